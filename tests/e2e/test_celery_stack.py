"""The CeleryExecutor stack on loopback: PostgreSQL, Redis, the Airflow services, a CPU and a GPU Celery worker.

The stack is what ``bash scripts/airflow.sh --celery`` starts (the same
``AirflowStack`` and service table), with shorter task heartbeat timeouts so
a lost worker is noticed in seconds. Both workers share this machine and the
data folder; the "GPU" worker has no GPU here, so its shards fall back to CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cnn_features.demo import generate
from cnn_features.storage import check_feature_file
from tests.e2e.live import DAG_ID, REPO, LiveAirflow, mid_shard, wait_for, workers_of

from airflow_local import (  # scripts/ is on sys.path through tests.e2e.live
    ADMIN_USER,
    FINISHED,
    RUN_TIMEOUT_S,
    AirflowApi,
    AirflowStack,
    LocalPostgres,
    LocalRedis,
    PostgresUnavailable,
    RedisUnavailable,
    ServiceError,
    airflow_env,
    descendants,
    free_port,
    postgres_bindir,
    redis_server_binary,
)

pytestmark = pytest.mark.e2e

FRAMES = 48
# Each shard worker sleeps this long after each batch of 8 (CNN_FEATURES_TEST_FAULT=slow)
# in the worker-kill test, so the test's looks (which freeze the worker) catch it mid-shard.
SLOW_S = "0.3"
# Features the killed try has stored, at least, when its Celery worker is killed:
# two batches, so its retry has some to keep.
KILL_AFTER_FILES = 16
# The scheduler's log entry for a task it could not hand to the broker: the exception, then the task instance's key.
SEND_FAILED = re.compile(
    r"Error sending Celery workload: (?s:.*?)\nCelery Task ID: TaskInstanceKey\(dag_id='(?P<dag_id>[^']*)', "
    r"task_id='(?P<task_id>[^']*)', run_id='(?P<run_id>[^']*)', try_number=(?P<try_number>\d+), map_index=(?P<map_index>-?\d+)\)"
)
# Seconds without a task heartbeat before the scheduler fails the try (default 300),
# and how often it looks (default 10): a killed worker's shard is retried within a minute.
HEARTBEAT_TIMEOUT_S = "20"
HEARTBEAT_CHECK_S = "5"
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def celery_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAirflow]:
    """The Celery stack with a demo corpus, stopped after this module, also on failure."""
    try:
        postgres_bindir()
        redis_server_binary()
    except (PostgresUnavailable, RedisUnavailable) as exc:
        pytest.skip(f"{exc}; the README test command (bash scripts/test.sh) installs it")
    root = tmp_path_factory.mktemp("celery")
    pg_root = Path(tempfile.mkdtemp(prefix="cnn-e2e-celery-pg-", dir="/tmp"))  # reachable by user postgres
    home = root / "data"
    counts = generate(home / "demo", frames=FRAMES)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CNN_FEATURES_"))}
    base.update({
        "CNN_FEATURES_HOME": str(home),
        "CNN_FEATURES_BATCH_SIZE": "8",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": HEARTBEAT_TIMEOUT_S,
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": HEARTBEAT_CHECK_S,
    })
    postgres = LocalPostgres(pg_root, durable=False)
    redis = LocalRedis(root / "redis")
    stack: AirflowStack | None = None
    api: AirflowApi | None = None
    try:
        db_url = postgres.start()
        broker_url = redis.start()
        stack = AirflowStack(airflow_env(home=root / "airflow", port=free_port(), base=base, db_url=db_url, broker_url=broker_url))
        stack.redis = redis
        stack.migrate()
        stack.start_all()
        stack.wait_healthy()
        api = AirflowApi(stack.url, ADMIN_USER, stack.admin_password())
        live = LiveAirflow(stack=stack, postgres=postgres, api=api, home=home, corpus=home / "demo", counts=counts)
        wait_for(lambda: api.request("GET", f"/api/v2/dags/{DAG_ID}").status_code == 200,
                 timeout_s=300, what="the extraction DAG to be parsed", interval_s=2.0)
        api.call("PATCH", "/api/v2/dags/emotion_training", json={"is_paused": True})  # training is not under test here
        yield live
    except ServiceError as exc:
        logs = "\n".join(f"--- {name}:\n{p.log_tail(30)}" for name, p in (stack.processes.items() if stack else []))
        pytest.fail(f"Celery stack failed: {exc}\n{logs}")
    finally:
        if api is not None:
            api.close()
        if stack is not None:
            stack.stop_all()
        redis.stop()
        postgres.stop()
        shutil.rmtree(pg_root, ignore_errors=True)


def test_documented_celery_command_starts_the_stack_and_stops_it_all_on_ctrl_c(tmp_path: Path) -> None:
    """`airflow_local.py --celery` (`bash scripts/airflow.sh --celery`) starts both workers on a loopback Redis with a password; Ctrl-C stops all."""
    try:
        postgres_bindir()
        redis_server_binary()
    except (PostgresUnavailable, RedisUnavailable) as exc:
        pytest.skip(f"{exc}; the README test command (bash scripts/test.sh) installs it")
    pg_root = Path(tempfile.mkdtemp(prefix="cnn-e2e-celery-cmd-pg-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CNN_FEATURES_"))}
    env.update({"AIRFLOW_HOME": str(tmp_path / "airflow"), "CNN_FEATURES_HOME": str(tmp_path / "data"),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})
    port = free_port()
    out = tmp_path / "airflow_local.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "airflow_local.py"), "--celery", "--port", str(port), "--pg-root", str(pg_root)],
            env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    pids: list[int] = []
    try:
        wait_for(lambda: "Press Ctrl-C" in out.read_text() or proc.poll() is not None, timeout_s=400,
                 what="the documented command to start the Celery stack")
        text = out.read_text()
        assert proc.poll() is None, text[-3000:]
        assert f"Airflow is up on http://127.0.0.1:{port} (PostgreSQL metadata DB, CeleryExecutor, Redis broker on 127.0.0.1:" in text
        assert f"worker:         cpu@{HOST} on queues default\n" in text
        assert f"worker:         gpu@{HOST} on queues default, gpu\n" in text
        redis_dir = tmp_path / "airflow" / "redis"
        password = (redis_dir / "password").read_text().strip()
        assert password not in text
        for secret in (redis_dir / "password", redis_dir / "redis.conf"):
            assert secret.stat().st_mode & 0o077 == 0, secret
        conf = (redis_dir / "redis.conf").read_text()
        assert "bind 127.0.0.1\n" in conf and f"requirepass {password}\n" in conf
        pids = [int(m) for m in re.findall(r"started \(pid (\d+)\)", out.read_text())]
        assert len(pids) == 8  # PostgreSQL, Redis, the four Airflow services, two workers
        for pid in pids:
            assert password not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(pg_root, ignore_errors=True)
    assert proc.returncode == 0, out.read_text()[-3000:]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def _results(live: LiveAirflow, run_id: str, task_id: str, conf: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the result of every mapped instance of ``task_id`` in a run: its XCom names the shard, whose
    whole result lies in the output's ``_shards/<id>.json``."""
    out = []
    for ti in live.api.mapped(DAG_ID, run_id, task_id):
        path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        shard_id = live.api.call("GET", path, params={"map_index": ti["map_index"], "deserialize": True})["value"]
        dataset = next(name for name in conf["datasets"] if shard_id.startswith(f"{name}-"))
        out.append(json.loads((Path(conf["datasets"][dataset]["output"]) / "_shards" / f"{shard_id}.json").read_text()))
    return out


