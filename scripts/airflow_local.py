"""Run a real local Airflow on loopback: API server, scheduler, DAG processor, triggerer (and Celery workers).

    bash scripts/airflow.sh                # SQLite metadata DB (the embedded default), LocalExecutor
    bash scripts/airflow.sh --postgres     # a PostgreSQL from Debian's postgresql package, started here
    bash scripts/airflow.sh --celery       # CeleryExecutor: PostgreSQL, Redis broker, a CPU and a GPU worker

Runs in the foreground until Ctrl-C (or SIGTERM), then stops every process it
started, PostgreSQL and Redis included, also when a component dies. Expects
the environment of scripts/airflow-env.sh (scripts/airflow.sh sets it up).

The services, their commands, readiness checks and stop rules come from one
table (``deployment.SERVICES``, which docker-compose.yaml is checked against).
The same classes serve the live-Airflow tests (tests/e2e/live.py) and the
benchmark's live runs (bench/extraction.py): ``AirflowStack`` (migrate,
start/stop/restart each service, wait until ready) here, ``LocalPostgres`` and
``LocalRedis`` in ``local_services``, ``AirflowApi`` (REST API v2 client) in
``airflow_api``; this module re-exports them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded by path
from airflow_api import FINISHED, POLL_S, RUN_TIMEOUT_S, AirflowApi, ApiError  # noqa: E402
from deployment import (  # noqa: E402
    CELERY_ENV,
    CELERY_EXECUTOR,
    GPU_POOL,
    LOCAL_EXECUTOR,
    SHARED_ENV,
    Service,
    result_backend,
    service,
    services_for,
)
from local_services import (  # noqa: E402
    STOP_GRACE_S,
    LocalPostgres,
    LocalRedis,
    ManagedProcess,
    PostgresUnavailable,
    RedisUnavailable,
    ServiceError,
    descendants,
    free_port,
    postgres_bindir,
    redis_server_binary,
    wait_for,
    write_secret,
)

__all__ = [
    "ADMIN_USER", "FINISHED", "POLL_S", "RUN_TIMEOUT_S", "STOP_GRACE_S", "AirflowApi", "AirflowStack", "ApiError",
    "LocalPostgres", "LocalRedis", "ManagedProcess", "PostgresUnavailable", "RedisUnavailable", "ServiceError",
    "airflow_env", "descendants", "free_port", "postgres_bindir", "redis_server_binary", "running_stack", "wait_for",
]

log = logging.getLogger("airflow_local")

REPO = Path(__file__).resolve().parents[1]
# The four Airflow 3 services a LocalExecutor deployment needs, in start order.
COMPONENTS = tuple(s.name for s in services_for(LOCAL_EXECUTOR))
# The UI user; the simple auth manager keeps its password in the passwords file.
ADMIN_USER = "admin"
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"
# Task slots per usable core (AIRFLOW__CORE__PARALLELISM), at least MIN_PARALLELISM.
# Airflow's default of 32 starts 32 LocalExecutor worker processes, idle on a
# small machine; a run needs at most probe + plan, or two shards (the default
# shard concurrency) plus a training task or two, at once.
PARALLELISM_PER_CORE = 2
MIN_PARALLELISM = 4
# Task slots of each local Celery worker: two shards at once per worker, as
# the LocalExecutor stack runs them (CNN_FEATURES_SHARD_CONCURRENCY's default).
CELERY_CONCURRENCY = 2
# Seconds to wait for the database migration (PostgreSQL on a busy 2-core box: ~1 min).
MIGRATE_TIMEOUT_S = 900.0
# Seconds a broker query for live workers waits for their answers.
INSPECT_TIMEOUT_S = 2.0


def airflow_env(
    *,
    home: Path,
    port: int,
    base: dict[str, str] | None = None,
    db_url: str | None = None,
    broker_url: str | None = None,
) -> dict[str, str]:
    """Return the environment of every Airflow process of a local stack on 127.0.0.1:``port``.

    The project's dags/ and plugins/, login required (the simple auth
    manager's ``admin`` user, no all-admins mode). ``db_url`` (else
    ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` from ``base``, else SQLite in
    ``home``) is the metadata DB. With ``broker_url`` (Redis) the executor is
    CeleryExecutor, with its result backend in the metadata DB and the GPU
    queue and pool of ``deployment.CELERY_ENV``; else LocalExecutor.
    ``AIRFLOW__CORE__PARALLELISM`` (task slots) is sized to the machine
    (``default_parallelism``) unless ``base`` sets it.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("AIRFLOW__CORE__PARALLELISM", str(default_parallelism()))
    env.update(SHARED_ENV)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": env.get("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags")),
        "AIRFLOW__CORE__PLUGINS_FOLDER": env.get("AIRFLOW__CORE__PLUGINS_FOLDER", str(REPO / "plugins")),
        "AIRFLOW__CORE__EXECUTOR": LOCAL_EXECUTOR,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
    })
    if db_url is not None:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = db_url
    if broker_url is not None:
        env.update(CELERY_ENV)
        env["AIRFLOW__CELERY__BROKER_URL"] = broker_url
        env["AIRFLOW__CELERY__RESULT_BACKEND"] = result_backend(env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", ""))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def default_parallelism() -> int:
    """Return the task slots for this machine: ``PARALLELISM_PER_CORE`` per usable core, at least ``MIN_PARALLELISM``."""
    return max(MIN_PARALLELISM, PARALLELISM_PER_CORE * len(os.sched_getaffinity(0)))


def gpu_pool_slots() -> int:
    """Return the GPU pool's size here: one slot per GPU this host may use, at least one.

    A host without GPUs still gets one slot, so its GPU worker's shards
    (which fall back to CPU) are never stuck behind an empty pool.
    """
    from cnn_features.backends import visible_gpus

    return max(1, len(visible_gpus()))


def live_workers(broker_url: str, *, timeout_s: float = INSPECT_TIMEOUT_S) -> dict[str, list[str]]:
    """Return each Celery worker answering on ``broker_url`` (``name@host``) with the queues it consumes."""
    from celery import Celery
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    app = Celery(broker=broker_url)
    try:
        answers = app.control.inspect(timeout=timeout_s).active_queues() or {}
    except (OSError, OperationalError, RedisError):  # the broker does not answer: no live worker
        return {}
    finally:
        app.close()
    return {worker: sorted(q["name"] for q in queues) for worker, queues in answers.items()}


class AirflowStack:
    """The Airflow services of one AIRFLOW_HOME, each a ``ManagedProcess``, as ``deployment.SERVICES`` lists them."""

    def __init__(self, env: dict[str, str], *, log_dir: Path | None = None) -> None:
        self.env = env
        self.home = Path(env["AIRFLOW_HOME"])
        self.port = int(env["AIRFLOW__API__PORT"])
        self.executor = env.get("AIRFLOW__CORE__EXECUTOR", LOCAL_EXECUTOR)
        self.services = services_for(self.executor)
        self.log_dir = log_dir or self.home / "services"
        self.processes: dict[str, ManagedProcess] = {}
        self.redis: LocalRedis | None = None  # the Celery broker, when running_stack started one

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
            import secrets

            passwords[ADMIN_USER] = secrets.token_urlsafe(16)
            write_secret(self.passwords_file, json.dumps(passwords))
        return str(passwords[ADMIN_USER])

    def _airflow(self, args: list[str], *, log_name: str, timeout_s: float) -> None:
        """Run ``airflow <args>`` to completion, its output appended to ``log_name`` in the log folder.

        Raises:
            ServiceError: it failed; the message holds its last lines.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / log_name
        with open(path, "ab") as out:
            done = subprocess.run(["airflow", *args], env=self.env, stdout=out, stderr=subprocess.STDOUT,  # noqa: S607
                                  check=False, timeout=timeout_s)
        if done.returncode != 0:
            tail = "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
            msg = f"airflow {args[0]} {args[1]} failed (exit {done.returncode}):\n{tail}"
            raise ServiceError(msg)

    def migrate(self, *, timeout_s: float = MIGRATE_TIMEOUT_S) -> None:
        """Create or upgrade the metadata DB (``airflow db migrate``); with Celery, create the GPU pool too.

        Raises:
            ServiceError: the migration failed; the message holds its last lines.
        """
        self._airflow(["db", "migrate"], log_name="db-migrate.log", timeout_s=timeout_s)
        if self.executor == CELERY_EXECUTOR:
            slots = gpu_pool_slots()
            self._airflow(["pools", "set", GPU_POOL, str(slots), "GPU shards running at once: one per GPU"],
                          log_name="pools.log", timeout_s=300)
            log.info("pool %r: %d slot(s)", GPU_POOL, slots)

    def _command(self, spec: Service) -> list[str]:
        fill = {"port": str(self.port), "concurrency": str(CELERY_CONCURRENCY)}
        return ["airflow", *spec.args, *(arg.format(**fill) for arg in spec.local_args)]

    def component(self, name: str, *, extra_env: dict[str, str] | None = None) -> ManagedProcess:
        """Return the ``ManagedProcess`` of service ``name`` (one of ``self.services``)."""
        spec = service(name)
        if spec not in self.services:
            msg = f"service {name!r} is not part of a {self.executor} stack"
            raise ValueError(msg)
        return ManagedProcess(name, self._command(spec), env={**self.env, **(extra_env or {})},
                              log_path=self.log_dir / f"{name}.log")

    def start(self, name: str, *, extra_env: dict[str, str] | None = None) -> ManagedProcess:
        """Start one service (with extra environment variables, e.g. a test fault)."""
        process = self.component(name, extra_env=extra_env)
        self.processes[name] = process
        process.start()
        return process

    def stop(self, name: str, *, grace_s: float | None = None) -> None:
        """Stop one service: SIGTERM, ``grace_s`` (default: its stop rule) to finish, then kill its process group."""
        process = self.processes.get(name)
        if process is not None:
            process.stop(grace_s=service(name).stop_grace_s if grace_s is None else grace_s)

    def restart(self, name: str, *, extra_env: dict[str, str] | None = None, grace_s: float | None = None) -> ManagedProcess:
        """Stop a service and start it again, optionally with a changed environment."""
        self.stop(name, grace_s=grace_s)
        return self.start(name, extra_env=extra_env)

    def start_all(self) -> None:
        """Start every service (the admin password is created first)."""
        self.admin_password()
        for spec in self.services:
            self.start(spec.name)

    def stop_all(self, *, grace_s: float = 20.0) -> None:
        """Stop every service in reverse start order, the API server last (running tasks report to it)."""
        for spec in reversed(self.services):
            self.stop(spec.name, grace_s=grace_s)

    def health(self) -> dict[str, Any] | None:
        """Return the API server's health report, or None while it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=10) as resp:  # noqa: S310
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return None

    def workers(self) -> dict[str, list[str]]:
        """Return each live Celery worker (``name@host``) with its queues; empty without Celery."""
        broker = self.env.get("AIRFLOW__CELERY__BROKER_URL")
        return live_workers(broker) if self.executor == CELERY_EXECUTOR and broker else {}

    def _ready(self, spec: Service, report: dict[str, Any], workers: dict[str, list[str]]) -> bool:
        kind, _, part = spec.ready.partition(":")
        if kind == "health":
            return (report.get(part) or {}).get("status") == "healthy"
        queues = workers.get(f"{part}@{socket.gethostname()}")
        return queues is not None and set(spec.queues) <= set(queues)

    def _all_healthy(self) -> bool:
        for name, process in self.processes.items():
            if not process.alive:
                msg = f"Airflow {name} exited (code {process.proc.returncode if process.proc else '?'}); last log lines:\n{process.log_tail()}"
                raise ServiceError(msg)
        report = self.health()
        if not report:
            return False
        workers = self.workers() if any(s.worker_name for s in self.services) else {}
        return all(self._ready(spec, report, workers) for spec in self.services if spec.name in self.processes)

    def wait_healthy(self, *, timeout_s: float = 300.0) -> None:
        """Wait until every started service passes its readiness check (``Service.ready``).

        Raises:
            ServiceError: a service exited, or the stack was not ready in time.
        """
        wait_for(self._all_healthy, timeout_s=timeout_s, what=f"a healthy Airflow at {self.url}", interval_s=2.0)


@contextlib.contextmanager
def running_stack(
    *,
    home: Path,
    port: int,
    postgres_root: Path | None,
    base_env: dict[str, str] | None = None,
    durable: bool = True,
    redis_root: Path | None = None,
) -> Iterator[tuple[AirflowStack, LocalPostgres | None]]:
    """Start PostgreSQL (with ``postgres_root``), Redis (with ``redis_root``: CeleryExecutor) and Airflow; stop all on exit.

    Everything started is stopped, also on failure. The stack's ``redis``
    attribute is the broker (None without Celery).
    """
    postgres = LocalPostgres(postgres_root, durable=durable) if postgres_root is not None else None
    redis = LocalRedis(redis_root) if redis_root is not None else None
    stack: AirflowStack | None = None
    try:
        db_url = postgres.start() if postgres is not None else None
        broker_url = redis.start() if redis is not None else None
        stack = AirflowStack(airflow_env(home=home, port=port, base=base_env, db_url=db_url, broker_url=broker_url))
        stack.redis = redis
        stack.migrate()
        stack.start_all()
        stack.wait_healthy()
        yield stack, postgres
    finally:
        if stack is not None:
            stack.stop_all()
        if redis is not None:
            redis.stop()
        if postgres is not None:
            postgres.stop()


def _serve(args: argparse.Namespace) -> int:
    home = Path(os.environ.get("AIRFLOW_HOME", REPO / ".airflow")).resolve()
    conn = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    postgres_root: Path | None = None
    redis_root = home / "redis" if args.celery else None
    if (args.postgres or args.celery) and conn.startswith("postgresql"):
        log.info("using the PostgreSQL of AIRFLOW__DATABASE__SQL_ALCHEMY_CONN; not starting one")
    elif args.postgres or args.celery:
        postgres_root = (args.pg_root or home / "postgres").resolve()
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with running_stack(home=home, port=args.port, postgres_root=postgres_root, redis_root=redis_root) as (stack, postgres):
            db = "PostgreSQL" if postgres is not None or conn.startswith("postgresql") else "SQLite"
            workers = "".join(f"\n  worker:         {name} on queues {', '.join(queues)}"
                              for name, queues in sorted(stack.workers().items()))
            broker = f", Redis broker on 127.0.0.1:{stack.redis.port}" if stack.redis is not None else ""
            print(
                f"\nAirflow is up on {stack.url} ({db} metadata DB, {stack.executor}{broker})\n"
                f"  login:          user '{ADMIN_USER}', password in {stack.passwords_file}\n"
                f"  progress page:  {stack.url}/cnn-progress/\n"
                f"  service logs:   {stack.log_dir}/{workers}\n"
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
    parser.add_argument("--celery", action="store_true",
                        help="CeleryExecutor: PostgreSQL (as --postgres), a Redis broker started here, "
                             "a CPU worker (default queue) and a GPU worker (default and gpu queues)")
    parser.add_argument("--port", type=int, default=8080, help="API server and UI port on 127.0.0.1 (default 8080)")
    parser.add_argument("--pg-root", type=Path, help="folder of the local PostgreSQL cluster (default $AIRFLOW_HOME/postgres)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
