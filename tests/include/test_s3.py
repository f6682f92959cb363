"""S3 locations, allowed roots and credentials (decided before a request is sent), and what an S3 listing holds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cnn_features.config import load_settings
from cnn_features.errors import InvalidConf
from cnn_features.plan import allowed_roots, checked_location, uses_s3, validate_conf
from cnn_features.procs import child_env
from cnn_features.s3 import S3Access, S3Location, parse_s3_uri, resolve_access, unsafe_key_reason
from cnn_features.stores import LocalStore, open_store, parse_location


def test_s3_uri_parses_bucket_and_prefix() -> None:
    """A URI gives its bucket and prefix; one trailing slash is dropped."""
    assert parse_s3_uri("f", "s3://corpora/ravdess/v1/") == S3Location("corpora", "ravdess/v1")
    assert parse_s3_uri("f", "s3://corpora") == S3Location("corpora", "")
    assert str(S3Location("corpora", "a/b")) == "s3://corpora/a/b"
    assert S3Location("corpora", "a/b").key("Actor_01/x.npy") == "a/b/Actor_01/x.npy"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3://ok-bucket/a//b", "empty, '.' or '..'"),
        ("s3://ok-bucket/a/../b", "empty, '.' or '..'"),
        ("s3://ok-bucket/./b", "empty, '.' or '..'"),
        ("s3://ok-bucket/a\nb", "control characters"),
        ("s3://", "not a valid S3 bucket name"),
    ],
)
def test_bad_s3_uris_are_refused_naming_the_field(raw: str, words: str) -> None:
    """A malformed bucket, an escaping or empty key segment, or control characters are refused by field."""
    with pytest.raises(InvalidConf, match="datasets.ravdess.input") as err:
        parse_s3_uri("datasets.ravdess.input", raw)
    assert words in str(err.value)


def test_prefix_containment_is_by_segment() -> None:
    """``s3://b/data`` contains ``s3://b/data/x`` but not ``s3://b/database`` or another bucket."""
    root = S3Location("b", "data")
    assert root.contains(S3Location("b", "data/x"))
    assert root.contains(S3Location("b", "data"))
    assert not root.contains(S3Location("b", "database"))
    assert not root.contains(S3Location("c", "data/x"))
    assert S3Location("b", "").contains(S3Location("b", "anything"))


def test_allowed_roots_mix_folders_and_s3_prefixes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``CNN_FEATURES_ALLOWED_ROOTS`` splits on ':' without breaking an s3:// entry."""
    monkeypatch.setenv("CNN_FEATURES_ALLOWED_ROOTS", f"{tmp_path}:s3://corpora/speech:s3://features")
    roots = allowed_roots(load_settings())
    assert roots == (tmp_path.resolve(), S3Location("corpora", "speech"), S3Location("features", ""))
    assert checked_location("x", "s3://corpora/speech/ravdess", roots) == S3Location("corpora", "speech/ravdess")
    with pytest.raises(InvalidConf, match=r"x: 's3://corpora/other' is outside the allowed S3 prefixes"):
        checked_location("x", "s3://corpora/other", roots)
    with pytest.raises(InvalidConf, match="outside the allowed S3 prefixes"):
        checked_location("x", "s3://elsewhere/speech", roots)


