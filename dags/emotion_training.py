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

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from cnn_features.config import load_settings

SETTINGS = load_settings()


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
            description='Verified features per dataset: {"ravdess": {"features": "/abs", "manifest": "/abs/manifest.json"}}.',
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

        try:
            return training_jobs(dict(get_current_context()["params"]), SETTINGS)
        except InvalidConf as exc:
            raise AirflowFailException(str(exc)) from None

    @task(map_index_template="{{ task.op_kwargs['job']['dataset'] }}")
    def train_classifier(job: dict[str, str]) -> dict[str, Any]:
        """Train and evaluate one dataset's classifier in a fresh process."""
        from pathlib import Path

        from cnn_features.training import run_training

        epochs = int(get_current_context()["params"]["epochs"])
        return run_training(Path(job["manifest"]), epochs=epochs)

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
