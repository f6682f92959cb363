"""Shard leases on S3 outputs, against a real S3 server (SeaweedFS on loopback): one holder per shard across clients."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cnn_features.errors import ShardFailed
from cnn_features.lease import ShardLease, acquire, lease_rel, shard_lease
from cnn_features.names import LEASES_DIR, is_own
from cnn_features.plan import DatasetIO, plan_dataset
from cnn_features.runner import run_shard
from cnn_features.s3 import ConditionFailed, S3Access, S3Location, S3Store
from cnn_features.stores import open_store
from tests.conftest import make_ravdess

NO_GPU = {"usable": False, "error": "no GPU in tests"}
FILES = [f"Actor_01/{i:02d}.npy" for i in range(10)]
SHARD = "ravdess-0001"
# Seconds any wait in these tests may last before it counts as a failure: far
# above what each needs (a TTL of 1.5 s, one worker start), so only a hang trips it.
DEADLINE_S = 60.0
# A TTL short enough for a test to outlive several renewals quickly.
TINY_TTL_S = 1.5
ME = f"pid {os.getpid()} on {socket.gethostname()}"


def access_of(server: Any) -> S3Access:
    creds = server.credentials
    return S3Access(creds["access_key_id"], creds["secret_access_key"], endpoint_url=server.endpoint_url, region_name="us-east-1")


def host(server: Any, bucket: str) -> S3Store:
    """Return a store on the output with its own boto3 client, as another host would have."""
    store = open_store(S3Location(bucket, "out"), access=access_of(server))
    assert isinstance(store, S3Store)
    return store


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def race(stores: list[S3Store], files: list[str], *, ttl_s: float = 30.0) -> tuple[list[ShardLease], list[str]]:
    """Start ``acquire`` on every store at once; return the leases won and the refusals' messages."""
    start = threading.Barrier(len(stores))
    won: list[ShardLease] = []
    refused: list[str] = []

    def take(store: S3Store) -> None:
        start.wait()
        try:
            won.append(acquire(store, SHARD, files, ttl_s=ttl_s, skew_s=0.0))
        except ShardFailed as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    return won, refused


def test_two_hosts_taking_one_shard_at_once_get_one_lease(s3_server: Any, s3_bucket: str) -> None:
    """Of two clients acquiring one shard's lease at once, one wins; the other is refused naming the holder and the expiry."""
    won, refused = race([host(s3_server, s3_bucket), host(s3_server, s3_bucket)], FILES)
    try:
        assert len(won) == 1 and len(refused) == 1, refused
        assert f"is being extracted by {ME} (shard {SHARD})" in refused[0]
        assert "expires in" in refused[0] and "not running it twice at once" in refused[0]
    finally:
        for lease in won:
            lease.release()


def test_sixteen_concurrent_acquirers_get_exactly_one_lease(s3_server: Any, s3_bucket: str) -> None:
    """Sixteen clients racing for one lease: exactly one holds it, fifteen are refused."""
    won, refused = race([host(s3_server, s3_bucket) for _ in range(16)], FILES)
    try:
        assert len(won) == 1 and len(refused) == 15, refused
        assert all("not running it twice at once" in msg for msg in refused), refused
    finally:
        for lease in won:
            lease.release()


def test_a_shard_overlapping_a_live_lease_is_refused_and_the_same_id_over_other_files_is_not(
    s3_server: Any, s3_bucket: str
) -> None:
    """As for local claims, leases are keyed to files: 5 shared files refuse another shard id; the same id over other files runs."""
    a, b = host(s3_server, s3_bucket), host(s3_server, s3_bucket)
    files = [f"Actor_01/{i:02d}.npy" for i in range(20)]
    with shard_lease(a, SHARD, files[:10], ttl_s=30.0, skew_s=0.0):
        with pytest.raises(ShardFailed, match=rf"5 of its files in {b.uri} are being extracted by {ME} \(shard {SHARD}\)"):
            acquire(b, "ravdess-0002", files[5:15], ttl_s=30.0, skew_s=0.0)
        with shard_lease(b, SHARD, files[10:], ttl_s=30.0, skew_s=0.0):
            pass
    assert b.modified(LEASES_DIR) == []  # the refused shard left no lease behind


