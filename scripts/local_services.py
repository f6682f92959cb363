"""Local services on loopback for the Airflow stacks: processes, PostgreSQL, Redis.

``ManagedProcess`` runs one long-lived child in its own process group, told
to die with the process that started it (PR_SET_PDEATHSIG), so nothing
outlives its owner. ``LocalPostgres`` and ``LocalRedis`` are throwaway
servers bound to 127.0.0.1 with a generated password kept in a 0600 file and
never logged. ``wait_for`` is the readiness loop every service uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("airflow_local")

# Seconds a component gets to stop on SIGTERM before its process group is killed:
# a scheduler waits for its running tasks, and a shard can take a while.
STOP_GRACE_S = 120.0
# Linux prctl option that sends a signal to a child when its parent dies.
_PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class ServiceError(RuntimeError):
    """A service could not be started, or stopped being healthy."""


class PostgresUnavailable(ServiceError):
    """PostgreSQL's server binaries are not installed here."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], T | None], *, timeout_s: float, what: str, interval_s: float = 1.0) -> T:
    """Call ``check`` until it returns something other than None or False; return that.

    Raises:
        ServiceError: ``timeout_s`` passed first; the message says what was awaited.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout_s:.0f} s waiting for {what}"
            raise ServiceError(msg)
        time.sleep(interval_s)


def _die_with_parent() -> None:
    """In a child before exec: ask the kernel for SIGKILL when the parent thread ends."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def descendants(pid: int) -> set[int]:
    """Return the ids of every process below ``pid`` (children, theirs, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@dataclass
class ManagedProcess:
    """A long-running child in its own process group, its output appended to a log file."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        """Start the process (a no-op while it runs)."""
        if self.alive:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} starting {self.name}: {' '.join(self.cmd)}\n".encode())
            out.flush()
            extra: dict[str, Any] = {}
            if self.user is not None:
                entry = pwd.getpwnam(self.user)
                extra = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self.cmd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl
                **extra,
            )
        log.info("%s started (pid %d), log %s", self.name, self.proc.pid, self.log_path)

    @property
    def alive(self) -> bool:
        """Return whether the process is running."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Return the process id (also its process group id), or None before start."""
        return self.proc.pid if self.proc is not None else None

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the process and everything in its group."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signum)

    def stop(self, *, grace_s: float = STOP_GRACE_S) -> None:
        """Ask the process to stop, wait ``grace_s``, then kill its whole group.

        The stop signal goes to the leader only, as a service manager's stop
        would (an Airflow scheduler then waits for its running tasks); whatever
        is left in the group afterwards is killed.
        """
        if self.proc is None:
            return
        tree: set[int] = set()
        if self.proc.poll() is None:
            tree = descendants(self.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing its process group", self.name, grace_s)
                tree |= descendants(self.proc.pid)
        self.signal_group(signal.SIGKILL)
        # Airflow's task processes start sessions of their own, out of the
        # group's reach: a killed scheduler would leave them (and a training
        # run under them) going. Kill what was under it, wherever it went.
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        log.info("%s stopped (exit %s)", self.name, self.proc.returncode)

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the process's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def postgres_bindir() -> Path:
    """Return the newest installed PostgreSQL server's bin folder (Debian layout, or PATH).

    Raises:
        PostgresUnavailable: no ``initdb`` and ``postgres`` binaries are installed.
    """
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1].parent
    found = shutil.which("postgres")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    msg = "PostgreSQL server binaries not found (install Debian's 'postgresql': bash scripts/system-deps.sh postgresql)"
    raise PostgresUnavailable(msg)


def _reachable_by(path: Path, uid: int) -> bool:
    """Return whether user ``uid`` can traverse every existing folder above ``path``."""
    for parent in path.parents:
        if not parent.exists():
            continue
        st = parent.stat()
        if not (st.st_uid == uid or st.st_mode & 0o001):
            return False
    return True


