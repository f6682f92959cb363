"""Benchmark CNN feature extraction against this machine's matrix-product limit.

One run, on one machine, measures (README: docs/benchmarks.md):

1. the corpus: 1,440 RAVDESS-layout + 7,442 CREMA-D-layout spectrograms of
   128 mel bins, generated once under ``--root`` (``fixed``: every clip
   128 x 256, the headline; ``realistic``: the demo's 200-500 frame clips);
2. the limit: float32 matrix-product GFLOP/s with numpy on the workers'
   thread count (``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` unset in that
   process only; the kernel OpenBLAS then runs is reported);
3. the model alone on in-memory batches, as the worker runs it (GFLOP/s from
   the reference CNN's FLOP count, computed from the model);
4. the extraction stage as the DAG runs it: every shard of the default plan
   through ``runner.run_shard`` (load -> batch -> infer -> atomic write);
5. the naive baseline: one ``model.predict(x[None])`` per file, on a sample;
6. the whole DAG end to end on a running Airflow (the four services of
   ``scripts/airflow.sh``, SQLite, LocalExecutor), triggered over REST as the
   UI does, start-up included; ``airflow dags test`` beside it for reference;
7. peak RSS of one extraction process over 1x and 4x the corpus;
8. DAG file parse time as the DAG processor pays it (Airflow and its parsing
   modules already imported), and with only ``airflow.sdk`` imported;

then prints a table of figures and target ratios and writes them as JSON.

    .venv/bin/python bench/extraction.py                  # both corpora, 3 runs each
    .venv/bin/python bench/extraction.py --corpus fixed --runs 1
    .venv/bin/python bench/extraction.py --smoke --root /tmp/b   # tiny corpus, a few minutes (two Airflow starts)

Internal sub-commands (``_matmul``, ``_model``, ``_naive``, ``_parse``) run
in fresh processes so thread settings and imports never leak between figures.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))

import numpy as np  # noqa: E402

from cnn_features import demo  # noqa: E402
from cnn_features.config import Settings, load_settings  # noqa: E402
from cnn_features.datasets import DATASETS  # noqa: E402
from cnn_features.plan import DatasetIO, RunConf, check_model, plan_run  # noqa: E402
from cnn_features.procs import RESULT_PREFIX, child_env, parse_line, python_module_cmd  # noqa: E402
from cnn_features.runner import run_shard  # noqa: E402
from cnn_features.spectrogram import read_header  # noqa: E402
from cnn_features.storage import write_json_atomic  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from airflow_local import ADMIN_USER, AirflowApi, ServiceError, free_port, running_stack, wait_for  # noqa: E402

# The full corpora's sizes (demo.py generates the real layouts).
FULL_COUNTS = {"ravdess": 1440, "crema_d": 7442}
# What a smoke run prints above its table and in its target rows: its figures
# come from a tiny corpus and short rounds, mostly Airflow start-ups.
SMOKE_NOTE = (
    "SMOKE RUN: a tiny corpus and short rounds, to check that the benchmark works. "
    "These figures are not measurements of the targets; run without --smoke for those."
)
SMOKE_VERDICT = "not judged (smoke run)"
# Smoke corpus: a few dozen short clips: the smoke run is mostly Airflow start-ups.
SMOKE_COUNTS = {"ravdess": 24, "crema_d": 24}
SMOKE_FRAMES = 64
# Frames of every clip in the headline (fixed-size) corpus.
HEADLINE_FRAMES = 256
# Side of the square float32 matrices of the limit: large enough that
# OpenBLAS runs at its peak (1024 reaches ~90 % of it), ~0.35 s per product here.
MATMUL_N = 4096
# Files of the naive baseline: one predict() call each is ~30 ms, so 100
# files give a stable rate in a few seconds.
NAIVE_FILES = 100
# Seconds of each model-alone round: long enough to average over many passes.
MODEL_ROUND_S = 4.0
# Copies of the corpus in the memory test's larger run.
RSS_SCALE = 4
# The project's targets.
TARGET_STAGE_VS_LIMIT = 0.85
TARGET_DAG_VS_LIMIT = 2 / 3
TARGET_VS_NAIVE = 10.0
TARGET_RSS_GIB = 1.5
TARGET_RSS_GROWTH = 0.10
TARGET_PARSE_S = 0.3
# What a DAG processor process has imported before it parses a file.
PARSE_PRELOAD = "airflow.sdk,airflow.dag_processing.processor"
# Environment variables that pin an older OpenBLAS kernel; unset for the limit.
OPENBLAS_PINS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
NO_GPU = {"usable": False, "error": "benchmark runs shards on CPU"}
DAG_ID = "cnn_feature_extraction"
TRAINING_DAG_ID = "emotion_training"
# Clips of the warm-up run a live Airflow gets before it is timed: its first
# task pays the execution API's one-time set-up (~4 s), as any deployment's
# first run after a restart does.
WARMUP_FILES = 4
GIB = 1024**3


class BenchError(RuntimeError):
    """A measurement could not be taken."""


# --------------------------------------------------------------------------- corpus


def ensure_corpus(home: Path, *, counts: dict[str, int], frames: int | None) -> dict[str, int]:
    """Write the first ``counts`` clips of each layout under ``home/demo``; keep existing files."""
    sources = {
        "ravdess": (demo.ravdess_clips(full=True), demo.RAVDESS_FRAMES),
        "crema_d": (demo.crema_d_clips(full=True), demo.CREMA_D_FRAMES),
    }
    written: dict[str, int] = {}
    for dataset, count in counts.items():
        clips, frames_range = sources[dataset]
        root = home / "demo" / dataset
        n = 0
        for rel, emotion, actor, intense in clips:
            if n == count:
                break
            n += 1
            path = root / rel
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            array = demo.spectrogram(rel, emotion, actor, frames_range=frames_range, frames=frames, intense=intense)
            np.save(path, array, allow_pickle=False)
        written[dataset] = n
    return written


def corpus_frames(home: Path) -> dict[str, list[int]]:
    """Return each dataset's frame counts, read from the ``.npy`` headers."""
    frames: dict[str, list[int]] = {}
    for dataset in DATASETS:
        root = home / "demo" / dataset
        frames[dataset] = [read_header(p).shape[1] for p in sorted(root.rglob("*.npy"))]
    return frames