def _all_features_valid(live: LiveAirflow, conf: dict[str, Any]) -> None:
    for name, dataset in conf["datasets"].items():
        features = sorted(Path(dataset["output"]).rglob("*.npy"))
        assert len(features) == live.counts[name], name
        assert all(check_feature_file(p, feature_dim=256) is None for p in features), name


def test_shards_run_on_the_gpu_worker_and_results_name_it(celery_live: LiveAirflow) -> None:
    """With a live GPU worker every shard runs on the GPU queue, and each result names gpu@host and queue gpu."""
    live = celery_live
    assert set(live.stack.workers()) == {f"cpu@{HOST}", f"gpu@{HOST}"}
    conf = live.conf("celery_gpu", datasets=("ravdess",), shard_size=100)
    run_id = live.trigger(conf)
    assert live.api.wait_run(DAG_ID, run_id)["state"] == "success"
    results = _results(live, run_id, "extract_shard_gpu", conf)
    assert len(results) == 2
    hosts = {ti["hostname"] for ti in live.api.mapped(DAG_ID, run_id, "extract_shard_gpu")}
    assert {(r["worker"]["celery_worker"], r["worker"]["queue"], r["worker"]["hostname"]) for r in results} == {
        (f"gpu@{HOST}", "gpu", *hosts)
    }
    assert all(r["device"] == "cpu" for r in results)  # no GPU here: the GPU try fell back to CPU
    assert live.api.mapped(DAG_ID, run_id, "extract_shard") == []
    _all_features_valid(live, conf)


