"""Run both DAGs end to end on the demo corpus with `airflow dags test`.

Generates the demo corpus, runs `cnn_feature_extraction`, then runs the
`emotion_training` run it triggered (with that run's conf), and prints where
the features, verification reports and training metrics are. Expects the
environment of scripts/airflow-env.sh (scripts/demo.sh sets it up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


def triggered_run(env: dict[str, str] | None = None) -> tuple[str, dict]:
    """Return run id and conf of the newest emotion_training run that trigger_training created."""
    code = (
        "import json\n"
        "from airflow.models.dagrun import DagRun\n"
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    dr = (s.query(DagRun).filter(DagRun.dag_id == 'emotion_training', DagRun.run_id.like('features\\_\\_%', escape='\\\\'))\n"
        "          .order_by(DagRun.id.desc()).first())\n"
        "    print('RUN ' + json.dumps([dr.run_id, dr.conf]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    line = next(line for line in reversed(out.stdout.splitlines()) if line.startswith("RUN "))
    run_id, conf = json.loads(line[4:])
    return run_id, conf


def main() -> int:
    """Run the demo; exit non-zero with the log's tail if a step fails."""
    try:
        return run_demo()
    except AirflowFailed as exc:
        print(exc, file=sys.stderr)
        return 1


def run_demo() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full-size corpus (1,440 + 7,442 files)")
    parser.add_argument("--shard-size", type=int, default=None, help="files per shard (default: 120 small, the configured default full)")
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

    # The small corpus is cut finer than the default, so the grid shows several shards.
    shard_size = args.shard_size or (settings.shard_size if args.full else 120)
    conf = {"datasets": settings.default_datasets(), "device": "auto", "shard_size": shard_size}
    print(f"3/4 cnn_feature_extraction (shard_size={shard_size}; log: {log})", flush=True)
    before = time.monotonic()
    airflow("dags", "test", "cnn_feature_extraction", "-c", json.dumps(conf), log=log)
    print(f"    done in {time.monotonic() - before:.0f} s", flush=True)

    run_id, training_conf = triggered_run()
    print(f"4/4 emotion_training with the conf of triggered run {run_id}", flush=True)
    airflow("dags", "test", "emotion_training", "-c", json.dumps(training_conf), log=log)

    print(f"\nAll done in {time.monotonic() - started:.0f} s.\n")
    for name, entry in sorted(training_conf["datasets"].items()):
        features = Path(entry["features"])
        report = json.loads((features / "verification_report.json").read_text())
        metrics = json.loads((features / "training" / "metrics.json").read_text())
        print(f"{name}:")
        print(f"  features:            {features}  ({report['features_ok']} of {report['input_files']} files)")
        print(f"  verification report: {features / 'verification_report.json'}")
        print(f"  manifest:            {entry['manifest']}")
        print(f"  training metrics:    {features / 'training' / 'metrics.json'}")
        print(
            f"  held-out actors {','.join(metrics['test_actors'])}: accuracy {metrics['accuracy']:.3f} "
            f"(balanced {metrics['balanced_accuracy']:.3f}, chance {metrics['chance_accuracy']:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
