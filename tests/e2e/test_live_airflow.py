"""cnn_feature_extraction on a running Airflow (PostgreSQL, LocalExecutor), driven through the REST API as the UI does.

One run fails one shard for a real reason (a feature folder that refuses
writes), is repaired and cleared at that one mapped instance, and completes;
another survives a scheduler restart in the middle.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest

from cnn_features.demo import generate
from tests.conftest import read_only
from tests.e2e.conftest import FRAMES
from tests.e2e.live import DAG_ID, REPO, TRAINING_DAG_ID, AirflowApi, Chromium, LiveAirflow, free_port, wait_for

pytestmark = pytest.mark.e2e

# Files per shard: the demo corpus (180 RAVDESS + 288 CREMA-D clips) makes 2 + 3 shards.
SHARD_SIZE = 100
# The RAVDESS actor whose feature folder refuses writes: its files are in shard 2 of 2.
BROKEN_ACTOR = "Actor_09"
PARAMS = ("datasets", "device", "shard_size", "model_path", "aws_conn_id", "max_bad_fraction")
# What the trigger form must show for each Param: its title and the start of its description.
FORM_TEXT = {
    "Datasets": "Each dataset's spectrogram folder and feature folder",
    "Device": "auto: GPU if the probe found a usable one, else CPU.",
    "Shard size": "Files per extract_shard task.",
    "Model (.keras)": "Absolute path of your own feature model",
    "AWS connection": "Airflow connection with the S3 keys",
    "Max bad fraction": "Share of unusable input files tolerated per dataset",
}
# The dialog of the UI's Clear button on a task instance page (Shift+C).
CLEAR_BUTTON = "[...document.querySelectorAll('button')].find(b => b.getAttribute('aria-label') === 'Press shift+c to clear')"
DIALOG_TEXT = "[...document.querySelectorAll('[role=dialog]')].map(d => d.innerText).find(t => /{}/.test(t))"


def feature_mtimes(live: LiveAirflow, name: str) -> dict[str, int]:
    """Return every feature file (relative to features/<name>) and its mtime in ns."""
    root = live.home / "features" / name
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*.npy")}


def states(tis: list[dict[str, Any]]) -> dict[tuple[str, str | None], str]:
    """Return {(task_id, rendered map index): state} of a run's task instances."""
    return {(t["task_id"], t.get("rendered_map_index")): t["state"] for t in tis}


@pytest.fixture(scope="module")
def failed_run(live_airflow: LiveAirflow) -> Iterator[dict[str, Any]]:
    """A run whose RAVDESS shard 2/2 cannot write its features, polled like the grid until the run fails."""
    live = live_airflow
    conf = live.conf("rerun", shard_size=SHARD_SIZE)
    broken = Path(conf["datasets"]["ravdess"]["output"]) / BROKEN_ACTOR
    polls: list[dict[str, Any]] = []
    with read_only(broken):
        triggered = live.api.trigger(DAG_ID, conf, note="e2e: one shard cannot write")
        run_id = triggered["dag_run_id"]

        def poll(run: dict[str, Any]) -> None:
            grid = live.api.grid_summary(DAG_ID, run_id) if run["state"] != "queued" else {"task_instances": []}
            mapped = live.api.mapped(DAG_ID, run_id, "extract_shard") if grid["task_instances"] else []
            polls.append({"run_state": run["state"], "grid": grid, "mapped": mapped})

        finished = live.api.wait_run(DAG_ID, run_id, on_poll=poll)
        tis = live.api.task_instances(DAG_ID, run_id)
    yield {"live": live, "conf": conf, "triggered": triggered, "run_id": run_id, "finished": finished, "tis": tis,
           "polls": polls}


