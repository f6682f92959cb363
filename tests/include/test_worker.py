"""The shard worker's fast path: folded model, traced predictor, passes on parallel threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cnn_features.errors import InvalidSpectrogram  # noqa: E402
from cnn_features.model import inference_model, load_feature_model, make_predictor, predict  # noqa: E402
from cnn_features.plan import DatasetIO, plan_dataset  # noqa: E402
from cnn_features.runner import run_shard  # noqa: E402
from cnn_features.worker import (  # noqa: E402
    CPU_PASS_FRAMES,
    CPU_PASS_FRAMES_AVX512,
    InferenceError,
    Pass,
    _results,
    cpu_pass_frames,
    cpu_slot,
    cpu_streams,
    pass_size,
)
from tests.conftest import make_ravdess, tiny_spectrogram  # noqa: E402

NO_GPU = {"usable": False, "error": "no GPU in tests"}


@pytest.fixture(scope="module")
def loaded(reference_model: dict[str, Any]) -> tuple[keras.Model, Any]:
    return load_feature_model(Path(reference_model["path"]))


def test_reference_batch_norms_are_folded_away(loaded: tuple[keras.Model, Any]) -> None:
    """The inference copy of the reference CNN has no BatchNormalization and convs with a bias."""
    model, info = loaded
    fast = inference_model(model, info)
    assert not [layer for layer in fast.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert all(layer.use_bias for layer in fast.layers if isinstance(layer, keras.layers.Conv2D))
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers), "the original is untouched"


def test_fast_path_matches_one_file_at_a_time(loaded: tuple[keras.Model, Any]) -> None:
    """Batched passes of the folded, traced model stay within 1e-5 of the plain model run one file at a time."""
    model, info = loaded
    run = make_predictor(inference_model(model, info), info)
    for frames in (16, 37, 64):
        batch = np.stack([tiny_spectrogram(seed, frames) for seed in range(6)])
        alone = np.concatenate([predict(model, batch[i : i + 1], info) for i in range(len(batch))])
        together = run(batch)
        assert together.shape == (6, 256) and together.dtype == np.float32
        np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)


def test_unfoldable_models_are_left_as_they_are(tmp_path: Path) -> None:
    """A BN after a conv whose output also feeds another layer is not folded; a model without BN is returned as is."""
    inputs = keras.Input(shape=(128, None, 1))
    conv = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    normed = keras.layers.BatchNormalization()(conv)
    merged = keras.layers.Add()([conv, normed])
    path = tmp_path / "branch.keras"
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(merged)).save(path)
    model, info = load_feature_model(path)
    assert inference_model(model, info) is model

    plain = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(conv))
    plain.save(tmp_path / "plain.keras")
    model, info = load_feature_model(tmp_path / "plain.keras")
    assert inference_model(model, info) is model


def test_folding_a_dense_model_with_trained_statistics(tmp_path: Path) -> None:
    """Non-trivial BN statistics fold into a Dense layer and give the same features."""
    inputs = keras.Input(shape=(128, 20))
    x = keras.layers.Dense(8)(keras.layers.GlobalAveragePooling1D()(inputs))
    bn = keras.layers.BatchNormalization()
    outputs = bn(x)
    rng = np.random.default_rng(3)
    bn.set_weights([rng.uniform(0.5, 2, 8), rng.normal(size=8), rng.normal(size=8), rng.uniform(0.5, 3, 8)])
    path = tmp_path / "dense.keras"
    keras.Model(inputs, outputs).save(path)
    model, info = load_feature_model(path)
    fast = inference_model(model, info)
    assert fast is not model
    x = rng.standard_normal((3, 128, 20)).astype(np.float32)
    np.testing.assert_allclose(make_predictor(fast, info)(x), predict(model, x, info), rtol=1e-5, atol=1e-5)


def test_pass_size_keeps_passes_within_the_memory_budget_on_every_device() -> None:
    """Passes shrink to fit the activation budget on CPU and GPU; a clip that alone exceeds it fits no pass."""
    budget, per_frame = 1 << 30, 48 << 10
    assert pass_size(256, batch_size=32, device="gpu", budget=budget, bytes_per_frame=per_frame) == 32
    assert pass_size(4_000, batch_size=32, device="gpu", budget=budget, bytes_per_frame=per_frame) == 5
    assert pass_size(4_000, batch_size=32, device="cpu", budget=budget, bytes_per_frame=per_frame, streams=2) == 1
    assert pass_size(15_000, batch_size=32, device="cpu", budget=budget, bytes_per_frame=per_frame, streams=2) == 1
    assert pass_size(100_000, batch_size=32, device="gpu", budget=budget, bytes_per_frame=per_frame) == 0
    assert pass_size(100_000, batch_size=32, device="cpu", budget=budget, bytes_per_frame=per_frame) == 0


def test_pass_size_bounds_cpu_passes_by_frames() -> None:
    """On CPU a pass holds about cpu_pass_frames() frames (at least one clip); on GPU the batch size rules."""
    assert cpu_pass_frames() in (CPU_PASS_FRAMES, CPU_PASS_FRAMES_AVX512)
    assert pass_size(256, batch_size=32, device="cpu") == cpu_pass_frames() // 256
    assert pass_size(5000, batch_size=32, device="cpu") == 1
    assert pass_size(16, batch_size=8, device="cpu") == 8
    assert pass_size(256, batch_size=32, device="gpu") == 32
    assert cpu_streams(3) == 3 and cpu_streams(0) == len(os.sched_getaffinity(0))


def test_results_run_every_pass_and_report_bad_files() -> None:
    """Every pass comes back with its own features, bad files are passed through, on several threads."""
    passes = [Pass([f"f{i}a", f"f{i}b"], np.full((2, 3, 4), i, dtype=np.float32)) for i in range(20)]
    source = [*passes[:5], ("bad.npy", InvalidSpectrogram("bad.npy: truncated")), *passes[5:]]
    got = list(_results(iter(source), lambda b: b.reshape(len(b), -1)[:, :1] * 2, streams=3))
    bad = [item for item in got if item[0] == "bad"]
    done = {rel: float(feat[0]) for kind, rels, feats in (i for i in got if i[0] == "done") for rel, feat in zip(rels, feats, strict=False)}
    assert [(b[1], str(b[2])) for b in bad] == [("bad.npy", "bad.npy: truncated")]
    assert done == {f"f{i}{s}": 2.0 * i for i in range(20) for s in "ab"}


def test_a_failing_pass_is_raised_in_the_caller() -> None:
    """An exception in an inference thread surfaces in the thread that writes, and the threads stop."""
    passes = (Pass([str(i)], np.zeros((1, 2))) for i in range(100))

    def broken(batch: np.ndarray) -> np.ndarray:
        raise ValueError("shape the model cannot take")

    with pytest.raises(InferenceError, match="ValueError: shape the model cannot take"):
        list(_results(passes, broken, streams=2))


def test_one_thread_and_many_threads_write_the_same_features(
    tmp_path: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard run with CNN_FEATURES_CPU_THREADS=1 and one with 3 threads give the same features within 1e-5."""
    make_ravdess(tmp_path / "in", actors=3, emotions=4)
    features = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("CNN_FEATURES_CPU_THREADS", threads)
        out = tmp_path / f"out{threads}"
        (shard,) = plan_dataset(DatasetIO("ravdess", tmp_path / "in", out), shard_size=100)
        result = run_shard({**shard, "model": reference_model, "batch_size": 4}, requested_device="cpu", probe=NO_GPU)
        assert result["extracted"] == 12
        features[threads] = {p.relative_to(out).as_posix(): np.load(p) for p in sorted(out.rglob("*.npy"))}
    assert features["1"].keys() == features["3"].keys() and len(features["1"]) == 12
    for rel, vector in features["1"].items():
        np.testing.assert_allclose(features["3"][rel], vector, rtol=0, atol=1e-5)


