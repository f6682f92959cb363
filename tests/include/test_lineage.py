"""Content-keyed reuse, lineage records, the verifier's mutation test, the model check and determinism."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnn_features import lineage
from cnn_features.config import load_settings
from cnn_features.errors import ShardFailed, VerificationFailed
from cnn_features.plan import DatasetIO, check_model, plan_dataset
from cnn_features.runner import run_shard
from cnn_features.stores import LocalStore
from cnn_features.verify import verify_run
from tests.conftest import make_ravdess, tiny_spectrogram

NO_GPU = {"usable": False, "error": "no GPU in tests"}


def _run(shards: list[dict[str, Any]], model: dict[str, Any], *, batch_size: int = 4, run_id: str = "test") -> list[dict[str, Any]]:
    """Run every shard on CPU in worker processes; return the results."""
    return [
        run_shard({**s, "model": model, "batch_size": batch_size, "run_id": run_id}, requested_device="cpu", probe=NO_GPU)
        for s in shards
    ]


def _problems(shards: list[dict[str, Any]], model: dict[str, Any]) -> str:
    """Return verification's problems as text ('' when it passes)."""
    try:
        verify_run([{**s, "model": model} for s in shards], [], max_bad_fraction=0.0, run_id="verify")
    except VerificationFailed as exc:
        return str(exc)
    return ""


def _flip_keeping_size_and_mtime(path: Path) -> None:
    """Change one float of a file in place, then put its size and mtime back."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01  # lowest mantissa byte of the last float: still finite
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def _save_model(path: Path, seed: int) -> None:
    """Save a reference-architecture model with other weights at ``path``, in a fresh process."""
    code = f"from cnn_features.model import build_reference_model as b; b(seed={seed}).save({str(path)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}, capture_output=True)


@pytest.fixture
def extracted(tmp_path: Path, reference_model: dict[str, Any]) -> tuple[list[dict[str, Any]], Path, Path]:
    """A tiny corpus fully extracted and verified on CPU: (shards, input folder, output folder)."""
    make_ravdess(tmp_path / "in", actors=2, emotions=3)
    shards = plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=3)
    results = _run(shards, reference_model)
    assert sum(r["extracted"] for r in results) == 6
    assert _problems(shards, reference_model) == ""
    return shards, tmp_path / "in", tmp_path / "out"


def test_each_feature_has_its_lineage_and_the_manifest_lists_it(
    extracted: tuple[list[dict[str, Any]], Path, Path], reference_model: dict[str, Any]
) -> None:
    """Per feature: input, model and feature digests, backend and version, device, precision, shard and run.

    One whole record per shard, no pieces left; the manifest lists every
    feature's SHA-256, input digest, labels and device, the model and the verifying run.
    """
    shards, inp, out = extracted
    records = sorted(p.name for p in (out / "_shards").iterdir() if ".lineage" in p.name)
    assert records == sorted(f"{s['shard_id']}.lineage.jsonl" for s in shards)
    entries = lineage.load_entries(LocalStore(out))
    assert sorted(entries) == sorted(rel for s in shards for rel in s["files"])
    rel = shards[0]["files"][0]
    (entry,) = entries[rel]
    assert entry["model_digest"] == reference_model["digest"] and entry["model_sha256"] == reference_model["sha256"]
    assert entry["input_sha256"] == lineage.sha256_hex((inp / rel).read_bytes())
    assert entry["feature_sha256"] == lineage.sha256_hex((out / rel).read_bytes())
    assert (entry["device"], entry["precision"], entry["run_id"]) == ("cpu", "float32", "test")
    assert entry["shard_id"] == shards[0]["shard_id"] and entry["keras_backend"] == "tensorflow" and entry["keras_version"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_digest"] == reference_model["digest"] and manifest["verified_by_run"] == "verify"
    item = next(i for i in manifest["items"] if i["feature"] == rel)
    assert item["sha256"] == entry["feature_sha256"] and item["input_sha256"] == entry["input_sha256"]
    assert (item["device"], item["actor"], item["emotion"], item["clip_id"]) == ("cpu", "01", "neutral", "01-01-01-01-01-01")


@pytest.mark.parametrize(
    "mutation",
    ["input changed, size and mtime kept", "feature byte flipped", "feature deleted", "two features swapped"],
)
def test_a_mutation_is_named_exactly_and_a_rerun_fixes_exactly_it(
    mutation: str, extracted: tuple[list[dict[str, Any]], Path, Path], reference_model: dict[str, Any]
) -> None:
    """Verification names exactly the affected files; the re-run re-extracts exactly those, and then verification passes."""
    shards, inp, out = extracted
    files = [rel for s in shards for rel in s["files"]]
    a, b = files[0], files[4]
    affected = {a, b} if mutation == "two features swapped" else {a}
    before = {rel: (out / rel).stat().st_mtime_ns for rel in files}
    if mutation.startswith("input changed"):
        _flip_keeping_size_and_mtime(inp / a)
    elif mutation == "feature byte flipped":
        _flip_keeping_size_and_mtime(out / a)
    elif mutation == "feature deleted":
        (out / a).unlink()
    else:
        os.replace(out / a, out / "swap.tmp")
        os.replace(out / b, out / a)
        os.replace(out / "swap.tmp", out / b)
        before = {rel: (out / rel).stat().st_mtime_ns for rel in files}
    problems = _problems(shards, reference_model)
    assert {rel for rel in files if rel in problems} == affected, problems
    assert not (out / "manifest.json").exists()
    results = _run(shards, reference_model)
    assert sum(r["extracted"] for r in results) == len(affected)
    assert sum(r["skipped_existing"] for r in results) == len(files) - len(affected)
    assert {rel for rel in files if (out / rel).stat().st_mtime_ns != before.get(rel)} == affected
    assert _problems(shards, reference_model) == ""


def test_an_added_feature_is_named_and_moved_aside(
    extracted: tuple[list[dict[str, Any]], Path, Path], reference_model: dict[str, Any]
) -> None:
    """A feature with no input is named alone and moved out of the feature space; the next verification passes."""
    shards, _, out = extracted
    files = [rel for s in shards for rel in s["files"]]
    shutil.copy(out / files[0], out / "Actor_01" / "03-01-08-01-01-01-01.npy")
    problems = _problems(shards, reference_model)
    assert "Actor_01/03-01-08-01-01-01-01.npy" in problems and not any(rel in problems for rel in files)
    assert (out / "_orphans" / "Actor_01" / "03-01-08-01-01-01-01.npy").is_file()
    assert _problems(shards, reference_model) == ""


def test_a_folder_of_another_models_features_is_named_and_redone(
    extracted: tuple[list[dict[str, Any]], Path, Path], reference_model: dict[str, Any], tmp_path: Path, home: Path
) -> None:
    """Features copied beside another model's: each is named, and a run with that model re-extracts every one."""
    shards, inp, out = extracted
    files = [rel for s in shards for rel in s["files"]]
    other_path = tmp_path / "other.keras"
    _save_model(other_path, seed=99)
    other = check_model(other_path, load_settings())
    assert other["digest"] != reference_model["digest"]
    shutil.copytree(out, tmp_path / "copy")
    copied = plan_dataset(DatasetIO("ravdess", inp, tmp_path / "copy"), shard_size=3)
    problems = _problems(copied, other)
    assert all(f"{rel}: feature file was made by another model" in problems for rel in files), problems
    results = _run(copied, other)
    assert sum(r["extracted"] for r in results) == len(files) and sum(r["skipped_existing"] for r in results) == 0
    assert _problems(copied, other) == ""


