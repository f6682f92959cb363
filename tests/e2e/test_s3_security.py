"""The local S3 server's internal ports (master, volume, filer): refused to a process without the generated certificate."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.s3_server import s3_local

pytestmark = pytest.mark.e2e

# Seconds a `weed shell` gets to answer. With the certificate it lists a bucket
# in about 0.5 s on a 2-core box; without it, it retries the master forever, so
# what it printed by then is all it will print.
SHELL_WAIT_S = 8.0
# Seconds the probing child gets for all its requests (each fails at once).
PROBE_TIMEOUT_S = 60.0
# What Go's HTTPS server answers a plain HTTP request that starts like GET or POST.
PLAIN_TO_TLS = "Client sent an HTTP request to an HTTPS server"
# What an HTTP/2 (gRPC) client sends first: the connection preface and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
# Seconds each raw connection waits for an answer.
SOCKET_TIMEOUT_S = 5.0
# A child process with no key material: it sends each (method, URL) it is given
# over plain HTTP and over HTTPS without a client certificate (and without
# checking the server's), and prints [status or null, body or error] for each.
PROBE = """
import json, ssl, sys, urllib.error, urllib.request
blind = ssl.create_default_context()
blind.check_hostname = False
blind.verify_mode = ssl.CERT_NONE
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=blind))
def ask(method, url):
    body = b"intruder" if method in ("POST", "PUT") else None
    try:
        with opener.open(urllib.request.Request(url, data=body, method=method), timeout=10) as response:
            return [response.status, response.read(300).decode("utf-8", "replace")]
    except urllib.error.HTTPError as exc:
        return [exc.code, exc.read(300).decode("utf-8", "replace")]
    except OSError as exc:
        return [None, repr(exc)]
print(json.dumps([ask(method, url) for method, url in json.load(sys.stdin)]))
"""


def clean_env(home: Path) -> dict[str, str]:
    """Return this environment without SeaweedFS or AWS settings, with HOME (and so ~/.seaweedfs/) in ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEED_", "AWS_"))}
    env["HOME"] = str(home)
    return env


def weed_shell(server: Any, commands: list[str], *, cwd: Path, env: dict[str, str]) -> str:
    """Run ``commands`` in `weed shell` against ``server``'s master from ``cwd``; return what it printed."""
    script = "\n".join([*commands, "exit", ""])
    master = f"{s3_local().HOST}:{server.ports['master.port']}.{server.ports['master.port.grpc']}"  # HTTP port.gRPC port
    cmd = [str(s3_local().weed_binary()), "shell", f"-master={master}"]
    try:
        done = subprocess.run(cmd, input=script.encode(), capture_output=True, cwd=cwd, env=env, timeout=SHELL_WAIT_S)
        out, err = done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        out, err = exc.stdout, exc.stderr
    return (out or b"").decode("utf-8", "replace") + (err or b"").decode("utf-8", "replace")


def h2_answer(address: str | tuple[str, int], *, tls: bool) -> str:
    """Send the HTTP/2 preface to ``address`` (a Unix socket path or a TCP address), over TLS without a certificate if asked.

    Returns what came back: ``frames: ...`` when the server answered HTTP/2,
    else how the attempt ended (closed, or the error).
    """
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    blind = ssl.create_default_context()
    blind.check_hostname = False
    blind.verify_mode = ssl.CERT_NONE
    blind.set_alpn_protocols(["h2"])
    try:
        with socket.socket(family, socket.SOCK_STREAM) as raw:
            raw.settimeout(SOCKET_TIMEOUT_S)
            raw.connect(address)
            conn = blind.wrap_socket(raw, server_hostname=s3_local().HOST) if tls else raw
            conn.sendall(H2_PREFACE)
            got = conn.recv(64)
    except OSError as exc:  # ssl.SSLError and timeouts included
        return f"refused: {exc!r}"
    return f"frames: {got!r}" if got else "closed"


def file_id(server: Any, bucket: str, key: str) -> str:
    """Return the volume file id of the first chunk of ``bucket/key``, asked as an administrator would (from the folder)."""
    printed = weed_shell(server, [f"fs.meta.cat /buckets/{bucket}/{key}"], cwd=server.folder, env=clean_env(server.folder))
    found = re.search(r'"fileId":\s*"([^"]+)"', printed)
    assert found, printed
    return found.group(1)


