"""GPU check kit: prove the GPU path on a real GPU and write one JSON file (docs/gpu.md).

Runs on a machine with numpy, JAX (CUDA build) and optionally PyTorch, without
TensorFlow or Airflow, given only this checkout's ``include/`` on
``PYTHONPATH`` and a Keras wheel:

    PYTHONPATH=include python3 bench/gpu_check.py --out /tmp/gpu_check.json
    .venv/bin/python bench/gpu_check.py --smoke --out /tmp/smoke.json   # CPU only, tiny corpus (CI)

What it records, each as a step with a status (ok, failed, error, skipped and why):

1. ``environment``: Python, packages (read from metadata, nothing imported), CPUs, nvidia-smi;
2. ``corpus``: the full-size corpus (1,440 + 7,442 clips of 128 x 256) generated
   in parallel processes (``--smoke``: 24 + 24 small clips);
3. ``probe``: the project's probe report, from a fresh process;
4. ``model``: the reference model checked (and created) in a fresh CPU process;
5. ``np_load``: bare ``np.load`` of every corpus file in one process (and 8 threads);
6. ``stage``: every shard through ``runner.run_shard`` on the GPU, results naming the GPU;
   files/s against ``np_load`` (target >= 0.8) and against the CPU stage in docs/benchmarks.md;
7. ``precision``: GPU features re-extracted on CPU (``crosscheck``), full float32
   (limit 1e-4 relative), and the same with TF32 for contrast;
8. ``fork``: in a separate process that initialises CUDA (driver, then JAX), a
   forked child fails or hangs; the runner started from that same process
   completes a shard on the GPU; with the GPU worker made to fail it completes on CPU;
9. ``varlen``: clips of 16 lengths through a GPU shard: compiles and their seconds, twice
   (the second run reads the on-disk compile cache);
10. ``torch``: the probe and a shard under the PyTorch backend where torch is installed,
    its features against JAX's.

The JSON is rewritten after every step (a run cut short still leaves what it
measured) and a table is printed at the end. The kit itself never touches
CUDA: only its children do, and the fork step runs in a process of its own.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
INCLUDE = REPO / "include"
if str(INCLUDE) not in sys.path:
    sys.path.insert(0, str(INCLUDE))

import numpy as np  # noqa: E402

log = logging.getLogger("gpu_check")

# Full-size corpus: RAVDESS speech (1,440) and CREMA-D (7,442), every clip 128 x 256.
FULL_FRAMES = 256
# Smoke corpus: a few clips per dataset, short enough for CI on 2 cores.
SMOKE_FILES = 24
SMOKE_FRAMES = 48
# Files of the fork, TF32 and torch runs: one shard, enough to time, cheap to redo.
SUBSET_FILES = 256
SMOKE_SUBSET_FILES = 8
# Files re-extracted on CPU for the precision figures.
XCHECK_FILES = 256
SMOKE_XCHECK_FILES = 8
# Variable-length clips: distinct lengths x clips per length (RAVDESS-like 200+ frames).
VARLEN_LENGTHS = tuple(range(200, 216))
VARLEN_PER_LENGTH = 4
SMOKE_VARLEN_LENGTHS = (40, 41, 42)
SMOKE_VARLEN_PER_LENGTH = 2
# Seconds a forked child may take before it counts as hung: a healthy CUDA
# call answers in milliseconds; a forked JAX child on an H100 hung past 120 s
# (and on the H200 past this limit, docs/gpu.md).
FORK_CHILD_TIMEOUT_S = 20.0
# Largest GPU-vs-CPU relative difference accepted in full float32 (verification's limit).
FLOAT32_RTOL = 1e-4
# Cross-backend (JAX vs PyTorch, both on the GPU in float32) agreement expected.
BACKEND_RTOL = 1e-4
# GPU stage files/s over bare np.load files/s: the target.
TARGET_STAGE_VS_NP_LOAD = 0.8
# The CPU extraction stage in docs/benchmarks.md (2-core AMD EPYC, TensorFlow),
# used if that file cannot be read.
CPU_STAGE_FILES_PER_S = 171.0
# Threads of the parallel np.load figure: enough to cover file-system latency.
NP_LOAD_THREADS = 8
# Default wall-time budget: GPU machines are often lent for minutes; ~6 for the whole command.
DEFAULT_BUDGET_S = 330.0
# Seconds each step is expected to need at most; a step is skipped when less is left.
STEP_NEEDS_S = {"fork": 90.0, "varlen": 75.0, "tf32": 30.0, "torch": 45.0}


class CheckFailed(RuntimeError):
    """A step ran but its result contradicts what it checks."""


# --- corpus --------------------------------------------------------------------


def _clips(dataset: str, *, full: bool) -> list[tuple[str, str, int, bool]]:
    from cnn_features import demo

    clips = demo.ravdess_clips(full=full) if dataset == "ravdess" else demo.crema_d_clips(full=full)
    return list(clips)


def _write_clips(root: str, dataset: str, items: list[tuple[str, str, int, bool, int]]) -> int:
    """Write clips (rel, emotion, actor, intense, frames) under root/dataset; return how many were new."""
    from cnn_features import demo
    from cnn_features.storage import save_npy_atomic

    ranges = {"ravdess": demo.RAVDESS_FRAMES, "crema_d": demo.CREMA_D_FRAMES}
    written = 0
    for rel, emotion, actor, intense, frames in items:
        path = Path(root) / dataset / rel
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        array = demo.spectrogram(rel, emotion, actor, frames_range=ranges[dataset], frames=frames, intense=intense)
        save_npy_atomic(path, array)
        written += 1
    return written


def generate(root: Path, plan: dict[str, list[tuple[str, str, int, bool, int]]], *, processes: int) -> int:
    """Write every planned clip in ``processes`` fresh processes (spawned: no fork of this one); return new files."""
    jobs = [(dataset, items[i : i + 64]) for dataset, items in plan.items() for i in range(0, len(items), 64)]
    if processes <= 1 or len(jobs) <= 1:
        return sum(_write_clips(str(root), dataset, chunk) for dataset, chunk in jobs)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        return sum(pool.map(_write_clips, [str(root)] * len(jobs), [d for d, _ in jobs], [c for _, c in jobs]))


def corpus_plan(*, smoke: bool) -> dict[str, list[tuple[str, str, int, bool, int]]]:
    """Return the clips of the kit's corpus: the full layouts at 256 frames, or a few small ones."""
    plan = {}
    for dataset in ("ravdess", "crema_d"):
        clips = _clips(dataset, full=not smoke)
        if smoke:
            clips = clips[:SMOKE_FILES]
        plan[dataset] = [(*clip, SMOKE_FRAMES if smoke else FULL_FRAMES) for clip in clips]
    return plan