def test_a_dead_holders_expired_lease_is_taken_over(s3_server: Any, s3_bucket: str) -> None:
    """A lease whose holder stopped renewing is taken over once its TTL has passed by the server's clock."""
    store = host(s3_server, s3_bucket)
    dead = {"host": "gone-host", "pid": 999_999, "token": "dead", "shard_id": SHARD, "files": FILES, "ttl_s": 0.0,
            "expires_at": "2000-01-01T00:00:00+00:00", "renewals": 3}
    store.write(lease_rel(SHARD, FILES), json.dumps(dead).encode())
    taken: list[ShardLease] = []
    refusals: list[str] = []

    def try_take() -> bool:
        try:
            taken.append(acquire(store, SHARD, FILES, ttl_s=30.0, skew_s=0.0))
        except ShardFailed as exc:
            refusals.append(str(exc))
        return bool(taken)

    wait_for("the expired lease to be taken over", try_take)
    assert all("pid 999999 on gone-host" in msg for msg in refusals), refusals
    record = json.loads(store.read(lease_rel(SHARD, FILES)))
    assert record["token"] == taken[0].record["token"] != "dead" and record["pid"] == os.getpid()
    taken[0].release()


def test_a_holder_whose_lease_was_taken_over_fails_its_shard_naming_why(s3_server: Any, s3_bucket: str) -> None:
    """When another process replaces the lease, the holder's next renewal is refused and the block ends in ShardFailed naming the new holder."""
    store, other = host(s3_server, s3_bucket), host(s3_server, s3_bucket)
    rel = lease_rel(SHARD, FILES)
    thief = {"host": "other-host", "pid": 4242, "token": "theirs", "shard_id": SHARD, "files": FILES, "ttl_s": 30.0,
             "expires_at": "2999-01-01T00:00:00+00:00", "renewals": 0}
    taken_over = pytest.raises(ShardFailed, match=r"lease s3://\S+ was taken over by pid 4242 on other-host")
    with taken_over as err, shard_lease(store, SHARD, FILES, ttl_s=TINY_TTL_S, skew_s=0.0) as lease:
        other.write(rel, json.dumps(thief).encode())  # as a taker of an expired lease would
        wait_for("the holder to notice", lambda: lease.lost is not None)
    assert "this run's result does not count" in str(err.value)
    assert json.loads(store.read(rel))["token"] == "theirs"  # the loser did not delete the new holder's lease


def test_renewals_keep_a_live_holder_past_its_ttl(s3_server: Any, s3_bucket: str) -> None:
    """A holder renewing its 1.5 s lease still holds it after several renewals: another client is refused."""
    store, other = host(s3_server, s3_bucket), host(s3_server, s3_bucket)
    with shard_lease(store, SHARD, FILES, ttl_s=TINY_TTL_S, skew_s=0.0) as lease:
        wait_for("six renewals", lambda: lease.record["renewals"] >= 6)
        with pytest.raises(ShardFailed, match=f"is being extracted by {ME}"):
            acquire(other, SHARD, FILES, ttl_s=TINY_TTL_S, skew_s=0.0)
        assert lease.lost is None


def test_release_removes_the_lease_and_a_rerun_takes_it_at_once(s3_server: Any, s3_bucket: str) -> None:
    """After the block the lease object is gone, and the next acquirer gets the shard without waiting for a TTL."""
    store = host(s3_server, s3_bucket)
    with shard_lease(store, SHARD, FILES, ttl_s=30.0, skew_s=10.0):
        assert [rel for rel, _ in store.modified(LEASES_DIR)] == [lease_rel(SHARD, FILES)]
    assert store.modified(LEASES_DIR) == []
    with shard_lease(host(s3_server, s3_bucket), SHARD, FILES, ttl_s=30.0, skew_s=10.0):
        pass
    assert is_own(lease_rel(SHARD, FILES))  # verification never takes a lease for a feature


