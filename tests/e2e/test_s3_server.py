"""The local S3 server (scripts/s3_local.py, SeaweedFS) against itself: loopback only, keys enforced, clean stops and crashes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.s3_server import s3_local

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# What S3 answers a request signed with a wrong secret or an unknown key.
REFUSED = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"}
# Seconds the CLI may take to print that it is up: a start, with room for a busy 2-core box.
CLI_READY_S = 120.0
# Seconds kill() and stop() may take: SIGKILL and reaping (stop() also fsyncs a few files), nothing to wait for.
KILL_LIMIT_S = 5.0


def group_pids(pgid: int) -> set[int]:
    """Return the live processes of process group ``pgid``, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.add(int(entry))
    return found


def decode_address(hex_address: str) -> tuple[str, int]:
    """Turn /proc/net/{tcp,udp}[6]'s ``0100007F:1F90`` into ``("127.0.0.1", 8080)``."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # The kernel prints each 32-bit word in host (little-endian) order.
    swapped = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, swapped), int(port, 16)


def bound_sockets(pids: set[int]) -> list[tuple[str, str, int]]:
    """Return (protocol, address, port) of every listening TCP and every UDP socket the processes hold."""
    inodes: set[str] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = []
    pid = next(iter(pids))
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode in inodes and (proto.startswith("udp") or state == "0A"):  # 0A: LISTEN
                found.append((proto, *decode_address(local)))
    return found


def keyed_client(endpoint_url: str, access_key_id: str, secret: str) -> Any:
    """Return an S3 client for ``endpoint_url`` signing with the given keys, no retries."""
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key_id, aws_secret_access_key=secret,
        region_name="us-east-1", config=Config(retries={"mode": "standard", "max_attempts": 1}, proxies={}),
    )


def assert_refused(client: Any, bucket: str) -> None:
    """Listing buckets, reading and writing an object all fail with an authentication error."""
    calls = {
        "ListBuckets": lambda: client.list_buckets(),
        "GetObject": lambda: client.get_object(Bucket=bucket, Key="kept"),
        "PutObject": lambda: client.put_object(Bucket=bucket, Key="intruder", Body=b"x"),
    }
    for name, call in calls.items():
        with pytest.raises(ClientError) as err:
            call()
        code = err.value.response["Error"]["Code"]
        assert code in REFUSED, f"{name}: {code}"


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Any]:
    """A server of this test alone (its stop and crash must not touch the session's), killed afterwards."""
    server = s3_local().S3Server(tmp_path / "s3")
    try:
        server.start()
        yield server
    finally:
        server.kill()


def test_listens_on_loopback_only(s3_server: Any) -> None:
    """Every socket the server's processes listen on is on 127.0.0.1, on one of the ports it was given."""
    pids = group_pids(s3_server.pid)
    sockets = bound_sockets(pids)
    assert ("tcp", "127.0.0.1", s3_server.ports["s3.port"]) in sockets, sockets
    assert all(address == "127.0.0.1" for _, address, _ in sockets), sockets
    assert {port for _, _, port in sockets} <= set(s3_server.ports.values()), (sockets, s3_server.ports)


def test_right_keys_put_get_list(s3_server: Any, s3_bucket: str) -> None:
    """With the server's keys, objects are written, read back byte for byte and listed."""
    client = s3_server.client()
    body = os.urandom(3000)
    client.put_object(Bucket=s3_bucket, Key="a/one.bin", Body=body)
    client.put_object(Bucket=s3_bucket, Key="a/two.bin", Body=b"2")
    assert client.get_object(Bucket=s3_bucket, Key="a/one.bin")["Body"].read() == body
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="a/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [("a/one.bin", 3000), ("a/two.bin", 1)]
    assert s3_bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_wrong_secret_is_refused(s3_server: Any, s3_bucket: str) -> None:
    """The right key id with a wrong secret can neither list, read nor write, and writes nothing."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="kept", Body=b"k")
    creds = s3_server.credentials
    assert_refused(keyed_client(s3_server.endpoint_url, creds["access_key_id"], "0" * 40), s3_bucket)
    with pytest.raises(ClientError):
        s3_server.client().head_object(Bucket=s3_bucket, Key="intruder")


def test_unknown_key_is_refused(s3_server: Any, s3_bucket: str) -> None:
    """A key id the server does not know, even with the right secret, can neither list, read nor write."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="kept", Body=b"k")
    unknown = keyed_client(s3_server.endpoint_url, "AKIDUNKNOWN000000000", s3_server.credentials["secret_access_key"])
    assert_refused(unknown, s3_bucket)


def test_unsigned_request_is_refused(s3_server: Any, s3_bucket: str) -> None:
    """An anonymous (unsigned) request cannot list or read a bucket."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="kept", Body=b"k")
    anonymous = boto3.session.Session().client(
        "s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
        config=Config(signature_version=UNSIGNED, retries={"mode": "standard", "max_attempts": 1}, proxies={}),
    )
    for call in (lambda: anonymous.list_objects_v2(Bucket=s3_bucket), lambda: anonymous.get_object(Bucket=s3_bucket, Key="kept")):
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.response["Error"]["Code"] == "AccessDenied"


def test_credentials_file_is_private_and_printed_as_a_connection(s3_server: Any) -> None:
    """credentials.json is mode 0600 and --print-connection prints the Airflow connection JSON of the running server."""
    assert s3_server.credentials_path.stat().st_mode & 0o777 == 0o600
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "s3_local.py"), "--print-connection", "--dir", str(s3_server.folder)],
        capture_output=True, text=True, check=True, timeout=60,
    )
    printed = json.loads(done.stdout)
    assert printed == json.loads(s3_server.airflow_connection_json())
    assert printed["conn_type"] == "aws" and printed["login"] == s3_server.credentials["access_key_id"]
    assert printed["extra"] == {"endpoint_url": s3_server.endpoint_url, "region_name": "us-east-1"}


def test_stop_leaves_no_process_and_a_new_server_reuses_keys_and_data(own_server: Any) -> None:
    """stop() right after writes leaves no process of the group; a new server on the folder has the same keys and every acknowledged write and delete."""
    client = own_server.client()
    client.create_bucket(Bucket="kept")
    big = os.urandom(9 << 20)  # three 4 MB chunks
    client.put_object(Bucket="kept", Key="k", Body=b"before stop")
    client.put_object(Bucket="kept", Key="big", Body=big)
    client.put_object(Bucket="kept", Key="twice", Body=b"first")
    client.put_object(Bucket="kept", Key="twice", Body=b"second")
    client.put_object(Bucket="kept", Key="gone", Body=b"deleted before stop")
    client.delete_object(Bucket="kept", Key="gone")
    pgid, creds = own_server.pid, own_server.credentials
    started = time.monotonic()
    own_server.stop()
    assert time.monotonic() - started < KILL_LIMIT_S + s3_local().KILL_WAIT_S
    assert group_pids(pgid) == set()
    assert not any(s3_local().port_in_use(port) for port in own_server.ports.values())
    again = s3_local().S3Server(own_server.folder)
    try:
        again.start()
        assert again.credentials["access_key_id"] == creds["access_key_id"]
        assert again.credentials["secret_access_key"] == creds["secret_access_key"]
        read = again.client()
        assert read.get_object(Bucket="kept", Key="k")["Body"].read() == b"before stop"
        assert read.get_object(Bucket="kept", Key="big")["Body"].read() == big
        assert read.get_object(Bucket="kept", Key="twice")["Body"].read() == b"second"
        assert [o["Key"] for o in read.list_objects_v2(Bucket="kept")["Contents"]] == ["big", "k", "twice"]
    finally:
        again.kill()


def test_kill_then_start_keeps_objects_and_keys(own_server: Any) -> None:
    """After kill() (SIGKILL, a crash) start() comes back on the same endpoint; clients made before read the old objects."""
    client = own_server.client()
    client.create_bucket(Bucket="kept")
    client.put_object(Bucket="kept", Key="k", Body=b"before the crash")
    pgid, endpoint, creds = own_server.pid, own_server.endpoint_url, own_server.credentials
    started = time.monotonic()
    own_server.kill()
    assert time.monotonic() - started < KILL_LIMIT_S
    assert group_pids(pgid) == set()
    own_server.start()
    assert own_server.pid != pgid and own_server.endpoint_url == endpoint and own_server.credentials == creds
    assert client.get_object(Bucket="kept", Key="k")["Body"].read() == b"before the crash"
    client.put_object(Bucket="kept", Key="k2", Body=b"after")
    assert [o["Key"] for o in client.list_objects_v2(Bucket="kept")["Contents"]] == ["k", "k2"]


def test_cli_runs_until_sigterm_and_never_prints_the_secret(tmp_path: Path) -> None:
    """The CLI serves with the bucket asked for, prints where the keys are and the admin shell but not the secret, and stops on SIGTERM."""
    folder = tmp_path / "cli"
    port = s3_local().free_ports(1)[0]
    cmd = [sys.executable, str(REPO / "scripts" / "s3_local.py"), "--dir", str(folder), "--port", str(port), "--bucket", "made-by-cli"]
    out_path = tmp_path / "cli.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + CLI_READY_S
        while "Press Ctrl-C" not in out_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "Press Ctrl-C" in out_path.read_text(), out_path.read_text()
        creds = json.loads((folder / "credentials.json").read_text())
        client = keyed_client(creds["endpoint_url"], creds["access_key_id"], creds["secret_access_key"])
        assert "made-by-cli" in [b["Name"] for b in client.list_buckets()["Buckets"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=KILL_LIMIT_S + s3_local().KILL_WAIT_S + 10) == 0
        output = out_path.read_text()
        assert creds["secret_access_key"] not in output
        assert creds["endpoint_url"] == f"http://127.0.0.1:{port}" and creds["endpoint_url"] in output
        assert str(folder / "credentials.json") in output
        assert f"cd {folder} && " in output and " shell -master=127.0.0.1:" in output
        assert not s3_local().port_in_use(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
