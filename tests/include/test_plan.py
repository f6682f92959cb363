"""Run-conf validation, the model check and stable shard plans."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnn_features import plan
from cnn_features.config import load_settings
from cnn_features.errors import InvalidConf, ModelError, OutputConflict, PlanMismatch
from cnn_features.plan import DatasetIO, check_model, claim_output, plan_dataset, validate_conf
from cnn_features.storage import file_sha256
from tests.conftest import make_ravdess

# Model files for plans that never load them: planning copies the file into
# each output it claims, so it must exist; its bytes are never a model.
_FAKE_MODELS = Path(tempfile.mkdtemp(prefix="cnn-fake-models-"))
atexit.register(shutil.rmtree, _FAKE_MODELS, True)


def fake_model(name: str) -> str:
    """Return the path of a small file standing in for model ``name``."""
    path = _FAKE_MODELS / f"{name}.keras"
    path.write_bytes(f"not a model: {name}".encode())
    return str(path)


def fake_info(name: str, digest: str) -> dict[str, Any]:
    """Return a model info for the stand-in file of ``name`` (with its real SHA-256, as the check records it) and ``digest``."""
    path = fake_model(name)
    return {"sha256": file_sha256(Path(path)), "digest": digest, "feature_dim": 256, "path": path}


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
    claim_output(io, fake_info("a", "d" * 64))
    claim_output(io, fake_info("a", "d" * 64))
    with pytest.raises(OutputConflict, match=r"holds features of model .*/a\.keras"):
        claim_output(io, fake_info("b", "e" * 64))


def test_the_same_weights_saved_again_are_the_same_model(tmp_path: Path) -> None:
    """A model rebuilt or saved again (new file SHA-256, same architecture and weights) may resume the folder.

    A folder claimed before digests were recorded is known by its file's SHA-256 and upgraded.
    """
    io = DatasetIO("ravdess", tmp_path / "in", tmp_path / "out")
    claim_output(io, fake_info("a", "d" * 64))
    claim_output(io, fake_info("rebuilt", "d" * 64))
    old = DatasetIO("ravdess", tmp_path / "in", tmp_path / "old")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "_features.json").write_text(json.dumps({"model_sha256": fake_info("a", "")["sha256"], "feature_dim": 256, "model_path": "/m/a.keras"}))
    claim_output(old, fake_info("a", "d" * 64))
    assert json.loads((tmp_path / "old" / "_features.json").read_text())["model_digest"] == "d" * 64
    with pytest.raises(OutputConflict, match=r"holds features of model .*/a\.keras"):
        claim_output(old, fake_info("a", "e" * 64))


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


def test_every_problem_of_one_dataset_is_reported_not_only_its_first(home: Path) -> None:
    """A dataset with a relative input and an output under /etc has both named, beside an unknown dataset's name."""
    conf = conf_for(home)
    conf["datasets"]["ravdess"] = {"input": "data/ravdess", "output": "/etc/features"}
    conf["datasets"]["savee"] = {"input": "also/relative", "output": "/etc"}
    with pytest.raises(InvalidConf) as info:
        validate_conf(conf, load_settings())
    text = str(info.value)
    assert text.startswith("the run conf has 5 problems:"), text
    for field in ("datasets.ravdess.input: 'data/ravdess' is relative", "datasets.ravdess.output: '/etc/features' is outside",
                  "datasets.savee: unknown dataset 'savee'", "datasets.savee.input: 'also/relative' is relative",
                  "datasets.savee.output: '/etc' is outside"):
        assert field in text, field


def test_two_first_runs_claiming_one_output_cannot_both_win(tmp_path: Path) -> None:
    """Sixteen first runs of different models claim one empty output folder at once: exactly one wins, every time."""
    import threading

    models = [fake_info(f"m{i}", f"{i:064x}") for i in range(16)]
    for attempt in range(10):
        out = tmp_path / f"out{attempt}"
        barrier = threading.Barrier(16)
        won: list[int] = []

        def claim(i: int, out: Path, barrier: threading.Barrier, won: list[int]) -> None:
            model = models[i]
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
        winner = models[won[0]]["sha256"]
        assert json.loads((out / "_features.json").read_text())["model_sha256"] == winner
        assert sorted(p.name for p in out.iterdir()) == ["_features.json", "_models"]
        assert [p.name for p in (out / "_models").iterdir()] == [f"{winner}.keras"]  # the winner's model alone