def test_two_run_shards_of_one_s3_shard_racing_extract_it_once(
    tmp_path: Path, s3_server: Any, s3_bucket: str, home: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard whose lease another client holds is refused naming it; two run_shard calls racing: one extracts, one fails naming it."""
    monkeypatch.setenv("CNN_FEATURES_ALLOWED_ROOTS", f"{home}:{tmp_path}:s3://{s3_bucket}")
    access = access_of(s3_server)
    rels = make_ravdess(tmp_path / "in", actors=1, emotions=3)
    (shard,) = plan_dataset(DatasetIO("ravdess", tmp_path / "in", S3Location(s3_bucket, "out")), shard_size=100, access=access)
    spec = {**shard, "model": reference_model, "batch_size": 4}
    elsewhere = shard_lease(host(s3_server, s3_bucket), shard["shard_id"], shard["files"], ttl_s=30.0, skew_s=0.0)
    with elsewhere, pytest.raises(ShardFailed, match=f"is being extracted by {ME}"):  # held by another host's client
        run_shard(spec, requested_device="cpu", probe=NO_GPU, access=access)
    start = threading.Barrier(2)
    results: list[dict[str, Any]] = []
    refused: list[str] = []

    def run() -> None:
        start.wait()
        try:
            results.append(run_shard(spec, requested_device="cpu", probe=NO_GPU, access=access))
        except ShardFailed as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S * 5)
    assert len(results) == 1 and len(refused) == 1, refused
    assert results[0]["extracted"] == len(rels)
    assert f"is being extracted by {ME} (shard {shard['shard_id']})" in refused[0]
    out = host(s3_server, s3_bucket)
    assert out.modified(LEASES_DIR) == []
    again = run_shard(spec, requested_device="cpu", probe=NO_GPU, access=access)
    assert again["skipped_existing"] == len(rels)


def lose_first_reply(store: S3Store, method: str) -> None:
    """Make the store's first ``method`` call write, then report 412, as a retry after a lost reply does."""
    real = getattr(store, method)
    calls: list[int] = []

    def lossy(*args: Any) -> str:
        etag = real(*args)
        if not calls:
            calls.append(1)
            raise ConditionFailed(f"412 for a write that was stored ({etag})")
        return etag

    setattr(store, method, lossy)


def test_a_lost_reply_to_our_own_write_is_not_taken_for_another_holder(s3_server: Any, s3_bucket: str) -> None:
    """A create and a renewal that were stored but answered 412 (their reply lost, the retry refused) keep the lease ours."""
    store = host(s3_server, s3_bucket)
    lose_first_reply(store, "create_tagged")
    lose_first_reply(store, "replace_if_match")
    with shard_lease(store, SHARD, FILES, ttl_s=TINY_TTL_S, skew_s=0.0) as lease:
        wait_for("two renewals", lambda: lease.record["renewals"] >= 2)
        assert lease.lost is None
    assert not [rel for rel, _ in store.modified(LEASES_DIR)], "the lease is released, not left blocking the shard"


def test_a_holder_that_lost_its_lease_writes_no_result(
    s3_server: Any, s3_bucket: str, tmp_path: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard whose lease went unrenewed past its TTL fails before writing its result: the new holder's record stands."""
    import cnn_features.lease as lease_module

    make_ravdess(tmp_path / "in", actors=1, emotions=2)
    store = host(s3_server, s3_bucket)
    (shard,) = plan_dataset(DatasetIO("ravdess", tmp_path / "in", store.location), shard_size=100)
    monkeypatch.setenv("CNN_FEATURES_S3_LEASE_TTL_S", "1")
    monkeypatch.setattr(lease_module.ShardLease, "start", lambda self: None)  # no renewals: the lease lapses mid-shard
    with pytest.raises(ShardFailed, match="went unrenewed"):
        run_shard({**shard, "model": reference_model, "batch_size": 4}, requested_device="cpu", probe=NO_GPU,
                  access=access_of(s3_server))
    assert not [rel for rel, _ in store.modified("_shards") if rel.endswith(f"{shard['shard_id']}.json")]


def test_an_expired_lease_of_another_shard_is_removed_when_seen(s3_server: Any, s3_bucket: str) -> None:
    """A dead holder's lease under another shard id (another shard size) is deleted by the next acquirer that reads it."""
    store = host(s3_server, s3_bucket)
    other = f"{LEASES_DIR}/ravdess-0099-0123456789abcdef.json"
    store.write(other, json.dumps({"token": "dead", "pid": 1, "host": "gone", "shard_id": "ravdess-0099",
                                   "files": FILES, "ttl_s": -60.0, "expires_at": "2000-01-01T00:00:00+00:00"}).encode())
    with shard_lease(store, SHARD, FILES, ttl_s=30.0, skew_s=0.0):
        assert other not in {rel for rel, _ in store.modified(LEASES_DIR)}