HOLD_SLOT = (
    "import sys, time\n"
    "from cnn_features.worker import cpu_slot\n"
    "with cpu_slot(int(sys.argv[1]), 'holder'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


def test_a_cpu_worker_waits_for_a_free_slot_and_gets_a_dead_holders_slot() -> None:
    """With every core taken by one worker's passes, a second waits; killing the first frees its slot at once."""
    cores = len(os.sched_getaffinity(0))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SLOT, str(cores)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        acquired = threading.Event()

        def take() -> None:
            with cpu_slot(cores, "waiter"):
                acquired.set()

        waiter = threading.Thread(target=take)
        waiter.start()
        assert not acquired.wait(1.0), "got a slot while the only one was held"
        holder.kill()
        assert acquired.wait(5.0), "the dead holder's slot was not freed"
        waiter.join()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores for two slots")
def test_single_stream_workers_share_the_cores() -> None:
    """Workers of one pass each get one slot per core: two hold slots at the same time."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SLOT, "1"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with cpu_slot(1, "second"):
            assert time.monotonic() - started < 1.0
    finally:
        holder.kill()
        holder.wait()


def _run_worker_main(
    tmp_path: Path, model: dict[str, Any], device: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any]]:
    """Run ``worker.main`` in this process on a 2-file shard; return its exit code and result line."""
    from cnn_features import worker
    from cnn_features.procs import PARENT_PID_ENV, RESULT_PREFIX, parse_line

    os.environ.pop(PARENT_PID_ENV, None)
    make_ravdess(tmp_path / "in", actors=1, emotions=2)
    (shard,) = plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=100)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**shard, "model": model, "batch_size": 4}))
    code = worker.main(["--spec", str(spec), "--device", device])
    lines = [p for line in capsys.readouterr().out.splitlines() if (p := parse_line(line, RESULT_PREFIX)) is not None]
    return code, lines[-1]


def test_failures_are_reported_as_what_they_are(
    tmp_path: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An input read error, a failing pass on CPU and on GPU, and a bug each get their own status, not "cannot write"."""
    from cnn_features import worker
    from cnn_features.faults import ENV_VAR
    from cnn_features.stores import LocalStore

    def unreadable(self: LocalStore, items: Any, *, max_bytes: int, threads: int = 1) -> Any:
        raise OSError(5, "Input/output error", str(self.root))
        yield  # a generator, as the real one

    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")

    monkeypatch.setattr(worker, "_load_predictor", lambda info, device, streams, **_: lambda b: b.reshape(len(b), -1)[:, :256])
    with monkeypatch.context() as patch:
        patch.setattr(LocalStore, "read_many", unreadable)
        code, result = _run_worker_main(tmp_path / "read", reference_model, "cpu", capsys)
    assert (code, result["status"]) == (worker.EXIT_INPUT, "input_failed")
    assert "cannot read inputs under" in result["error"] and "cannot write" not in result["error"]

    monkeypatch.setattr(worker, "_load_predictor", lambda info, device, streams, **_: broken)
    code, result = _run_worker_main(tmp_path / "cpu", reference_model, "cpu", capsys)
    assert (code, result["status"]) == (worker.EXIT_MODEL, "model_failed")
    assert "CUDA_ERROR_ILLEGAL_ADDRESS" in result["error"]
    monkeypatch.setenv(ENV_VAR, "fake_gpu")
    code, result = _run_worker_main(tmp_path / "gpu", reference_model, "gpu", capsys)
    assert (code, result["status"]) == (worker.EXIT_GPU_RUN, "gpu_failed")

    def bug(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("files")

    monkeypatch.setattr(worker, "_pending", bug)
    code, result = _run_worker_main(tmp_path / "bug", reference_model, "gpu", capsys)
    assert (code, result["status"]) == (worker.EXIT_INTERNAL, "internal_error")
    assert result["error"] == "internal error: KeyError: 'files'"


def test_cpu_slot_locks_refuse_planted_symlinks_and_open_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A symlinked or world-writable slot folder, or a lock file planted as a symlink, is refused; the target is untouched."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / f"cnn-features-{os.getuid()}"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)

    folder.symlink_to(elsewhere)
    with cpu_slot(1, "s1"):
        pass
    assert list(elsewhere.iterdir()) == [] and "refusing it" in caplog.text
    folder.unlink()

    folder.mkdir()
    folder.chmod(0o777)
    caplog.clear()
    with cpu_slot(1, "s2"):
        pass
    assert "not 0700" in caplog.text and list(folder.iterdir()) == []

    folder.chmod(0o700)
    for i in range(len(os.sched_getaffinity(0))):
        (folder / f"cpu-slot-{i}.lock").symlink_to(victim)
    with cpu_slot(1, "s3"):
        pass
    assert victim.read_text() == "precious\n"


def test_a_refused_write_names_the_folder_the_same_way_on_every_try(tmp_path: Path) -> None:
    """Two tries refused in one actor folder give one reason, naming that folder, not the temporaries' random names."""
    import errno

    from cnn_features.worker import write_error

    out = tmp_path / "out"
    first = OSError(errno.EPERM, "Operation not permitted", str(out / "Actor_09" / ".03-01-01.npy.tmp-vm-29984-28b8c58e"))
    again = OSError(errno.EPERM, "Operation not permitted", str(out / "Actor_09" / ".03-01-05.npy.tmp-vm-30198-f766e3fe"))
    assert write_error(str(out), first) == write_error(str(out), again) == (
        f"cannot write features under {out}: Operation not permitted (errno 1) in Actor_09/"
    )
    assert write_error(str(out), OSError(errno.ENOSPC, "No space left on device", str(out / ".x.tmp"))).endswith(
        "No space left on device (errno 28) in its top folder"
    )
