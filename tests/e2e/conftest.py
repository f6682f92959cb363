"""Fixtures for end-to-end tests against running services: a live Airflow on PostgreSQL, headless Chromium."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnn_features.demo import generate
from tests.e2e.live import DAG_ID, REPO, TRAINING_DAG_ID, AirflowApi, Chromium, LiveAirflow, chromium_binary

sys.path.insert(0, str(REPO / "scripts"))
from airflow_local import (  # noqa: E402
    ADMIN_USER,
    AirflowStack,
    LocalPostgres,
    PostgresUnavailable,
    ServiceError,
    airflow_env,
    free_port,
    postgres_bindir,
    wait_for,
)

# Frames of every demo clip: small and fixed, so a shard extracts in a second or two.
FRAMES = 48
# Where screenshots and other artifacts of the browser tests go (git-ignored).
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="package")
def live_airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAirflow]:
    """PostgreSQL and the four Airflow services (LocalExecutor) on loopback, with a demo corpus; stopped after tests/e2e.

    One stack for every test of this package (starting one costs 15-30 s) and
    stopped when the package's last test is done, also on failure. Tests give
    each run its own output folders (``LiveAirflow.conf(name)``).
    """
    try:
        postgres_bindir()
    except PostgresUnavailable as exc:
        pytest.skip(f"{exc}; the README test command (bash scripts/test.sh) installs it")
    root = tmp_path_factory.mktemp("live")
    # PostgreSQL runs as user postgres, which cannot enter pytest's private tmp folders.
    pg_root = Path(tempfile.mkdtemp(prefix="cnn-e2e-pg-", dir="/tmp"))
    home = root / "data"
    counts = generate(home / "demo", frames=FRAMES)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CNN_FEATURES_"))}
    base.update({
        "CNN_FEATURES_HOME": str(home),
        # Two shards at once: on two cores a shard's start-up (TensorFlow import) overlaps the other's work.
        "CNN_FEATURES_SHARD_CONCURRENCY": "2",
        "CNN_FEATURES_BATCH_SIZE": "8",
    })
    postgres = LocalPostgres(pg_root, durable=False)
    stack: AirflowStack | None = None
    api: AirflowApi | None = None
    try:
        db_url = postgres.start()
        stack = AirflowStack(airflow_env(home=root / "airflow", port=free_port(), base=base, db_url=db_url))
        stack.migrate()
        stack.start_all()
        stack.wait_healthy()
        api = AirflowApi(stack.url, ADMIN_USER, stack.admin_password())
        live = LiveAirflow(stack=stack, postgres=postgres, api=api, home=home, corpus=home / "demo", counts=counts)
        wait_for(lambda: all(api.request("GET", f"/api/v2/dags/{d}").status_code == 200 for d in (DAG_ID, TRAINING_DAG_ID)),
                 timeout_s=300, what="both DAGs to be parsed", interval_s=2.0)
        yield live
    except ServiceError as exc:
        logs = "\n".join(f"--- {name}:\n{p.log_tail(30)}" for name, p in (stack.processes.items() if stack else []))
        pytest.fail(f"live Airflow failed: {exc}\n{logs}")
    finally:
        if api is not None:
            api.close()
        if stack is not None:
            stack.stop_all()
        postgres.stop()
        shutil.rmtree(pg_root, ignore_errors=True)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    """Headless Chromium with a fresh profile, stopped after the test; skipped when Chromium is absent."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium not installed (Debian 'chromium'); the README test command (bash scripts/test.sh) installs it")
    browser = Chromium(binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        browser.start()
        yield browser
    finally:
        browser.close()


@pytest.fixture
def artifacts() -> Path:
    """The folder test artifacts (screenshots) are kept in."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
