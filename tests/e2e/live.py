"""A live Airflow for end-to-end tests: PostgreSQL + the four Airflow services, a REST client, headless Chromium.

Fixtures in ``tests/e2e/conftest.py`` build on these. Services start with
``scripts/airflow_local.py`` (the same code as ``bash scripts/airflow.sh``),
listen on 127.0.0.1 only, run in their own process groups and die with the
test session.

Reuse, e.g. for a test that kills a task mid-shard::

    def test_x(live_airflow: LiveAirflow) -> None:
        run_id = live_airflow.trigger(live_airflow.conf("x", shard_size=60))
        live_airflow.wait_for_progress(run_id, lambda run: any(s.state == "running" for s in run.shards))
        ...                                    # find and kill the worker, e.g. via psutil
        live_airflow.api.wait_run(DAG_ID, run_id, {"success"})
        live_airflow.stack.restart("scheduler")  # or .stop(...) / .start(...) each service
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from airflow_local import (  # noqa: E402
    FINISHED,
    RUN_TIMEOUT_S,
    AirflowApi,
    AirflowStack,
    LocalPostgres,
    ServiceError,
    free_port,
    wait_for,
)
from airflow_client.client.api.task_instance_api import TaskInstanceApi  # noqa: E402

from cnn_features.plan import load_shards  # noqa: E402
from cnn_features.progress import run_folder  # noqa: E402
from cnn_features.progress_report import RunProgress, load_run  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["REPO", "AirflowApi", "Chromium", "LiveAirflow", "ServiceError", "free_port", "mid_shard", "shard_of", "stored_features", "wait_for", "workers_of"]

DAG_ID = "cnn_feature_extraction"
TRAINING_DAG_ID = "emotion_training"
# Seconds between looks while waiting to freeze shard workers: each look stops
# them for a moment, and a shard slowed by a test fault moves on a batch in
# about this time.
FREEZE_POLL_S = 0.2
# Seconds a stopped worker gets to have every thread stopped (one in a system
# call stops when the call returns).
STOP_SETTLE_S = 30.0

T = TypeVar("T")


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def workers_of(home: Path) -> list[int]:
    """Return the pids of shard workers serving the live stack whose data lives in ``home``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "cnn_features.worker" in cmdline and _environ(int(entry.name)).get("CNN_FEATURES_HOME") == str(home):
            pids.append(int(entry.name))
    return pids


def shard_of(worker: int) -> str | None:
    """Return the id of the shard a worker process runs (from the spec file on its command line), or None if it is gone."""
    try:
        args = Path(f"/proc/{worker}/cmdline").read_bytes().decode(errors="replace").split("\0")
        spec = Path(args[args.index("--spec") + 1])
        return str(json.loads(spec.read_text())["shard_id"])
    except (OSError, ValueError, IndexError, KeyError):
        return None


def stored_features(output: Path) -> int:
    """Return how many feature files lie in a local output (each is whole under its name, or absent)."""
    return sum(1 for _ in output.rglob("*.npy"))