def varlen_plan(*, smoke: bool) -> dict[str, list[tuple[str, str, int, bool, int]]]:
    """Return RAVDESS-layout clips of several exact lengths, a few clips each."""
    lengths = SMOKE_VARLEN_LENGTHS if smoke else VARLEN_LENGTHS
    per = SMOKE_VARLEN_PER_LENGTH if smoke else VARLEN_PER_LENGTH
    clips = _clips("ravdess", full=True)[: len(lengths) * per]
    return {"ravdess": [(*clip, lengths[i % len(lengths)]) for i, clip in enumerate(clips)]}


# --- helpers ---------------------------------------------------------------------


@contextlib.contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set (or, with None, remove) environment variables inside the block; restore them after."""
    old = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def package_versions() -> dict[str, str | None]:
    """Return installed versions of the packages the kit cares about, without importing them."""
    versions: dict[str, str | None] = {}
    for dist in ("numpy", "keras", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "torch", "tensorflow", "boto3"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def nvidia_smi() -> str | None:
    """Return nvidia-smi's one-line-per-GPU listing (no CUDA call in this process), or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"
    return (done.stdout or done.stderr).strip()


def cpu_stage_figure() -> float:
    """Return the CPU extraction stage files/s from docs/benchmarks.md (the constant if unreadable)."""
    with contextlib.suppress(OSError):
        text = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
        found = re.search(r"extraction stage \(load, batch, infer, write\): files/s \| ([\d.,]+)", text)
        if found:
            return float(found.group(1).replace(",", ""))
    return CPU_STAGE_FILES_PER_S


