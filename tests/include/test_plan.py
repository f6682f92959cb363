"""Run-conf validation, the model check and stable shard plans."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from cnn_features import plan
from cnn_features.config import load_settings
from cnn_features.errors import InvalidConf, ModelError, OutputConflict
from cnn_features.plan import DatasetIO, check_model, claim_output, plan_dataset, validate_conf
from tests.conftest import make_ravdess


def conf_for(home: Path, **overrides: Any) -> dict[str, Any]:
    (home / "in" / "ravdess").mkdir(parents=True, exist_ok=True)
    conf: dict[str, Any] = {
        "datasets": {"ravdess": {"input": str(home / "in" / "ravdess"), "output": str(home / "out" / "ravdess")}},
        "device": "auto",
        "shard_size": 10,
        "model_path": None,
    }
    conf.update(overrides)
    return conf


def test_valid_conf_is_accepted(home: Path) -> None:
    """A well-formed conf comes back typed, with resolved paths."""
    conf = validate_conf(conf_for(home), load_settings())
    assert conf.datasets[0].name == "ravdess"
    assert conf.datasets[0].output == (home / "out" / "ravdess").resolve()
    assert (conf.device, conf.shard_size, conf.model_path, conf.max_bad_fraction) == ("auto", 10, None, 0.0)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda h: {"datasets": {}}, "datasets"),
        (lambda h: {"datasets": {"iemocap": {"input": str(h), "output": str(h / "o")}}}, "datasets.iemocap"),
        (lambda h: {"datasets": {"ravdess": {"input": "in/ravdess", "output": str(h / "o")}}}, "datasets.ravdess.input: 'in/ravdess' is relative"),
        (lambda h: {"datasets": {"ravdess": {"input": f"{h}/in/../in/ravdess", "output": str(h / "o")}}}, "contains '..'"),
        (lambda h: {"datasets": {"ravdess": {"input": "/etc", "output": str(h / "o")}}}, "outside the allowed roots"),
        (lambda h: {"datasets": {"ravdess": {"input": str(h / "missing"), "output": str(h / "o")}}}, "does not exist"),
        (lambda h: {"datasets": {"ravdess": {"input": str(h / "in" / "ravdess"), "output": str(h / "in" / "ravdess" / "f")}}}, "overlap"),
        (lambda h: {"datasets": {"ravdess": {"input": str(h / "in" / "ravdess")}}}, "exactly the keys"),
        (lambda h: {"device": "tpu"}, "device: 'tpu'"),
        (lambda h: {"shard_size": -1}, "shard_size"),
        (lambda h: {"shard_size": 10**9}, "shard_size"),
        (lambda h: {"shard_size": True}, "shard_size"),
        (lambda h: {"max_bad_fraction": 1.5}, "max_bad_fraction"),
        (lambda h: {"model_path": "model.keras"}, "model_path"),
    ],
)
def test_bad_conf_fields_are_rejected_by_name(home: Path, change: Any, field: str) -> None:
    """Every bad field is rejected before any work, and the message names it."""
    with pytest.raises(InvalidConf, match=field.replace("(", r"\(").replace(".", r"\.")):
        validate_conf(conf_for(home, **change(home)), load_settings())


def test_allowed_roots_come_from_the_environment(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CNN_FEATURES_ALLOWED_ROOTS widens where conf paths may point."""
    (tmp_path / "corpus").mkdir()
    conf = {"datasets": {"ravdess": {"input": str(tmp_path / "corpus"), "output": str(tmp_path / "feat")}}}
    with pytest.raises(InvalidConf, match="allowed roots"):
        validate_conf(conf, load_settings())
    monkeypatch.setenv("CNN_FEATURES_ALLOWED_ROOTS", f"{home}:{tmp_path}")
    assert validate_conf(conf, load_settings()).datasets[0].input == tmp_path / "corpus"