def test_conf_naming_an_unlisted_bucket_is_refused_before_any_request(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A dataset on a bucket outside the allowed roots fails validation by field, with no S3 call made."""
    monkeypatch.setenv("CNN_FEATURES_ALLOWED_ROOTS", f"{tmp_path}:s3://allowed")
    # A dead endpoint: any request would fail differently (and slowly).
    access = S3Access("AKIAEXAMPLE", "not-a-secret", endpoint_url="http://127.0.0.1:9")
    conf = {"datasets": {"ravdess": {"input": "s3://other-bucket/ravdess", "output": str(tmp_path / "out")}}}
    with pytest.raises(InvalidConf, match=r"datasets.ravdess.input: 's3://other-bucket/ravdess' is outside"):
        validate_conf(conf, load_settings(), access=access)


def test_unsafe_keys_are_named() -> None:
    """A key below the prefix with an empty, '.' or '..' segment is refused; ordinary keys pass."""
    assert unsafe_key_reason("Actor_01/03-01-01-01-01-01-01.npy") is None
    for rel in ("../escape.npy", "a//b.npy", "./a.npy", "a/../../b.npy"):
        assert "would leave the prefix" in str(unsafe_key_reason(rel))


def test_uses_s3_only_when_a_location_is_s3() -> None:
    """Connections are looked up only for confs that name S3."""
    assert not uses_s3({"datasets": {"r": {"input": "/a", "output": "/b"}}})
    assert uses_s3({"datasets": {"r": {"input": "/a", "output": "s3://b/x"}}})
    assert uses_s3({"datasets": {"r": {"features": "s3://b/x", "manifest": "s3://b/x/manifest.json"}}})


def test_access_from_an_airflow_connection_reads_keys_and_endpoint() -> None:
    """Login/password are the keys, the extra holds endpoint_url and region_name, as the Amazon provider keeps them."""
    conn = SimpleNamespace(
        login="AKIDEXAMPLE",
        password="s3cr3t-value",
        host=None,
        extra_dejson={"endpoint_url": "http://127.0.0.1:8333", "region_name": "eu-west-1"},
    )
    access = S3Access.from_connection(conn)
    assert access == S3Access("AKIDEXAMPLE", "s3cr3t-value", None, "http://127.0.0.1:8333", "eu-west-1")
    assert "s3cr3t-value" not in repr(access)
    assert access.env() == {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:8333",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    assert S3Access.from_environ(access.env()) == access


def test_missing_connection_means_the_default_chain() -> None:
    """An undefined connection gives empty settings, so boto3 reads the environment or the instance profile."""

    class NotFound(Exception):
        pass

    def get(conn_id: str) -> object:
        raise NotFound(conn_id)

    access = resolve_access("aws_default", get, NotFound)
    assert access == S3Access()
    assert access.env() == {}


def test_children_get_s3_keys_through_their_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``child_env`` adds the access's variables; the parent's own environment is left unchanged."""
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    env = child_env("cpu", S3Access("AKID", "s3cr3t").env())
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and env["CUDA_VISIBLE_DEVICES"] == "-1"
    import os

    assert "AWS_SECRET_ACCESS_KEY" not in os.environ


def test_location_strings_pick_their_store(tmp_path: Path) -> None:
    """An s3:// string opens an S3 store, anything else a local folder: the one place the scheme is looked at."""
    assert parse_location("s3://b/p") == S3Location("b", "p")
    assert parse_location(str(tmp_path)) == tmp_path
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    store = open_store("s3://b/p", access=S3Access("AKID", "s3cr3t", endpoint_url="http://127.0.0.1:9"))
    assert store.uri == "s3://b/p" and store.name("x.npy") == "s3://b/p/x.npy"


def test_folder_markers_are_listing_noise_not_bad_inputs(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    """Zero-byte keys ending in '/' (the S3 console's "Create folder", sync tools) are left out of an S3 listing, so
    the plan refuses nothing; the spectrograms beside them are listed as usual."""
    from cnn_features.plan import DatasetIO, plan_dataset
    from tests.conftest import make_ravdess

    creds = s3_server.credentials
    access = S3Access(creds["access_key_id"], creds["secret_access_key"], endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    rels = make_ravdess(tmp_path / "in", actors=1, emotions=2)
    client, location = s3_server.client(), S3Location(s3_bucket, "corpus")
    for key in ("corpus/", "corpus/Actor_01/", "corpus/Actor_02/"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"")
    for rel in rels:
        client.put_object(Bucket=s3_bucket, Key=location.key(rel), Body=(tmp_path / "in" / rel).read_bytes())
    store = open_store(location, access=access)
    assert [rel for rel, _ in store.list()] == rels
    (shard,) = plan_dataset(DatasetIO("ravdess", location, tmp_path / "out"), shard_size=10, access=access)
    assert shard["files"] == rels and shard["rejected"] == {}


def test_a_key_ending_in_a_slash_that_holds_bytes_is_still_listed_and_refused() -> None:
    """Only empty keys ending in '/' are folder markers: one holding bytes is listed, and the plan's check refuses it."""
    from cnn_features.s3 import S3Store

    keys = {"corpus/Actor_01/": 0, "corpus/Actor_01/x.npy": 5, "corpus/Actor_02/": 7}

    class Paginator:
        def paginate(self, **kwargs: Any) -> list[dict[str, Any]]:
            return [{"Contents": [{"Key": key, "Size": size} for key, size in keys.items()]}]

    client = SimpleNamespace(get_paginator=lambda operation: Paginator())
    store = S3Store(S3Location("b", "corpus"), client=client, concurrency=1)
    assert store.list() == [("Actor_01/x.npy", 5), ("Actor_02/", 7)]
    assert "would leave the prefix; refused" in str(unsafe_key_reason("Actor_02/"))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_modified_lists_one_folders_files_with_their_write_times(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Both stores list the files directly in a folder with when each was written; deeper files and others are not listed."""
    import time

    if kind == "local":
        store: Any = LocalStore(tmp_path / "root")
    else:
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        creds = server.credentials
        access = S3Access(creds["access_key_id"], creds["secret_access_key"], endpoint_url=server.endpoint_url, region_name="us-east-1")
        store = open_store(S3Location(bucket, "root"), access=access)
    for rel in ("_plans/b.json", "_plans/a.json", "_plans/deeper/c.json", "_plansx/d.json", "e.json"):
        store.write(rel, b"{}")
    listed = store.modified("_plans")
    assert [rel for rel, _ in listed] == ["_plans/a.json", "_plans/b.json"]
    assert all(abs(mtime - time.time()) < 3600 for _, mtime in listed)
    assert store.modified("absent") == []