def plan_dataset(
    settings: Any, model: dict[str, Any], dataset: str, source: Path, output: Path, *, shard_size: int
) -> list[dict[str, Any]]:
    """Plan one dataset's shards as plan_shards does (validated conf, stable shards)."""
    from cnn_features import plan

    params = {
        "datasets": {dataset: {"input": str(source), "output": str(output)}},
        "device": "gpu",
        "shard_size": shard_size,
        "model_path": None,
        "max_bad_fraction": 0.0,
    }
    conf = plan.validate_conf(params, settings)
    return plan.plan_run(conf, model, batch_size=settings.batch_size, settings=settings)


def shard_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Keep the fields of a shard result that the report shows."""
    keys = (
        "shard_id", "device", "device_reason", "fallback_reason", "gpu_index", "gpu_name", "keras_backend",
        "precision", "extracted", "skipped_existing", "files_per_s", "elapsed_s", "compiles", "compile_s", "attempts",
    )
    return {k: result.get(k) for k in keys}


def read_features(root: Path, rels: list[str]) -> np.ndarray:
    """Return the stored features of ``rels`` stacked (float32)."""
    return np.stack([np.load(root / rel, allow_pickle=False) for rel in rels])


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Return the largest per-file max |a - b| / max |b|."""
    from cnn_features.crosscheck import relative_difference as rel_diff

    return max(rel_diff(x, y) for x, y in zip(a, b, strict=True))


# --- the fork step (a process of its own) -----------------------------------------


def _error_name(lib: Any, code: int) -> str:
    name = ctypes.c_char_p()
    if code and lib.cuGetErrorName(code, ctypes.byref(name)) == 0 and name.value:
        return name.value.decode()
    return "CUDA_SUCCESS" if code == 0 else f"error {code}"