def corpus_settings(home: Path) -> Settings:
    """Return the deployment settings with ``home`` as CNN_FEATURES_HOME, every default kept."""
    return dataclasses.replace(load_settings(), home=home)


def clear_outputs(settings: Settings) -> None:
    """Delete the features of a previous run, so every file is extracted again."""
    shutil.rmtree(settings.features_root, ignore_errors=True)
    shutil.rmtree(settings.progress_root, ignore_errors=True)


# --------------------------------------------------------------------------- child processes


def run_child(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 900) -> dict[str, Any]:
    """Run ``python bench/extraction.py <args>`` in a fresh process; return its result line."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        env=env or child_env("cpu"),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if (payload := parse_line(line, RESULT_PREFIX)) is not None:
            return payload
    tail = " | ".join(proc.stderr.strip().splitlines()[-8:])
    msg = f"{args[0]} exited with code {proc.returncode} without a result: {tail}"
    raise BenchError(msg)


def emit(payload: dict[str, Any]) -> None:
    """Print a child's result line."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(payload) + "\n")
    sys.stdout.flush()


def blas_info() -> dict[str, Any]:
    """Return the BLAS numpy runs here: library, kernel (core type) and threads.

    Uses threadpoolctl when installed, else asks the loaded OpenBLAS itself.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        threadpool_info = None
    if threadpool_info is not None:
        for pool in threadpool_info():
            if pool.get("user_api") == "blas":
                return {
                    "source": "threadpoolctl",
                    "library": pool.get("internal_api"),
                    "version": pool.get("version"),
                    "kernel": pool.get("architecture"),
                    "threads": pool.get("num_threads"),
                }
    return _openblas_by_ctypes()


def _openblas_by_ctypes() -> dict[str, Any]:
    with open("/proc/self/maps", encoding="utf-8") as fh:
        paths = sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and line.rstrip().endswith(".so")})
    if not paths:
        return {"source": "ctypes", "library": "unknown"}
    lib = ctypes.CDLL(paths[0])

    def call(name: str, restype: Any) -> Any:
        for prefix in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", ""):
                func = getattr(lib, f"{prefix}{name}{suffix}", None)
                if func is not None:
                    func.restype = restype
                    return func()
        return None

    corename = call("get_corename", ctypes.c_char_p)
    config = call("get_config", ctypes.c_char_p)
    return {
        "source": "ctypes (threadpoolctl not installed)",
        "library": "openblas",
        "version": config.decode() if config else None,
        "kernel": corename.decode() if corename else None,
        "threads": call("get_num_threads", ctypes.c_int),
    }


def child_matmul(args: argparse.Namespace) -> None:
    """Measure float32 matrix-product GFLOP/s (a child process)."""
    n = args.n
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)
    samples = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        np.matmul(a, b, out=out)
        samples.append(2 * n**3 / (time.perf_counter() - started) / 1e9)
    emit({"gflops": statistics.median(samples), "samples": samples, "n": n, "blas": blas_info()})


def measure_limit(*, threads: int, n: int, repeats: int, inherit_pins: bool = False) -> dict[str, Any]:
    """Run the matrix product in a fresh process with ``threads`` BLAS threads."""
    env = child_env("cpu")
    if not inherit_pins:
        for name in OPENBLAS_PINS:
            env.pop(name, None)
    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    return run_child(["_matmul", "--n", str(n), "--repeats", str(repeats)], env=env)


def model_flops(model: Any, shape: tuple[int, ...]) -> int:
    """Return the multiply-add FLOPs (2 per MAC) of the conv and dense layers for one input of ``shape``.

    Batch norm, ReLU and pooling are left out: under 1 % of the total here.
    """
    import keras

    kinds = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense)
    layers = [layer for layer in model.layers if isinstance(layer, kinds)]
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    outputs = probe.compute_output_spec(keras.KerasTensor((1, *shape)))
    total = 0
    for layer, out in zip(layers, outputs, strict=True):
        positions = int(np.prod(out.shape[1:-1])) if len(out.shape) > 2 else 1
        total += 2 * positions * int(np.prod(layer.kernel.shape))
    return total


def child_model(args: argparse.Namespace) -> None:
    """Time start-up, count FLOPs and measure the model alone as the worker runs it (a child process)."""
    t0 = time.perf_counter()
    import keras

    t_import = time.perf_counter()
    from cnn_features.model import configure_cpu_threads, inference_model, load_feature_model, make_predictor
    from cnn_features.worker import pass_size

    configure_cpu_threads(streams=args.streams)
    model, info = load_feature_model(Path(args.model))
    t_load = time.perf_counter()
    fast = inference_model(model, info)
    t_fold = time.perf_counter()
    predictor = make_predictor(fast, info)
    t_trace = time.perf_counter()
    frames_list = json.loads(args.flop_frames)
    shape = (info.n_mels, None, 1) if info.channel_axis else (info.n_mels, None)
    flops = {str(f): model_flops(model, tuple(f if d is None else d for d in shape)) for f in frames_list}

    per_pass = pass_size(args.frames, batch_size=args.batch_size, device="cpu")
    batch = np.random.default_rng(0).standard_normal((per_pass, info.n_mels, args.frames)).astype(np.float32)
    predictor(batch)
    rates = [_model_round(predictor, batch, streams=args.streams, seconds=args.seconds) for _ in range(args.repeats)]
    emit(
        {
            "backend": keras.backend.backend(),
            "startup_s": {
                "import_keras_tensorflow": t_import - t0,
                "load_model": t_load - t_import,
                "fold_batch_norm": t_fold - t_load,
                "trace_and_warm": t_trace - t_fold,
            },
            "flops": flops,
            "pass_size": per_pass,
            "streams": args.streams,
            "files_per_s": statistics.median(rates),
            "samples": rates,
            "model_info": dataclasses.asdict(info),
        }
    )


def _model_round(predictor: Any, batch: np.ndarray, *, streams: int, seconds: float) -> float:
    """Run ``streams`` threads of back-to-back passes for about ``seconds``; return files/s."""
    counts = [0] * streams
    deadline = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < deadline:
            predictor(batch)
            counts[i] += len(batch)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def child_naive(args: argparse.Namespace) -> None:
    """Extract files the naive way: load, one ``model.predict(x[None])``, save, per file (a child process)."""
    import keras

    files = json.loads(Path(args.files).read_text(encoding="utf-8"))
    model = keras.saving.load_model(args.model, compile=False, safe_mode=True)
    out = Path(tempfile.mkdtemp(prefix="naive-"))
    try:
        model.predict(np.load(files[0])[None, ..., None], verbose=0)
        started = time.perf_counter()
        for i, path in enumerate(files):
            x = np.load(path)
            features = model.predict(x[None, ..., None], verbose=0)[0]
            np.save(out / f"{i}.npy", features)
        elapsed = time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)
    emit({"files": len(files), "elapsed_s": elapsed, "files_per_s": len(files) / elapsed})


def child_parse(args: argparse.Namespace) -> None:
    """Time executing each DAG file after importing ``--preload`` modules (a child process)."""
    import importlib
    import importlib.util

    for name in args.preload.split(","):
        importlib.import_module(name)
    seconds: dict[str, float] = {}
    for path in sorted(Path(args.dags).glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"bench_dag_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        started = time.perf_counter()
        spec.loader.exec_module(module)
        seconds[path.name] = time.perf_counter() - started
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "jax", "torch"))
    emit({"seconds": seconds, "heavy_modules": heavy})


# --------------------------------------------------------------------------- measurements


def measure_stage(settings: Settings, model: dict[str, Any]) -> dict[str, Any]:
    """Run every shard of the default plan through ``run_shard``, as extract_shard does; return timings."""
    clear_outputs(settings)
    datasets = tuple(DatasetIO(name, Path(io["input"]), Path(io["output"])) for name, io in settings.default_datasets().items())
    conf = RunConf(datasets, "cpu", settings.shard_size, None, 0.0)
    shards = plan_run(conf, model, batch_size=settings.batch_size)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    results = [run_shard(shard, requested_device="cpu", probe=NO_GPU) for shard in shards]
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "shards": len(shards),
        "extracted": sum(r["extracted"] for r in results),
        "loop_s": sum(r["elapsed_s"] for r in results),
        "wall_s": wall,
        "cpu_per_wall": cpu / wall,
    }


def airflow_env(airflow_home: Path, home: Path) -> dict[str, str]:
    """Return the environment scripts/airflow-env.sh sets, with its own Airflow home and ``home`` as data.

    Each corpus gets its own Airflow home: the DAG's asset URI follows
    CNN_FEATURES_HOME, and one metadata DB refuses a second URI for its name.
    """
    env = child_env("cpu")
    env.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "CNN_FEATURES_HOME": str(home),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    for name in ("CNN_FEATURES_ALLOWED_ROOTS", "CNN_FEATURES_TEST_FAULT"):
        env.pop(name, None)
    return env


def airflow_cli(args: list[str], *, env: dict[str, str], log: Path) -> float:
    """Run an ``airflow`` command with its output appended to ``log``; return its wall time."""
    airflow = Path(sys.executable).parent / "airflow"
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ airflow {' '.join(args)}\n")
        fh.flush()
        started = time.perf_counter()
        proc = subprocess.run([str(airflow), *args], env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
        elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
        msg = f"airflow {' '.join(args[:3])} failed (exit {proc.returncode}); {log}:\n{tail}"
        raise BenchError(msg)
    return elapsed


def prepare_airflow(airflow_home: Path, home: Path) -> None:
    """Create and migrate an Airflow home (SQLite metadata DB) for one corpus's DAG runs."""
    airflow_home.mkdir(parents=True, exist_ok=True)
    airflow_cli(["db", "migrate"], env=airflow_env(airflow_home, home), log=airflow_home / "bench.log")