class LocalPostgres:
    """A throwaway PostgreSQL cluster under ``root``, listening on 127.0.0.1 only.

    ``root/data`` is the cluster (owned by the ``postgres`` user when run as
    root, since PostgreSQL refuses to run as root), ``root/password`` the
    generated password of the ``airflow`` role (mode 0600, never logged).
    Authentication is scram-sha-256 on TCP and on the socket in the data folder.
    """

    DB = "airflow"
    ROLE = "airflow"

    def __init__(self, root: Path, *, port: int | None = None, durable: bool = True) -> None:
        self.root = root
        self.port = port or free_port()
        self.durable = durable
        self.data = root / "data"
        self.password_file = root / "password"
        self.user = "postgres" if os.geteuid() == 0 else None
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """Return the SQLAlchemy URL of the Airflow database (holds the password: never log it)."""
        password = self.password_file.read_text(encoding="utf-8").strip()
        return f"postgresql+psycopg2://{self.ROLE}:{password}@127.0.0.1:{self.port}/{self.DB}"

    def _run_as_owner(self, cmd: list[str]) -> None:
        extra: dict[str, Any] = {}
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            extra = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300, **extra)  # noqa: S603
        if done.returncode != 0:
            msg = f"{Path(cmd[0]).name} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
            raise ServiceError(msg)

    def _init_cluster(self, bindir: Path) -> None:
        owner_uid = pwd.getpwnam(self.user).pw_uid if self.user else os.getuid()
        owner_gid = pwd.getpwnam(self.user).pw_gid if self.user else os.getgid()
        if not _reachable_by(self.root, owner_uid):
            msg = (
                f"PostgreSQL runs as user {self.user!r}, which cannot reach {self.root} "
                "(a folder above it is private); use --pg-root with a folder it can reach, e.g. under /var/tmp"
            )
            raise ServiceError(msg)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)
        password = secrets.token_urlsafe(24)
        write_secret(self.password_file, password)
        self.data.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.data, owner_uid, owner_gid)
        pwfile = self.root / ".initdb-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(password + "\n")
        os.chown(pwfile, owner_uid, owner_gid)
        try:
            self._run_as_owner([
                str(bindir / "initdb"), "-D", str(self.data), "-U", self.ROLE, f"--pwfile={pwfile}",
                "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C",
            ])
        finally:
            pwfile.unlink(missing_ok=True)
        log.info("PostgreSQL cluster created in %s", self.data)

    def start(self, *, timeout_s: float = 120.0) -> str:
        """Create the cluster on first use, start it, create the database; return its URL.

        Raises:
            PostgresUnavailable: PostgreSQL is not installed.
            ServiceError: it did not start or accept connections in time.
        """
        bindir = postgres_bindir()
        if not (self.data / "PG_VERSION").is_file():
            self._init_cluster(bindir)
        cmd = [
            str(bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.data}",
        ]
        if not self.durable:
            # A test database is thrown away: skip the disk flushes that make commits slow.
            cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        self.process = ManagedProcess(
            "postgres", cmd, env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
            log_path=self.root / "postgres.log", user=self.user, stop_signal=signal.SIGINT,  # SIGINT: fast shutdown
        )
        self.process.start()
        wait_for(self._ready, timeout_s=timeout_s, what=f"PostgreSQL on 127.0.0.1:{self.port}")
        self._create_database()
        log.info("PostgreSQL ready on 127.0.0.1:%d, database %r", self.port, self.DB)
        return self.url

    def _connect(self, dbname: str) -> Any:
        import psycopg2

        password = self.password_file.read_text(encoding="utf-8").strip()
        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.ROLE, password=password,
                                dbname=dbname, connect_timeout=5)

    def _ready(self) -> bool:
        import psycopg2

        if self.process is not None and not self.process.alive:
            msg = f"PostgreSQL exited at start; last log lines:\n{self.process.log_tail()}"
            raise ServiceError(msg)
        try:
            self._connect("postgres").close()
        except psycopg2.OperationalError:
            return False
        return True

    def _create_database(self) -> None:
        conn = self._connect("postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.DB,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{self.DB}"')
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop the server (fast shutdown), killing it if it does not stop."""
        if self.process is not None:
            self.process.stop(grace_s=30.0)


class RedisUnavailable(ServiceError):
    """Redis's server binary is not installed here."""


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path``, readable by its owner only (mode 0600 from the start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(value + "\n")


def read_or_create_secret(path: Path, *, nbytes: int = 24) -> str:
    """Return the secret in ``path``, generating it (mode 0600) on first use."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        value = ""
    if not value:
        value = secrets.token_urlsafe(nbytes)
        write_secret(path, value)
    return value


def redis_server_binary() -> Path:
    """Return the ``redis-server`` binary.

    Raises:
        RedisUnavailable: it is not installed.
    """
    found = shutil.which("redis-server")
    if found is None:
        msg = "redis-server not found (install Debian's 'redis-server': bash scripts/system-deps.sh redis-server)"
        raise RedisUnavailable(msg)
    return Path(found)


class LocalRedis:
    """A Redis under ``root`` listening on 127.0.0.1 only, with a generated password: the Celery broker.

    ``root/password`` holds the password (mode 0600, never logged), and
    ``root/redis.conf`` the configuration (mode 0600: it holds the password,
    which so never appears on a command line). The append-only file keeps
    queued Celery messages across a restart of the server.
    """

    def __init__(self, root: Path, *, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.password_file = root / "password"
        self.config_file = root / "redis.conf"
        self.process: ManagedProcess | None = None

    @property
    def password(self) -> str:
        """Return the password (never log it)."""
        return self.password_file.read_text(encoding="utf-8").strip()

    @property
    def url(self) -> str:
        """Return the broker URL, database 0 (holds the password: never log it)."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        password = read_or_create_secret(self.password_file)
        lines = [
            "bind 127.0.0.1",
            "protected-mode yes",
            f"port {self.port}",
            f"requirepass {password}",
            f"dir {self.root}",
            # Queued messages survive a restart: an append-only file, flushed each second.
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "daemonize no",
        ]
        write_secret(self.config_file, "\n".join(lines))

    def start(self, *, timeout_s: float = 60.0) -> str:
        """Write the configuration, start the server and wait for it; return its URL.

        Raises:
            RedisUnavailable: Redis is not installed.
            ServiceError: it did not start or answer in time.
        """
        binary = redis_server_binary()
        self._write_config()
        self.process = ManagedProcess(
            "redis", [str(binary), str(self.config_file)], env={"PATH": os.environ.get("PATH", "")},
            log_path=self.root / "redis.log",
        )
        self.process.start()
        wait_for(self._ready, timeout_s=timeout_s, what=f"Redis on 127.0.0.1:{self.port}", interval_s=0.2)
        log.info("Redis ready on 127.0.0.1:%d", self.port)
        return self.url

    def _ready(self) -> bool:
        import redis

        if self.process is not None and not self.process.alive:
            msg = f"Redis exited at start; last log lines:\n{self.process.log_tail()}"
            raise ServiceError(msg)
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM: it flushes its append-only file), killing it if it does not stop."""
        if self.process is not None:
            self.process.stop(grace_s=30.0)
