"""Benchmark the plan at scale: a million small spectrograms, the plan's time and what a run stores.

One run, on one machine, measures (docs/benchmarks.md, "Scale"):

1. the corpus: ``--files`` clips of 128 x 16 frames in the CREMA-D layout
   (one flat folder, ~8.3 kB each), generated once under ``--corpus`` and
   reused (a hidden marker records a finished one);
2. plan time over the whole corpus, step by step as ``plan_shards`` runs it:
   ``validate_conf``, the model check, the listing (walk and stat), labels and
   rejections, cutting the shards (fitted to ``core.max_map_length``),
   serialising, hashing and writing the plan file, the progress record; and
   what the workers and verification pay to read it back (one shard, all);
3. one whole-DAG run on a live stack (``scripts/airflow_local.py``: SQLite,
   LocalExecutor, loopback), triggered over REST, over the first
   ``--dag-files`` clips (hard links) at the shard size the whole corpus is
   planned with: XCom bytes of the run and metadata-DB rows added per table
   (read from the database before and after), the scheduler's CPU-seconds
   (``/proc/<pid>/stat``), and the run's wall time.

    .venv/bin/python bench/scale.py                              # 1,000,000 files (~9 GB, ~2 min to generate), 100,000 through the DAG: ~5 min
    .venv/bin/python bench/scale.py --dag-files 1000000          # the whole corpus through the DAG too: ~25 min on 2 cores
    .venv/bin/python bench/scale.py --corpus /big/disk/scale     # the corpus elsewhere (default ROOT/corpus, ROOT = data/scale)
    .venv/bin/python bench/scale.py --smoke --root /tmp/b        # tiny corpus, ~2 min: checks the script only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import resource
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "include"))
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402

from airflow_local import ADMIN_USER, AirflowApi, ServiceError, free_port, running_stack, wait_for  # noqa: E402
from bench.extraction import BenchError, corpus_settings, log, machine  # noqa: E402
from cnn_features import plan  # noqa: E402
from cnn_features.datasets import get_dataset, label_all  # noqa: E402
from cnn_features.progress import PLAN_NAME, run_folder, write_plan  # noqa: E402
from cnn_features.storage import write_json_atomic  # noqa: E402
from cnn_features.stores import LocalStore  # noqa: E402

# Mel bins and frames of each generated clip: small, so a million fit in ~9 GB.
SCALE_MELS = 128
SCALE_FRAMES = 16
# CREMA-D names give 12 sentences x 6 emotions x 4 levels = 288 clips per actor.
SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
LEVELS = ("LO", "MD", "HI", "XX")
# First actor number: four digits, so up to 8,999 actors (2.59 M clips) fit.
FIRST_ACTOR = 1001
# Distinct spectrograms written, cycled through the clips: the plan never reads them.
VARIANTS = 64
# Marker left in a finished corpus folder (hidden: listings skip it).
COMPLETE = ".complete.json"


def clip_name(i: int) -> str:
    """Return the CREMA-D file name of clip ``i`` (0-based)."""
    per_actor = len(SENTENCES) * len(EMOTIONS) * len(LEVELS)
    actor, rest = divmod(i, per_actor)
    sentence, rest = divmod(rest, len(EMOTIONS) * len(LEVELS))
    emotion, level = divmod(rest, len(LEVELS))
    return f"{FIRST_ACTOR + actor:04d}_{SENTENCES[sentence]}_{EMOTIONS[emotion]}_{LEVELS[level]}.npy"


def ensure_scale_corpus(folder: Path, *, files: int) -> float:
    """Write ``files`` clips into ``folder`` unless a finished corpus of that size is there; return seconds spent."""
    marker = folder / COMPLETE
    try:
        if json.loads(marker.read_text(encoding="utf-8")).get("files") == files:
            return 0.0
    except (OSError, ValueError):
        pass
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    header = _npy_header((SCALE_MELS, SCALE_FRAMES))
    variants = [
        header + (rng.standard_normal((SCALE_MELS, SCALE_FRAMES)).astype(np.float32) - 4.0).tobytes() for _ in range(VARIANTS)
    ]
    size = len(variants[0])
    for i in range(files):
        path = folder / clip_name(i)
        try:
            if path.stat().st_size == size:
                continue
        except FileNotFoundError:
            pass
        path.write_bytes(variants[i % VARIANTS])
    marker.write_text(json.dumps({"files": files, "mels": SCALE_MELS, "frames": SCALE_FRAMES}) + "\n", encoding="utf-8")
    return time.perf_counter() - start


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()



DAG_ID = "cnn_feature_extraction"
TRAINING_DAG_ID = "emotion_training"
DATASET = "crema_d"
# Airflow's own default of [core] max_map_length: the plan is fitted to it.
DEFAULT_MAX_MAP_LENGTH = 1024
# Targets of the scale issue (docs/benchmarks.md, "Scale").
TARGET_PLAN_S = 60.0
TARGET_XCOM_BYTES = 256 * 1024
# Seconds one live DAG run may take: a million clips on 2 shared cores take ~30 minutes.
DAG_TIMEOUT_S = 3 * 3600
# Full run: a million clips, a tenth of them through the live DAG (2 shared cores).
FULL_FILES = 1_000_000
FULL_DAG_FILES = 100_000
# Smoke run: enough clips for several shards; a small max_map_length, so the
# raised shard size and its note are exercised through the live DAG too.
SMOKE_FILES = 120
SMOKE_SHARD_SIZE = 10
SMOKE_MAX_MAP_LENGTH = 4
SMOKE_NOTE = "SMOKE RUN: a tiny corpus; the figures check the script, not the machine."


# --------------------------------------------------------------------------- plan time


def timed(steps: dict[str, float], name: str, call: Callable[[], Any]) -> Any:
    """Run ``call``, add its wall seconds to ``steps[name]``; return its value."""
    started = time.perf_counter()
    value = call()
    steps[name] = steps.get(name, 0.0) + time.perf_counter() - started
    return value


def measure_plan(corpus: Path, home: Path, *, shard_size: int, max_shards: int) -> dict[str, Any]:
    """Plan the whole corpus as ``plan_shards`` does, then each step alone; return seconds and sizes."""
    settings = corpus_settings(home)
    output = home / "features" / DATASET
    params = {"datasets": {DATASET: {"input": str(corpus), "output": str(output)}}, "shard_size": shard_size}
    folder = run_folder(settings.progress_root, "bench_scale")
    # As the task runs it, end to end.
    started, cpu = time.perf_counter(), time.process_time()
    conf = plan.validate_conf(params, settings)
    model = plan.check_model(conf.model_path, settings)
    run_plan = plan.make_plan(conf, model, batch_size=settings.batch_size, max_shards=max_shards, settings=settings)
    refs, plans = plan.publish_plan(run_plan.shards, settings=settings)
    write_plan(folder, "bench_scale", run_plan.shards, note=run_plan.note)
    plan_s, plan_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    # Each step alone, on the same (now warm) corpus.
    steps: dict[str, float] = {}
    dataset = conf.datasets[0]
    timed(steps, "validate_conf", lambda: plan.validate_conf(params, settings))
    timed(steps, "check_model (cached)", lambda: plan.check_model(conf.model_path, settings))
    timed(steps, "claim_output", lambda: plan.claim_output(dataset, model, settings=settings))
    listed = timed(steps, "list: walk + stat", lambda: LocalStore(dataset.input).list())
    names = [rel for rel, _ in listed]
    timed(steps, "labels: label_all", lambda: label_all(get_dataset(DATASET), names))
    listing = timed(steps, "list_dataset (list + labels + checks)", lambda: plan.list_dataset(dataset, settings=settings))
    size = timed(steps, "fit_shard_size",
                 lambda: plan.fit_shard_size([len(listing.files)], shard_size=conf.shard_size, max_shards=max_shards))
    shards = timed(steps, "cut_shards", lambda: [{**s, "model": model, "batch_size": settings.batch_size}
                                                 for s in plan.cut_shards(dataset, listing, shard_size=size)])
    index, own = timed(steps, "plan files: serialise and hash", lambda: plan.plan_files(shards))

    def write_files() -> None:
        out = LocalStore(dataset.output)
        for data in (*own.values(), index):
            out.write(plan.plan_file(plan.plan_digest(data)), data)

    timed(steps, "plan files: write", write_files)
    timed(steps, "progress record", lambda: write_plan(folder, "bench_scale", shards))
    reads: dict[str, float] = {}
    timed(reads, "load_shard (one, a worker)", lambda: plan.load_shard(refs[-1], plans, settings=settings))
    loaded = timed(reads, "load_shards (all, verification)", lambda: plan.load_shards(refs, plans, settings=settings))
    if loaded != run_plan.shards or shards != run_plan.shards:
        msg = "the plan read back differs from the plan written"
        raise BenchError(msg)
    return {
        "files": len(listing.files),
        "listed": len(listed),
        "rejected": len(listing.rejected),
        "requested_shard_size": shard_size,
        "shard_size": run_plan.shard_size,
        "note": run_plan.note,
        "shards": len(run_plan.shards),
        "max_map_length": max_shards,
        "plan_s": plan_s,
        "plan_cpu_s": plan_cpu_s,
        "steps_s": steps,
        "reads_s": reads,
        "plan_index_bytes": len(index),
        "plan_file_bytes": len(index) + sum(len(data) for data in own.values()),
        "largest_shard_file_bytes": max((len(data) for data in own.values()), default=0),
        "refs_json_bytes": len(json.dumps(refs)) + len(json.dumps(plans)),
        "progress_record_bytes": (folder / PLAN_NAME).stat().st_size,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# --------------------------------------------------------------------------- the whole DAG, live


@dataclasses.dataclass
class LiveStack:
    """A running stack: its REST client, scheduler pid and SQLite metadata DB."""

    api: AirflowApi
    scheduler_pid: int
    database: Path


@contextlib.contextmanager
def live_stack(airflow_home: Path, home: Path, *, allowed: list[Path], max_map_length: int) -> Iterator[LiveStack]:
    """Start the four Airflow services (SQLite, LocalExecutor, loopback); stop them after, even on failure."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CNN_FEATURES_"))}
    base.update({
        "CNN_FEATURES_HOME": str(home),
        "CNN_FEATURES_ALLOWED_ROOTS": os.pathsep.join(str(p) for p in allowed),
        "AIRFLOW__CORE__MAX_MAP_LENGTH": str(max_map_length),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    shutil.rmtree(airflow_home, ignore_errors=True)
    try:
        with running_stack(home=airflow_home, port=free_port(), postgres_root=None, base_env=base) as (stack, _):
            api = AirflowApi(stack.url, ADMIN_USER, stack.admin_password())
            try:
                wait_for(lambda: all(api.request("GET", f"/api/v2/dags/{d}").status_code == 200 for d in (DAG_ID, TRAINING_DAG_ID)),
                         timeout_s=300, what="both DAGs to be parsed", interval_s=1.0)
                api.call("PATCH", f"/api/v2/dags/{TRAINING_DAG_ID}", json={"is_paused": True})
                pid = stack.processes["scheduler"].pid
                if pid is None:
                    msg = "the scheduler has no pid"
                    raise BenchError(msg)
                yield LiveStack(api, pid, airflow_home / "airflow.db")
            finally:
                api.close()
    except ServiceError as exc:
        msg = f"live Airflow in {airflow_home}: {exc}"
        raise BenchError(msg) from None


def process_cpu_s(pid: int) -> float:
    """Return the user + system CPU-seconds process ``pid`` has used itself (children not counted)."""
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def table_rows(database: Path) -> dict[str, int]:
    """Return the row count of every table of a SQLite metadata DB, read-only."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as db:
        names = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {name: db.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for name in sorted(names)}  # noqa: S608


def xcom_bytes(database: Path, run_id: str) -> dict[str, int]:
    """Return the bytes of XCom values a run stored, per task id (the value column as stored)."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as db:
        rows = db.execute(
            "SELECT task_id, sum(length(CAST(value AS BLOB))), count(*) FROM xcom WHERE run_id = ? GROUP BY task_id", (run_id,)
        ).fetchall()
    return {f"{task} ({count} rows)": int(size or 0) for task, size, count in rows}


def link_subset(corpus: Path, target: Path, *, files: int) -> Path:
    """Hard-link the first ``files`` clips of ``corpus`` into ``target`` (kept between runs); return it."""
    marker = target / COMPLETE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text(encoding="utf-8")).get("files") == files:
            return target
    target.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        name = clip_name(i)
        with contextlib.suppress(FileExistsError):
            os.link(corpus / name, target / name)
    marker.write_text(json.dumps({"files": files}) + "\n", encoding="utf-8")
    return target


def measure_dag(stack: LiveStack, subset: Path, home: Path, *, shard_size: int) -> dict[str, Any]:
    """Run the whole DAG once over ``subset`` on fresh outputs; return its wall, XCom bytes, DB rows and scheduler CPU."""
    output = home / "features" / f"{DATASET}-dag"
    shutil.rmtree(output, ignore_errors=True)
    conf = {"datasets": {DATASET: {"input": str(subset), "output": str(output)}}, "device": "cpu", "shard_size": shard_size}
    rows_before = table_rows(stack.database)
    cpu_before = process_cpu_s(stack.scheduler_pid)
    started = datetime.now().astimezone()
    run_id = str(stack.api.trigger(DAG_ID, conf)["dag_run_id"])
    try:
        done = stack.api.wait_run(DAG_ID, run_id, timeout_s=DAG_TIMEOUT_S)
    except ServiceError as exc:
        raise BenchError(str(exc)) from None
    cpu_after = process_cpu_s(stack.scheduler_pid)
    rows_after = table_rows(stack.database)
    tis = stack.api.task_instances(DAG_ID, run_id)
    if done["state"] != "success":
        msg = f"run {run_id} ended {done['state']}: {[(t['task_id'], t['map_index'], t['state']) for t in tis]}"
        raise BenchError(msg)
    tasks: dict[str, float] = {}
    for ti in tis:
        tasks[ti["task_id"]] = tasks.get(ti["task_id"], 0.0) + float(ti["duration"] or 0.0)
    run = {"wall_s": (datetime.fromisoformat(done["end_date"]) - started).total_seconds(), "tasks_s": tasks}
    xcoms = xcom_bytes(stack.database, run_id)
    added = {name: rows_after.get(name, 0) - count for name, count in rows_before.items() if rows_after.get(name, 0) != count}
    record = json.loads((run_folder(home / "progress", run_id) / PLAN_NAME).read_text(encoding="utf-8"))
    return {
        "files": sum(1 for _ in subset.glob("*.npy")),
        "run_id": run_id,
        "wall_s": run["wall_s"],
        "tasks_s": run["tasks_s"],
        "shards": len(record["shards"]),
        "plan_note": record.get("note"),
        "xcom_bytes": sum(xcoms.values()),
        "xcom_bytes_by_task": xcoms,
        "db_rows_added": sum(added.values()),
        "db_rows_added_by_table": added,
        "scheduler_cpu_s": cpu_after - cpu_before,
        "features": sum(1 for _ in output.glob("*.npy")),
    }


# --------------------------------------------------------------------------- report


def targets(result: dict[str, Any]) -> dict[str, bool]:
    """Return each target and whether the figures meet it."""
    met = {"plan_s <= 60": max(r["plan_s"] for r in result["plan"]) <= TARGET_PLAN_S}
    if result.get("dag"):
        met["xcom_bytes <= 256 KB"] = result["dag"]["xcom_bytes"] <= TARGET_XCOM_BYTES
    return met


def table(result: dict[str, Any]) -> str:
    """Return the figures as a Markdown table."""
    lines = [f"CPU: {result['machine']['cpu']} ({result['machine']['usable_cores']} cores usable)", "", "| figure | value |", "|---|---|"]
    first, second = result["plan"][0], result["plan"][-1]
    lines.append(f"| corpus: files, shard size (asked), shards | {first['files']:,}, {first['shard_size']:,} "
                 f"({first['requested_shard_size']:,}), {first['shards']:,} |")
    runs = ", ".join(f"{r['plan_s']:.1f}" for r in result["plan"])
    lines.append(f"| plan time (plan_shards' work), s, per run | {runs} |")
    for step, seconds in second["steps_s"].items():
        lines.append(f"| step alone: {step}, s | {seconds:.2f} |")
    for step, seconds in second["reads_s"].items():
        lines.append(f"| read back: {step}, s | {seconds:.2f} |")
    lines.append(f"| plan files, bytes: all / index / largest shard's | {first['plan_file_bytes']:,} / "
                 f"{first['plan_index_bytes']:,} / {first['largest_shard_file_bytes']:,} |")
    lines.append(f"| plan_shards' XComs (references and plan index), bytes | {first['refs_json_bytes']:,} |")
    lines.append(f"| peak RSS of the planning process, MiB | {max(r['peak_rss_mib'] for r in result['plan']):,.0f} |")
    dag = result.get("dag")
    if dag:
        lines.append(f"| whole DAG over {dag['files']:,} files: wall s, shards | {dag['wall_s']:.0f}, {dag['shards']} |")
        lines.append(f"| XCom bytes per run | {dag['xcom_bytes']:,} |")
        lines.append(f"| metadata-DB rows added per run | {dag['db_rows_added']:,} |")
        lines.append(f"| scheduler CPU-seconds per run | {dag['scheduler_cpu_s']:.1f} |")
    lines.append("")
    lines.append("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in result["targets"].items()))
    text = "\n".join(lines)
    return f"{SMOKE_NOTE}\n\n{text}" if result["smoke"] else text


def main(argv: list[str] | None = None) -> int:
    """Generate the corpus if needed, measure the plan and one DAG run, print the table, write the JSON."""
    args = parse_args(argv)
    root = args.root.resolve()
    corpus = (args.corpus or root / "corpus").resolve() / DATASET
    home = root / "home"
    started = time.perf_counter()
    try:
        log(f"corpus: {args.files:,} clips under {corpus}")
        generated_s = ensure_scale_corpus(corpus, files=args.files)
        os.environ["CNN_FEATURES_ALLOWED_ROOTS"] = os.pathsep.join(str(p) for p in (corpus.parent, root))
        result: dict[str, Any] = {
            "when": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "smoke": bool(args.smoke),
            "machine": machine(),
            "load_before": os.getloadavg(),
            "corpus": {"path": str(corpus), "files": args.files, "mels": SCALE_MELS, "frames": SCALE_FRAMES,
                       "generated_s": generated_s},
            "plan": [],
        }
        for run in range(args.plan_runs):
            log(f"plan run {run + 1}/{args.plan_runs}")
            result["plan"].append(measure_plan(corpus, home, shard_size=args.shard_size, max_shards=args.max_map_length))
        shard_size = result["plan"][0]["shard_size"]
        if args.dag_files:
            subset = corpus if args.dag_files >= args.files else link_subset(corpus, root / f"subset-{args.dag_files}" / DATASET,
                                                                              files=args.dag_files)
            log(f"whole DAG over {args.dag_files:,} clips at shard size {shard_size:,}")
            with live_stack(root / "airflow", home, allowed=[corpus.parent, root], max_map_length=args.max_map_length) as stack:
                dag_size = args.shard_size if args.smoke else shard_size
                result["dag"] = measure_dag(stack, subset, home, shard_size=dag_size)
        result["targets"] = targets(result)
        result["load_after"] = os.getloadavg()
        result["seconds"] = time.perf_counter() - started
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    out = args.json or root / "scale_results.json"
    write_json_atomic(out, json.loads(json.dumps(result, default=str)))
    print(table(result))
    print(f"\nJSON: {out}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "data" / "scale", help="outputs, Airflow home, results")
    parser.add_argument("--corpus", type=Path, default=None, help="where the corpus lies or is generated (default ROOT/corpus)")
    parser.add_argument("--files", type=int, default=FULL_FILES, help="clips in the corpus")
    parser.add_argument("--dag-files", type=int, default=FULL_DAG_FILES, help="clips through the live DAG (0: no DAG run)")
    parser.add_argument("--shard-size", type=int, default=None, help="shard size asked for (default: the deployment's)")
    parser.add_argument("--max-map-length", type=int, default=DEFAULT_MAX_MAP_LENGTH, help="[core] max_map_length of the stack")
    parser.add_argument("--plan-runs", type=int, default=2, help="plans of the whole corpus (the first may read a cold cache)")
    parser.add_argument("--json", type=Path, default=None, help="where the JSON goes (default ROOT/scale_results.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny corpus: checks the script, not the machine")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.files, args.dag_files, args.plan_runs = SMOKE_FILES, SMOKE_FILES, 1
        args.shard_size, args.max_map_length = SMOKE_SHARD_SIZE, SMOKE_MAX_MAP_LENGTH
    if args.shard_size is None:
        from cnn_features.config import load_settings

        args.shard_size = load_settings().shard_size
    return args


if __name__ == "__main__":
    sys.exit(main())
