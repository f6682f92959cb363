#!/usr/bin/env bash
# Start a real local Airflow on 127.0.0.1: API server + UI, scheduler, DAG
# processor and triggerer, with this checkout's dags/ and plugins/,
# LocalExecutor (CeleryExecutor with --celery), Airflow home .airflow/. Runs in
# the foreground; Ctrl-C stops every process it started.
#
#   bash scripts/airflow.sh               # SQLite metadata DB (embedded default)
#   bash scripts/airflow.sh --postgres    # PostgreSQL: AIRFLOW__DATABASE__SQL_ALCHEMY_CONN if it
#                                         # names one, else a local cluster in .airflow/postgres/
#   bash scripts/airflow.sh --celery      # CeleryExecutor: PostgreSQL as above, a Redis broker on
#                                         # loopback (password in .airflow/redis/password), a CPU
#                                         # worker (queue "default") and a GPU worker ("default,gpu")
#   bash scripts/airflow.sh --port 8081   # another port (default 8080)
#
# Login: user "admin", password in .airflow/simple_auth_manager_passwords.json.generated.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for arg in "$@"; do
    if { [ "$arg" = "--postgres" ] || [ "$arg" = "--celery" ]; } && [ -z "${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-}" ]; then
        bash scripts/system-deps.sh postgresql
    fi
    if [ "$arg" = "--celery" ]; then
        bash scripts/system-deps.sh redis-server
    fi
done
source scripts/airflow-env.sh
exec python scripts/airflow_local.py "$@"
