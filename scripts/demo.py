"""Run both DAGs end to end on the demo corpus with `airflow dags test`.

Generates the demo corpus, runs `cnn_feature_extraction`, then runs the
`emotion_training` run it triggered (with that run's conf), and prints where
the features, verification reports and training metrics are. Expects the
environment of scripts/airflow-env.sh (scripts/demo.sh sets it up).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cnn_features.config import load_settings
from cnn_features.demo import generate


class AirflowFailed(RuntimeError):
    """An airflow CLI command exited non-zero."""


def airflow(*args: str, log: Path, env: dict[str, str] | None = None) -> None:
    """Run an airflow command, its output appended to ``log``.

    Raises:
        AirflowFailed: the command failed; the message holds the log's tail.
    """
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ airflow {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.run(["airflow", *args], stdout=fh, stderr=subprocess.STDOUT, check=False, env=env)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-60:]
        msg = f"airflow {' '.join(args[:3])} failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail)
        raise AirflowFailed(msg)


def triggered_run(env: dict[str, str] | None = None, *, take: bool = False) -> tuple[str, dict]:
    """Return run id and conf of the newest emotion_training run that trigger_training created.

    With ``take``, that run is also removed from the metadata DB while it is
    still queued: ``airflow dags test`` runs its conf as a run of its own,
    and a scheduler started later would otherwise run it a second time.
    """
    code = (
        "import json\n"
        "from airflow.models.dagrun import DagRun\n"
        "from airflow.utils.session import create_session\n"
        "from airflow.utils.state import DagRunState\n"
        "with create_session() as s:\n"
        "    dr = (s.query(DagRun).filter(DagRun.dag_id == 'emotion_training', DagRun.run_id.like('features\\_\\_%', escape='\\\\'))\n"
        "          .order_by(DagRun.id.desc()).first())\n"
        "    print('RUN ' + json.dumps([dr.run_id, dr.conf]))\n"
        f"    if {take!r} and dr.state == DagRunState.QUEUED:\n"
        "        s.delete(dr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    line = next(line for line in reversed(out.stdout.splitlines()) if line.startswith("RUN "))
    run_id, conf = json.loads(line[4:])
    return run_id, conf


# Bucket of the S3 demo: the corpus under corpus/<dataset>, features under features/<dataset>.
S3_DEMO_BUCKET = "cnn-demo"


@contextlib.contextmanager
def s3_demo(home: Path, corpus: Path, datasets: list[str]) -> Iterator[tuple[dict[str, dict[str, str]], Any]]:
    """Start the local S3 server, upload the corpus, point Airflow at it; yield the run's datasets and a client."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from s3_local import S3Server

    with S3Server(home / "s3") as server:
        server.create_bucket(S3_DEMO_BUCKET)
        client = server.client()
        uploaded = 0
        for name in datasets:
            for path in sorted((corpus / name).rglob("*.npy")):
                key = f"corpus/{name}/{path.relative_to(corpus / name).as_posix()}"
                client.put_object(Bucket=S3_DEMO_BUCKET, Key=key, Body=path.read_bytes())
                uploaded += 1
        print(f"    S3 server on {server.endpoint_url}; {uploaded} spectrograms uploaded to s3://{S3_DEMO_BUCKET}/corpus/", flush=True)
        os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = server.airflow_connection_json()
        roots = os.environ.get("CNN_FEATURES_ALLOWED_ROOTS") or str(load_settings().home)
        os.environ["CNN_FEATURES_ALLOWED_ROOTS"] = f"{roots}:s3://{S3_DEMO_BUCKET}"
        yield (
            {
                name: {"input": f"s3://{S3_DEMO_BUCKET}/corpus/{name}", "output": f"s3://{S3_DEMO_BUCKET}/features/{name}"}
                for name in datasets
            },
            client,
        )


def read_text(location: str, client: Any) -> str:
    """Return the text of a local file or an S3 object of the demo bucket."""
    if location.startswith("s3://"):
        bucket, _, key = location[len("s3://") :].partition("/")
        return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    return Path(location).read_text(encoding="utf-8")


def main() -> int:
    """Run the demo; exit non-zero with the log's tail if a step fails."""
    try:
        return run_demo()
    except AirflowFailed as exc:
        print(exc, file=sys.stderr)
        return 1


def run_pipeline(args: argparse.Namespace, settings: Any, datasets: dict[str, dict[str, str]], log: Path, client: Any) -> None:
    """Run extraction, then the training run it triggered; print where every result is."""
    # The small corpus is cut finer than the default, so the grid shows several shards.
    shard_size = args.shard_size or (settings.shard_size if args.full else 120)
    conf = {"datasets": datasets, "device": "auto", "shard_size": shard_size}
    print(f"3/4 cnn_feature_extraction (shard_size={shard_size}; log: {log})", flush=True)
    before = time.monotonic()
    airflow("dags", "test", "cnn_feature_extraction", "-c", json.dumps(conf), log=log)
    print(f"    done in {time.monotonic() - before:.0f} s", flush=True)

    run_id, training_conf = triggered_run(take=True)
    print(f"4/4 emotion_training with the conf of triggered run {run_id}", flush=True)
    airflow("dags", "test", "emotion_training", "-c", json.dumps(training_conf), log=log)

    for name, entry in sorted(training_conf["datasets"].items()):
        features = entry["features"]
        report = json.loads(read_text(f"{features}/verification_report.json", client))
        metrics = json.loads(read_text(f"{features}/training/metrics.json", client))
        print(f"{name}:")
        print(f"  features:            {features}  ({report['features_ok']} of {report['input_files']} files)")
        print(f"  verification report: {features}/verification_report.json")
        print(f"  manifest:            {entry['manifest']}")
        print(f"  training metrics:    {features}/training/metrics.json")
        print(
            f"  held-out actors {','.join(metrics['test_actors'])}: accuracy {metrics['accuracy']:.3f} "
            f"(balanced {metrics['balanced_accuracy']:.3f}, chance {metrics['chance_accuracy']:.3f})"
        )


def run_demo() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full-size corpus (1,440 + 7,442 files)")
    parser.add_argument("--shard-size", type=int, default=None, help="files per shard (default: 120 small, the configured default full)")
    parser.add_argument("--s3", action="store_true", help="corpus and features on a local S3 server (SeaweedFS on loopback)")
    args = parser.parse_args()
    settings = load_settings()
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    log = home / "demo.log"
    log.write_text("", encoding="utf-8")
    started = time.monotonic()

    print(f"1/4 demo corpus under {settings.demo_input_root}", flush=True)
    counts = generate(settings.demo_input_root, full=args.full)
    print(f"    {counts}", flush=True)
    print(f"2/4 Airflow metadata DB (SQLite) in {home}", flush=True)
    airflow("db", "migrate", log=log)

    with contextlib.ExitStack() as stack:
        datasets: dict[str, dict[str, str]] = settings.default_datasets()
        client = None
        if args.s3:
            print(f"    S3 (SeaweedFS on 127.0.0.1, data and keys in {settings.home / 's3'})", flush=True)
            datasets, client = stack.enter_context(s3_demo(settings.home, settings.demo_input_root, sorted(counts)))
        run_pipeline(args, settings, datasets, log, client)
        print(f"\nAll done in {time.monotonic() - started:.0f} s.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
