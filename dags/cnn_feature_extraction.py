"""
### CNN feature extraction

Turns spectrogram corpora (RAVDESS, CREMA-D, or any corpus laid out like them)
into one 256-d CNN feature vector per clip, then triggers `emotion_training`.

1. **probe_gpu** probes the GPU in a fresh process; a crash, hang or error
   there means "no usable GPU", never a failed run.
2. **plan_shards** validates the conf, checks the model in a fresh process and
   cuts each dataset into stable shards (`ravdess-0003` always holds the same files).
   Each dataset's plan is written into its output as `_plans/<sha256>.json`;
   only small references to it travel between tasks. When the shards would
   outnumber `[core] max_map_length`, the shard size is raised to fit (logged,
   and shown on the progress page).
3. **extract_shard** (one per shard, named e.g. `ravdess 3/6` in the grid) runs
   each shard in fresh worker processes: on the GPU when the probe found one
   (or `device=gpu`), re-run on CPU with CUDA hidden if the GPU worker fails.
   Existing valid features are skipped, every file is written atomically.
   With CeleryExecutor, **route_gpu_shards** first sends every shard to
   `extract_shard_gpu` (the GPU queue and pool, `CNN_FEATURES_GPU_QUEUE` /
   `CNN_FEATURES_GPU_POOL`) when a live worker serves the GPU queue and the
   run's `device` is not `cpu`;
   **route_cpu_shards** leaves the rest to `extract_shard` (default queue).
   Each result names the worker and queue that ran it.
4. **verify_features** checks every feature and its lineage (this model made
   it from its input's current bytes) and writes
   `verification_report.json` and `manifest.json` into each output folder, and
   two plots (PCA of the features by emotion, throughput per shard) that the
   *CNN feature progress* page links.
5. **trigger_training** starts `emotion_training` on the verified manifests.

**Re-running failed shards:** fix the cause, open the failed `extract_shard`
instance (e.g. `ravdess 2/2`) from the grid, press *Clear* (Shift+C), keep
*Downstream* selected and confirm. Only that shard re-runs, skipping the
features it already wrote; verification and training follow.

**S3:** any `input` or `output` may be an `s3://bucket/prefix` URI, in any
mix with local folders. Keys come from the Airflow connection named by
`aws_conn_id` (endpoint URL in its extra, as the Amazon provider keeps it), or
boto3's default chain (environment, instance profile) when it is not defined;
workers get them through their environment only.

No TensorFlow is imported here or in any Airflow task process: CUDA state does
not survive the `fork()` the task supervisor uses to start tasks.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, Connection, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from cnn_features.config import load_settings
from cnn_features.datasets import conf_schema

log = logging.getLogger(__name__)
SETTINGS = load_settings()
FEATURES_ASSET = Asset(name="cnn_features", uri=SETTINGS.features_root.as_uri())


def celery_live_queues() -> dict[str, list[str]]:
    """Return each live Celery worker (``name@host``) with the queues it consumes, asking Airflow's Celery app.

    Raises:
        ConnectionError: the broker could not be reached.
    """
    from airflow.providers.celery.executors.celery_executor_utils import app
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    try:
        answers = app.control.inspect(timeout=5.0).active_queues() or {}
    except (OperationalError, RedisError) as exc:
        msg = f"Celery broker: {exc}"
        raise ConnectionError(msg) from exc
    return {worker: [q["name"] for q in queues] for worker, queues in answers.items()}


def worker_identity(hostname: str | None, queue: str) -> dict[str, Any]:
    """Return who ran a task: the host, the Celery worker (``name@host``, None without Celery) and the queue."""
    from celery import current_task

    celery_worker = current_task.request.hostname if current_task else None
    return {"hostname": hostname, "celery_worker": celery_worker, "queue": queue}


def s3_access(params: dict[str, Any]) -> Any:
    """Return the run's S3 settings from its ``aws_conn_id`` connection (boto3's default chain if undefined)."""
    from cnn_features.s3 import resolve_access

    return resolve_access(str(params["aws_conn_id"]), Connection.get, AirflowNotFoundException)


@dag(
    dag_id="cnn_feature_extraction",
    schedule=None,
    catchup=False,
    doc_md=__doc__,
    tags=["features", "cnn", "emotion"],
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "datasets": Param(
            SETTINGS.default_datasets(),
            **conf_schema(),
            title="Datasets",
            description=(
                "Each dataset's spectrogram folder and feature folder: "
                '{"ravdess": {"input": "/abs/path", "output": "s3://bucket/features/ravdess"}, "crema_d": {...}}. '
                "Absolute paths or s3://bucket/prefix URIs, in any mix, under the allowed roots "
                "(CNN_FEATURES_ALLOWED_ROOTS)."
            ),
        ),
        "device": Param(
            "auto",
            enum=["auto", "gpu", "cpu"],
            title="Device",
            description="auto: GPU if the probe found a usable one, else CPU. "
            "gpu: try the GPU even so. cpu: never touch a GPU. A failed GPU shard always re-runs on CPU.",
        ),
        "shard_size": Param(
            SETTINGS.shard_size,
            type="integer",
            minimum=1,
            maximum=100_000,
            title="Shard size",
            description="Files per extract_shard task. The same folder and size always give the same shards. "
            "Raised, and the run says so, when the shards would outnumber Airflow's [core] max_map_length.",
        ),
        "model_path": Param(
            None,
            type=["null", "string"],
            title="Model (.keras)",
            description="Absolute path of your own feature model, loaded in safe mode; empty for the built-in reference CNN.",
        ),
        "aws_conn_id": Param(
            "aws_default",
            type="string",
            minLength=1,
            title="AWS connection",
            description="Airflow connection with the S3 keys (login/password) and, for S3-compatible servers, "
            "endpoint_url in its extra. Used only when a dataset is on S3; when it is not defined, boto3's "
            "default chain applies (environment, instance profile).",
        ),
        "max_bad_fraction": Param(
            0.0,
            type="number",
            minimum=0,
            maximum=1,
            title="Max bad fraction",
            description="Share of unusable input files tolerated per dataset before verification fails. Bad files are always listed.",
        ),
    },
)
def cnn_feature_extraction() -> None:
    @task(retries=0)
    def probe_gpu() -> dict[str, Any]:
        """Probe the GPU in a fresh process; report (in the log and on the progress page), never fail."""
        from cnn_features.probe import run_probe
        from cnn_features.progress import run_folder, write_probe

        report = run_probe(timeout_s=SETTINGS.probe_timeout_s)
        run_id = get_current_context()["run_id"]
        write_probe(run_folder(SETTINGS.progress_root, run_id), report)
        return report

    @task
    def plan_shards() -> list[dict[str, Any]]:
        """Validate the conf, check the model, write each dataset's shard plan into its output; return one reference per shard.

        The plan index (each dataset's output and plan digest) is pushed once
        as XCom ``plans``: the file lists never travel through XCom.
        """
        from airflow.sdk import conf as airflow_conf

        from cnn_features import plan
        from cnn_features.errors import InvalidConf, ModelError, OutputConflict

        from cnn_features.progress import run_folder, write_plan, write_plan_error

        context = get_current_context()
        params = dict(context["params"])
        run_id = context["run_id"]
        access = s3_access(params) if plan.uses_s3(params) else None
        max_shards = airflow_conf.getint("core", "max_map_length", fallback=1024)
        try:
            conf = plan.validate_conf(params, SETTINGS, access=access)
            model = plan.check_model(conf.model_path, SETTINGS)
            run_plan = plan.make_plan(
                conf, model, batch_size=SETTINGS.batch_size, max_shards=max_shards, settings=SETTINGS, access=access
            )
            refs, plans = plan.publish_plan(run_plan.shards, settings=SETTINGS, access=access)
        except (InvalidConf, ModelError, OutputConflict) as exc:
            write_plan_error(run_folder(SETTINGS.progress_root, run_id), run_id, str(exc))
            raise AirflowFailException(str(exc)) from None
        write_plan(run_folder(SETTINGS.progress_root, run_id), run_id, run_plan.shards, note=run_plan.note)
        context["ti"].xcom_push(key="plans", value=plans)  # each dataset's output and plan digest, once per run
        return refs

    @task
    def route_gpu_shards(shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Give every shard to the GPU workers when the run may use a GPU and a live one serves the GPU queue; else none."""
        from cnn_features.routing import choose_route

        device = str(get_current_context()["params"]["device"])
        route = choose_route(device=device, gpu_queue=SETTINGS.gpu_queue, live_queues=celery_live_queues)
        log.info("shards go to %s: %s", "GPU workers" if route.gpu else "CPU workers", route.reason)
        return list(shards) if route.gpu else []

    @task
    def route_cpu_shards(shards: list[dict[str, Any]], gpu_shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Leave the shards the GPU workers do not take to the default queue."""
        from cnn_features.routing import remaining

        return remaining(shards, gpu_shards)

    @task(
        map_index_template="{{ task.op_kwargs['shard']['label'] }}",
        max_active_tis_per_dagrun=SETTINGS.shard_concurrency,
        execution_timeout=timedelta(hours=6),
    )
    def extract_shard(shard: dict[str, Any], plans: dict[str, Any], probe: dict[str, Any]) -> str:
        """Extract one shard in fresh worker processes, GPU first when chosen, CPU on failure; return its id."""
        from cnn_features.errors import PlanMismatch
        from cnn_features.plan import load_shard
        from cnn_features.progress import Tries, run_folder
        from cnn_features.routing import shard_device
        from cnn_features.runner import run_shard
        from cnn_features.s3 import is_s3

        context = get_current_context()
        params = dict(context["params"])
        queue = context["task"].queue
        ti = context["ti"]
        output = plans.get(shard["dataset"], {}).get("output", "")
        access = s3_access(params) if is_s3(output) else None
        try:
            spec = load_shard(shard, plans, settings=SETTINGS, access=access)
        except PlanMismatch as exc:  # a changed plan file stays changed: retrying cannot help
            raise AirflowFailException(str(exc)) from None
        result = run_shard(
            # The run is named in each feature's lineage; the worker in the shard's result.
            {**spec, "run_id": context["run_id"], "worker": worker_identity(ti.hostname, queue)},
            requested_device=shard_device(params["device"], on_gpu_queue=bool(SETTINGS.gpu_queue) and queue == SETTINGS.gpu_queue),
            probe=probe,
            progress_dir=run_folder(SETTINGS.progress_root, context["run_id"]),
            access=access or (s3_access(params) if is_s3(spec["input"]) else None),
            # Which try this is, so a failure with tries left reads "retrying" on the progress page.
            tries=Tries(ti.try_number, ti.max_tries + 1, context["task"].retry_delay.total_seconds()),
        )
        return str(result["shard_id"])  # the whole result lies in the output's _shards/<id>.json

    @task(retries=0, multiple_outputs=True, trigger_rule="none_failed")
    def verify_features(refs: list[dict[str, Any]], plans: dict[str, Any], done: list[str]) -> dict[str, Any]:
        """Check every feature file; write reports, manifests and plots; fail listing every problem."""
        from cnn_features.errors import PlanMismatch, VerificationFailed
        from cnn_features.plots import write_run_plots
        from cnn_features.progress import run_folder
        from cnn_features.progress_report import PLOTS_DIR
        from cnn_features.verify import verify_run

        from cnn_features.plan import load_results, load_shards, uses_s3

        context = get_current_context()
        params = dict(context["params"])
        access = s3_access(params) if uses_s3(params) else None
        fraction = float(params["max_bad_fraction"])
        try:
            shards = load_shards(refs, plans, settings=SETTINGS, access=access)
            results = load_results(shards, done, settings=SETTINGS, access=access)
        except PlanMismatch as exc:
            raise AirflowFailException(str(exc)) from None
        records = run_folder(SETTINGS.progress_root, context["run_id"])
        try:
            summary = verify_run(
                shards,
                results,
                max_bad_fraction=fraction,
                settings=SETTINGS,
                access=access,
                record_dir=records,
                run_id=context["run_id"],
            )
            summary["training_conf"]["aws_conn_id"] = params["aws_conn_id"]
            return summary
        except VerificationFailed as exc:
            raise AirflowFailException(str(exc)) from None
        finally:
            write_run_plots(records / PLOTS_DIR, shards, results, settings=SETTINGS, access=access)

    probe = probe_gpu()
    shards = plan_shards()  # independent of the probe: the two may run side by side
    gpu_shards = route_gpu_shards(shards)
    cpu_done = extract_shard.partial(plans=shards["plans"], probe=probe).expand(shard=route_cpu_shards(shards, gpu_shards))
    # The same task on the GPU queue, GPU shards capped by the GPU pool's slots (one per GPU).
    extract_shard_gpu = extract_shard.override(
        task_id="extract_shard_gpu", queue=SETTINGS.gpu_task_queue, pool=SETTINGS.gpu_task_pool
    )
    gpu_done = extract_shard_gpu.partial(plans=shards["plans"], probe=probe).expand(shard=gpu_shards)
    # One of the two extraction tasks maps no shard and is skipped: verification runs unless one failed.
    verified = verify_features(shards, shards["plans"], cpu_done.concat(gpu_done))
    TriggerDagRunOperator(
        task_id="trigger_training",
        trigger_dag_id="emotion_training",
        trigger_run_id="features__{{ run_id }}",
        conf=verified["training_conf"],
        outlets=[FEATURES_ASSET],
    )


cnn_feature_extraction()