# --------------------------------------------------------------------------- plan files and references

MODEL = fake_info("a", "d" * 64)
# What a run may push into XCom in all (the scale target, docs/benchmarks.md "Scale").
MAX_XCOM_BYTES = 256 * 1024


def two_datasets(tmp_path: Path, *, shard_size: int) -> plan.RunConf:
    make_ravdess(tmp_path / "in" / "ravdess", actors=4, emotions=6)  # 24 files
    crema = tmp_path / "in" / "crema_d"
    crema.mkdir(parents=True)
    for i in range(10):
        np.save(crema / f"{1001 + i}_IEO_ANG_LO.npy", np.zeros((128, 16), np.float32))
    datasets = tuple(DatasetIO(name, tmp_path / "in" / name, tmp_path / "out" / name) for name in ("crema_d", "ravdess"))
    return plan.RunConf(datasets, "cpu", shard_size, None, 0.0)


def test_each_plan_file_is_whole_and_named_by_its_digest(tmp_path: Path) -> None:
    """publish_plan writes an index and a file per shard under _plans/<sha256>.json; the references load back every shard as planned."""
    run = plan.make_plan(two_datasets(tmp_path, shard_size=4), MODEL, batch_size=8)
    refs, plans = plan.publish_plan(run.shards)
    assert refs == [{"dataset": s["dataset"], "shard_id": s["shard_id"], "label": s["label"]} for s in run.shards]
    for name in ("crema_d", "ravdess"):
        written = sorted((tmp_path / "out" / name / plan.PLANS_DIR).iterdir())  # no temporary left beside them
        assert len(written) == 1 + sum(s["dataset"] == name for s in run.shards)
        assert all(path.name == f"{plan.plan_digest(path.read_bytes())}.json" for path in written)
        assert plans[name] == {"output": str(tmp_path / "out" / name), "digest": plans[name]["digest"]}
        assert plans[name]["digest"] in {path.stem for path in written}
    assert plan.load_shards(refs, plans) == run.shards
    assert plan.load_shard(refs[3], plans) == run.shards[3], "one cleared shard reads back exactly its own files"


def test_a_changed_or_missing_plan_file_is_refused_naming_it_and_both_digests(tmp_path: Path) -> None:
    """A plan or shard file whose bytes no longer hash to their digest is refused; the message names the file and both digests."""
    run = plan.make_plan(two_datasets(tmp_path, shard_size=4), MODEL, batch_size=8)
    refs, plans = plan.publish_plan(run.shards)
    folder = tmp_path / "out" / "crema_d" / plan.PLANS_DIR
    _, own = plan.plan_files([s for s in run.shards if s["dataset"] == "crema_d"])
    digest = plan.plan_digest(own["crema_d-0001"])
    path = folder / f"{digest}.json"
    changed = path.read_bytes().replace(b"1001_IEO_ANG_LO.npy", b"1001_IEO_ANG_MD.npy")
    path.write_bytes(changed)
    with pytest.raises(PlanMismatch, match=rf"{path}: plan of shard crema_d-0001 has SHA-256 {plan.plan_digest(changed)}, not {digest}"):
        plan.load_shard(refs[0], plans)
    assert plan.load_shard(refs[1], plans) == run.shards[1], "the other shards still load"
    index = folder / f"{plans['crema_d']['digest']}.json"
    index.write_bytes(index.read_bytes() + b" ")
    with pytest.raises(PlanMismatch, match=rf"{index}: shard plan has SHA-256 [0-9a-f]{{64}}, not {plans['crema_d']['digest']}"):
        plan.load_shard(refs[1], plans)
    index.unlink()
    with pytest.raises(PlanMismatch, match=rf"{index}: shard plan unreadable"):
        plan.load_shard(refs[1], plans)
    with pytest.raises(PlanMismatch, match="not a plan digest"):
        plan.load_shard(refs[0], {"crema_d": {**plans["crema_d"], "digest": "../../etc/passwd"}})
    with pytest.raises(PlanMismatch, match="holds no shard ravdess-0009"):
        plan.load_shard({**refs[-1], "shard_id": "ravdess-0009"}, plans)