def measure_dag(airflow_home: Path, settings: Settings) -> dict[str, Any]:
    """Run the whole extraction DAG with ``airflow dags test`` on fresh outputs; return wall time and task times."""
    clear_outputs(settings)
    env = airflow_env(airflow_home, settings.home)
    log = airflow_home / "bench.log"
    offset = log.stat().st_size if log.exists() else 0
    conf = {"datasets": settings.default_datasets(), "device": "auto"}
    wall = airflow_cli(["dags", "test", "cnn_feature_extraction", "-c", json.dumps(conf)], env=env, log=log)
    with open(log, encoding="utf-8", errors="replace") as fh:
        fh.seek(offset)
        tasks = task_seconds(fh)
    return {"wall_s": wall, "tasks_s": tasks, "features": count_features(settings)}


@contextlib.contextmanager
def live_airflow(airflow_home: Path, home: Path) -> Iterator[AirflowApi]:
    """Start the four Airflow services (SQLite, LocalExecutor, loopback) as ``bash scripts/airflow.sh`` does; stop them after.

    The deployment's settings are the defaults: nothing here tunes the
    pipeline. ``emotion_training`` is paused, so the runs it is triggered for
    queue up instead of competing with the measurements.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CNN_FEATURES_"))}
    base.update({"CNN_FEATURES_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"})
    shutil.rmtree(airflow_home, ignore_errors=True)
    try:
        with running_stack(home=airflow_home, port=free_port(), postgres_root=None, base_env=base) as (stack, _):
            api = AirflowApi(stack.url, ADMIN_USER, stack.admin_password())
            try:
                wait_for(lambda: all(api.request("GET", f"/api/v2/dags/{d}").status_code == 200 for d in (DAG_ID, TRAINING_DAG_ID)),
                         timeout_s=300, what="both DAGs to be parsed", interval_s=1.0)
                # Each run triggers a training run; paused, it waits instead of
                # training beside the next measurement.
                api.call("PATCH", f"/api/v2/dags/{TRAINING_DAG_ID}", json={"is_paused": True})
                yield api
            finally:
                api.close()
    except ServiceError as exc:
        msg = f"live Airflow in {airflow_home}: {exc}"
        raise BenchError(msg) from None


def warm_up(api: AirflowApi, home: Path) -> float:
    """Run the DAG once on a few hard-linked clips, so the timed runs do not pay one-time set-up; return its wall."""
    source = home / "demo" / "ravdess"
    target = home / "warmup" / "ravdess"
    shutil.rmtree(home / "warmup", ignore_errors=True)
    for src in sorted(source.rglob("*.npy"))[:WARMUP_FILES]:
        dst = target / src.relative_to(source)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
    conf = {"datasets": {"ravdess": {"input": str(target), "output": str(home / "warmup" / "features")}}}
    return live_run(api, conf)["wall_s"]


def live_run(api: AirflowApi, conf: dict[str, Any]) -> dict[str, Any]:
    """Trigger the DAG over REST as the UI does and wait for it; return trigger-to-end seconds and task seconds.

    The end is the run's own ``end_date`` (same clock), so polling adds nothing.
    """
    started = datetime.now().astimezone()
    run = api.trigger(DAG_ID, conf)
    try:
        done = api.wait_run(DAG_ID, run["dag_run_id"], timeout_s=1800)
    except ServiceError as exc:
        raise BenchError(str(exc)) from None
    tis = api.task_instances(DAG_ID, run["dag_run_id"])
    if done["state"] != "success":
        states = [(t["task_id"], t["map_index"], t["state"]) for t in tis]
        msg = f"live run {run['dag_run_id']} ended {done['state']}: {states}"
        raise BenchError(msg)
    tasks: Counter[str] = Counter()
    for ti in tis:
        tasks[ti["task_id"]] += float(ti["duration"] or 0.0)
    return {"wall_s": (datetime.fromisoformat(done["end_date"]) - started).total_seconds(), "tasks_s": dict(tasks)}


def measure_live_dag(api: AirflowApi, settings: Settings) -> dict[str, Any]:
    """Run the whole extraction DAG on a running Airflow on fresh outputs; return wall and task times."""
    clear_outputs(settings)
    result = live_run(api, {"datasets": settings.default_datasets(), "device": "auto"})
    result["features"] = count_features(settings)
    return result


def count_features(settings: Settings) -> int:
    """Count the feature files under the features folder (records and temporaries left out)."""
    return sum(1 for p in settings.features_root.rglob("*.npy") if not p.name.startswith(".") and "/_" not in p.as_posix())


def task_seconds(lines: Iterator[str] | Any) -> dict[str, float]:
    """Sum each task's seconds from ``airflow dags test`` output (its [DAG TEST] start/end lines)."""
    starts: dict[str, datetime] = {}
    totals: Counter[str] = Counter()
    for line in lines:
        if "[DAG TEST]" not in line or "task_id=" not in line:
            continue
        try:
            stamp = datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
        except ValueError:
            continue
        task = line.split("task_id=", 1)[1].split()[0]
        if "starting task_id=" in line:
            starts[task] = stamp
        elif "end task task_id=" in line and task in starts:
            totals[task] += (stamp - starts.pop(task)).total_seconds()
    return dict(totals)