def test_without_a_gpu_worker_the_run_completes_on_cpu_workers(celery_live: LiveAirflow) -> None:
    """With the GPU worker stopped, no shard waits for it: all go to the default queue and the CPU worker runs them."""
    live = celery_live
    live.stack.stop("worker-gpu", grace_s=60)
    try:
        wait_for(lambda: set(live.stack.workers()) == {f"cpu@{HOST}"} or None, timeout_s=60, what="only the CPU worker live")
        conf = live.conf("celery_cpu", datasets=("ravdess",), shard_size=100)
        run_id = live.trigger(conf)
        assert live.api.wait_run(DAG_ID, run_id)["state"] == "success"
        results = _results(live, run_id, "extract_shard", conf)
        assert len(results) == 2
        assert {(r["worker"]["celery_worker"], r["worker"]["queue"]) for r in results} == {(f"cpu@{HOST}", "default")}
        _all_features_valid(live, conf)
    finally:
        live.stack.start("worker-gpu")
        live.stack.wait_healthy()


def _celery_worker_running(live: LiveAirflow, shard_worker: int) -> str:
    """Return the stack service (worker-cpu or worker-gpu) whose process tree holds ``shard_worker``."""
    for name in ("worker-cpu", "worker-gpu"):
        process = live.stack.processes[name]
        if process.pid is not None and shard_worker in descendants(process.pid):
            return name
    msg = f"shard worker {shard_worker} belongs to no Celery worker"
    raise AssertionError(msg)


def test_celery_worker_killed_mid_shard_is_retried_on_the_other_worker(celery_live: LiveAirflow) -> None:
    """SIGKILL a Celery worker and everything under it mid-shard: the shard's try times out and its retry runs on the other worker."""
    live = celery_live
    # Both workers serve the default queue; without a GPU queue the shards go there, so either may run them.
    for name in ("worker-cpu", "worker-gpu"):
        live.stack.restart(name, extra_env={"CNN_FEATURES_GPU_QUEUE": "", "CNN_FEATURES_TEST_FAULT": f"slow={SLOW_S}"}, grace_s=60)
    live.stack.wait_healthy()
    killed = ""
    try:
        conf = live.conf("celery_kill", datasets=("ravdess",), shard_size=1000)
        out = Path(conf["datasets"]["ravdess"]["output"])
        run_id = live.trigger(conf)
        caught = mid_shard(out, at_least=KILL_AFTER_FILES, total=live.counts["ravdess"])
        with live.workers_frozen_when(run_id, caught, what="the shard mid-way"):
            (shard_worker,) = workers_of(live.home)
            killed = _celery_worker_running(live, shard_worker)
            process = live.stack.processes[killed]
            assert process.pid is not None
            tree = descendants(process.pid) | {process.pid}
            for pid in tree:  # the whole host goes: worker, its pool, the task supervisor and the shard worker
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        survivor = "gpu" if killed == "worker-cpu" else "cpu"
        run = live.api.wait_run(DAG_ID, run_id)
        assert run["state"] == "success"
        (ti,) = live.api.mapped(DAG_ID, run_id, "extract_shard")
        assert ti["try_number"] >= 2
        (result,) = _results(live, run_id, "extract_shard", conf)
        assert result["worker"]["celery_worker"] == f"{survivor}@{HOST}"
        assert result["skipped_existing"] > 0  # the retry kept what the killed try had written
        _all_features_valid(live, conf)
    finally:
        for name in ("worker-cpu", "worker-gpu"):
            live.stack.restart(name, grace_s=60)
        live.stack.wait_healthy()