def test_weed_shell_elsewhere_lists_reads_and_deletes_nothing(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    """`weed shell` run outside the server's folder gets no listing, no content and no delete; run from the folder it lists the object."""
    body = f"the content of {s3_bucket}/kept".encode()
    s3_server.client().put_object(Bucket=s3_bucket, Key="kept", Body=body)
    path = f"/buckets/{s3_bucket}"
    printed = weed_shell(s3_server, [f"fs.ls -l {path}", f"fs.cat {path}/kept", f"fs.rm {path}/kept"],
                         cwd=tmp_path, env=clean_env(tmp_path))
    assert "kept" not in printed, printed
    assert s3_server.client().get_object(Bucket=s3_bucket, Key="kept")["Body"].read() == body
    admin = weed_shell(s3_server, [f"fs.ls -l {path}"], cwd=s3_server.folder, env=clean_env(tmp_path))
    assert f"{path}/kept" in admin, admin


def test_internal_http_ports_refuse_requests_without_the_certificate(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    """Listing, reading, writing and deleting on the master, volume and filer HTTP ports, knowing the object's file id, all fail."""
    body = os.urandom(3000)
    s3_server.client().put_object(Bucket=s3_bucket, Key="kept", Body=body)
    fid = file_id(s3_server, s3_bucket, "kept")
    master, volume, filer = (f"{s3_local().HOST}:{s3_server.ports[f'{name}.port']}" for name in ("master", "volume", "filer"))
    requests = [  # reads first, then writes, then deletes; the last one would drop the bucket's volumes
        ("GET", f"{master}/dir/status"), ("GET", f"{master}/dir/lookup?fileId={fid}&read=yes"), ("GET", f"{volume}/{fid}"),
        ("GET", f"{filer}/buckets/{s3_bucket}/"), ("GET", f"{filer}/buckets/{s3_bucket}/kept"),
        ("GET", f"{master}/dir/assign"), ("POST", f"{volume}/{fid}"),
        ("DELETE", f"{volume}/{fid}"), ("DELETE", f"{filer}/buckets/{s3_bucket}/kept"),
        ("GET", f"{master}/col/delete?collection={s3_bucket}"),
    ]
    targets = [(method, f"{scheme}://{address}") for scheme in ("http", "https") for method, address in requests]
    done = subprocess.run([sys.executable, "-c", PROBE], input=json.dumps(targets), capture_output=True, text=True,
                          cwd=tmp_path, env=clean_env(tmp_path), timeout=PROBE_TIMEOUT_S, check=True)
    answers = dict(zip((f"{method} {url}" for method, url in targets), json.loads(done.stdout), strict=True))
    # Plain HTTP: Go's 400 for a request line it recognises (GET, POST), else the connection closes unanswered.
    # HTTPS: the handshake fails for want of a client certificate, so there is no HTTP answer at all.
    served = [(request, status, text[:120]) for request, (status, text) in answers.items()
              if status is not None and not (request.split()[1].startswith("http://") and status == 400 and PLAIN_TO_TLS in text)]
    assert served == [], "\n".join(map(str, served))
    assert s3_server.client().get_object(Bucket=s3_bucket, Key="kept")["Body"].read() == body
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=s3_server.tls_context()))
    with opener.open(f"https://{master}/dir/status", timeout=10) as response:
        assert response.status == 200 and "Topology" in json.load(response)


def test_grpc_ports_and_sockets_refuse_clients_without_the_certificate(s3_server: Any) -> None:
    """Every gRPC port and its Unix socket in /tmp answers no HTTP/2 frame, neither in plain text nor over TLS without a client certificate."""
    kinds = ("master", "volume", "filer", "s3")
    addresses: list[str | tuple[str, int]] = [(s3_local().HOST, s3_server.ports[f"{kind}.port.grpc"]) for kind in kinds]
    sockets = [Path(f"/tmp/seaweedfs-{kind}-grpc-{s3_server.ports[f'{kind}.port.grpc']}.sock") for kind in kinds]
    addresses += [str(path) for path in sockets if path.exists()]
    answers = {f"{address} {'tls' if tls else 'plain'}": h2_answer(address, tls=tls) for address in addresses for tls in (False, True)}
    assert not [answer for answer in answers.values() if answer.startswith("frames")], answers


def test_generated_keys_are_private_and_never_logged(s3_server: Any) -> None:
    """security.toml and the TLS files are mode 0600, the CA's key is written nowhere, and no key appears in weed.log."""
    folder = s3_server.folder
    files = [folder / name for name in (s3_local().SECURITY_FILE, s3_local().TLS_CA_FILE,
                                        s3_local().TLS_CERT_FILE, s3_local().TLS_KEY_FILE)]
    assert [oct(path.stat().st_mode & 0o777) for path in files] == [oct(0o600)] * len(files)
    config = tomllib.loads(s3_server.security_path.read_text())
    jwt_keys = [config["jwt"]["signing"]["key"], config["jwt"]["signing"]["read"]["key"],
                config["jwt"]["filer_signing"]["key"], config["jwt"]["filer_signing"]["read"]["key"]]
    assert len(set(jwt_keys)) == 4 and all(re.fullmatch(r"[0-9a-f]{64}", key) for key in jwt_keys), jwt_keys
    holding_a_key = [path.name for path in folder.iterdir() if path.is_file() and "PRIVATE KEY" in path.read_text(errors="replace")]
    assert holding_a_key == [s3_local().TLS_KEY_FILE]
    logged = s3_server.log_path.read_text(errors="replace")
    assert "PRIVATE KEY" not in logged and not any(key in logged for key in jwt_keys)