def test_shards_are_stable_and_cover_every_file_once(tmp_path: Path) -> None:
    """The same folder and shard size give the same shards; each file is in exactly one."""
    rels = make_ravdess(tmp_path / "in", actors=3, emotions=4)
    io = DatasetIO("ravdess", tmp_path / "in", tmp_path / "out")
    first, second = plan_dataset(io, shard_size=5), plan_dataset(io, shard_size=5)
    assert first == second
    assert [s["shard_id"] for s in first] == ["ravdess-0001", "ravdess-0002", "ravdess-0003"]
    assert [s["label"] for s in first] == ["ravdess 1/3", "ravdess 2/3", "ravdess 3/3"]
    assert [f for s in first for f in s["files"]] == rels
    json.dumps(first)  # shards travel through XCom


def test_rejected_names_travel_with_their_shard(tmp_path: Path) -> None:
    """A file whose name does not parse is carried in its shard's rejected map."""
    make_ravdess(tmp_path / "in", actors=1, emotions=2)
    (tmp_path / "in" / "Actor_01" / "junk.npy").write_bytes(b"")
    (shard,) = plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=50)
    assert list(shard["rejected"]) == ["Actor_01/junk.npy"]


def test_reference_model_is_created_and_described(reference_model: dict[str, Any]) -> None:
    """Without a model path the reference CNN is built once and reports its shapes."""
    assert reference_model["n_mels"] == 128 and reference_model["frames"] is None
    assert reference_model["feature_dim"] == 256 and reference_model["min_frames"] == 16
    assert len(reference_model["sha256"]) == 64


def test_missing_and_corrupt_models_fail_before_shard_work(home: Path, tmp_path: Path) -> None:
    """A missing or corrupt model file is a ModelError naming it."""
    with pytest.raises(ModelError, match="file not found"):
        check_model(home / "nope.keras", load_settings())
    broken = home / "broken.keras"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelError, match="cannot be loaded in safe mode"):
        check_model(broken, load_settings())


def test_output_of_another_model_is_refused(tmp_path: Path) -> None:
    """Resuming into a folder made by a different model would mix feature spaces: refused."""
    io = DatasetIO("ravdess", tmp_path / "in", tmp_path / "out")
    claim_output(io, {"sha256": "a" * 64, "digest": "d" * 64, "feature_dim": 256, "path": "/m/a.keras"})
    claim_output(io, {"sha256": "a" * 64, "digest": "d" * 64, "feature_dim": 256, "path": "/m/a.keras"})
    with pytest.raises(OutputConflict, match="holds features of model /m/a.keras"):
        claim_output(io, {"sha256": "b" * 64, "digest": "e" * 64, "feature_dim": 256, "path": "/m/b.keras"})


def test_the_same_weights_saved_again_are_the_same_model(tmp_path: Path) -> None:
    """A model rebuilt or saved again (new file SHA-256, same architecture and weights) may resume the folder.

    A folder claimed before digests were recorded is known by its file's SHA-256 and upgraded.
    """
    io = DatasetIO("ravdess", tmp_path / "in", tmp_path / "out")
    claim_output(io, {"sha256": "a" * 64, "digest": "d" * 64, "feature_dim": 256, "path": "/m/a.keras"})
    claim_output(io, {"sha256": "f" * 64, "digest": "d" * 64, "feature_dim": 256, "path": "/m/rebuilt.keras"})
    old = DatasetIO("ravdess", tmp_path / "in", tmp_path / "old")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "_features.json").write_text(json.dumps({"model_sha256": "a" * 64, "feature_dim": 256, "model_path": "/m/a.keras"}))
    claim_output(old, {"sha256": "a" * 64, "digest": "d" * 64, "feature_dim": 256, "path": "/m/a.keras"})
    assert json.loads((tmp_path / "old" / "_features.json").read_text())["model_digest"] == "d" * 64
    with pytest.raises(OutputConflict, match="holds features of model /m/a.keras"):
        claim_output(old, {"sha256": "a" * 64, "digest": "e" * 64, "feature_dim": 256, "path": "/m/a.keras"})