def _failed_sends(scheduler_log: Path, offset: int, run_id: str) -> set[tuple[str, int, int]]:
    """Return ``(task_id, map_index, try_number)`` of each task of ``run_id`` the scheduler logged it could not send,
    reading its log from byte ``offset`` on."""
    with open(scheduler_log, "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode(errors="replace")
    return {(m["task_id"], int(m["map_index"]), int(m["try_number"]))
            for m in SEND_FAILED.finditer(text) if m["dag_id"] == DAG_ID and m["run_id"] == run_id}


def test_broker_restart_mid_run_costs_one_try_per_unsent_task_and_the_run_completes(celery_live: LiveAirflow) -> None:
    """Redis down mid-run until the scheduler fails to send a shard: the running shard goes on, each failed send costs its
    shard one try that never ran and no other try is lost; Redis back, the retries run and the run succeeds."""
    live = celery_live
    redis = live.stack.redis
    assert redis is not None
    scheduler_log = live.stack.processes["scheduler"].log_path
    conf = live.conf("celery_broker", datasets=("ravdess",), shard_size=50)
    run_id = live.trigger(conf)
    # 4 shards, sent one per GPU pool slot (one per GPU, one here): while one runs, those pending are not sent yet.
    live.wait_for_progress(run_id, lambda run: any(s.state == "running" for s in run.shards)
                           and sum(s.state == "pending" for s in run.shards) >= 2)
    offset = scheduler_log.stat().st_size
    redis.stop()
    try:
        wait_for(lambda: live.stack.workers() == {} or None, timeout_s=120, what="the broker to be gone")
        states = {ti["map_index"]: ti["state"] for ti in live.api.mapped(DAG_ID, run_id, "extract_shard_gpu")}
        assert any(state in (None, "scheduled") for state in states.values()), f"every shard was sent before Redis stopped: {states}"

        def sent_in_vain() -> set[tuple[str, int, int]] | None:
            if sends := _failed_sends(scheduler_log, offset, run_id):
                return sends
            if (state := live.api.run(DAG_ID, run_id)["state"]) in FINISHED:
                msg = f"run {run_id} ended {state} while Redis was down, without a failed send"
                raise AssertionError(msg)
            return None

        # Redis stays down until a send has failed, however long the running shard takes to finish on a busy machine.
        wait_for(sent_in_vain, timeout_s=RUN_TIMEOUT_S, what="the scheduler to fail sending a shard to the stopped Redis")
    finally:
        redis.start()
    run = live.api.wait_run(DAG_ID, run_id)
    assert run["state"] == "success"
    sends = _failed_sends(scheduler_log, offset, run_id)
    assert sends and {task for task, _, _ in sends} == {"extract_shard_gpu"}, sends
    for ti in live.api.mapped(DAG_ID, run_id, "extract_shard_gpu"):
        failed = sorted(tried for _, index, tried in sends if index == ti["map_index"])
        # Every try before the last went on a failed send, one each; the shard running meanwhile kept its first try.
        assert ti["state"] == "success" and failed == list(range(1, ti["try_number"])), (ti, failed)
        # No try ran and failed: a try lost to a failed send never started, and leaves no entry in the try history.
        assert [t["try_number"] for t in live.tries(run_id, "extract_shard_gpu", ti["map_index"])] == [ti["try_number"]]
    wait_for(lambda: set(live.stack.workers()) == {f"cpu@{HOST}", f"gpu@{HOST}"} or None, timeout_s=300,
             what="both workers back on the broker")
    _all_features_valid(live, conf)


def test_workers_with_their_own_data_folders_share_progress_and_the_model_travels_with_the_output(celery_live: LiveAirflow) -> None:
    """Each Celery worker gets its own CNN_FEATURES_HOME, as on its own host, and the API server keeps another; corpus,
    outputs and progress records are in the folder they share (CNN_FEATURES_PROGRESS_ROOT). The run completes, the
    progress page (API server) shows every shard done with its plots, and each output holds the model copy any worker
    without the file fetches. On one machine every worker can still see the planner's model path, so fetching the copy
    is proven at the worker level (tests/include/test_lineage.py), not here."""
    live = celery_live
    shared = live.home
    homes = {name: Path(tempfile.mkdtemp(prefix=f"cnn-e2e-{name}-home-")) for name in ("worker-cpu", "worker-gpu")}
    for name, home in homes.items():
        live.stack.restart(
            name,
            extra_env={
                "CNN_FEATURES_HOME": str(home),
                "CNN_FEATURES_PROGRESS_ROOT": str(shared / "progress"),
                "CNN_FEATURES_ALLOWED_ROOTS": str(shared),
            },
            grace_s=60,
        )
    live.stack.wait_healthy()
    try:
        conf = live.conf("celery_hosts", datasets=("ravdess",), shard_size=100)
        run_id = live.trigger(conf)
        assert live.api.wait_run(DAG_ID, run_id)["state"] == "success"
        _all_features_valid(live, conf)
        page = live.api.call("GET", f"/cnn-progress/api/runs/{run_id}")
        assert page["state"] == "success" and page["done"] == page["total"] == live.counts["ravdess"]
        (dataset,) = page["datasets"]
        assert {s["state"] for s in dataset["shards"]} == {"success"} and len(dataset["shards"]) == 2
        assert page["plots"]
        planners = [name for name, home in homes.items() if (home / "models" / "reference_cnn_v2.keras").is_file()]
        assert len(planners) == 1  # the worker that ran plan_shards built the reference model in its own folder
        copies = list((Path(conf["datasets"]["ravdess"]["output"]) / "_models").glob("*.keras"))
        assert [c.read_bytes() for c in copies] == [(homes[planners[0]] / "models" / "reference_cnn_v2.keras").read_bytes()]
        assert not any((home / "progress").exists() for home in homes.values())  # no record stranded on a worker
    finally:
        for name in homes:
            live.stack.restart(name, grace_s=60)
        live.stack.wait_healthy()
        for home in homes.values():
            shutil.rmtree(home, ignore_errors=True)
