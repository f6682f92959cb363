"""Features that agree across devices: re-extract a sample of GPU-made features on CPU and compare.

A per-shard CPU fallback, or a later run that reuses an earlier run's
features, means one dataset can hold features from both devices (or GPU
precisions), which is only safe if they agree. ``check_dataset`` (parent
side, no framework) decides from the lineage entries verification matched
whether a dataset's features were made in more than one way, picks a
deterministic sample of those not made on CPU and runs
``python -m cnn_features.crosscheck`` in a fresh process with CUDA hidden:
that child finds and checks the model as a worker does
(``shipping.local_model``, then its digest), re-extracts the sample, and
reports the largest relative difference (largest absolute difference over the
largest CPU feature magnitude, per file).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cnn_features.backends import backend_env, prepare_process
from cnn_features.config import Settings, load_settings
from cnn_features.errors import CnnFeaturesError, InvalidSpectrogram
from cnn_features.procs import RESULT_PREFIX, child_env, die_with_parent, emit, parse_line, python_module_cmd
from cnn_features.s3 import S3Access
from cnn_features.shipping import local_model

log = logging.getLogger(__name__)

# Seconds the CPU re-extraction may take: a framework start, a model load and
# a few dozen clips; a stuck child must not hang verification.
CROSSCHECK_TIMEOUT_S = 600.0
# How the CPU re-extraction computes (``made_with``): the reference every
# other way a feature was made is compared with.
CPU_REFERENCE = "cpu float32"
# Smallest feature magnitude a relative difference is taken against: an
# all-zero feature vector compares by absolute difference instead.
_TINY = 1e-30


class CrosscheckFailed(CnnFeaturesError):
    """The CPU re-extraction could not run (model, inputs or the child process failed)."""


def made_with(entry: dict[str, Any]) -> str:
    """Return what a lineage entry says computed its feature: the device kind and precision, e.g. ``gpu tf32``.

    A GPU worker records its device as ``gpu:<index> <name>``; any GPU counts as ``gpu``.
    """
    device = str(entry.get("device") or "unknown-device")
    kind = "gpu" if device.split(":", 1)[0] == "gpu" else device
    return f"{kind} {entry.get('precision') or 'unknown-precision'}"


def sample(files: list[str], count: int) -> list[str]:
    """Return ``count`` of ``files`` evenly spread over their sorted order (all of them if fewer)."""
    ordered = sorted(files)
    if count <= 0 or not ordered:
        return []
    if len(ordered) <= count:
        return ordered
    step = len(ordered) / count
    return [ordered[int(i * step)] for i in range(count)]


def check_dataset(
    shards: list[dict[str, Any]],
    entries: dict[str, dict[str, Any]],
    *,
    bad: set[str],
    settings: Settings | None = None,
    access: S3Access | None = None,
) -> dict[str, Any]:
    """Compare a sample of a dataset's features with CPU re-extractions when they were made in more than one way.

    ``entries`` are the lineage entries verification matched, by feature:
    they say which device and precision made each feature, in this run or
    an earlier one (a feature a GPU made and a later all-CPU run reused
    still counts as GPU-made). When they name more than one, a sample of
    each group's features not made on CPU in float32 is re-extracted that
    way and compared.

    Returns a report: ``mixed``, ``made_with`` (feature count per device and
    precision), ``checked``, and when checked ``files``, ``max_rel_diff``,
    ``worst_file``, ``rtol``, ``passed`` (or ``error``).
    """
    settings = settings or load_settings()
    rtol = settings.crosscheck_rtol
    groups: dict[str, list[str]] = {}
    for rel, entry in entries.items():
        if rel not in bad:
            groups.setdefault(made_with(entry), []).append(rel)
    report: dict[str, Any] = {
        "mixed": len(groups) > 1,
        "made_with": {group: len(rels) for group, rels in sorted(groups.items())},
        "checked": False,
        "rtol": rtol,
        "passed": True,
    }
    if not report["mixed"]:
        report["reason"] = "every feature was made the same way" if groups else "no feature with lineage"
        return report
    picked = sorted(
        rel for group, rels in groups.items() if group != CPU_REFERENCE for rel in sample(rels, settings.crosscheck_sample)
    )
    if not picked:
        report["reason"] = "no feature made otherwise than on CPU to compare" if settings.crosscheck_sample else "sample size 0"
        return report
    first = shards[0]
    try:
        compared = compare_on_cpu(
            model=first["model"], input_uri=first["input"], features_uri=first["output"], rels=picked, access=access
        )
    except CrosscheckFailed as exc:
        report.update(checked=False, passed=False, error=str(exc))
        return report
    report.update(compared, checked=True, passed=compared["max_rel_diff"] <= rtol)
    return report


def describe(report: dict[str, Any]) -> str:
    """Return one line saying what the cross-device check found."""
    made = " and ".join(f"{group} ({count})" for group, count in report.get("made_with", {}).items()) or "no device"
    if not report["mixed"]:
        return f"features from one device and precision only, {made}; no cross-device check ({report.get('reason')})"
    if report.get("error"):
        return f"features from {made}, but the CPU re-extraction failed: {report['error']}"
    if not report["checked"]:
        return f"features from {made}; not compared ({report.get('reason')})"
    verdict = "within" if report["passed"] else "ABOVE"
    return (
        f"features from {made}: {report['files']} file(s) not made on CPU re-extracted there differ by at most "
        f"{report['max_rel_diff']:.3g} relative ({report['worst_file']}), {verdict} the {report['rtol']:g} limit"
    )


def compare_on_cpu(
    *,
    model: dict[str, Any],
    input_uri: str,
    features_uri: str,
    rels: list[str],
    access: S3Access | None = None,
    timeout_s: float = CROSSCHECK_TIMEOUT_S,
) -> dict[str, Any]:
    """Re-extract ``rels`` on CPU in a fresh process and compare with the features stored for them.

    Returns ``files``, ``max_rel_diff``, ``mean_rel_diff``, ``max_abs_diff``,
    ``worst_file``, ``keras_backend`` and ``elapsed_s``.

    Raises:
        CrosscheckFailed: the child could not load the model, read a file, or
            did not finish within ``timeout_s``.
    """
    settings = load_settings()
    spec = {"model": model, "input": input_uri, "features": features_uri, "files": rels}
    extra = {**(access or S3Access()).env(), **backend_env(settings.keras_backend, "cpu", precision=settings.gpu_precision)}
    with tempfile.TemporaryDirectory(prefix="cnn-crosscheck-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        try:
            proc = subprocess.run(
                python_module_cmd("cnn_features.crosscheck", "--spec", str(spec_path)),
                env=child_env("cpu", extra),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            msg = f"CPU re-extraction of {len(rels)} file(s) under {input_uri} did not finish within {timeout_s:g} s"
            raise CrosscheckFailed(msg) from None
    for line in reversed(proc.stdout.splitlines()):
        if (payload := parse_line(line, RESULT_PREFIX)) is not None:
            if payload.get("ok"):
                return {k: v for k, v in payload.items() if k != "ok"}
            raise CrosscheckFailed(str(payload.get("error")))
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    msg = f"CPU re-extraction exited with code {proc.returncode} without a result" + (f": {tail}" if tail else "")
    raise CrosscheckFailed(msg)


def relative_difference(got: np.ndarray, reference: np.ndarray) -> float:
    """Return max |got - reference| over max |reference| (absolute difference if the reference is all zero)."""
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    diff = float(np.max(np.abs(got.astype(np.float64) - reference.astype(np.float64)))) if reference.size else 0.0
    return diff / scale if scale > _TINY else diff


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Re-extract the spec's files on CPU and compare with the stored features (child side)."""
    import time

    prepare_process("cpu")
    from cnn_features.model import ModelInfo, check_digest, inference_model, load_feature_model, make_predictor
    from cnn_features.spectrogram import MAX_INPUT_BYTES, parse_spectrogram
    from cnn_features.storage import MAX_FEATURE_FILE_BYTES
    from cnn_features.stores import open_store

    started = time.monotonic()
    settings = load_settings()
    info = ModelInfo(**spec["model"])
    source, features = open_store(spec["input"], settings), open_store(spec["features"], settings)
    # The model as a worker finds it: the plan's file if this host has it, else the output's copy.
    model, _ = load_feature_model(local_model(spec["model"], features, settings.home / "cache" / "models"))
    check_digest(spec["model"], model)
    predictor = make_predictor(inference_model(model, info), info)
    rels: list[str] = spec["files"]
    worst, worst_rel, total, max_abs = -1.0, "", 0.0, 0.0
    inputs = dict(source.read_many(((rel, 0) for rel in rels), max_bytes=MAX_INPUT_BYTES))
    stored = dict(features.read_many(((rel, 0) for rel in rels), max_bytes=MAX_FEATURE_FILE_BYTES))
    for rel in rels:
        data, feature = inputs.get(rel), stored.get(rel)
        if isinstance(data, InvalidSpectrogram) or data is None:
            msg = f"{rel}: input unreadable for the CPU re-extraction ({data})"
            raise CrosscheckFailed(msg)
        if isinstance(feature, InvalidSpectrogram) or feature is None:
            msg = f"{rel}: stored feature unreadable ({feature})"
            raise CrosscheckFailed(msg)
        array = parse_spectrogram(data, rel, n_mels=info.n_mels, min_frames=info.min_frames, frames=info.frames)
        cpu = predictor(array[None])[0]
        gpu = np.load(io.BytesIO(feature), allow_pickle=False)
        if gpu.shape != cpu.shape:
            msg = f"{rel}: stored feature has shape {gpu.shape}, the CPU re-extraction {cpu.shape}"
            raise CrosscheckFailed(msg)
        diff = relative_difference(gpu, cpu)
        total += diff
        max_abs = max(max_abs, float(np.max(np.abs(gpu.astype(np.float64) - cpu))))
        if diff > worst:
            worst, worst_rel = diff, rel
    import keras

    return {
        "files": len(rels),
        "max_rel_diff": max(worst, 0.0),
        "mean_rel_diff": total / len(rels) if rels else 0.0,
        "max_abs_diff": max_abs,
        "worst_file": worst_rel,
        "keras_backend": keras.backend.backend(),
        "elapsed_s": round(time.monotonic() - started, 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Child entry point: compare, print one result line."""
    parser = argparse.ArgumentParser(prog="python -m cnn_features.crosscheck")
    parser.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    try:
        result = _run_child(spec)
    except (CnnFeaturesError, OSError) as exc:
        emit(RESULT_PREFIX, {"ok": False, "error": str(exc)})
        return 2
    emit(RESULT_PREFIX, {"ok": True, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
