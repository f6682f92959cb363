"""Run a real local Airflow on loopback: API server, scheduler, DAG processor, triggerer.

    bash scripts/airflow.sh                # SQLite metadata DB (the embedded default)
    bash scripts/airflow.sh --postgres     # a PostgreSQL from Debian's postgresql package, started here

Runs in the foreground until Ctrl-C (or SIGTERM), then stops every process it
started, PostgreSQL included, also when a component dies. Expects the
environment of scripts/airflow-env.sh (scripts/airflow.sh sets it up).

The same classes serve the live-Airflow tests (tests/e2e/live.py) and the
benchmark's live runs (bench/extraction.py): ``LocalPostgres`` (initdb, start
on 127.0.0.1, role and database, stop), ``AirflowStack`` (migrate,
start/stop/restart each component, wait until healthy) and ``AirflowApi``
(REST API v2 client: trigger, poll, clear).
Every process runs in its own process group and is told to die with the
process that started it (PR_SET_PDEATHSIG), so nothing outlives its owner.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

log = logging.getLogger("airflow_local")

REPO = Path(__file__).resolve().parents[1]
# The four Airflow 3 services a LocalExecutor deployment needs, in start order.
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
# The UI user; the simple auth manager keeps its password in the passwords file.
ADMIN_USER = "admin"
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"
# Seconds a component gets to stop on SIGTERM before its process group is killed:
# a scheduler waits for its running tasks, and a shard can take a while.
STOP_GRACE_S = 120.0
# Task slots per usable core (AIRFLOW__CORE__PARALLELISM), at least MIN_PARALLELISM.
# Airflow's default of 32 starts 32 LocalExecutor worker processes, idle on a
# small machine; a run needs at most probe + plan, or two shards (the default
# shard concurrency) plus a training task or two, at once.
PARALLELISM_PER_CORE = 2
MIN_PARALLELISM = 4
# Seconds to wait for the database migration (PostgreSQL on a busy 2-core box: ~1 min).
MIGRATE_TIMEOUT_S = 900.0
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
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(password + "\n")
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


def airflow_env(
    *,
    home: Path,
    port: int,
    base: dict[str, str] | None = None,
    db_url: str | None = None,
) -> dict[str, str]:
    """Return the environment of every Airflow process of a local stack on 127.0.0.1:``port``.

    The project's dags/ and plugins/, LocalExecutor, login required (the
    simple auth manager's ``admin`` user, no all-admins mode). ``db_url``
    (else ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` from ``base``, else SQLite in
    ``home``) is the metadata DB. ``AIRFLOW__CORE__PARALLELISM`` (task slots, one
    LocalExecutor worker process each) is sized to the machine
    (``default_parallelism``) unless ``base`` sets it.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("AIRFLOW__CORE__PARALLELISM", str(default_parallelism()))
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": env.get("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags")),
        "AIRFLOW__CORE__PLUGINS_FOLDER": env.get("AIRFLOW__CORE__PLUGINS_FOLDER", str(REPO / "plugins")),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
    })
    if db_url is not None:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = db_url
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def default_parallelism() -> int:
    """Return the task slots for this machine: ``PARALLELISM_PER_CORE`` per usable core, at least ``MIN_PARALLELISM``."""
    return max(MIN_PARALLELISM, PARALLELISM_PER_CORE * len(os.sched_getaffinity(0)))


class AirflowStack:
    """The four Airflow services of one AIRFLOW_HOME, each a ``ManagedProcess``."""

    def __init__(self, env: dict[str, str], *, log_dir: Path | None = None) -> None:
        self.env = env
        self.home = Path(env["AIRFLOW_HOME"])
        self.port = int(env["AIRFLOW__API__PORT"])
        self.log_dir = log_dir or self.home / "services"
        self.processes: dict[str, ManagedProcess] = {}

    @property
    def url(self) -> str:
        """Return the base URL of the API server and UI."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def passwords_file(self) -> Path:
        """Return the simple auth manager's passwords file."""
        return self.home / PASSWORDS_FILE

    def admin_password(self) -> str:
        """Return the admin's password, generating one on first use (file mode 0600)."""
        try:
            passwords = json.loads(self.passwords_file.read_text(encoding="utf-8") or "{}")
        except FileNotFoundError:
            passwords = {}
        if ADMIN_USER not in passwords:
            passwords[ADMIN_USER] = secrets.token_urlsafe(16)
            self.home.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.passwords_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(passwords) + "\n")
        return str(passwords[ADMIN_USER])

    def migrate(self, *, timeout_s: float = MIGRATE_TIMEOUT_S) -> None:
        """Create or upgrade the metadata DB (``airflow db migrate``).

        Raises:
            ServiceError: the migration failed; the message holds its last lines.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / "db-migrate.log"
        with open(path, "ab") as out:
            done = subprocess.run(["airflow", "db", "migrate"], env=self.env, stdout=out, stderr=subprocess.STDOUT,  # noqa: S607
                                  check=False, timeout=timeout_s)
        if done.returncode != 0:
            tail = "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
            msg = f"airflow db migrate failed (exit {done.returncode}):\n{tail}"
            raise ServiceError(msg)

    def component(self, name: str, *, extra_env: dict[str, str] | None = None) -> ManagedProcess:
        """Return the ``ManagedProcess`` of component ``name`` (one of ``COMPONENTS``)."""
        if name not in COMPONENTS:
            msg = f"unknown Airflow component {name!r}; expected one of {', '.join(COMPONENTS)}"
            raise ValueError(msg)
        cmd = ["airflow", name]
        if name == "api-server":
            cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        elif name in ("scheduler", "triggerer"):
            # Their log servers bind every interface (hard-coded); the API server
            # reads task logs from the local log folder instead.
            cmd += ["--skip-serve-logs"]
        return ManagedProcess(name, cmd, env={**self.env, **(extra_env or {})}, log_path=self.log_dir / f"{name}.log")

    def start(self, name: str, *, extra_env: dict[str, str] | None = None) -> ManagedProcess:
        """Start one component (with extra environment variables, e.g. a test fault)."""
        process = self.component(name, extra_env=extra_env)
        self.processes[name] = process
        process.start()
        return process

    def stop(self, name: str, *, grace_s: float = STOP_GRACE_S) -> None:
        """Stop one component: SIGTERM, ``grace_s`` to finish, then kill its process group."""
        process = self.processes.get(name)
        if process is not None:
            process.stop(grace_s=grace_s)

    def restart(self, name: str, *, extra_env: dict[str, str] | None = None, grace_s: float = STOP_GRACE_S) -> ManagedProcess:
        """Stop a component and start it again, optionally with a changed environment."""
        self.stop(name, grace_s=grace_s)
        return self.start(name, extra_env=extra_env)

    def start_all(self) -> None:
        """Start every component (the admin password is created first)."""
        self.admin_password()
        for name in COMPONENTS:
            self.start(name)

    def stop_all(self, *, grace_s: float = 20.0) -> None:
        """Stop every component, the API server last (running tasks report to it)."""
        for name in reversed(COMPONENTS):
            self.stop(name, grace_s=grace_s)

    def health(self) -> dict[str, Any] | None:
        """Return the API server's health report, or None while it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=10) as resp:  # noqa: S310
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return None

    def _all_healthy(self) -> bool:
        for name, process in self.processes.items():
            if not process.alive:
                msg = f"Airflow {name} exited (code {process.proc.returncode if process.proc else '?'}); last log lines:\n{process.log_tail()}"
                raise ServiceError(msg)
        report = self.health()
        if not report:
            return False
        parts = {"metadatabase", "scheduler", "triggerer", "dag_processor"}
        return all((report.get(part) or {}).get("status") == "healthy" for part in parts)

    def wait_healthy(self, *, timeout_s: float = 300.0) -> None:
        """Wait until the API server reports the DB, scheduler, triggerer and DAG processor healthy.

        Raises:
            ServiceError: a component exited, or the stack was not healthy in time.
        """
        wait_for(self._all_healthy, timeout_s=timeout_s, what=f"a healthy Airflow at {self.url}", interval_s=2.0)


# Run states after which nothing more happens to a run.
FINISHED = frozenset({"success", "failed"})
# Seconds to wait for a whole extraction run on a busy 2-core machine (other
# engineers' CPU-heavy work runs beside it).
RUN_TIMEOUT_S = 600.0
# Seconds between polls of the REST API, as the grid view refreshes.
POLL_S = 2.0


class ApiError(RuntimeError):
    """The REST API answered with an error status."""


@dataclass
class AirflowApi:
    """A client of Airflow's REST API v2 with a token from ``POST /auth/token``."""

    base_url: str
    username: str
    password: str
    _token: str | None = field(default=None, repr=False)
    _client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60.0), repr=False)

    def token(self, *, refresh: bool = False) -> str:
        """Return a JWT for the user, logging in on first use (or when asked to refresh)."""
        if self._token is None or refresh:
            resp = self._client.post(f"{self.base_url}/auth/token", json={"username": self.username, "password": self.password})
            if resp.status_code not in (200, 201):
                msg = f"POST /auth/token: {resp.status_code} {resp.text[:500]}"
                raise ApiError(msg)
            self._token = str(resp.json()["access_token"])
        return self._token

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request with the bearer token; log in again once if it expired."""
        for attempt in range(2):
            headers = {"Authorization": f"Bearer {self.token(refresh=attempt > 0)}", **kwargs.pop("headers", {})}
            resp = self._client.request(method, f"{self.base_url}{path}", headers=headers, **kwargs)
            if resp.status_code != 401:
                return resp
        return resp

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request and return its JSON body.

        Raises:
            ApiError: the status is not 2xx; the message holds the body.
        """
        resp = self.request(method, path, **kwargs)
        if resp.status_code >= 300:
            msg = f"{method} {path}: {resp.status_code} {resp.text[:2000]}"
            raise ApiError(msg)
        return resp.json() if resp.content else None

    def trigger(self, dag_id: str, conf: dict[str, Any], *, note: str | None = None) -> dict[str, Any]:
        """Trigger a run with ``conf`` as the UI's trigger form does (logical date now); return the run."""
        body = {"logical_date": datetime.now(UTC).isoformat(), "conf": conf, "note": note}
        return self.call("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """Return a DAG run."""
        return self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Return every task instance of a run, mapped ones included, with their rendered names."""
        data = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000})
        return list(data["task_instances"])

    def mapped(self, dag_id: str, run_id: str, task_id: str) -> list[dict[str, Any]]:
        """Return a mapped task's instances, as the grid lists them when its box is clicked."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/listMapped"
        return list(self.call("GET", path, params={"limit": 1000})["task_instances"])

    def grid_summary(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """Return the grid view's per-task summary of a run (``/ui/grid/ti_summaries``, NDJSON)."""
        resp = self.request("GET", f"/ui/grid/ti_summaries/{dag_id}", params={"run_ids": run_id})
        if resp.status_code != 200:
            msg = f"grid summaries: {resp.status_code} {resp.text[:500]}"
            raise ApiError(msg)
        lines = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
        return next(line for line in lines if line.get("run_id") == run_id)

    def clear(self, dag_id: str, run_id: str, task_ids: list[Any], *, dry_run: bool = False) -> list[dict[str, Any]]:
        """Clear failed task instances (``[task_id, map_index]`` pairs) of a run and their downstream."""
        body = {"dag_run_id": run_id, "task_ids": task_ids, "include_downstream": True, "only_failed": True, "dry_run": dry_run}
        return list(self.call("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances", json=body)["task_instances"])

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, *, map_index: int = -1) -> str:
        """Return a task try's log as text."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
        data = self.call("GET", path, params={"map_index": map_index, "full_content": True}, headers={"Accept": "application/json"})
        content = data.get("content", "")
        if not isinstance(content, list):
            return str(content)
        lines = []
        for item in content:
            if not isinstance(item, dict):
                lines.append(str(item))
                continue
            lines.append(str(item.get("event", "")))
            lines.extend(f"{e.get('exc_type')}: {e.get('exc_value')}" for e in item.get("error_detail") or [])
        return "\n".join(lines)

    def wait_run(
        self,
        dag_id: str,
        run_id: str,
        states: set[str] | frozenset[str] = FINISHED,
        *,
        timeout_s: float = RUN_TIMEOUT_S,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll a run until its state is one of ``states``; return it.

        Raises:
            ServiceError: it did not get there in time (the message has its task states).
        """

        def check() -> dict[str, Any] | None:
            run = self.run(dag_id, run_id)
            if on_poll is not None:
                on_poll(run)
            return run if run["state"] in states else None

        try:
            return wait_for(check, timeout_s=timeout_s, what=f"{dag_id} run {run_id} to be {sorted(states)}", interval_s=POLL_S)
        except ServiceError as exc:
            tis = [(t["task_id"], t["map_index"], t["state"]) for t in self.task_instances(dag_id, run_id)]
            msg = f"{exc}; task instances: {tis}"
            raise ServiceError(msg) from None

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()


@contextlib.contextmanager
def running_stack(
    *, home: Path, port: int, postgres_root: Path | None, base_env: dict[str, str] | None = None, durable: bool = True
) -> Iterator[tuple[AirflowStack, LocalPostgres | None]]:
    """Start PostgreSQL (when ``postgres_root`` is given) and the Airflow stack; stop both on exit, even on failure."""
    postgres = LocalPostgres(postgres_root, durable=durable) if postgres_root is not None else None
    stack: AirflowStack | None = None
    try:
        db_url = postgres.start() if postgres is not None else None
        stack = AirflowStack(airflow_env(home=home, port=port, base=base_env, db_url=db_url))
        stack.migrate()
        stack.start_all()
        stack.wait_healthy()
        yield stack, postgres
    finally:
        if stack is not None:
            stack.stop_all()
        if postgres is not None:
            postgres.stop()


def _serve(args: argparse.Namespace) -> int:
    home = Path(os.environ.get("AIRFLOW_HOME", REPO / ".airflow")).resolve()
    conn = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    postgres_root: Path | None = None
    if args.postgres and conn.startswith("postgresql"):
        log.info("using the PostgreSQL of AIRFLOW__DATABASE__SQL_ALCHEMY_CONN; not starting one")
    elif args.postgres:
        postgres_root = (args.pg_root or home / "postgres").resolve()
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with running_stack(home=home, port=args.port, postgres_root=postgres_root) as (stack, postgres):
            db = "PostgreSQL" if postgres is not None or conn.startswith("postgresql") else "SQLite"
            print(
                f"\nAirflow is up on {stack.url} ({db} metadata DB, LocalExecutor)\n"
                f"  login:          user '{ADMIN_USER}', password in {stack.passwords_file}\n"
                f"  progress page:  {stack.url}/cnn-progress/\n"
                f"  service logs:   {stack.log_dir}/\n"
                "Press Ctrl-C to stop everything.",
                flush=True,
            )
            while not stopping:
                for name, process in stack.processes.items():
                    if not process.alive:
                        print(f"{name} exited; last log lines:\n{process.log_tail()}", file=sys.stderr)
                        return 1
                time.sleep(1.0)
            print("stopping...", flush=True)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Start the stack in the foreground; stop it all on Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", action="store_true",
                        help="PostgreSQL metadata DB: the one in AIRFLOW__DATABASE__SQL_ALCHEMY_CONN, else a local one started here")
    parser.add_argument("--port", type=int, default=8080, help="API server and UI port on 127.0.0.1 (default 8080)")
    parser.add_argument("--pg-root", type=Path, help="folder of the local PostgreSQL cluster (default $AIRFLOW_HOME/postgres)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