def test_a_model_replaced_after_planning_is_refused_naming_both_digests(
    tmp_path: Path, home: Path
) -> None:
    """Other weights under the plan's model name are not run; with no copy in the output the shard fails naming both SHA-256s, nothing is written."""
    model_path = tmp_path / "mine.keras"
    _save_model(model_path, seed=7)
    planned = check_model(model_path, load_settings())
    _save_model(model_path, seed=8)  # replaced between planning and the shard
    make_ravdess(tmp_path / "in", actors=1, emotions=2)
    shards = plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=10)
    with pytest.raises(ShardFailed, match=rf"the file on this host has SHA-256 [0-9a-f]{{64}}, not the plan's {planned['sha256']}"):
        _run(shards, planned)
    assert not list((tmp_path / "out").rglob("*.npy"))


def test_an_unchanged_rerun_hashes_no_input_and_a_touched_one_is_hashed_not_redone(
    extracted: tuple[list[dict[str, Any]], Path, Path], reference_model: dict[str, Any]
) -> None:
    """The stat fast path: unchanged inputs are trusted; a file whose mtime changed is hashed again, and reused if its bytes did not."""
    shards, inp, _ = extracted
    results = _run(shards, reference_model)
    assert sum(r["inputs_hashed_for_reuse"] for r in results) == 0 and sum(r["extracted"] for r in results) == 0
    os.utime(inp / shards[0]["files"][0])
    results = _run(shards, reference_model)
    assert sum(r["inputs_hashed_for_reuse"] for r in results) == 1 and sum(r["extracted"] for r in results) == 0