def mid_shard(output: Path, *, at_least: int, total: int) -> Callable[[list[int]], int | None]:
    """Return a ``workers_frozen_when`` condition: how many features lie in ``output`` once at least ``at_least`` do; None before.

    The condition raises AssertionError when all ``total`` are there: the shard ended before it was caught mid-way.
    """

    def stored(_workers: list[int]) -> int | None:
        count = stored_features(output)
        if count >= total:
            msg = f"{output}: all {total} features stored before the shard was caught mid-way"
            raise AssertionError(msg)
        return count if count >= at_least else None

    return stored


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _all_threads_stopped(pid: int) -> bool:
    """Return whether every thread of ``pid`` is stopped (or gone): a SIGSTOP has taken hold."""
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return True
    for thread in threads:
        try:
            state = (thread / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # the thread ended
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def _stop(pids: list[int]) -> None:
    """SIGSTOP ``pids`` and return once each has stopped, so nothing they do can land after this returns."""
    _signal_all(pids, signal.SIGSTOP)
    wait_for(lambda: all(_all_threads_stopped(pid) for pid in pids), timeout_s=STOP_SETTLE_S,
             what=f"shard workers {pids} to stop", interval_s=0.01)


@dataclass
class LiveAirflow:
    """A running stack with its data: what end-to-end tests drive."""

    stack: AirflowStack
    postgres: LocalPostgres
    api: AirflowApi
    home: Path  # CNN_FEATURES_HOME of every Airflow process
    corpus: Path  # demo corpus: corpus/ravdess, corpus/crema_d
    counts: dict[str, int]

    def conf(self, name: str, *, datasets: tuple[str, ...] = ("ravdess", "crema_d"), **fields: Any) -> dict[str, Any]:
        """Return a run conf reading the demo corpus and writing under ``features/<name>/``."""
        return {
            "datasets": {d: {"input": str(self.corpus / d), "output": str(self.home / "features" / name / d)} for d in datasets},
            "device": "auto",
            "max_bad_fraction": 0.0,
            **fields,
        }

    def trigger(self, conf: dict[str, Any], *, note: str | None = None) -> str:
        """Trigger ``cnn_feature_extraction`` with ``conf``; return the run id."""
        return str(self.api.trigger(DAG_ID, conf, note=note)["dag_run_id"])

    def shard_files(self, run_id: str) -> dict[str, list[str]]:
        """Return each shard's files (relative to its dataset): plan_shards' XComs through the REST API, then the plan files they name."""
        entries = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/plan_shards/xcomEntries"
        refs, plans = (self._xcom(f"{entries}/{key}") for key in ("return_value", "plans"))
        return {s["shard_id"]: list(s["files"]) for s in load_shards(refs, plans)}

    def _xcom(self, path: str) -> Any:
        value = self.api.call("GET", path, params={"deserialize": True})["value"]
        return json.loads(value) if isinstance(value, str) else value

    def progress_folder(self, run_id: str) -> Path:
        """Return a run's progress-record folder."""
        return run_folder(self.home / "progress", run_id)

    def progress(self, run_id: str) -> RunProgress | None:
        """Return a run's progress from its records, or None before plan_shards wrote the plan."""
        folder = self.progress_folder(run_id)
        return load_run(folder) if (folder / "plan.json").is_file() else None

    def wait_for_progress(
        self, run_id: str, condition: Callable[[RunProgress], bool], *, timeout_s: float = RUN_TIMEOUT_S
    ) -> RunProgress:
        """Poll a run's progress records until ``condition`` holds; return that progress."""

        def check() -> RunProgress | None:
            run = self.progress(run_id)
            if run is not None and condition(run):
                return run
            state = self.api.run(DAG_ID, run_id)["state"]
            if state in FINISHED:
                msg = f"run {run_id} ended {state} before the awaited progress"
                raise ServiceError(msg)
            return None

        return wait_for(check, timeout_s=timeout_s, what=f"progress of {run_id}", interval_s=0.5)

    def tries(self, run_id: str, task_id: str, map_index: int) -> list[dict[str, Any]]:
        """Return every try of a mapped task instance, oldest first, as the task instance's try list in the UI shows them."""
        got = self.api._typed(TaskInstanceApi, "get_mapped_task_instance_tries", DAG_ID, run_id, task_id, map_index)
        return sorted(got["task_instances"], key=lambda t: t["try_number"])

    @contextlib.contextmanager
    def workers_frozen_when(self, run_id: str, condition: Callable[[list[int]], T | None], *, what: str,
                            timeout_s: float = RUN_TIMEOUT_S) -> Iterator[T]:
        """Stop (SIGSTOP) the run's shard workers at a moment ``condition`` holds; yield its value; resume them on exit.

        Each look stops every shard worker of this stack first and asks
        ``condition`` after, with their pids (e.g. it counts stored features,
        or reads progress records of the shards those workers run), and resumes them
        when it does not hold. So what the condition saw, a shard mid-way,
        stays so for the whole block, however slowly a loaded machine runs it:
        a kill in the block lands mid-shard for certain. Workers the block
        killed are simply gone on exit.

        Raises:
            ServiceError: the run ended, or ``timeout_s`` passed, before the condition held.
        """
        frozen: list[int] = []

        def look() -> T | None:
            pids = workers_of(self.home)
            if not pids:
                state = self.api.run(DAG_ID, run_id)["state"]
                if state in FINISHED:
                    msg = f"run {run_id} ended {state} before {what}"
                    raise ServiceError(msg)
                return None
            try:
                _stop(pids)
                value = condition(pids)
            except BaseException:
                _signal_all(pids, signal.SIGCONT)
                raise
            if value is None or value is False:
                _signal_all(pids, signal.SIGCONT)
                return None
            frozen.extend(pids)
            return value

        try:
            yield wait_for(look, timeout_s=timeout_s, what=what, interval_s=FREEZE_POLL_S)
        finally:
            _signal_all(frozen, signal.SIGCONT)

    @contextlib.contextmanager
    def scheduler_env(self, **extra: str) -> Iterator[None]:
        """Run the scheduler (and so every task it starts) with extra environment variables, then restore it."""
        self.stack.restart("scheduler", extra_env=extra)
        self.stack.wait_healthy()
        try:
            yield
        finally:
            self.stack.restart("scheduler")
            self.stack.wait_healthy()

    @contextlib.contextmanager
    def dag_paused(self, dag_id: str) -> Iterator[None]:
        """Pause a DAG for the block; on exit delete the runs that queued up meanwhile, and unpause it.

        For runs whose triggered follow-up (``emotion_training``) is not under
        test: it would otherwise keep the CPU busy, and a scheduler stopping
        meanwhile waits for its tasks.
        """

        def run_ids() -> dict[str, str]:
            runs = self.api.call("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 1000})["dag_runs"]
            return {r["dag_run_id"]: r["state"] for r in runs}

        before = set(run_ids())
        self.api.call("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": True})
        try:
            yield
        finally:
            for run_id, state in run_ids().items():
                if run_id not in before and state == "queued":
                    self.api.request("DELETE", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            self.api.call("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})

    def airflow_cli(self, *args: str, stdin: str = "", timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run an ``airflow`` CLI command against this stack's metadata DB."""
        return subprocess.run(["airflow", *args], env=self.stack.env, input=stdin, capture_output=True, text=True,
                              check=False, timeout=timeout_s)


def chromium_binary() -> str | None:
    """Return the headless-capable Chromium to use (``$CHROMIUM``, else Debian's ``chromium``), or None."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless Chromium driven over the DevTools protocol (one page, sequential commands)."""

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    )

    def __init__(self, binary: str, profile: Path, log_path: Path, *, width: int = 1280, height: int = 1000) -> None:
        from airflow_local import ManagedProcess

        profile.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.process = ManagedProcess(
            "chromium",
            [binary, *self.FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            env={**os.environ, "HOME": str(profile)},
            log_path=log_path,
        )
        self._ws: Any = None
        self._connection = contextlib.ExitStack()
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def start(self, *, timeout_s: float = 60.0) -> None:
        """Start the browser and attach to its page."""
        from websockets.sync.client import connect

        self.process.start()
        port_file = self.profile / "DevToolsActivePort"

        def port() -> int | None:
            if not self.process.alive:
                msg = f"chromium exited at start:\n{self.process.log_tail()}"
                raise ServiceError(msg)
            text = port_file.read_text() if port_file.is_file() else ""
            return int(text.split()[0]) if text.strip() else None

        devtools = wait_for(port, timeout_s=timeout_s, what="Chromium's DevTools port", interval_s=0.2)
        targets = httpx.get(f"http://127.0.0.1:{devtools}/json/list", timeout=10).json()
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = self._connection.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=30)
        )
        self.send("Page.enable")
        self.send("Network.enable")

    def send(self, method: str, *, timeout_s: float = 60.0, **params: Any) -> dict[str, Any]:
        """Send a DevTools command and return its result; events seen meanwhile are kept in ``events``."""
        self._next_id += 1
        ident = self._next_id
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            message = json.loads(self._ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("id") == ident:
                if "error" in message:
                    msg = f"{method}: {message['error']}"
                    raise ServiceError(msg)
                return dict(message.get("result", {}))
            if "method" in message:
                self.events.append(message)

    def set_cookie(self, name: str, value: str, url: str) -> None:
        """Set a cookie for ``url`` (e.g. the Airflow UI's session token)."""
        self.send("Network.setCookie", name=name, value=value, url=url, httpOnly=False)

    def navigate(self, url: str, *, timeout_s: float = 60.0) -> None:
        """Open ``url`` and wait for its load event."""
        self.events.clear()
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                msg = f"{url} did not finish loading in {timeout_s:.0f} s"
                raise ServiceError(msg)
            self.send("Runtime.evaluate", expression="1")

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its (JSON) value."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            msg = f"JavaScript error: {result['exceptionDetails']}"
            raise ServiceError(msg)
        return result["result"].get("value")

    def wait_for_js(self, expression: str, *, timeout_s: float = 60.0) -> Any:
        """Evaluate ``expression`` until it is truthy (e.g. a React page rendering); return its value.

        The value must be JSON (a string, a number, a list...): wrap an element in ``!!(...)``.
        """
        return wait_for(lambda: self.evaluate(expression) or None, timeout_s=timeout_s,
                        what=f"the page to satisfy {expression[:80]!r}", interval_s=0.5)

    def screenshot(self, path: Path, *, full_page: bool = True) -> Path:
        """Save a PNG screenshot of the page."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """Close the connection and stop the browser (its whole process group)."""
        from websockets.exceptions import WebSocketException

        with contextlib.suppress(WebSocketException, OSError):
            self._connection.close()
        self.process.stop(grace_s=5.0)