def test_the_same_inputs_give_the_same_digests_and_ids(tmp_path: Path) -> None:
    """Planning the same folders twice gives the same references; one more input file changes that dataset's digest only."""
    conf = two_datasets(tmp_path, shard_size=4)
    first = plan.publish_plan(plan.make_plan(conf, MODEL, batch_size=8).shards)
    assert plan.publish_plan(plan.make_plan(conf, MODEL, batch_size=8).shards) == first
    np.save(tmp_path / "in" / "crema_d" / "2001_IEO_SAD_HI.npy", np.zeros((128, 16), np.float32))
    refs, plans = plan.publish_plan(plan.make_plan(conf, MODEL, batch_size=8).shards)
    assert {name for name in plans if plans[name] != first[1][name]} == {"crema_d"}
    assert refs == first[0], "same ids and labels: the new file falls into the last crema_d shard"


def test_shard_size_is_raised_to_fit_max_map_length_and_says_so(tmp_path: Path) -> None:
    """34 files in shards of 2 make 17 shards; with room for 5 the size becomes the smallest that fits, and the note says why."""
    run = plan.make_plan(two_datasets(tmp_path, shard_size=2), MODEL, batch_size=8, max_shards=5)
    assert len(run.shards) <= 5 and run.shard_size == 8 and run.requested_shard_size == 2
    assert plan.shard_count([10, 24], 7) > 5, "a shard size one smaller would not fit"
    assert run.note is not None and "shard_size raised from 2 to 8" in run.note and "core.max_map_length" in run.note
    assert sum(len(s["files"]) for s in run.shards) == 34
    roomy = plan.make_plan(two_datasets(tmp_path / "b", shard_size=2), MODEL, batch_size=8, max_shards=17)
    assert (len(roomy.shards), roomy.shard_size, roomy.note) == (17, 2, None)


@pytest.mark.parametrize(
    ("counts", "size", "most", "fitted"),
    [([1_000_000], 100, 1024, 977), ([10_000_000], 100, 1024, 9766), ([1_000_000, 7442], 100, 1024, 985), ([0, 5], 1, 5, 1)],
)
def test_fit_shard_size_picks_the_smallest_size_that_fits(counts: list[int], size: int, most: int, fitted: int) -> None:
    """The fitted size keeps the total shard count within the limit, and one less would not."""
    assert plan.fit_shard_size(counts, shard_size=size, max_shards=most) == fitted
    assert plan.shard_count(counts, fitted) <= most
    assert fitted == size or plan.shard_count(counts, fitted - 1) > most


def test_more_datasets_than_max_map_length_is_refused() -> None:
    """Three datasets with files cannot fit two mapped tasks at any size: refused naming the setting."""
    with pytest.raises(InvalidConf, match="3 datasets need a shard each, over the 2 mapped tasks core.max_map_length"):
        plan.fit_shard_size([5, 5, 5], shard_size=1, max_shards=2)


def test_xcom_payload_stays_small_for_a_million_files(tmp_path: Path) -> None:
    """A million-file listing cut to fit 1,024 shards pushes references of under 256 KB in all, with every shard id's result."""
    names = [f"{1001 + i // 288:04d}_{i % 288:03d}.npy" for i in range(1_000_000)]
    listing = plan.Listing(names, dict.fromkeys(names, 8320), {}, [])
    io = DatasetIO("crema_d", tmp_path / "in", tmp_path / "features" / "crema_d")
    size = plan.fit_shard_size([len(names)], shard_size=500, max_shards=1024)
    shards = [{**s, "model": MODEL, "batch_size": 32} for s in plan.cut_shards(io, listing, shard_size=size)]
    refs, plans = plan.publish_plan(shards)
    done = [s["shard_id"] for s in shards]  # what each extract_shard pushes: its shard id
    pushed = len(json.dumps(refs)) + len(json.dumps(plans)) + len(json.dumps(done))
    assert len(refs) == 1024 and pushed <= MAX_XCOM_BYTES // 2, pushed
    assert plan.load_shard(refs[-1], plans)["files"] == names[-len(shards[-1]["files"]) :]


