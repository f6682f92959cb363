"""Stores and shards against a real S3 server (SeaweedFS on loopback, keys checked): no mock stands in for S3."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from botocore.exceptions import ClientError

from cnn_features.config import load_settings
from cnn_features.errors import InvalidConf, InvalidSpectrogram, ShardFailed, StoreError, StoreMissing
from cnn_features.faults import ENV_VAR
from cnn_features.plan import DatasetIO, plan_dataset, validate_conf
from cnn_features.runner import run_shard
from cnn_features.s3 import S3Access, S3Location
from cnn_features.storage import check_feature_bytes, feature_file_size, npy_bytes
from cnn_features.stores import LocalStore, Store, open_store, valid_features
from tests.conftest import IGNORED_EXTRA, add_bad_inputs, make_ravdess

pytestmark = pytest.mark.e2e

NO_GPU = {"usable": False, "error": "no GPU in tests"}
# Seconds a dead endpoint may take to fail: attempts x connect timeout plus
# botocore's backoff, with the test settings below.
DEAD_ENDPOINT_LIMIT_S = 30.0


def access_of(server: Any) -> S3Access:
    creds = server.credentials
    return S3Access(
        creds["access_key_id"], creds["secret_access_key"], endpoint_url=server.endpoint_url, region_name="us-east-1"
    )


def upload(server: Any, local: Path, location: S3Location) -> list[str]:
    """Upload every regular file under ``local`` (symlinks are skipped: S3 has none); return the relative keys."""
    client = server.client()
    rels = []
    for path in sorted(local.rglob("*")):
        if path.is_file() and not path.is_symlink():
            rel = path.relative_to(local).as_posix()
            client.put_object(Bucket=location.bucket, Key=location.key(rel), Body=path.read_bytes())
            rels.append(rel)
    return rels


@pytest.fixture
def s3_env(s3_server: Any, s3_bucket: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Allowed roots holding the home and the test bucket; S3 keys in this process's environment for workers."""
    monkeypatch.setenv("CNN_FEATURES_ALLOWED_ROOTS", f"{home}:s3://{s3_bucket}")
    monkeypatch.setenv("CNN_FEATURES_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("CNN_FEATURES_S3_CONNECT_TIMEOUT_S", "1")
    return {"server": s3_server, "bucket": s3_bucket, "access": access_of(s3_server)}


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same interface over a local folder and a real S3 prefix."""
    if request.param == "local":
        yield LocalStore(tmp_path / "root")
        return
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    yield open_store(S3Location(bucket, "root"), access=access_of(server))


def test_store_writes_whole_and_lists_sorted_with_sizes(store: Store) -> None:
    """Written files read back byte for byte; listing is sorted, relative, sized, and skips hidden names."""
    for rel, data in [("b/2.npy", b"22"), ("a/1.npy", b"1"), ("a/.DS_Store", b"x"), ("top.txt", b"333")]:
        store.write(rel, data)
    assert store.list() == [("a/1.npy", 1), ("b/2.npy", 2), ("top.txt", 3)]
    assert store.read("b/2.npy") == b"22"
    with pytest.raises(StoreMissing):
        store.read("nope.npy")


def test_store_reads_many_in_order_and_refuses_oversize_without_reading(store: Store) -> None:
    """``read_many`` keeps the caller's order and names an input over the limit instead of downloading it."""
    rels = [f"f{i:03d}.npy" for i in range(40)]
    for i, rel in enumerate(rels):
        store.write(rel, bytes([i]) * (10 + i))
    items = [(rel, 10 + i) for i, rel in enumerate(rels)]
    got = list(store.read_many(items, max_bytes=45))
    assert [rel for rel, _ in got] == rels
    for i, (rel, data) in enumerate(got):
        if 10 + i > 45:
            assert isinstance(data, InvalidSpectrogram) and "45-byte input limit" in str(data), rel
        else:
            assert data == bytes([i]) * (10 + i)


def test_valid_features_are_found_by_one_check(store: Store) -> None:
    """Only whole, valid feature files count as done."""
    good = npy_bytes(np.ones(8, dtype=np.float32))
    store.write("a.npy", good)
    store.write("short.npy", good[:-4])
    assert valid_features(store, ["a.npy", "short.npy", "missing.npy"], feature_dim=8) == {"a.npy"}


def test_concurrent_writer_reports_every_object_once(store: Store) -> None:
    """Every put is reported stored exactly once, by ``put`` or ``flush``."""
    stored: list[str] = []
    with store.writer() as writer:
        for i in range(50):
            stored += writer.put(f"x/{i:02d}.npy", npy_bytes(np.full(4, i, dtype=np.float32)))
        stored += writer.flush()
    assert sorted(stored) == [f"x/{i:02d}.npy" for i in range(50)]
    assert len(store.list()) == 50


def test_s3_shard_features_are_byte_identical_to_local(
    tmp_path: Path, s3_env: dict[str, Any], reference_model: dict[str, Any]
) -> None:
    """S3 -> S3, S3 -> local and local -> S3 shards write exactly the bytes a local run writes."""
    rels = make_ravdess(tmp_path / "in", actors=3, emotions=4)
    bucket, access = s3_env["bucket"], s3_env["access"]
    upload(s3_env["server"], tmp_path / "in", S3Location(bucket, "corpus"))
    runs = {
        "local": (tmp_path / "in", tmp_path / "out-local"),
        "s3-s3": (S3Location(bucket, "corpus"), S3Location(bucket, "features-s3")),
        "s3-local": (S3Location(bucket, "corpus"), tmp_path / "out-s3-local"),
        "local-s3": (tmp_path / "in", S3Location(bucket, "features-local")),
    }
    features: dict[str, dict[str, bytes]] = {}
    for name, (src, dst) in runs.items():
        (shard,) = plan_dataset(DatasetIO("ravdess", src, dst), shard_size=100, access=access)
        spec = {**shard, "model": reference_model, "batch_size": 4}
        result = run_shard(spec, requested_device="auto", probe=NO_GPU, access=access)
        assert result["extracted"] == len(rels) and not result["bad"], (name, result)
        out = open_store(dst, access=access)
        features[name] = {rel: out.read(rel) for rel in rels}
        assert out.read(f"_shards/{shard['shard_id']}.json")
    for name in ("s3-s3", "s3-local", "local-s3"):
        assert features[name] == features["local"], name


def test_hostile_inputs_on_s3_are_named_and_nothing_runs(
    tmp_path: Path, s3_env: dict[str, Any], reference_model: dict[str, Any]
) -> None:
    """Pickled, truncated, wrong dtype or ndim, NaN, oversized-header and escaping keys are bad inputs; the rest is extracted."""
    rels = make_ravdess(tmp_path / "in", actors=2, emotions=2)
    marker = tmp_path / "pwned"
    bad = add_bad_inputs(tmp_path / "in", marker)
    bad.pop("Actor_77/03-01-05-01-01-01-77.npy")  # a symlink: S3 has none, so it is not uploaded
    bucket, access = s3_env["bucket"], s3_env["access"]
    src = S3Location(bucket, "hostile")
    upload(s3_env["server"], tmp_path / "in", src)
    client = s3_env["server"].client()
    # Keys that would leave the prefix as paths. SeaweedFS itself refuses '.'
    # and '..' segments and folds '//'; AWS S3 stores all three. Whatever the
    # server keeps, the plan must refuse.
    escaping = []
    for rel in ("Actor_01/../../escape.npy", "Actor_01/./03-01-02-01-01-01-01.npy", "Actor_01//03-01-02-01-01-02-01.npy"):
        with contextlib.suppress(ClientError):
            client.put_object(Bucket=bucket, Key=src.key(rel), Body=(tmp_path / "in" / rels[0]).read_bytes())
            escaping.append(rel)
    listed = {rel for rel, _ in open_store(src, access=access).list()}
    escaping = [rel for rel in escaping if rel in listed]
    (shard,) = plan_dataset(DatasetIO("ravdess", src, S3Location(bucket, "hostile-out")), shard_size=100, access=access)
    spec = {**shard, "model": reference_model, "batch_size": 4}
    result = run_shard(spec, requested_device="cpu", probe=NO_GPU, access=access)
    reasons = {item["file"]: item["reason"] for item in result["bad"]}
    for rel, words in bad.items():
        assert rel in reasons and (words in reasons[rel] or words.split()[0] in reasons[rel]), (rel, reasons.get(rel))
    for rel in escaping:
        assert "would leave the prefix" in reasons[rel], rel
    ignored = set(IGNORED_EXTRA)  # not .npy by name: never an input
    assert shard["ignored"] == sorted(ignored)
    assert result["extracted"] == len(listed) - len(reasons) - len(ignored) >= len(rels) + 1  # the first take of the pair too
    out = open_store(S3Location(bucket, "hostile-out"), access=access)
    assert {rel for rel, _ in out.list() if rel.endswith(".npy") and not rel.startswith("_")} == listed - set(reasons) - ignored
    assert not marker.exists()


def test_missing_bucket_prefix_wrong_keys_and_dead_endpoint_are_named_without_the_secret(
    tmp_path: Path, s3_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each S3 mistake fails validation naming the field and what S3 said; the secret appears nowhere."""
    bucket, access = s3_env["bucket"], s3_env["access"]
    make_ravdess(tmp_path / "in", actors=1, emotions=1)
    upload(s3_env["server"], tmp_path / "in", S3Location(bucket, "corpus"))
    settings = load_settings()

    def conf(src: str) -> dict[str, Any]:
        return {"datasets": {"ravdess": {"input": src, "output": str(tmp_path / "out")}}}

    wrong = S3Access(access.access_key_id, "wrong-" + str(access.secret_access_key), endpoint_url=access.endpoint_url)
    unknown = S3Access("AKIDUNKNOWN00000000", str(access.secret_access_key), endpoint_url=access.endpoint_url)
    dead = S3Access(access.access_key_id, access.secret_access_key, endpoint_url="http://127.0.0.1:9")
    cases = [
        (f"s3://{bucket}/corpus", wrong, ["datasets.ravdess.input", "ListObjectsV2", bucket, access.endpoint_url]),
        (f"s3://{bucket}/corpus", unknown, ["datasets.ravdess.input", "ListObjectsV2", bucket]),
        (f"s3://{bucket}/no-such-prefix", access, ["datasets.ravdess.input", "no objects under", "no-such-prefix"]),
        (f"s3://{bucket}-absent/corpus", access, ["datasets.ravdess.input", "does not exist", f"{bucket}-absent"]),
        (f"s3://{bucket}/corpus", dead, ["datasets.ravdess.input", "ListObjectsV2", "127.0.0.1:9", bucket]),
    ]
    monkeypatch.setenv("CNN_FEATURES_ALLOWED_ROOTS", f"{tmp_path}:s3://{bucket}:s3://{bucket}-absent")
    for src, who, words in cases:
        started = time.monotonic()
        with pytest.raises(InvalidConf) as err:
            validate_conf(conf(src), settings, access=who)
        message = str(err.value)
        assert time.monotonic() - started < DEAD_ENDPOINT_LIMIT_S, message
        for word in words:
            assert word in message, (word, message)
        assert str(access.secret_access_key) not in message and "wrong-" not in message


def test_server_killed_mid_shard_fails_clearly_and_a_rerun_completes(
    tmp_path: Path, s3_env: dict[str, Any], reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the server SIGKILLed mid-shard the shard fails naming S3; no partial object counts; after a restart the re-run finishes exactly the rest."""
    rels = make_ravdess(tmp_path / "in", actors=8, emotions=8, frames=32)
    server, bucket, access = s3_env["server"], s3_env["bucket"], s3_env["access"]
    src, dst = S3Location(bucket, "kill-in"), S3Location(bucket, "kill-out")
    upload(server, tmp_path / "in", src)
    (shard,) = plan_dataset(DatasetIO("ravdess", src, dst), shard_size=1000, access=access)
    spec = {**shard, "model": reference_model, "batch_size": 2}
    out = open_store(dst, access=access)
    size = feature_file_size(256)

    def stored() -> int:
        try:
            return sum(1 for rel, got in out.list() if rel.endswith(".npy") and got == size)
        except StoreError:
            return -1

    seen: list[int] = []

    def kill_when_started() -> None:
        # Waits for the shard to have stored features, however slow its start on a
        # loaded machine; the bound only keeps a broken shard from hanging the test.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and (count := stored()) < 6:
            time.sleep(0.05)
        seen.append(count)
        server.kill()

    monkeypatch.setenv(ENV_VAR, "slow=0.2")
    killer = threading.Thread(target=kill_when_started)
    killer.start()
    try:
        with pytest.raises(ShardFailed) as err:
            run_shard(spec, requested_device="cpu", probe=NO_GPU, access=access)
    finally:
        killer.join()
        server.start()
    assert seen and seen[0] >= 6, f"the shard stored {seen} features in 600 s before the server was killed"
    message = str(err.value)
    assert "S3" in message and bucket in message, message
    assert str(access.secret_access_key) not in message
    monkeypatch.delenv(ENV_VAR)
    before = {rel for rel, got in out.list() if rel.endswith(".npy")}
    assert 0 < len(before) < len(rels)
    for rel in before:  # every object that exists is a whole feature
        assert check_feature_bytes(out.read(rel), feature_dim=256)[1] is None, rel
    result = run_shard(spec, requested_device="cpu", probe=NO_GPU, access=access)
    assert result["skipped_existing"] == len(before)
    assert result["extracted"] == len(rels) - len(before)
    listed = [rel for rel, _ in out.list() if rel.endswith(".npy") and not rel.startswith("_")]
    assert sorted(listed) == sorted(rels)


def test_overlapping_s3_prefixes_are_refused(tmp_path: Path, s3_env: dict[str, Any]) -> None:
    """Features written under the input prefix are refused, as for folders; the input itself is reachable."""
    bucket, access = s3_env["bucket"], s3_env["access"]
    make_ravdess(tmp_path / "in", actors=1, emotions=1)
    upload(s3_env["server"], tmp_path / "in", S3Location(bucket, "corpus"))
    conf = {"datasets": {"ravdess": {"input": f"s3://{bucket}/corpus", "output": f"s3://{bucket}/corpus/features"}}}
    with pytest.raises(InvalidConf, match=r"datasets.ravdess: input s3://\S+/corpus and output s3://\S+/corpus/features overlap"):
        validate_conf(conf, load_settings(), access=access)


def test_claiming_an_s3_output_is_create_if_absent(s3_env: dict[str, Any]) -> None:
    """On S3 the output claim is a conditional PUT (If-None-Match): a second create of the key is refused, the first object stays."""
    store = open_store(S3Location(s3_env["bucket"], "claim"), access=s3_env["access"])
    assert store.create("_features.json", b"first") is True
    assert store.create("_features.json", b"second") is False
    assert store.read("_features.json") == b"first"


def test_lineage_on_s3_names_a_changed_feature_or_input_and_a_rerun_fixes_exactly_it(
    tmp_path: Path, s3_env: dict[str, Any], reference_model: dict[str, Any]
) -> None:
    """S3 in, S3 out: one whole lineage record per shard; a flipped feature byte and a rewritten input are each named
    by verification, and the re-run re-extracts exactly that file (S3 inputs are always hashed again)."""
    from cnn_features.errors import VerificationFailed
    from cnn_features.verify import verify_run

    rels = make_ravdess(tmp_path / "in", actors=2, emotions=4)
    server, bucket, access = s3_env["server"], s3_env["bucket"], s3_env["access"]
    src, dst = S3Location(bucket, "lineage-in"), S3Location(bucket, "lineage-out")
    upload(server, tmp_path / "in", src)
    shards = [{**s, "model": reference_model, "batch_size": 4} for s in plan_dataset(DatasetIO("ravdess", src, dst), shard_size=100, access=access)]
    (result,) = [run_shard(s, requested_device="cpu", probe=NO_GPU, access=access) for s in shards]
    assert result["extracted"] == len(rels)
    out, client = open_store(dst, access=access), server.client()
    assert [rel for rel, _ in out.list() if ".lineage" in rel] == [f"_shards/{shards[0]['shard_id']}.lineage.jsonl"]
    verify_run(shards, [result], max_bad_fraction=0.0, access=access)

    def flip(location: S3Location, rel: str) -> None:
        data = bytearray(client.get_object(Bucket=bucket, Key=location.key(rel))["Body"].read())
        data[-4] ^= 0x01
        client.put_object(Bucket=bucket, Key=location.key(rel), Body=bytes(data))

    for location, rel in ((dst, rels[1]), (src, rels[5])):
        flip(location, rel)
        with pytest.raises(VerificationFailed) as err:
            verify_run(shards, [result], max_bad_fraction=0.0, access=access)
        assert [r for r in rels if r in str(err.value)] == [rel]
        (again,) = [run_shard(s, requested_device="cpu", probe=NO_GPU, access=access) for s in shards]
        assert (again["extracted"], again["skipped_existing"]) == (1, len(rels) - 1)
        assert again["inputs_hashed_for_reuse"] == len(rels) - (1 if location == dst else 0)
        verify_run(shards, [again], max_bad_fraction=0.0, access=access)
