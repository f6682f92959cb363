"""The progress page in headless Chromium, while a run is in progress and after it, against the real counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from cnn_features.progress_report import RunProgress
from tests.e2e.live import DAG_ID, REPO, TRAINING_DAG_ID, Chromium, LiveAirflow, shard_of

pytestmark = pytest.mark.e2e

# Files per shard: 180 RAVDESS clips make 3 shards.
SHARD_SIZE = 60
# Seconds each worker sleeps per batch of 8 (test fault): a 60-file shard then
# takes about 8 s beyond its start-up, so the test's looks (which freeze the
# workers) find one shard done and another mid-way.
SLOW_S = "1.0"
# Collects what the page shows: each shard row's data attributes and visible cells.
READ_PAGE = """(() => {
  const rows = [...document.querySelectorAll('tr.shard')].map(r => ({
    ...r.dataset, cells: [...r.querySelectorAll('td')].map(td => td.innerText.trim())}));
  const files = document.getElementById('run-files');
  return {rows, run: {state: document.getElementById('run-state').dataset.state,
                      done: +files.dataset.done, total: +files.dataset.total,
                      eta: document.getElementById('run-eta').innerText, rate: document.getElementById('run-rate').innerText},
          series: document.querySelectorAll('#throughput-chart polyline.series').length,
          gpu: {usable: document.getElementById('run-gpu').dataset.usable, text: document.getElementById('run-gpu').innerText},
          plots: [...document.querySelectorAll('.plots img')].map(i => ({src: i.getAttribute('src'), width: i.naturalWidth}))};
})()"""


def on_disk(output: Path, files: list[str]) -> int:
    """Return how many of a shard's files have a feature file."""
    return sum((output / f).is_file() for f in files)


def open_page(browser: Chromium, live: LiveAirflow, run_id: str) -> dict[str, Any]:
    """Log the browser in (the UI's session cookie) and read the run's progress page."""
    browser.set_cookie("_token", live.api.token(), live.stack.url)
    browser.navigate(f"{live.stack.url}/cnn-progress/runs/{quote(run_id, safe='')}")
    return browser.evaluate(READ_PAGE)


def test_progress_page_needs_a_login(live_airflow: LiveAirflow) -> None:
    """Without a session the page sends a browser to the Airflow login, and the JSON API answers 401."""
    url = live_airflow.stack.url
    page = httpx.get(f"{url}/cnn-progress/", headers={"Accept": "text/html"}, follow_redirects=False, timeout=30)
    assert page.status_code == 303 and "/auth/login" in page.headers["location"]
    assert httpx.get(f"{url}/cnn-progress/api/runs", timeout=30).status_code == 401
    plugins = live_airflow.api.call("GET", "/api/v2/plugins")["plugins"]
    ours = next(p for p in plugins if p["name"] == "cnn_progress")
    assert {v["destination"] for v in ours["external_views"]} == {"nav", "dag_run"}
    assert ours["fastapi_apps"][0]["url_prefix"] == "/cnn-progress"


# Serves the plugin as the API server does (mounted under JWTRefreshMiddleware)
# with an auth manager whose UI session is refreshed, and whose DAG belongs to a
# team; prints the status, whether a new cookie came back, and what was asked.
_REFRESHED_SESSION = """
import json, sys
from fastapi import FastAPI
from fastapi.testclient import TestClient
from airflow.api_fastapi import app as api_app
from airflow.api_fastapi.auth.middlewares.refresh_token import JWTRefreshMiddleware
from airflow.models.dag import DagModel
import cnn_progress_plugin

class User:
    def __init__(self, name, refreshed):
        self.name, self.refreshed = name, refreshed
    def get_id(self):
        return self.name
    def get_name(self):
        return self.name

class AuthManager:
    asked = []
    async def get_user_from_token(self, token):
        return User("alice", refreshed=False)
    def refresh_user(self, *, user):
        return User(user.name, refreshed=True)  # e.g. the identity provider's session renewed
    def generate_jwt(self, user, **kwargs):
        return "renewed-token"
    def is_authorized_dag(self, *, method, access_entity=None, details=None, user=None):
        self.asked.append([method, str(access_entity), details.id, details.team_name, user.refreshed])
        return user.refreshed and details.team_name == "speech-team"

am = AuthManager()
api_app._AuthManagerState.instance = am
DagModel.get_team_name = staticmethod(lambda dag_id, **kw: "speech-team")
cnn_progress_plugin.dag_runs = lambda: {}
root = FastAPI()
root.add_middleware(JWTRefreshMiddleware)
root.mount("/cnn-progress", cnn_progress_plugin.create_app())
client = TestClient(root)
got = client.get("/cnn-progress/api/runs/no-such-run", cookies={"_token": "old-session-token"})
print(json.dumps({"status": got.status_code, "cookie": got.cookies.get("_token"), "asked": am.asked}))
"""