def measure_rss(home: Path, settings: Settings, model: dict[str, Any], *, scale: int) -> dict[str, Any]:
    """Run one worker over ``scale`` copies of the corpus (hard links); return its peak RSS and file count."""
    inputs = home / f"rss-x{scale}"
    files: list[str] = []
    for copy in range(scale):
        for dataset in DATASETS:
            src_root = home / "demo" / dataset
            for src in sorted(src_root.rglob("*.npy")):
                rel = f"copy{copy}/{dataset}/{src.relative_to(src_root).as_posix()}"
                dst = inputs / rel
                if not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.link(src, dst)
                files.append(rel)
    output = home / "rss-out"
    shutil.rmtree(output, ignore_errors=True)
    spec = {
        "shard_id": f"rss-x{scale}",
        "label": f"rss x{scale}",
        "dataset": "mixed",
        "input": str(inputs),
        "output": str(output),
        "files": files,
        "rejected": {},
        "model": model,
        "batch_size": settings.batch_size,
    }
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        write_json_atomic(spec_path, spec)
        with open(Path(tmp) / "out.log", "w+", encoding="utf-8") as out:
            cmd = python_module_cmd("cnn_features.worker", "--spec", str(spec_path), "--device", "cpu")
            proc = subprocess.Popen(cmd, env=child_env("cpu"), stdout=out, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = code = os.waitstatus_to_exitcode(status)
            out.seek(0)
            lines = [parse_line(line.rstrip("\n"), RESULT_PREFIX) for line in out]
    shutil.rmtree(output, ignore_errors=True)
    result = next((r for r in lines if r is not None), None)
    if code != 0 or result is None:
        msg = f"memory run x{scale}: worker exited with code {code} without a result"
        raise BenchError(msg)
    return {"files": result["extracted"], "peak_rss_bytes": usage.ru_maxrss * 1024}


def measure_parse(root: Path, *, repeats: int) -> dict[str, Any]:
    """Parse the DAG files in ``repeats`` fresh processes; return median totals and per-file seconds.

    ``total_s`` is what the DAG processor pays: its process already holds
    Airflow, the SDK and its own parsing modules (``PARSE_PRELOAD``), so a
    file costs its own code and the imports only it makes. ``cold_total_s``
    has only ``airflow.sdk`` imported, so it also pays for the Airflow
    modules the files' imports pull in (models, API, providers).
    """
    env = airflow_env(root / "airflow" / "parse", root / "parse-home")
    runs: dict[str, list[dict[str, Any]]] = {}
    for mode, preload in (("processor", PARSE_PRELOAD), ("cold", "airflow.sdk")):
        args = ["_parse", "--dags", str(REPO / "dags"), "--preload", preload]
        runs[mode] = [run_child(args, env=env) for _ in range(repeats)]
    totals = {mode: [sum(r["seconds"].values()) for r in rs] for mode, rs in runs.items()}
    names = runs["processor"][0]["seconds"].keys()
    return {
        "total_s": statistics.median(totals["processor"]),
        "cold_total_s": statistics.median(totals["cold"]),
        "samples": totals,
        "per_file_s": {n: statistics.median(r["seconds"][n] for r in runs["processor"]) for n in names},
        "preload": PARSE_PRELOAD,
        "heavy_modules": sorted({m for rs in runs.values() for r in rs for m in r["heavy_modules"]}),
    }


# --------------------------------------------------------------------------- ratios and report


def corpus_gflop(frames: dict[str, list[int]], flops: dict[str, int]) -> float:
    """Return the corpus's total GFLOP from per-file frame counts and FLOPs per frame count."""
    return sum(flops[str(f)] for counts in frames.values() for f in counts) / 1e9


def ratios(figures: dict[str, Any]) -> dict[str, float]:
    """Return the target ratios, each computed from the measured figures."""
    limit = figures["limit_gflops"]
    return {
        "model_alone_vs_limit": figures["model_alone_gflops"] / limit,
        "stage_vs_limit": figures["stage_gflops"] / limit,
        "dag_vs_limit": figures["dag_gflops"] / limit,
        "dag_wall_vs_compute_at_limit": figures["dag_wall_s"] / (figures["corpus_gflop"] / limit),
        "dags_test_vs_limit": figures["dags_test_gflops"] / limit,
        "stage_vs_naive": figures["stage_files_per_s"] / figures["naive_files_per_s"],
        "rss_growth_1x_to_4x": figures["rss_4x_gib"] / figures["rss_1x_gib"] - 1.0,
    }


def targets(figures: dict[str, Any], ratio: dict[str, float]) -> dict[str, bool]:
    """Return whether each of the project's targets is met."""
    return {
        "stage >= 85 % of limit": ratio["stage_vs_limit"] >= TARGET_STAGE_VS_LIMIT,
        "DAG >= 2/3 of limit": ratio["dag_vs_limit"] >= TARGET_DAG_VS_LIMIT,
        ">= 10x naive": ratio["stage_vs_naive"] >= TARGET_VS_NAIVE,
        "peak RSS <= 1.5 GiB": max(figures["rss_1x_gib"], figures["rss_4x_gib"]) <= TARGET_RSS_GIB,
        "RSS flat 1x -> 4x (<= 10 %)": ratio["rss_growth_1x_to_4x"] <= TARGET_RSS_GROWTH,
        "DAG parse <= 0.3 s, no TensorFlow": figures["dag_parse_s"] <= TARGET_PARSE_S and not figures["dag_parse_heavy_modules"],
    }


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def dag_figures(prefix: str, runs: list[dict[str, Any]], *, gflop: float, files: int) -> dict[str, Any]:
    """Return the median wall of whole-DAG runs, its rates, the median run's task times and the features written."""
    wall = median_of(runs, "wall_s")
    return {
        f"{prefix}_wall_s": wall,
        f"{prefix}_gflops": gflop / wall,
        f"{prefix}_files_per_s": files / wall,
        f"{prefix}_tasks_s": sorted(runs, key=lambda d: d["wall_s"])[len(runs) // 2]["tasks_s"],
        f"{prefix}_features_written": runs[-1]["features"],
    }


def bench_corpus(name: str, home: Path, root: Path, args: argparse.Namespace, shared: dict[str, Any]) -> dict[str, Any]:
    """Measure one corpus: model alone, stage, naive, DAG and memory; return figures, ratios and targets."""
    settings = corpus_settings(home)
    model = check_model(None, settings)
    frames = corpus_frames(home)
    n_files = sum(len(v) for v in frames.values())
    probe_frames = args.fixed_frames
    distinct = sorted({f for v in frames.values() for f in v} | {probe_frames})
    streams = shared["streams"]
    def model_alone(flop_frames: list[int], repeats: int) -> dict[str, Any]:
        return run_child(
            [
                "_model", "--model", model["path"], "--streams", str(streams), "--frames", str(probe_frames),
                "--batch-size", str(settings.batch_size), "--repeats", str(repeats), "--seconds", str(args.model_seconds),
                "--flop-frames", json.dumps(flop_frames),
            ]
        )

    log(f"[{name}] model alone ({streams} streams, {probe_frames} frames) and FLOP count")
    alone = model_alone(distinct, args.repeats)
    alone_samples = list(alone["samples"])
    flops = alone["flops"]
    gflop = corpus_gflop(frames, flops)
    gflop_per_probe = flops[str(probe_frames)] / 1e9

    stages, dags_tests, dags = [], [], []
    airflow_home = root / "airflow" / name
    if not args.skip_dag:
        log(f"[{name}] Airflow metadata DB (SQLite) in {airflow_home}")
        prepare_airflow(airflow_home, home)
    for run in range(args.runs):
        log(f"[{name}] extraction stage, run {run + 1}/{args.runs}")
        stages.append(measure_stage(settings, model))
        # The limit and the model alone again after each stage run, so that
        # load from other processes weighs on every figure alike.
        shared["limit_samples"].append(measure_limit(threads=streams, n=args.matmul_n, repeats=args.repeats)["gflops"])
        alone_samples += model_alone([probe_frames], 2)["samples"]
        if not args.skip_dag:
            log(f"[{name}] whole DAG (airflow dags test), run {run + 1}/{args.runs}")
            dags_tests.append(measure_dag(airflow_home, settings))
    warmup_s = None
    if not args.skip_dag:
        live_home = root / "airflow" / f"live-{name}"
        log(f"[{name}] running Airflow (API server, scheduler, DAG processor, triggerer) in {live_home}")
        with live_airflow(live_home, home) as api:
            warmup_s = warm_up(api, home)
            for run in range(args.runs):
                log(f"[{name}] whole DAG on the running Airflow (REST trigger), run {run + 1}/{args.runs}")
                dags.append(measure_live_dag(api, settings))
                shared["limit_samples"].append(measure_limit(threads=streams, n=args.matmul_n, repeats=args.repeats)["gflops"])
    every_file = sorted(str(p) for d in DATASETS for p in (home / "demo" / d).rglob("*.npy"))
    sample_files = every_file[:: max(1, n_files // args.naive_files)][: args.naive_files]
    log(f"[{name}] naive baseline on {len(sample_files)} files")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(sample_files, fh)
    naive = run_child(["_naive", "--model", model["path"], "--files", fh.name])
    os.unlink(fh.name)
    naive_gflop = sum(flops[str(read_header(Path(p)).shape[1])] for p in sample_files) / 1e9
    log(f"[{name}] peak RSS at 1x and {RSS_SCALE}x the corpus")
    rss1 = measure_rss(home, settings, model, scale=1)
    rss4 = measure_rss(home, settings, model, scale=RSS_SCALE)

    stage_loop = median_of(stages, "loop_s")
    stage_wall = median_of(stages, "wall_s")
    figures: dict[str, Any] = {
        "files": n_files,
        "corpus_gflop": gflop,
        "gflop_per_file_at_probe_frames": gflop_per_probe,
        "model_alone_files_per_s": statistics.median(alone_samples),
        "model_alone_gflops": statistics.median(alone_samples) * gflop_per_probe,
        "stage_files_per_s": n_files / stage_loop,
        "stage_gflops": gflop / stage_loop,
        "stage_loop_s": stage_loop,
        "stage_shards": stages[0]["shards"],
        "stage_wall_with_worker_startup_s": stage_wall,
        "worker_startup_s_per_shard": (stage_wall - stage_loop) / stages[0]["shards"],
        "stage_cpu_per_wall": median_of(stages, "cpu_per_wall"),
        "naive_files_per_s": naive["files_per_s"],
        "naive_gflops": naive_gflop / naive["elapsed_s"],
        "rss_1x_gib": rss1["peak_rss_bytes"] / GIB,
        "rss_4x_gib": rss4["peak_rss_bytes"] / GIB,
        "rss_files_1x": rss1["files"],
        "rss_files_4x": rss4["files"],
        "startup_s": alone["startup_s"],
        "pass_size": alone["pass_size"],
    }
    if dags:
        figures |= dag_figures("dag", dags, gflop=gflop, files=n_files)
        figures |= dag_figures("dags_test", dags_tests, gflop=gflop, files=n_files)
        figures["dag_warmup_wall_s"] = warmup_s
    return {"figures": figures, "runs": {"stage": stages, "dag": dags, "dags_test": dags_tests, "model_alone": alone_samples}}


def finish(result: dict[str, Any], shared: dict[str, Any]) -> None:
    """Add the shared figures (limit, parse) to a corpus result; compute its ratios and targets."""
    figures = result["figures"]
    figures["limit_gflops"] = statistics.median(shared["limit_samples"])
    figures["dag_parse_s"] = shared["parse"]["total_s"]
    figures["dag_parse_cold_s"] = shared["parse"]["cold_total_s"]
    figures["dag_parse_heavy_modules"] = shared["parse"]["heavy_modules"]
    if "dag_wall_s" not in figures:
        return
    result["ratios"] = ratios(figures)
    result["targets"] = targets(figures, result["ratios"])


def table(results: dict[str, dict[str, Any]], shared: dict[str, Any]) -> str:
    """Return the figures, ratios and targets of every corpus as a Markdown table.

    A smoke run (``shared["smoke"]``) says so above the table, and its target
    rows read "not judged (smoke run)": its figures check the script, they
    do not measure the targets.
    """
    smoke = bool(shared.get("smoke"))
    names = list(results)
    rows: list[tuple[str, ...]] = [("figure", *names), ("---", *("---:" for _ in names))]

    def row(label: str, fmt: str, get: Any) -> None:
        cells = []
        for name in names:
            try:
                cells.append(fmt.format(get(results[name])))
            except (KeyError, TypeError):
                cells.append("-")
        rows.append((label, *cells))

    def f(key: str) -> Any:
        return lambda res: res["figures"][key]

    def r(key: str) -> Any:
        return lambda res: res["ratios"][key]

    row("files", "{:,}", f("files"))
    row("corpus GFLOP (conv multiply-adds x 2)", "{:,.0f}", f("corpus_gflop"))
    row(f"machine limit: numpy float32 matmul, {shared['streams']} threads, GFLOP/s", "{:.0f}", f("limit_gflops"))
    row("model alone, in-memory passes: files/s", "{:.0f}", f("model_alone_files_per_s"))
    row("model alone: GFLOP/s", "{:.0f}", f("model_alone_gflops"))
    row("extraction stage (load, batch, infer, write): files/s", "{:.0f}", f("stage_files_per_s"))
    row("extraction stage: GFLOP/s", "{:.0f}", f("stage_gflops"))
    row("shards (default shard size)", "{}", f("stage_shards"))
    row("worker start-up per shard, s", "{:.2f}", f("worker_startup_s_per_shard"))
    row("naive predict() per file: files/s", "{:.1f}", f("naive_files_per_s"))
    row("whole DAG, running Airflow (REST trigger to run end): wall s", "{:.1f}", f("dag_wall_s"))
    row("whole DAG: files/s", "{:.0f}", f("dag_files_per_s"))
    row("whole DAG: GFLOP/s", "{:.0f}", f("dag_gflops"))
    row("whole DAG, `airflow dags test` (CLI start, tasks one by one): wall s", "{:.1f}", f("dags_test_wall_s"))
    row("peak RSS, 1x corpus, GiB", "{:.2f}", f("rss_1x_gib"))
    row(f"peak RSS, {RSS_SCALE}x corpus, GiB", "{:.2f}", f("rss_4x_gib"))
    row("DAG files parse, as the DAG processor pays it, s", "{:.3f}", f("dag_parse_s"))
    row("DAG files parse, only airflow.sdk imported before, s", "{:.3f}", f("dag_parse_cold_s"))
    row("**model alone / limit**", "{:.1%}", r("model_alone_vs_limit"))
    row("**stage / limit** (target >= 85 %)", "{:.1%}", r("stage_vs_limit"))
    row("**DAG / limit** (target >= 66.7 %)", "{:.1%}", r("dag_vs_limit"))
    row("DAG wall / compute time at the limit (target <= 1.5)", "{:.2f}", r("dag_wall_vs_compute_at_limit"))
    row("`airflow dags test` / limit (for reference)", "{:.1%}", r("dags_test_vs_limit"))
    row("**stage / naive** (target >= 10x)", "{:.1f}x", r("stage_vs_naive"))
    row("RSS growth 1x -> 4x (target <= 10 %)", "{:+.1%}", r("rss_growth_1x_to_4x"))
    for target in next((res["targets"] for res in results.values() if "targets" in res), {}):
        if smoke:
            row(f"target: {target}", "{}", lambda res: SMOKE_VERDICT)
        else:
            row(f"target: {target}", "{}", lambda res, t=target: "met" if res["targets"][t] else "NOT met")
    text = "\n".join("| " + " | ".join(cells) + " |" for cells in rows)
    return f"{SMOKE_NOTE}\n\n{text}" if smoke else text


def machine() -> dict[str, Any]:
    """Describe this machine and the software versions."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    versions = {}
    for package in ("numpy", "tensorflow-cpu", "tensorflow", "keras", "apache-airflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "openblas_pins_in_environment": {n: os.environ[n] for n in OPENBLAS_PINS if n in os.environ},
    }


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def main_bench(args: argparse.Namespace) -> int:
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    counts = SMOKE_COUNTS if args.smoke else FULL_COUNTS
    corpora = {"fixed": args.fixed_frames, "realistic": None}
    chosen = list(corpora) if args.corpus == "both" else [args.corpus]
    streams = load_settings().cpu_threads or len(os.sched_getaffinity(0))
    started = time.perf_counter()
    shared: dict[str, Any] = {
        "streams": streams, "limit_samples": [], "load_before": os.getloadavg(), "smoke": bool(args.smoke),
    }
    info = machine()
    log(f"load average {shared['load_before']}; limit: numpy matmul on {streams} threads")
    first = measure_limit(threads=streams, n=args.matmul_n, repeats=args.repeats)
    shared["limit_samples"].append(first["gflops"])
    shared["blas"] = first["blas"]
    if info["openblas_pins_in_environment"]:
        shared["limit_with_inherited_pins"] = measure_limit(threads=streams, n=args.matmul_n, repeats=args.repeats, inherit_pins=True)
    (root / "airflow" / "parse").mkdir(parents=True, exist_ok=True)
    shared["parse"] = measure_parse(root, repeats=args.repeats)

    results: dict[str, dict[str, Any]] = {}
    out = args.json or root / "results.json"
    for name in chosen:
        home = root / (f"{name}-{corpora[name]}" if corpora[name] else name)
        log(f"[{name}] corpus under {home / 'demo'}")
        ensure_corpus(home, counts=counts, frames=corpora[name])
        results[name] = bench_corpus(name, home, root, args, shared)
        for result in results.values():
            finish(result, shared)
        shared["load_after"] = os.getloadavg()
        report = {
            "when": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "seconds": time.perf_counter() - started,
            "machine": info,
            "settings": dataclasses.asdict(load_settings()) | {"streams": streams},
            "shared": shared,
            "corpora": results,
        }
        write_json_atomic(out, json.loads(json.dumps(report, default=str)))  # after each corpus
    print(table(results, shared))
    print(f"\nBLAS: {shared['blas']}; load average before {shared['load_before']}, after {shared['load_after']}")
    print(f"JSON: {out}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):  # an internal child measurement: not in --help
        return _child_parser().parse_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "data" / "bench", help="corpora, Airflow home, results")
    parser.add_argument("--corpus", choices=("fixed", "realistic", "both"), default="both")
    parser.add_argument("--runs", type=int, default=3, help="runs of the stage and the DAG (median reported)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the cheap figures (median reported)")
    parser.add_argument("--json", type=Path, default=None, help="where the JSON goes (default ROOT/results.json)")
    parser.add_argument("--skip-dag", action="store_true", help="leave out the whole-DAG run")
    parser.add_argument("--smoke", action="store_true", help="tiny corpus and short rounds: checks the script, not the machine")
    args = parser.parse_args(argv)
    args.child = None
    args.fixed_frames = SMOKE_FRAMES if args.smoke else HEADLINE_FRAMES
    args.matmul_n = 512 if args.smoke else MATMUL_N
    args.naive_files = 4 if args.smoke else NAIVE_FILES
    args.model_seconds = 0.3 if args.smoke else MODEL_ROUND_S
    if args.smoke:
        args.runs, args.repeats = 1, 1
    return args


def _child_parser() -> argparse.ArgumentParser:
    """Return the parser of the internal child measurements the benchmark starts (``_matmul`` ...)."""
    parser = argparse.ArgumentParser(prog=f"{Path(__file__).name} (internal)")
    sub = parser.add_subparsers(dest="child", required=True)
    m = sub.add_parser("_matmul")
    m.add_argument("--n", type=int, required=True)
    m.add_argument("--repeats", type=int, required=True)
    m = sub.add_parser("_model")
    for name in ("--model", "--flop-frames"):
        m.add_argument(name, required=True)
    for name in ("--streams", "--frames", "--batch-size", "--repeats"):
        m.add_argument(name, type=int, required=True)
    m.add_argument("--seconds", type=float, required=True)
    m = sub.add_parser("_naive")
    m.add_argument("--model", required=True)
    m.add_argument("--files", required=True)
    m = sub.add_parser("_parse")
    m.add_argument("--dags", required=True)
    m.add_argument("--preload", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, or one of its child measurements."""
    args = parse_args(argv)
    children = {"_matmul": child_matmul, "_model": child_model, "_naive": child_naive, "_parse": child_parse}
    if args.child:
        children[args.child](args)
        return 0
    try:
        return main_bench(args)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