def _wait_child(pid: int, read_fd: int, timeout_s: float) -> dict[str, Any]:
    """Wait for a forked child's JSON on ``read_fd``; kill it at the time limit. Return its outcome."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], 0.2)
        if ready:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            data += chunk
    os.close(read_fd)
    done, status = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return {"outcome": "hung", "detail": f"no answer within {timeout_s:g} s; killed"}
    if data:
        return {"outcome": "answered", **json.loads(data.decode())}
    return {"outcome": "died", "detail": f"exit status {status} without an answer"}


def fork_driver() -> dict[str, Any]:
    """cuInit in this process, then fork: the child's cuInit/cuDeviceGet/cuCtxCreate should fail (error 3)."""
    lib = ctypes.CDLL("libcuda.so.1")
    parent = lib.cuInit(0)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the forked child: only raw driver calls, then _exit
        try:
            os.close(read_fd)
            device, context = ctypes.c_int(), ctypes.c_void_p()
            calls = {
                "cuInit": lambda: lib.cuInit(0),
                "cuDeviceGet": lambda: lib.cuDeviceGet(ctypes.byref(device), 0),
                "cuCtxCreate": lambda: lib.cuCtxCreate_v2(ctypes.byref(context), 0, device),
            }
            codes: dict[str, int] = {}
            named: dict[str, str] = {}
            for call, fn in calls.items():
                try:
                    codes[call] = int(fn())
                    named[call] = _error_name(lib, codes[call])
                except AttributeError as exc:  # a driver without that symbol
                    named[call] = f"not called: {exc}"
            os.write(write_fd, json.dumps({"codes": codes, "names": named}).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    child = _wait_child(pid, read_fd, FORK_CHILD_TIMEOUT_S)
    spawned = subprocess.run(
        [sys.executable, "-c", "import ctypes; print(ctypes.CDLL('libcuda.so.1').cuInit(0))"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    failed = child.get("outcome") == "hung" or any(code != 0 for code in child.get("codes", {}).values())
    return {
        "parent_cuInit": _error_name(lib, parent),
        "forked_child": child,
        "spawned_child_cuInit": spawned.stdout.strip() or spawned.stderr.strip()[-300:],
        "reproduced": failed,
    }


def fork_jax() -> dict[str, Any]:
    """Run JAX on the GPU in this process, then fork a child that runs JAX: it should fail or hang."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((512, 512), jnp.float32)
    parent_sum = float(jnp.sum(x @ x))
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            try:
                y = jnp.ones((512, 512), jnp.float32)
                answer = {"sum": float(jnp.sum(y @ y)), "device": str(jax.devices()[0])}
            except Exception as exc:  # noqa: BLE001 - whatever CUDA says in a forked child is the finding
                answer = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            os.write(write_fd, json.dumps(answer).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    child = _wait_child(pid, read_fd, FORK_CHILD_TIMEOUT_S)
    return {
        "parent_device": str(jax.devices()[0]),
        "parent_sum": parent_sum,
        "forked_child": child,
        "reproduced": child["outcome"] != "answered" or "error" in child,
    }


def fork_main(spec_path: Path, result_path: Path) -> int:
    """The fork step's own process: reproduce the failure, then run the runner from this same process."""
    from cnn_features import faults
    from cnn_features.runner import run_shard

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    out: dict[str, Any] = {}

    def record(name: str, fn: Callable[[], dict[str, Any]], *, needs_gpu: bool) -> None:
        if needs_gpu and not spec["gpu"]:
            out[name] = {"status": "skipped", "reason": "no GPU"}
        else:
            try:
                out[name] = {"status": "ok", **fn()}
            except Exception as exc:  # noqa: BLE001 - recorded, the next part still runs
                out[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        result_path.write_text(json.dumps(out, indent=2), encoding="utf-8")

    record("driver_fork", fork_driver, needs_gpu=True)
    record("jax_fork", fork_jax, needs_gpu=True)
    record(
        "runner_from_cuda_parent",
        lambda: shard_summary(run_shard(spec["shards"][0], requested_device="gpu", probe=spec["probe"])),
        needs_gpu=True,
    )
    with environ(**{faults.ENV_VAR: "gpu_init_error"}):
        record(
            "runner_gpu_init_fault",
            lambda: shard_summary(run_shard(spec["shards"][1], requested_device="gpu", probe=spec["probe"])),
            needs_gpu=False,
        )
    return 0


# --- the steps ---------------------------------------------------------------------


class Kit:
    """The steps of one kit run and the report they fill."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke: bool = args.smoke
        self.work: Path = args.work.resolve()
        self.out: Path = args.out.resolve()
        self.started = time.monotonic()
        self.report: dict[str, Any] = {
            "kit": "bench/gpu_check.py",
            "mode": "smoke" if self.smoke else "full",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "keras_backend": args.backend,
            "steps": {},
        }
        self.gpu = False
        self.probe: dict[str, Any] = {}
        self.model: dict[str, Any] = {}
        self.settings: Any = None
        self.files: dict[str, list[str]] = {}
        self.stage_outputs: dict[str, Path] = {}

    # bookkeeping

    def left_s(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.out)

    def step(self, name: str, fn: Callable[[], dict[str, Any]], *, needs_gpu: bool = False) -> dict[str, Any]:
        """Run one step, record its outcome (never raise), save the report."""
        started = time.monotonic()
        needs = STEP_NEEDS_S.get(name, 0.0)
        if needs_gpu and not self.gpu:
            entry: dict[str, Any] = {"status": "skipped", "reason": "no GPU" + (f" ({self.probe.get('error')})" if self.probe else "")}
        elif not self.smoke and self.left_s() < needs:
            entry = {"status": "skipped", "reason": f"time budget: {self.left_s():.0f} s left, the step needs ~{needs:.0f} s"}
        else:
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            try:
                entry = {"status": "ok", **fn()}
            except CheckFailed as exc:
                entry = {"status": "failed", "error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - one broken step must not lose the others' figures
                entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        entry["step_s"] = round(time.monotonic() - started, 2)
        self.report["steps"][name] = entry
        self.save()
        return entry

    # steps

    def environment(self) -> dict[str, Any]:
        return {
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "machine": platform.machine(),
            "cpus": len(os.sched_getaffinity(0)),
            "packages": package_versions(),
            "nvidia_smi": nvidia_smi(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "work": str(self.work),
        }

    def corpus(self) -> dict[str, Any]:
        plan = corpus_plan(smoke=self.smoke)
        root = self.work / "corpus"
        started = time.monotonic()
        new = generate(root, plan, processes=1 if self.smoke else len(os.sched_getaffinity(0)))
        elapsed = time.monotonic() - started
        self.files = {d: sorted(item[0] for item in items) for d, items in plan.items()}
        total = sum(len(v) for v in self.files.values())
        size = sum((root / d / rel).stat().st_size for d, rels in self.files.items() for rel in rels)
        return {"root": str(root), "files": {d: len(v) for d, v in self.files.items()}, "total": total,
                "bytes": size, "generated": new, "seconds": round(elapsed, 2)}

    def probe_step(self) -> dict[str, Any]:
        from cnn_features.probe import run_probe

        self.probe = run_probe(timeout_s=120.0)
        self.gpu = bool(self.probe.get("usable"))
        if not self.smoke and not self.gpu:
            msg = f"the probe found no usable GPU: {self.probe.get('error')}"
            raise CheckFailed(msg)
        return {"report": self.probe}

    def model_step(self) -> dict[str, Any]:
        from cnn_features.config import load_settings
        from cnn_features.plan import check_model

        self.settings = load_settings()
        started = time.monotonic()
        self.model = check_model(None, self.settings)
        return {"info": self.model, "seconds": round(time.monotonic() - started, 2), "keras_backend": self.settings.keras_backend}

    def np_load(self) -> dict[str, Any]:
        paths = [self.work / "corpus" / d / rel for d, rels in self.files.items() for rel in rels]
        for path in paths[:64]:  # the page cache is warm from generation; touch the first files' inodes too
            np.load(path, allow_pickle=False)
        started = time.monotonic()
        for path in paths:
            np.load(path, allow_pickle=False)
        serial = time.monotonic() - started
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(NP_LOAD_THREADS) as pool:
            list(pool.map(lambda p: np.load(p, allow_pickle=False), paths, chunksize=64))
        threaded = time.monotonic() - started
        return {"files": len(paths), "files_per_s": round(len(paths) / serial, 1),
                f"files_per_s_{NP_LOAD_THREADS}_threads": round(len(paths) / threaded, 1)}

    def stage(self) -> dict[str, Any]:
        from cnn_features.runner import run_shard

        device = "gpu" if self.gpu else "cpu"
        results = []
        wall = time.monotonic()
        for dataset in self.files:
            out = self.work / "out" / f"stage-{device}" / dataset
            shutil.rmtree(out, ignore_errors=True)
            self.stage_outputs[dataset] = out
            for shard in plan_dataset(self.settings, self.model, dataset, self.work / "corpus" / dataset, out,
                                      shard_size=self.settings.shard_size):
                results.append(run_shard(shard, requested_device=device, probe=self.probe))
        wall = time.monotonic() - wall
        extracted = sum(r["extracted"] for r in results)
        busy = sum(r["elapsed_s"] for r in results)
        rate = extracted / busy if busy else 0.0
        np_rate = self.report["steps"].get("np_load", {}).get("files_per_s")
        cpu_stage = cpu_stage_figure()
        entry = {
            "device": device,
            "shards": [shard_summary(r) for r in results],
            "extracted": extracted,
            "stage_files_per_s": round(rate, 1),
            "wall_s": round(wall, 2),
            "wall_files_per_s": round(extracted / wall, 1) if wall else None,
            "worker_startup_s_per_shard": round((wall - busy) / max(1, len(results)), 2),
            "batch_size": self.settings.batch_size,
            "read_threads": self.settings.gpu_read_threads,
            "vs_np_load": round(rate / np_rate, 3) if np_rate else None,
            "target_vs_np_load": TARGET_STAGE_VS_NP_LOAD,
            "cpu_stage_files_per_s_docs": cpu_stage,
            "vs_cpu_stage_docs": round(rate / cpu_stage, 1),
        }
        if self.gpu:
            wrong = [r["shard_id"] for r in results if r["device"] != "gpu" or not r.get("gpu_name")]
            if wrong:
                msg = f"shards not run on the GPU (or not naming it): {', '.join(wrong)}"
                raise CheckFailed(msg)
            entry["meets_target"] = bool(entry["vs_np_load"] and entry["vs_np_load"] >= TARGET_STAGE_VS_NP_LOAD)
        return entry

    def precision(self) -> dict[str, Any]:
        from cnn_features.crosscheck import compare_on_cpu, sample

        dataset = "ravdess"
        rels = sample(self.files[dataset], SMOKE_XCHECK_FILES if self.smoke else XCHECK_FILES)
        made_on = self.report["steps"]["stage"].get("device")
        compared = compare_on_cpu(model=self.model, input_uri=str(self.work / "corpus" / dataset),
                                  features_uri=str(self.stage_outputs[dataset]), rels=rels)
        entry = {"features_made_on": made_on, "precision": self.settings.gpu_precision, "float32": compared,
                 "rtol": FLOAT32_RTOL}
        if compared["max_rel_diff"] > FLOAT32_RTOL:
            msg = f"GPU float32 features differ from CPU by {compared['max_rel_diff']:.3g} relative, above {FLOAT32_RTOL:g}"
            raise CheckFailed(msg)
        return entry

    def tf32(self) -> dict[str, Any]:
        from cnn_features.crosscheck import compare_on_cpu
        from cnn_features.runner import run_shard

        out = self.work / "out" / "tf32" / "ravdess"
        shutil.rmtree(out, ignore_errors=True)
        shard = plan_dataset(self.settings, self.model, "ravdess", self.work / "corpus" / "ravdess", out, shard_size=SUBSET_FILES)[0]
        with environ(CNN_FEATURES_GPU_PRECISION="tf32", NVIDIA_TF32_OVERRIDE=None):
            result = run_shard(shard, requested_device="gpu", probe=self.probe)
        compared = compare_on_cpu(model=self.model, input_uri=shard["input"], features_uri=str(out), rels=shard["files"])
        return {"shard": shard_summary(result), "tf32_vs_cpu": compared}

    def fork(self) -> dict[str, Any]:
        out = self.work / "out" / "fork"
        shutil.rmtree(out, ignore_errors=True)
        shards = []
        for name in ("gpu-from-cuda-parent", "gpu-init-fault"):
            planned = plan_dataset(self.settings, self.model, "ravdess", self.work / "corpus" / "ravdess", out / name / "ravdess",
                                   shard_size=SMOKE_SUBSET_FILES if self.smoke else SUBSET_FILES)
            shards.append(planned[0])
        spec = self.work / "fork-spec.json"
        result = self.work / "fork-result.json"
        result.unlink(missing_ok=True)
        spec.write_text(json.dumps({"gpu": self.gpu, "probe": self.probe, "shards": shards}), encoding="utf-8")
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--fork-step", str(spec), str(result)],
                              capture_output=True, text=True, timeout=max(60.0, self.left_s()), check=False)
        parts = json.loads(result.read_text(encoding="utf-8")) if result.exists() else {}
        entry: dict[str, Any] = {"parts": parts, "returncode": done.returncode}
        if done.returncode != 0:
            entry["stderr_tail"] = done.stderr[-2000:]
        problems = []
        if self.gpu:
            for part in ("driver_fork", "jax_fork"):
                if not parts.get(part, {}).get("reproduced"):
                    problems.append(f"{part}: the forked child did not fail")
            runner = parts.get("runner_from_cuda_parent", {})
            if runner.get("device") != "gpu":
                problems.append(f"runner from the CUDA parent ran on {runner.get('device')} ({runner.get('error') or runner.get('fallback_reason')})")
        fault = parts.get("runner_gpu_init_fault", {})
        if fault.get("device") != "cpu" or "CUDA_ERROR_NOT_INITIALIZED" not in str(fault.get("fallback_reason")):
            problems.append(f"GPU init fault: shard ran on {fault.get('device')}, fallback {fault.get('fallback_reason')!r}")
        if problems:
            entry_msg = "; ".join(problems)
            raise CheckFailed(entry_msg + " | " + json.dumps(parts, default=str)[:3000])
        return entry

    def varlen(self) -> dict[str, Any]:
        from cnn_features.runner import run_shard

        plan = varlen_plan(smoke=self.smoke)
        root = self.work / "varlen"
        generate(root, plan, processes=1)
        device = "gpu" if self.gpu else "cpu"
        runs = []
        for attempt in ("first", "second"):
            out = self.work / "out" / f"varlen-{attempt}" / "ravdess"
            shutil.rmtree(out, ignore_errors=True)
            shard = plan_dataset(self.settings, self.model, "ravdess", root / "ravdess", out, shard_size=10_000)[0]
            runs.append({"run": attempt, **shard_summary(run_shard(shard, requested_device=device, probe=self.probe))})
        lengths = sorted({item[4] for item in plan["ravdess"]})
        first = read_features(self.work / "out" / "varlen-first" / "ravdess", sorted(i[0] for i in plan["ravdess"]))
        second = read_features(self.work / "out" / "varlen-second" / "ravdess", sorted(i[0] for i in plan["ravdess"]))
        return {"device": device, "files": len(plan["ravdess"]), "distinct_lengths": len(lengths), "runs": runs,
                "runs_agree_max_rel_diff": relative_difference(second, first)}

    def torch(self) -> dict[str, Any]:
        from cnn_features.probe import run_probe
        from cnn_features.runner import run_shard

        if package_versions()["torch"] is None:
            return {"status": "skipped", "reason": "torch is not installed"}
        out = self.work / "out" / "torch" / "ravdess"
        shutil.rmtree(out, ignore_errors=True)
        shard = plan_dataset(self.settings, self.model, "ravdess", self.work / "corpus" / "ravdess", out, shard_size=SUBSET_FILES)[0]
        with environ(CNN_FEATURES_KERAS_BACKEND="torch", KERAS_BACKEND="torch"):
            probe = run_probe(timeout_s=120.0)
            result = run_shard(shard, requested_device="gpu", probe=probe)
        reference = read_features(self.stage_outputs["ravdess"], shard["files"])
        got = read_features(out, shard["files"])
        diff = relative_difference(got, reference)
        entry = {"probe": probe, "shard": shard_summary(result), "torch_vs_jax_max_rel_diff": diff, "rtol": BACKEND_RTOL}
        if diff > BACKEND_RTOL:
            msg = f"PyTorch features differ from JAX's by {diff:.3g} relative, above {BACKEND_RTOL:g}"
            raise CheckFailed(msg)
        return entry

    def run(self) -> int:
        self.step("environment", self.environment)
        self.step("corpus", self.corpus)
        self.step("probe", self.probe_step)
        model = self.step("model", self.model_step)
        if model["status"] != "ok":
            self.finish()
            return 1
        self.step("np_load", self.np_load)
        stage = self.step("stage", self.stage)
        if stage["status"] in ("ok", "failed") and self.stage_outputs:
            self.step("precision", self.precision)
        self.step("fork", self.fork)
        self.step("varlen", self.varlen)
        self.step("tf32", self.tf32, needs_gpu=True)
        self.step("torch", self.torch, needs_gpu=True)
        return self.finish()

    def finish(self) -> int:
        steps = self.report["steps"]
        self.report["passed"] = all(s["status"] in ("ok", "skipped") for s in steps.values())
        self.report["summary"] = summary(self.report)
        self.save()
        print(table(self.report))
        print(f"gpu_check: report written to {self.out}", file=sys.stderr)
        return 0 if self.report["passed"] else 1


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Return the headline figures of a report, flat."""
    steps = report["steps"]
    probe = steps.get("probe", {}).get("report", {})
    stage = steps.get("stage", {})
    shards = stage.get("shards") or [{}]
    fork = steps.get("fork", {}).get("parts", {})
    varlen = steps.get("varlen", {})
    runs = varlen.get("runs") or [{}, {}]
    return {
        "gpu": probe.get("device_name"),
        "gpu_memory_mb": probe.get("memory_total_mb"),
        "driver": probe.get("driver_version"),
        "cuda": probe.get("cuda_version"),
        "backend": f"{probe.get('framework')} {probe.get('framework_version')}",
        "stage_device": stage.get("device"),
        "stage_gpu": f"{shards[0].get('gpu_index')}: {shards[0].get('gpu_name')}",
        "stage_files_per_s": stage.get("stage_files_per_s"),
        "np_load_files_per_s": steps.get("np_load", {}).get("files_per_s"),
        "stage_vs_np_load": stage.get("vs_np_load"),
        "stage_vs_cpu_stage_docs": stage.get("vs_cpu_stage_docs"),
        "float32_vs_cpu_max_rel_diff": steps.get("precision", {}).get("float32", {}).get("max_rel_diff"),
        "tf32_vs_cpu_max_rel_diff": steps.get("tf32", {}).get("tf32_vs_cpu", {}).get("max_rel_diff"),
        "forked_driver_child": fork.get("driver_fork", {}).get("forked_child", {}).get("names")
        or fork.get("driver_fork", {}).get("status"),
        "forked_jax_child": fork.get("jax_fork", {}).get("forked_child", {}).get("outcome") or fork.get("jax_fork", {}).get("status"),
        "runner_from_cuda_parent": fork.get("runner_from_cuda_parent", {}).get("device")
        or fork.get("runner_from_cuda_parent", {}).get("status"),
        "gpu_init_fault_ran_on": fork.get("runner_gpu_init_fault", {}).get("device"),
        "varlen_compiles": [r.get("compiles") for r in runs],
        "varlen_compile_s": [r.get("compile_s") for r in runs],
        "torch_vs_jax_max_rel_diff": steps.get("torch", {}).get("torch_vs_jax_max_rel_diff"),
    }


def table(report: dict[str, Any]) -> str:
    """Return the report as a short text table: each step's status, then the headline figures."""
    lines = [f"GPU check ({report['mode']}, {report['date']}, {report.get('elapsed_s')} s): "
             + ("PASSED" if report.get("passed") else "NOT PASSED")]
    for name, entry in report["steps"].items():
        why = entry.get("reason") or entry.get("error") or ""
        lines.append(f"  {name:<12} {entry['status']:<8} {entry.get('step_s', 0):>7.1f} s  {str(why)[:110]}")
    lines.append("")
    for key, value in report.get("summary", {}).items():
        lines.append(f"  {key:<28} {_shown(value)}")
    return "\n".join(lines)


def _shown(value: object) -> str:
    """Format a figure: thousands with one decimal, small numbers to 3 significant digits."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    """Run the kit (or, internally, its fork step)."""
    parser = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    parser.add_argument("--work", type=Path, help="working folder (corpus, features); default: /tmp/cnn-gpu-check[-smoke]")
    parser.add_argument("--smoke", action="store_true", help="tiny corpus, CPU only; GPU-only parts are skipped")
    parser.add_argument("--backend", default="jax", choices=("jax", "tensorflow", "torch"), help="Keras backend (default jax)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="skip optional steps past this many seconds")
    parser.add_argument("--fork-step", nargs=2, type=Path, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.fork_step:
        return fork_main(*args.fork_step)
    args.work = args.work or Path("/tmp/cnn-gpu-check" + ("-smoke" if args.smoke else ""))
    args.work.mkdir(parents=True, exist_ok=True)
    # Every child (workers, probe, model check) finds the package and this run's settings here.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(INCLUDE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    os.environ.update(
        CNN_FEATURES_HOME=str(args.work.resolve() / "home"),
        CNN_FEATURES_ALLOWED_ROOTS=str(args.work.resolve()),
        CNN_FEATURES_KERAS_BACKEND=args.backend,
        KERAS_BACKEND=args.backend,
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
    )
    os.environ.pop("CNN_FEATURES_TEST_FAULT", None)
    args.out.resolve().parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.out.resolve().with_suffix(".log"), mode="w")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger().handlers[0].setLevel(logging.WARNING)
    return Kit(args).run()


if __name__ == "__main__":
    sys.exit(main())
