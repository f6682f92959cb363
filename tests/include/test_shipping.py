"""The model copy in every output: checked by SHA-256 when planning, and preferred to another file under the model's name."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from cnn_features import shipping
from cnn_features.errors import ModelError
from cnn_features.plan import DatasetIO, claim_output, plan_dataset
from cnn_features.runner import run_shard
from cnn_features.s3 import S3Access, S3Location
from cnn_features.shipping import local_model, model_name, ship_model
from cnn_features.stores import LocalStore, open_store
from tests.conftest import make_ravdess

NO_GPU = {"usable": False, "error": "no GPU in tests"}


def stand_in(path: Path, data: bytes) -> dict[str, Any]:
    """Write a file standing in for a model; return its plan info (its real SHA-256; no digest is checked here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "digest": "d" * 64, "feature_dim": 256}


def damaged(data: bytes) -> bytes:
    """Return ``data`` with one bit of its middle byte flipped: same size, other bytes."""
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x01
    return bytes(changed)


def test_a_damaged_copy_of_the_same_size_is_rewritten_and_a_good_one_kept(tmp_path: Path) -> None:
    """Planning again replaces a copy whose bytes changed (same size); a copy with the right SHA-256 is left as it is."""
    model = stand_in(tmp_path / "m.keras", b"model weights " * 64)
    output = LocalStore(tmp_path / "out")
    ship_model(output, model)
    copy = tmp_path / "out" / model_name(model["sha256"])
    copy.write_bytes(damaged(copy.read_bytes()))
    ship_model(output, model)
    assert copy.read_bytes() == Path(model["path"]).read_bytes()
    inode = copy.stat().st_ino
    ship_model(output, model)
    assert copy.stat().st_ino == inode, "a good copy is not written again"


def test_a_damaged_copy_is_refused_on_arrival_saying_what_to_do(tmp_path: Path) -> None:
    """A host without the model refuses a copy with the wrong SHA-256, saying to trigger the DAG from a host with the model;
    once planning rewrote it, the copy is fetched."""
    model = stand_in(tmp_path / "planner" / "m.keras", b"model weights " * 64)
    output = LocalStore(tmp_path / "out")
    ship_model(output, model)
    copy = tmp_path / "out" / model_name(model["sha256"])
    copy.write_bytes(damaged(copy.read_bytes()))
    elsewhere = {**model, "path": str(tmp_path / "worker" / "m.keras")}  # a host that never had the file
    with pytest.raises(ModelError, match=r": SHA-256 [0-9a-f]{64} on arrival, expected [0-9a-f]{64}; not used: the copy is damaged\. "
                                         r"Trigger the DAG again from a host that has the model at .*/worker/m\.keras"):
        local_model(elsewhere, output, tmp_path / "cache")
    ship_model(output, model)  # the next run, planned on the host with the model
    fetched = local_model(elsewhere, output, tmp_path / "cache")
    assert fetched == tmp_path / "cache" / f"{model['sha256']}.keras"
    assert fetched.read_bytes() == Path(model["path"]).read_bytes()


def test_another_file_at_the_models_path_gives_way_to_the_outputs_copy(tmp_path: Path) -> None:
    """A host with a different file under the plan's model path runs the output's checked copy; the plan's own file is run in place."""
    model = stand_in(tmp_path / "m.keras", b"model weights " * 64)
    output = LocalStore(tmp_path / "out")
    ship_model(output, model)
    Path(model["path"]).write_bytes(b"another model under the same name")
    fetched = local_model(model, output, tmp_path / "cache")
    assert fetched == tmp_path / "cache" / f"{model['sha256']}.keras"
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == model["sha256"]
    Path(model["path"]).write_bytes(b"model weights " * 64)
    assert local_model(model, output, tmp_path / "cache") == Path(model["path"])


def test_a_model_file_changed_after_its_check_is_not_copied(tmp_path: Path) -> None:
    """A model file whose bytes are no longer those the plan checked is refused, and no copy is written under the plan's name."""
    model = stand_in(tmp_path / "m.keras", b"model weights " * 64)
    Path(model["path"]).write_bytes(b"model weights, saved again")
    with pytest.raises(ModelError, match=rf"model {model['path']}: SHA-256 [0-9a-f]{{64}} now, not the {model['sha256']} it was checked"):
        ship_model(LocalStore(tmp_path / "out"), model)
    assert not (tmp_path / "out" / model_name(model["sha256"])).exists()


def test_on_s3_a_damaged_or_oversized_copy_is_rewritten_and_an_oversized_model_is_a_model_error(
    tmp_path: Path, s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 a copy of the right size but wrong bytes, or one over the limit, is rewritten; a model over the limit fails planning as a ModelError."""
    creds = s3_server.credentials
    access = S3Access(creds["access_key_id"], creds["secret_access_key"], endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    data = b"model weights " * 64
    model = stand_in(tmp_path / "m.keras", data)
    output = open_store(S3Location(s3_bucket, "out"), access=access)
    rel = model_name(model["sha256"])
    output.write(rel, damaged(data))
    ship_model(output, model)
    assert output.read(rel) == data
    monkeypatch.setattr(shipping, "MAX_MODEL_BYTES", len(data))
    output.write(rel, data + b"trailing bytes")  # larger than any model may be: S3 refuses to hand it over
    ship_model(output, model)
    assert output.read(rel) == data
    big = stand_in(tmp_path / "big.keras", data + b"!")
    with pytest.raises(ModelError, match=rf"model {big['path']}: {len(data) + 1:,} bytes, over the {len(data):,}-byte limit"):
        claim_output(DatasetIO("ravdess", tmp_path / "in", S3Location(s3_bucket, "big")), big, access=access)


def test_a_worker_whose_model_path_holds_another_file_runs_the_outputs_copy(
    tmp_path: Path, home: Path, reference_model: dict[str, Any]
) -> None:
    """A worker host with another file under the plan's model path extracts with the output's copy instead of failing the shard."""
    model_path = tmp_path / "models" / "mine.keras"
    model_path.parent.mkdir()
    shutil.copyfile(reference_model["path"], model_path)
    planned = {**reference_model, "path": str(model_path)}
    make_ravdess(tmp_path / "in", actors=1, emotions=3)
    io = DatasetIO("ravdess", tmp_path / "in", tmp_path / "out")
    claim_output(io, planned)
    model_path.write_bytes(b"this host's own, different mine.keras")
    (shard,) = plan_dataset(io, shard_size=10)
    result = run_shard({**shard, "model": planned, "batch_size": 4}, requested_device="cpu", probe=NO_GPU)
    assert result["extracted"] == 3