def test_documented_command_runs_the_dag_on_sqlite_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """`scripts/airflow_local.py` (what `bash scripts/airflow.sh` runs) serves the four services on SQLite; a run succeeds; Ctrl-C stops them all."""
    home = tmp_path / "data"
    generate(home / "demo", frames=FRAMES)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CNN_FEATURES_"))}
    env.update({"AIRFLOW_HOME": str(tmp_path / "airflow"), "CNN_FEATURES_HOME": str(home),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})
    port = free_port()
    out = tmp_path / "airflow_local.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "airflow_local.py"), "--port", str(port)],
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "Press Ctrl-C" in out.read_text() or proc.poll() is not None, timeout_s=300,
                 what="the documented command to start Airflow")
        text = out.read_text()
        assert proc.poll() is None, text[-3000:]
        assert f"Airflow is up on http://127.0.0.1:{port} (SQLite metadata DB, LocalExecutor)" in text
        password = json.loads((tmp_path / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        assert password not in text
        api = AirflowApi(f"http://127.0.0.1:{port}", "admin", password)
        wait_for(lambda: all(api.request("GET", f"/api/v2/dags/{d}").status_code == 200 for d in (DAG_ID, TRAINING_DAG_ID)),
                 timeout_s=300, what="the DAGs to be parsed", interval_s=2.0)
        api.call("PATCH", f"/api/v2/dags/{TRAINING_DAG_ID}", json={"is_paused": True})  # not under test here
        run = api.trigger(DAG_ID, {"shard_size": 200})
        assert api.wait_run(DAG_ID, run["dag_run_id"])["state"] == "success"
        api.close()
        pids = [int(m) for m in re.findall(r"started \(pid (\d+)\)", out.read_text())]
        assert len(pids) == 4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out.read_text()[-3000:]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_login_needs_the_documented_credentials(live_airflow: LiveAirflow) -> None:
    """The API refuses anonymous calls and a wrong password; user admin with the generated password gets a token."""
    client = live_airflow.api._client
    url = live_airflow.stack.url
    assert client.get(f"{url}/api/v2/dags").status_code == 401
    wrong = client.post(f"{url}/auth/token", json={"username": "admin", "password": "admin"})
    assert wrong.status_code == 401
    password = json.loads(live_airflow.stack.passwords_file.read_text())["admin"]
    good = client.post(f"{url}/auth/token", json={"username": "admin", "password": password})
    assert good.status_code == 201 and good.json()["access_token"]
    assert live_airflow.stack.passwords_file.stat().st_mode & 0o077 == 0


def test_trigger_form_shows_typed_params_with_titles(live_airflow: LiveAirflow) -> None:
    """The trigger form's source (DAG details) has every Param typed, with a title and a description."""
    details = live_airflow.api.call("GET", f"/api/v2/dags/{DAG_ID}/details")
    params = details["params"]
    assert set(params) == set(PARAMS)
    for name in PARAMS:
        schema = params[name]["schema"]
        assert schema.get("title"), name
        assert params[name].get("description") or schema.get("description"), name
        assert "type" in schema or "enum" in schema, name
    assert params["shard_size"]["schema"]["type"] == "integer" and params["shard_size"]["schema"]["minimum"] == 1
    assert params["device"]["schema"]["enum"] == ["auto", "gpu", "cpu"]


def test_trigger_form_in_the_ui_explains_every_param(live_airflow: LiveAirflow, chromium: Chromium, artifacts: Path) -> None:
    """In Chromium, the DAG page's Trigger button opens a form showing each Param's title and description."""
    chromium.set_cookie("_token", live_airflow.api.token(), live_airflow.stack.url)
    chromium.navigate(f"{live_airflow.stack.url}/dags/{DAG_ID}")
    trigger = "[...document.querySelectorAll('button')].find(b => b.getAttribute('aria-label') === 'Trigger Dag')"
    chromium.wait_for_js(f"!!{trigger}")
    chromium.evaluate(f"{trigger}.click()")
    form = chromium.wait_for_js(DIALOG_TEXT.format("Run Parameters") + " || null")
    chromium.wait_for_js(DIALOG_TEXT.format("Max bad fraction") + " || null")
    chromium.screenshot(artifacts / "trigger-form.png", full_page=False)
    form = chromium.evaluate(DIALOG_TEXT.format("Run Parameters"))
    assert f"Trigger Dag - {DAG_ID}" in form
    for title, description in FORM_TEXT.items():
        assert title in form and description in form, (title, form[:3000])


def test_trigger_through_the_rest_api_keeps_the_conf(failed_run: dict[str, Any]) -> None:
    """A run triggered with POST /api/v2/dags/.../dagRuns is a manual run carrying exactly the conf sent."""
    run = failed_run["live"].api.run(DAG_ID, failed_run["run_id"])
    assert run["run_type"] == "manual"
    assert run["conf"] == failed_run["conf"] == failed_run["triggered"]["conf"]
    assert run["note"] == "e2e: one shard cannot write"


def test_grid_polling_shows_each_shard_by_its_readable_name(failed_run: dict[str, Any]) -> None:
    """Polled like the grid, the run shows one extract_shard box with a mapped instance per shard, named 'ravdess 2/2'."""
    polls = failed_run["polls"]
    live_polls = [p for p in polls if p["run_state"] == "running" and p["mapped"]]
    assert live_polls, "never saw the run running with its mapped shards"
    assert any(m["state"] in ("running", "up_for_retry") for p in live_polls for m in p["mapped"]), \
        "never caught a shard in progress"
    names = {m["map_index"]: m["rendered_map_index"] for m in polls[-1]["mapped"]}
    assert sorted(names.values()) == ["crema_d 1/3", "crema_d 2/3", "crema_d 3/3", "ravdess 1/2", "ravdess 2/2"]
    node = next(n for n in polls[-1]["grid"]["task_instances"] if n["task_id"] == "extract_shard")
    assert node["child_states"] == {"success": 4, "failed": 1}


def test_failed_shard_is_named_and_the_others_succeed(failed_run: dict[str, Any]) -> None:
    """The shard that cannot write fails the run after its retries, its log names the folder; every other shard succeeds."""
    assert failed_run["finished"]["state"] == "failed"
    by_name = states(failed_run["tis"])
    shards = {name: state for (task, name), state in by_name.items() if task == "extract_shard"}
    assert shards == {"ravdess 1/2": "success", "ravdess 2/2": "failed", "crema_d 1/3": "success",
                      "crema_d 2/3": "success", "crema_d 3/3": "success"}
    assert by_name[("verify_features", None)] == "upstream_failed"
    failed = next(t for t in failed_run["tis"] if t.get("rendered_map_index") == "ravdess 2/2")
    assert failed["try_number"] == 3  # the first try and both retries
    text = failed_run["live"].api.task_log(DAG_ID, failed_run["run_id"], "extract_shard", failed["try_number"],
                                            map_index=failed["map_index"])
    assert "shard ravdess-0002 (ravdess) failed on CPU" in text
    assert f"{BROKEN_ACTOR}" in text and "cannot write features" in text
    progress = failed_run["live"].progress(failed_run["run_id"])
    assert progress is not None
    shard = next(s for s in progress.shards if s.label == "ravdess 2/2")
    assert shard.state == "failed" and "cannot write features" in (shard.error or "")


def test_ui_clear_dialog_of_the_failed_shard_lists_it_and_its_downstream(
    failed_run: dict[str, Any], chromium: Chromium, artifacts: Path
) -> None:
    """The documented UI clicks: the failed shard's page, Clear: the dialog (Downstream) affects that shard, verify and trigger."""
    live = failed_run["live"]
    failed = next(t for t in failed_run["tis"] if t["state"] == "failed")
    chromium.set_cookie("_token", live.api.token(), live.stack.url)
    run = quote(failed_run["run_id"], safe="")
    chromium.navigate(f"{live.stack.url}/dags/{DAG_ID}/runs/{run}/tasks/extract_shard/mapped/{failed['map_index']}")
    chromium.wait_for_js(f"!!{CLEAR_BUTTON}")
    chromium.evaluate(f"{CLEAR_BUTTON}.click()")
    dialog = chromium.wait_for_js(DIALOG_TEXT.format("Affected Tasks: 3") + " || null")
    chromium.screenshot(artifacts / "clear-dialog.png", full_page=False)
    assert "Clear Task Instance: extract_shard" in dialog and "Downstream" in dialog
    names = [line.strip() for line in dialog.splitlines() if line.strip() in ("extract_shard", "verify_features", "trigger_training")]
    assert sorted(names) == ["extract_shard", "trigger_training", "verify_features"], dialog
    assert f"Failed\t{failed['map_index']}\t{failed_run['run_id']}" in dialog, dialog
    assert live.api.run(DAG_ID, failed_run["run_id"])["state"] == "failed"


def test_cli_clear_only_failed_picks_the_failed_shard(failed_run: dict[str, Any]) -> None:
    """The documented `airflow tasks clear --only-failed` lists the failed shard and its downstream, nothing else."""
    live = failed_run["live"]
    day = failed_run["triggered"]["logical_date"]
    proc = live.airflow_cli("tasks", "clear", DAG_ID, "-t", "extract_shard", "--only-failed", "--downstream",
                            "-s", day, "-e", day, stdin="n\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = proc.stdout
    assert "You are about to delete these 3 tasks" in listed, listed[-2000:]
    failed = next(t for t in failed_run["tis"] if t["state"] == "failed")
    assert f"extract_shard {failed_run['run_id']} map_index={failed['map_index']} [failed]" in listed
    assert "verify_features" in listed and "trigger_training" in listed
    assert "Cancelled" in listed
    assert live.api.run(DAG_ID, failed_run["run_id"])["state"] == "failed"


def test_clearing_only_the_failed_shard_completes_the_run(failed_run: dict[str, Any]) -> None:
    """After repair, clearing the one failed mapped instance recomputes only its missing files; verification and training follow."""
    live = failed_run["live"]
    run_id = failed_run["run_id"]
    failed = next(t for t in failed_run["tis"] if t["state"] == "failed")
    files = {sid: [f"{sid.rsplit('-', 1)[0]}/{f}" for f in fs] for sid, fs in live.shard_files(run_id).items()}
    before = feature_mtimes(live, "rerun")
    results_dir = {d: Path(io["output"]) / "_shards" for d, io in failed_run["conf"]["datasets"].items()}
    results_before = {p.name: p.stat().st_mtime_ns for d in results_dir.values() for p in d.glob("*.json")}
    missing = [f for f in files["ravdess-0002"] if f not in before]
    assert missing and all(f in before for sid, fs in files.items() if sid != "ravdess-0002" for f in fs)

    cleared = live.api.clear(DAG_ID, run_id, [["extract_shard", failed["map_index"]]])
    assert sorted((t["task_id"], t["map_index"]) for t in cleared) == [
        ("extract_shard", failed["map_index"]), ("trigger_training", -1), ("verify_features", -1)]
    done = live.api.wait_run(DAG_ID, run_id)
    assert done["state"] == "success"

    after = feature_mtimes(live, "rerun")
    assert {f: after[f] for f in before} == before, "a feature that existed was rewritten"
    assert sorted(set(after) - set(before)) == sorted(missing)
    result = json.loads((results_dir["ravdess"] / "ravdess-0002.json").read_text())
    assert result["extracted"] == len(missing) and result["skipped_existing"] == len(files["ravdess-0002"]) - len(missing)
    results_after = {p.name: p.stat().st_mtime_ns for d in results_dir.values() for p in d.glob("*.json")}
    assert {k: v for k, v in results_after.items() if k != "ravdess-0002.json"} == \
        {k: v for k, v in results_before.items() if k != "ravdess-0002.json"}
    tries = {t["rendered_map_index"]: t["try_number"] for t in live.api.task_instances(DAG_ID, run_id)
             if t["task_id"] == "extract_shard"}
    assert tries == {"ravdess 1/2": 1, "ravdess 2/2": 4, "crema_d 1/3": 1, "crema_d 2/3": 1, "crema_d 3/3": 1}

    for dataset, io in failed_run["conf"]["datasets"].items():
        report = json.loads((Path(io["output"]) / "verification_report.json").read_text())
        assert report["passed"] and report["features_ok"] == live.counts[dataset], report["problems"]
    training = live.api.wait_run(TRAINING_DAG_ID, f"features__{run_id}")
    assert training["state"] == "success"
    for io in failed_run["conf"]["datasets"].values():
        metrics = json.loads((Path(io["output"]) / "training" / "metrics.json").read_text())
        assert metrics["accuracy"] > metrics["chance_accuracy"]
    plots = live.progress_folder(run_id) / "plots"
    assert (plots / "pca.png").is_file() and (plots / "throughput.png").is_file()


def test_run_survives_a_scheduler_restart(live_airflow: LiveAirflow) -> None:
    """Stopping the scheduler mid-run and starting it again: the run completes and every feature file is valid."""
    live = live_airflow
    conf = live.conf("restart", shard_size=SHARD_SIZE)
    with live.dag_paused(TRAINING_DAG_ID):
        run_id = live.trigger(conf)
        # Mid-run: a shard done and one not started (at most two run at once, so some are left after the stop).
        live.wait_for_progress(
            run_id, lambda r: any(s.state == "success" for s in r.shards) and any(s.state == "pending" for s in r.shards)
        )
        live.stack.stop("scheduler")  # SIGTERM: the scheduler lets running tasks finish, then exits
        assert not live.stack.processes["scheduler"].alive
        stopped = live.progress(run_id)
        assert stopped is not None and stopped.done < stopped.total, "the run ended before the scheduler stopped"
        time.sleep(5)
        assert live.api.run(DAG_ID, run_id)["state"] == "running"
        still = live.progress(run_id)
        assert still is not None
        assert [(s.shard_id, s.state, s.done) for s in still.shards] == [(s.shard_id, s.state, s.done) for s in stopped.shards], \
            "work went on without a scheduler"
        live.stack.start("scheduler")
        live.stack.wait_healthy()
        assert live.api.wait_run(DAG_ID, run_id)["state"] == "success"

    for dataset, io in conf["datasets"].items():
        out = Path(io["output"])
        report = json.loads((out / "verification_report.json").read_text())
        assert report["passed"] and report["features_ok"] == live.counts[dataset], report["problems"]
        features = sorted(out.rglob("*.npy"))
        assert len(features) == live.counts[dataset]
        for path in features:
            vector = np.load(path, allow_pickle=False)
            assert vector.shape == (256,) and vector.dtype == np.float32 and np.isfinite(vector).all(), path
        assert not [p for p in out.rglob(".*.tmp-*")]