def test_a_killed_worker_leaves_pieces_that_the_rerun_uses_and_folds(
    tmp_path: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lineage is written ahead of each pass: after a SIGKILL the stored features are reused, and the finished shard has one whole record."""
    from cnn_features.faults import ENV_VAR

    make_ravdess(tmp_path / "in", actors=2, emotions=5)
    shards = plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=10)
    monkeypatch.setenv(ENV_VAR, "die_after=4")
    with pytest.raises(ShardFailed, match="killed"):
        _run(shards, reference_model, batch_size=2)
    monkeypatch.delenv(ENV_VAR)
    out = tmp_path / "out"
    stored = sorted(p.relative_to(out).as_posix() for p in out.glob("Actor_*/*.npy"))
    pieces = [p.name for p in (out / "_shards").iterdir() if ".lineage-" in p.name]
    assert len(stored) >= 4 and pieces
    assert set(stored) <= set(lineage.load_entries(LocalStore(out)))
    (result,) = _run(shards, reference_model, batch_size=2)
    assert result["skipped_existing"] == len(stored) and result["extracted"] == 10 - len(stored)
    assert sorted(p.name for p in (out / "_shards").iterdir() if ".lineage" in p.name) == [f"{shards[0]['shard_id']}.lineage.jsonl"]
    assert _problems(shards, reference_model) == ""


def test_training_refuses_a_feature_changed_after_verification(extracted: tuple[list[dict[str, Any]], Path, Path]) -> None:
    """A feature whose bytes are not the manifest's stops training, naming the file and both SHA-256s."""
    from cnn_features.training import TrainingFailed, load_manifest

    shards, _, out = extracted
    rel = shards[0]["files"][0]
    listed = next(i["sha256"] for i in json.loads((out / "manifest.json").read_text())["items"] if i["feature"] == rel)
    _flip_keeping_size_and_mtime(out / rel)
    with pytest.raises(TrainingFailed, match=rf"{rel}: SHA-256 [0-9a-f]{{64}} is not the {listed} its manifest lists"):
        load_manifest(LocalStore(out), "manifest.json")


def test_two_cpu_runs_are_bit_identical_and_shard_or_batch_size_change_nothing_beyond_1e_6(
    extracted: tuple[list[dict[str, Any]], Path, Path], reference_model: dict[str, Any], tmp_path: Path
) -> None:
    """The README's two promises: the same plan on the same device twice gives the same bytes; another shard or
    batch size changes no feature by more than 1e-6 of its largest magnitude."""
    shards, inp, out = extracted
    files = [rel for s in shards for rel in s["files"]]
    again = plan_dataset(DatasetIO("ravdess", inp, tmp_path / "again"), shard_size=3)
    _run(again, reference_model)
    assert all((out / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes() for rel in files)
    for folder, shard_size, batch_size in (("shard5", 5, 4), ("batch1", 3, 1), ("batch8", 6, 8)):
        other = plan_dataset(DatasetIO("ravdess", inp, tmp_path / folder), shard_size=shard_size)
        _run(other, reference_model, batch_size=batch_size)
        for rel in files:
            first = np.load(out / rel, allow_pickle=False)
            second = np.load(tmp_path / folder / rel, allow_pickle=False)
            assert np.abs(second - first).max() <= 1e-6 * np.abs(first).max(), (folder, rel)


def test_a_worker_without_the_model_file_fetches_the_outputs_copy_checked_by_sha256(
    tmp_path: Path, home: Path, reference_model: dict[str, Any]
) -> None:
    """A host whose data folder lacks the model (another Celery worker) runs the copy planning left in the output;
    a copy whose bytes are not the plan's is refused on arrival."""
    from cnn_features.plan import claim_output
    from cnn_features.shipping import model_name

    model_path = tmp_path / "planner" / "mine.keras"
    model_path.parent.mkdir()
    shutil.copyfile(reference_model["path"], model_path)
    planned = {**reference_model, "path": str(model_path)}
    make_ravdess(tmp_path / "in", actors=1, emotions=3)
    io = DatasetIO("ravdess", tmp_path / "in", tmp_path / "out")
    claim_output(io, planned)
    shipped = tmp_path / "out" / model_name(planned["sha256"])
    assert shipped.read_bytes() == model_path.read_bytes()
    shutil.rmtree(tmp_path / "planner")  # this "host" never had it
    shards = plan_dataset(io, shard_size=10)
    (result,) = _run(shards, planned)
    assert result["extracted"] == 3
    assert (home / "cache" / "models" / f"{planned['sha256']}.keras").read_bytes() == shipped.read_bytes()

    shutil.rmtree(home / "cache" / "models")
    data = bytearray(shipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    shipped.write_bytes(bytes(data))
    for rel in shards[0]["files"]:
        (tmp_path / "out" / rel).unlink()
    with pytest.raises(ShardFailed, match=rf"model copy .*{model_name(planned['sha256'])}: SHA-256 [0-9a-f]{{64}} on arrival, expected {planned['sha256']}"):
        _run(shards, planned)


def _link_tree(root: Path, *, actors: int, emotions: int) -> list[str]:
    """Write a corpus whose inputs are relative links into a hidden store inside the root, as DVC and git-annex keep one."""
    rels = make_ravdess(root.parent / "plain", actors=actors, emotions=emotions)
    for i, rel in enumerate(rels):
        (root / ".annex").mkdir(parents=True, exist_ok=True)
        os.replace(root.parent / "plain" / rel, root / ".annex" / f"{i}.npy")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(f"../.annex/{i}.npy")
    return rels


def _relink(link: Path, target: str) -> None:
    """Point ``link`` at ``target``, replacing it in one rename, as ``ln -sfn`` would."""
    link.with_name(link.name + ".new").symlink_to(target)
    os.replace(link.with_name(link.name + ".new"), link)


def test_a_link_tree_input_is_judged_by_the_target_it_reads(tmp_path: Path, reference_model: dict[str, Any]) -> None:
    """Inputs that are links into the root: a target rewritten in place and a link pointed at another file are each
    named by verification and re-extracted; the manifest then records every input's current SHA-256."""
    rels = _link_tree(tmp_path / "in", actors=1, emotions=3)
    inp, out = tmp_path / "in", tmp_path / "out"
    shards = plan_dataset(DatasetIO("ravdess", inp, out), shard_size=10)
    assert shards[0]["rejected"] == {}
    assert sum(r["extracted"] for r in _run(shards, reference_model)) == 3
    assert _problems(shards, reference_model) == ""
    rewritten, relinked = rels[0], rels[1]
    np.save((inp / rewritten).resolve(), tiny_spectrogram(901), allow_pickle=False)  # in place: same inode
    np.save(inp / ".annex" / "other.npy", tiny_spectrogram(902), allow_pickle=False)
    _relink(inp / relinked, "../.annex/other.npy")
    problems = _problems(shards, reference_model)
    assert {rel for rel in rels if rel in problems} == {rewritten, relinked}, problems
    results = _run(shards, reference_model)
    assert (sum(r["extracted"] for r in results), sum(r["skipped_existing"] for r in results)) == (2, 1)
    assert _problems(shards, reference_model) == ""
    manifest = json.loads((out / "manifest.json").read_text())
    assert {i["feature"]: i["input_sha256"] for i in manifest["items"]} == {
        rel: lineage.sha256_hex((inp / rel).read_bytes()) for rel in rels
    }


def test_the_stat_a_read_records_is_that_of_the_descriptor_its_bytes_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read keeps the fstat of what it read (a link's target, not the link), once; none when the file grew while
    it was read or changed within the racy window before; a link now resolving outside the root has no stat."""
    from cnn_features import spectrogram

    root = tmp_path / "in"
    (root / ".annex").mkdir(parents=True)
    target = root / ".annex" / "a.npy"
    np.save(target, tiny_spectrogram(1), allow_pickle=False)
    (root / "x.npy").symlink_to(".annex/a.npy")
    store = LocalStore(root)
    ctime = target.stat().st_ctime_ns

    def read() -> None:
        ((_, data),) = store.read_many([("x.npy", 0)], max_bytes=spectrogram.MAX_INPUT_BYTES)
        assert isinstance(data, bytes)

    monkeypatch.setattr(spectrogram, "_clock_ns", lambda: ctime + spectrogram.RACY_WINDOW_NS)
    read()
    st = target.stat()
    fields = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    assert lineage.read_stat(store, "x.npy") == fields and lineage.read_stat(store, "x.npy") is None
    assert lineage.input_stat(store, "x.npy") == fields and os.lstat(root / "x.npy").st_ino != st.st_ino

    monkeypatch.setattr(spectrogram, "_clock_ns", lambda: ctime + spectrogram.RACY_WINDOW_NS - 1)
    read()
    assert lineage.read_stat(store, "x.npy") is None

    monkeypatch.setattr(spectrogram, "_clock_ns", lambda: 2 * ctime)
    real_read = spectrogram._read_exactly

    def growing(fd: int, size: int) -> bytes:
        with open(target, "ab") as fh:  # a writer appends while the read is under way
            fh.write(b"\0" * 8)
        return real_read(fd, size)

    monkeypatch.setattr(spectrogram, "_read_exactly", growing)
    read()
    assert lineage.read_stat(store, "x.npy") is None

    np.save(tmp_path / "outside.npy", tiny_spectrogram(2), allow_pickle=False)
    _relink(root / "x.npy", str(tmp_path / "outside.npy"))
    assert lineage.input_stat(store, "x.npy") is None