def test_plugin_uses_airflows_access_check_with_refresh_and_team(tmp_path: Path) -> None:
    """A UI session the auth manager refreshes is let through with a new cookie, and the DAG's team is asked about."""
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "CNN_FEATURES_HOME": str(tmp_path / "data"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run([sys.executable, "-c", _REFRESHED_SESSION], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["asked"] == [["GET", "DagAccessEntity.RUN", DAG_ID, "speech-team", True]]
    assert seen["status"] == 404 and seen["cookie"] == "renewed-token"  # past the check: the run just has no records


def test_progress_page_shows_a_run_in_progress(live_airflow: LiveAirflow, chromium: Chromium, artifacts: Path) -> None:
    """Mid-run the page shows every shard with done/total between the records before and the files after, device and rate; then the plots."""
    live = live_airflow
    conf = live.conf("page", datasets=("ravdess",), shard_size=SHARD_SIZE)
    output = Path(conf["datasets"]["ravdess"]["output"])
    with live.dag_paused(TRAINING_DAG_ID), live.scheduler_env(CNN_FEATURES_TEST_FAULT=f"slow={SLOW_S}"):
        run_id = live.trigger(conf)

        def mid_run(workers: list[int]) -> RunProgress | None:
            """Return the progress once a shard is done and another, whose worker is frozen, is mid-way."""
            run = live.progress(run_id)
            if run is None or not any(s.state == "success" for s in run.shards):
                return None
            frozen = {shard_of(pid) for pid in workers}
            return run if any(s.state == "running" and s.done > 0 and s.shard_id in frozen for s in run.shards) else None

        # The shard workers stay stopped while the page loads: the shard seen mid-way is still mid-way on the page.
        with live.workers_frozen_when(run_id, mid_run, what="a shard done and another mid-way") as before:
            shown = open_page(chromium, live, run_id)
            after = live.progress(run_id)
            chromium.screenshot(artifacts / "progress-page-running.png")
        files = live.shard_files(run_id)
        disk = {sid: on_disk(output, fs) for sid, fs in files.items()}
        terminal = subprocess.run([sys.executable, "-m", "cnn_features", "progress", run_id],
                                  env={**live.stack.env}, capture_output=True, text=True, check=False, timeout=60)

        assert after is not None
        rows = {r["shardId"]: r for r in shown["rows"]}
        assert [r["label"] for r in shown["rows"]] == ["ravdess 1/3", "ravdess 2/3", "ravdess 3/3"]
        assert {sid: int(r["total"]) for sid, r in rows.items()} == {sid: len(fs) for sid, fs in files.items()}
        earlier = {s.shard_id: s for s in before.shards}
        later = {s.shard_id: s for s in after.shards}
        for sid, row in rows.items():
            done = int(row["done"])
            assert earlier[sid].done <= done <= later[sid].done <= disk[sid], (sid, row, disk)
            assert row["cells"][2] == f"{done} / {row['total']}"
        finished = [r for r in shown["rows"] if r["state"] == "success"]
        running = [r for r in shown["rows"] if r["state"] == "running" and int(r["done"]) > 0]
        assert finished and running, shown["rows"]
        for row in finished:
            assert int(row["done"]) == int(row["total"]) == disk[row["shardId"]]
        for row in running:
            assert row["device"] == "cpu" and row["cells"][6].startswith("CPU")
            assert float(row["filesPerS"]) > 0 and row["cells"][8] != "-"
        assert shown["run"]["state"] == "running" and shown["run"]["total"] == live.counts["ravdess"]
        assert shown["run"]["done"] == sum(int(r["done"]) for r in shown["rows"])
        assert shown["series"] >= 1 and shown["run"]["eta"] != "-"
        assert terminal.returncode == 0, terminal.stderr
        assert "ravdess 1/3" in terminal.stdout and "success" in terminal.stdout
        # probe_gpu's report reached the page and the terminal: usable or not, never "not probed yet".
        assert shown["gpu"]["usable"] in ("yes", "no") and shown["gpu"]["text"].startswith("GPU: "), shown["gpu"]
        assert "GPU: " in terminal.stdout and "GPU: not probed yet" not in terminal.stdout

        assert live.api.wait_run(DAG_ID, run_id)["state"] == "success"
        done = open_page(chromium, live, run_id)
        chromium.screenshot(artifacts / "progress-page-done.png")
    assert done["run"]["state"] == "success" and done["run"]["done"] == done["run"]["total"] == live.counts["ravdess"]
    assert all(r["state"] == "success" and r["done"] == r["total"] for r in done["rows"])
    assert [p["src"].rsplit("/", 1)[-1] for p in done["plots"]] == ["pca.png", "throughput.png"]
    assert all(p["width"] > 300 for p in done["plots"]), done["plots"]