def test_a_checked_model_is_not_loaded_again(home: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A model file checked before (same SHA-256, same Keras) is described from the cache, no process started."""
    def no_child(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model check process was started")

    monkeypatch.setattr(plan.subprocess, "run", no_child)
    assert check_model(None, load_settings()) == reference_model
    copy = home / "copy.keras"
    shutil.copyfile(reference_model["path"], copy)
    assert check_model(copy, load_settings()) == {**reference_model, "path": str(copy)}


def test_a_changed_or_misnamed_model_is_checked_again(home: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """New bytes, a file that is not .keras, or an unreadable cache entry each start the check process."""
    started: list[list[str]] = []
    real_run = plan.subprocess.run

    def counting_run(cmd: list[str], **kwargs: Any) -> Any:
        started.append(cmd)
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(plan.subprocess, "run", counting_run)
    renamed = home / "model.bin"
    shutil.copyfile(reference_model["path"], renamed)
    with pytest.raises(ModelError, match="expected a .keras file"):
        check_model(renamed, load_settings())
    assert len(started) == 1
    changed = home / "changed.keras"
    changed.write_bytes(Path(reference_model["path"]).read_bytes()[:-100])
    with pytest.raises(ModelError, match="cannot be loaded in safe mode"):
        check_model(changed, load_settings())
    assert len(started) == 2
    (entry,) = load_settings().model_info_cache.glob(f"{reference_model['sha256']}-*.json")
    entry.write_text("{not json")
    assert check_model(None, load_settings()) == reference_model
    assert len(started) == 3
    assert json.loads(entry.read_text()) == reference_model


def test_a_file_name_that_is_not_utf8_is_a_bad_input_and_the_plan_serialises(tmp_path: Path) -> None:
    """A name of raw non-UTF-8 bytes is listed as a bad input by its repr(); the plan is valid UTF-8 JSON."""
    import os

    make_ravdess(tmp_path / "in", actors=1, emotions=2)
    raw = os.fsdecode(b"03-01-01-01-01-02-\xff.npy")
    (tmp_path / "in" / "Actor_01" / raw).write_bytes(b"x")
    (shard,) = plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=10)
    json.dumps(shard).encode("utf-8")  # what XCom serialisation needs
    json.dumps(shard, ensure_ascii=False).encode("utf-8")
    shown = repr(f"Actor_01/{raw}")
    assert shown in shard["files"] and shard["rejected"][shown] == f"{shown}: file name is not valid UTF-8; rename the file"
    assert len(shard["files"]) == 3 and not any(f"Actor_01/{raw}" == rel for rel in shard["files"])


def test_a_conf_with_several_mistakes_reports_them_all(home: Path) -> None:
    """Bad shard_size, device, max_bad_fraction, model_path and a dataset input are all named in one message."""
    conf = conf_for(home, shard_size=-1, device="tpu", max_bad_fraction=1.5, model_path="rel/m.keras")
    conf["datasets"]["ravdess"]["input"] = "/etc"
    with pytest.raises(InvalidConf) as info:
        validate_conf(conf, load_settings())
    text = str(info.value)
    assert text.startswith("the run conf has 5 problems:")
    named = ("datasets.ravdess.input: '/etc' is outside", "device: 'tpu'", "shard_size: expected",
             "model_path: 'rel/m.keras' is relative", "max_bad_fraction: expected")
    for field in named:
        assert field in text, field


def test_two_first_runs_claiming_one_output_cannot_both_win(tmp_path: Path) -> None:
    """Sixteen first runs of different models claim one empty output folder at once: exactly one wins, every time."""
    import threading

    for attempt in range(10):
        out = tmp_path / f"out{attempt}"
        barrier = threading.Barrier(16)
        won: list[int] = []

        def claim(i: int, out: Path, barrier: threading.Barrier, won: list[int]) -> None:
            model = {"sha256": f"{i:064x}", "digest": f"{i:064x}", "feature_dim": 256, "path": f"/m{i}.keras"}
            barrier.wait()
            try:
                claim_output(DatasetIO("ravdess", tmp_path / "in", out), model)
            except OutputConflict:
                return
            won.append(i)

        threads = [threading.Thread(target=claim, args=(i, out, barrier, won)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(won) == 1, f"attempt {attempt}: {len(won)} runs claimed {out}"
        assert json.loads((out / "_features.json").read_text())["model_sha256"] == f"{won[0]:064x}"
        assert [p.name for p in out.iterdir()] == ["_features.json"]
