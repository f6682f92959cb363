# Source this file: the embedded Airflow default for this checkout.
# SQLite metadata DB and logs under .airflow/, LocalExecutor, the project's
# dags/ and plugins/, data under data/. Every value can be overridden by
# exporting it before sourcing.
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$_repo/.airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$_repo/dags}"
export AIRFLOW__CORE__PLUGINS_FOLDER="${AIRFLOW__CORE__PLUGINS_FOLDER:-$_repo/plugins}"
export AIRFLOW__CORE__LOAD_EXAMPLES="${AIRFLOW__CORE__LOAD_EXAMPLES:-False}"
export AIRFLOW__CORE__EXECUTOR="${AIRFLOW__CORE__EXECUTOR:-LocalExecutor}"
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-False}"
# The API server (and so `airflow standalone`) listens on loopback only.
export AIRFLOW__API__HOST="${AIRFLOW__API__HOST:-127.0.0.1}"
export CNN_FEATURES_HOME="${CNN_FEATURES_HOME:-$_repo/data}"
export PATH="$_repo/.venv/bin:$PATH"
unset _repo