def test_results_are_read_back_from_the_output_for_finished_shards(tmp_path: Path) -> None:
    """Each finished shard's result is read from <output>/_shards/<id>.json; a finished shard without one is refused by name."""
    run = plan.make_plan(two_datasets(tmp_path, shard_size=20), MODEL, batch_size=8)
    first = run.shards[0]
    result = {"shard_id": first["shard_id"], "extracted": 10, "bad": []}
    (tmp_path / "out" / "crema_d" / "_shards").mkdir(parents=True)
    (tmp_path / "out" / "crema_d" / "_shards" / f"{first['shard_id']}.json").write_text(json.dumps(result))
    assert plan.load_results(run.shards, [first["shard_id"]]) == [result]
    with pytest.raises(PlanMismatch, match=r"ravdess-0001\.json: result of finished shard ravdess-0001 unreadable"):
        plan.load_results(run.shards, [s["shard_id"] for s in run.shards])


# --------------------------------------------------------------------------- locations across datasets and the model copy


@pytest.mark.parametrize(
    ("ravdess_output", "crema_input"),
    [("in/crema_d/ravdess_features", "in/crema_d"), ("out/all", "out/all/crema_d")],
    ids=["output-inside-another-input", "input-inside-another-output"],
)
def test_an_output_overlapping_another_datasets_input_is_refused_naming_both(
    home: Path, ravdess_output: str, crema_input: str
) -> None:
    """One dataset's output inside another's input (or that input inside the output) is refused, naming both datasets and paths."""
    for rel in ("in/ravdess", crema_input):
        (home / rel).mkdir(parents=True, exist_ok=True)
    conf = {
        "datasets": {
            "ravdess": {"input": str(home / "in" / "ravdess"), "output": str(home / ravdess_output)},
            "crema_d": {"input": str(home / crema_input), "output": str(home / "out" / "crema_d_features")},
        }
    }
    with pytest.raises(InvalidConf) as info:
        validate_conf(conf, load_settings())
    assert str(info.value) == (
        f"datasets.ravdess.output {home / ravdess_output} and datasets.crema_d.input {home / crema_input} overlap; "
        "keep every dataset's features out of every input tree"
    )


def test_an_s3_output_inside_another_datasets_s3_input_is_refused(home: Path, s3_server: Any, s3_bucket: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """On S3 too, a dataset's output prefix under another dataset's input prefix is refused naming both."""
    from cnn_features.s3 import S3Access

    creds = s3_server.credentials
    access = S3Access(creds["access_key_id"], creds["secret_access_key"], endpoint_url=s3_server.endpoint_url,
                      region_name="us-east-1")
    client = s3_server.client()
    for key in ("ravdess/Actor_01/03-01-01-01-01-01-01.npy", "crema/1001_IEO_ANG_LO.npy"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    monkeypatch.setenv("CNN_FEATURES_ALLOWED_ROOTS", f"{home}:s3://{s3_bucket}")
    conf = {
        "datasets": {
            "ravdess": {"input": f"s3://{s3_bucket}/ravdess", "output": f"s3://{s3_bucket}/crema/ravdess_features"},
            "crema_d": {"input": f"s3://{s3_bucket}/crema", "output": f"s3://{s3_bucket}/features/crema_d"},
        }
    }
    with pytest.raises(InvalidConf, match=rf"datasets\.ravdess\.output s3://{s3_bucket}/crema/ravdess_features and "
                                          rf"datasets\.crema_d\.input s3://{s3_bucket}/crema overlap"):
        validate_conf(conf, load_settings(), access=access)


def test_a_model_too_large_to_copy_beside_the_features_is_a_model_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model file over the copy limit fails planning with a ModelError naming the file and the limit, and no copy is left."""
    from cnn_features import shipping

    monkeypatch.setattr(shipping, "MAX_MODEL_BYTES", 8)
    model = fake_info("big", "d" * 64)
    with pytest.raises(ModelError, match=rf"model {model['path']}: \d+ bytes, over the 8-byte limit of a model copied beside"):
        claim_output(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), model)
    assert not (tmp_path / "out" / shipping.MODELS_DIR).exists()
