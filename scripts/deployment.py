"""The Airflow deployment as one table: services, executor, queues, pools and the settings they share.

``scripts/airflow_local.py`` starts the loopback stacks from this table, and
``tests/test_compose.py`` checks ``docker-compose.yaml`` against it, so the
local stack and the compose file cannot drift apart:

* ``SERVICES``: each Airflow service's command (what the compose file runs
  too), the options only the loopback stack adds, its readiness check and its
  stop rule;
* ``SHARED_ENV`` and ``CELERY_ENV``: settings with the same value everywhere;
* ``HOST_ENV``: settings every deployment sets, each to its own value (paths,
  URLs, secrets).

No Airflow import here: the table is plain data.
"""

from __future__ import annotations

from dataclasses import dataclass

LOCAL_EXECUTOR = "LocalExecutor"
CELERY_EXECUTOR = "CeleryExecutor"
# Airflow's default queue ([operators] default_queue): probe, plan, verification
# and CPU shards go there.
DEFAULT_QUEUE = "default"
# The queue only GPU workers serve, and the pool that caps the GPU shards
# running at once at the number of GPUs (CNN_FEATURES_GPU_QUEUE / _POOL).
GPU_QUEUE = "gpu"
GPU_POOL = "gpu"
# Seconds a service gets to stop on SIGTERM before its process group is killed:
# a scheduler or a Celery worker waits for its running tasks (a shard can take
# a while); the others stop at once.
TASK_STOP_GRACE_S = 120.0
SERVICE_STOP_GRACE_S = 20.0


@dataclass(frozen=True)
class Service:
    """One Airflow service of a deployment.

    ``args`` follow ``airflow`` on the command line everywhere (the compose
    file's ``command``); ``local_args`` are added by the loopback stack only
    (``{port}`` and ``{concurrency}`` are filled in there). ``ready`` names the
    readiness check: ``health:<part>`` of ``/api/v2/monitor/health``, or
    ``celery:<worker name>`` (the worker answers on the broker and consumes
    its queues). A stop is SIGTERM, then SIGKILL of the process group after
    ``stop_grace_s``.
    """

    name: str
    args: tuple[str, ...]
    ready: str
    stop_grace_s: float = SERVICE_STOP_GRACE_S
    local_args: tuple[str, ...] = ()
    executors: frozenset[str] = frozenset({LOCAL_EXECUTOR, CELERY_EXECUTOR})
    queues: tuple[str, ...] = ()

    @property
    def worker_name(self) -> str | None:
        """Return the Celery worker's name before ``@host``, or None for other services."""
        kind, _, name = self.ready.partition(":")
        return name if kind == "celery" else None


def _worker(name: str, queues: tuple[str, ...]) -> Service:
    return Service(
        name=f"worker-{name}",
        args=("celery", "worker", "--queues", ",".join(queues), "--celery-hostname", f"{name}@%h"),
        ready=f"celery:{name}",
        stop_grace_s=TASK_STOP_GRACE_S,
        # Two workers on one host cannot both serve logs on the fixed log-server
        # port; the API server reads task logs from the shared log folder.
        local_args=("--concurrency", "{concurrency}", "--skip-serve-logs"),
        executors=frozenset({CELERY_EXECUTOR}),
        queues=queues,
    )


# Start order; stops run in reverse (the API server last: running tasks report to it).
SERVICES: tuple[Service, ...] = (
    Service("api-server", ("api-server",), ready="health:metadatabase",
            local_args=("--host", "127.0.0.1", "--port", "{port}", "--workers", "1")),
    # Their log servers bind every interface (hard-coded); the API server reads
    # task logs from the local log folder instead.
    Service("scheduler", ("scheduler",), ready="health:scheduler", stop_grace_s=TASK_STOP_GRACE_S,
            local_args=("--skip-serve-logs",)),
    Service("dag-processor", ("dag-processor",), ready="health:dag_processor"),
    Service("triggerer", ("triggerer",), ready="health:triggerer", local_args=("--skip-serve-logs",)),
    _worker("cpu", (DEFAULT_QUEUE,)),
    _worker("gpu", (DEFAULT_QUEUE, GPU_QUEUE)),
)

# Settings with one value in every deployment, whatever its executor.
SHARED_ENV: dict[str, str] = {
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    # The simple auth manager's users (user:role); passwords are generated, never set here.
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
}
# Settings of every CeleryExecutor deployment: the executor, and the GPU queue
# and pool the extraction DAG routes GPU shards to (cnn_features.config).
CELERY_ENV: dict[str, str] = {
    "AIRFLOW__CORE__EXECUTOR": CELERY_EXECUTOR,
    "CNN_FEATURES_GPU_QUEUE": GPU_QUEUE,
    "CNN_FEATURES_GPU_POOL": GPU_POOL,
}
# Settings every CeleryExecutor deployment sets to values of its own. (Secrets
# are not listed: the loopback stack lets Airflow generate its JWT secret into
# the shared airflow.cfg; hosts that share no AIRFLOW_HOME set it explicitly.)
HOST_ENV: frozenset[str] = frozenset({
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    "AIRFLOW__CORE__PARALLELISM",
    "AIRFLOW__CORE__DAGS_FOLDER",
    "AIRFLOW__CORE__PLUGINS_FOLDER",
    "AIRFLOW__API__HOST",
    "AIRFLOW__API__PORT",
    "AIRFLOW__API__BASE_URL",
})


def services_for(executor: str) -> tuple[Service, ...]:
    """Return the services a deployment with ``executor`` runs, in start order."""
    return tuple(s for s in SERVICES if executor in s.executors)


def service(name: str) -> Service:
    """Return the service called ``name``.

    Raises:
        ValueError: no service has that name.
    """
    for candidate in SERVICES:
        if candidate.name == name:
            return candidate
    msg = f"unknown Airflow service {name!r}; expected one of {', '.join(s.name for s in SERVICES)}"
    raise ValueError(msg)


def result_backend(db_url: str) -> str:
    """Return Celery's result backend URL for the PostgreSQL metadata DB at ``db_url``."""
    scheme, sep, rest = db_url.partition("://")
    if not sep or not scheme.startswith("postgresql"):
        msg = f"CeleryExecutor needs a PostgreSQL metadata DB, got a {scheme or 'malformed'} URL"
        raise ValueError(msg)
    # The driver is named: SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3, not installed here.
    return f"db+postgresql+psycopg2://{rest}"
