"""
### Emotion training

Trains a small Keras classifier per dataset on the features that
`cnn_feature_extraction` verified, holding out whole actors (every fifth) for a
speaker-independent test set. Writes `training/emotion_classifier.keras` and
`training/metrics.json` (accuracy, per-class recall, confusion matrix) beside
each dataset's features.

Triggered by `cnn_feature_extraction` with
`{"datasets": {"ravdess": {"features": ..., "manifest": ...}, ...}}`; run it by
hand with the same conf, or with no conf for the demo folders.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Connection, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from cnn_features.config import load_settings

SETTINGS = load_settings()


def s3_access(params: dict[str, Any]) -> Any:
    """Return the run's S3 settings, or None when no manifest is on S3."""
    from cnn_features.plan import uses_s3
    from cnn_features.s3 import resolve_access

    if not uses_s3(params):
        return None
    return resolve_access(str(params["aws_conn_id"]), Connection.get, AirflowNotFoundException)


@dag(
    dag_id="emotion_training",
    schedule=None,
    catchup=False,
    doc_md=__doc__,
    tags=["training", "emotion"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    params={
        "datasets": Param(
            {
                name: {"features": io["output"], "manifest": f"{io['output']}/manifest.json"}
                for name, io in SETTINGS.default_datasets().items()
            },
            type="object",
            title="Datasets",
            description='Verified features per dataset: {"ravdess": {"features": "/abs", "manifest": "/abs/manifest.json"}}. '
            "Paths or s3://bucket/prefix URIs.",
        ),
        "aws_conn_id": Param(
            "aws_default",
            type="string",
            minLength=1,
            title="AWS connection",
            description="Airflow connection with S3 keys and endpoint_url (extra), used when features are on S3; "
            "boto3's default chain when it is not defined.",
        ),
        "epochs": Param(150, type="integer", minimum=1, maximum=10_000, title="Epochs", description="Training epochs."),
    },
)
def emotion_training() -> None:
    @task(retries=0)
    def list_training_jobs() -> list[dict[str, str]]:
        """Validate the conf and return one training job per dataset."""
        from cnn_features.errors import InvalidConf
        from cnn_features.training import training_jobs

        params = dict(get_current_context()["params"])
        try:
            return training_jobs(params, SETTINGS, access=s3_access(params))
        except InvalidConf as exc:
            raise AirflowFailException(str(exc)) from None

    @task(map_index_template="{{ task.op_kwargs['job']['dataset'] }}")
    def train_classifier(job: dict[str, str]) -> dict[str, Any]:
        """Train and evaluate one dataset's classifier in a fresh process."""
        from cnn_features.training import run_training

        params = dict(get_current_context()["params"])
        return run_training(job["manifest"], epochs=int(params["epochs"]), access=s3_access(params))

    @task
    def report_metrics(metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """Log each dataset's held-out accuracy against chance."""
        import logging

        log = logging.getLogger(__name__)
        summary = {}
        for m in metrics:
            log.info(
                "%s: accuracy %.3f, balanced %.3f, chance %.3f, %d test clips; %s",
                m["dataset"], m["accuracy"], m["balanced_accuracy"], m["chance_accuracy"], m["n_test"],
                m["model"],
            )
            summary[m["dataset"]] = {k: m[k] for k in ("accuracy", "balanced_accuracy", "chance_accuracy", "model")}
        return summary

    report_metrics(train_classifier.expand(job=list_training_jobs()))


emotion_training()
