"""Progress records: what each shard of a run has done, written as it runs.

Layout, one folder per DAG run under ``$CNN_FEATURES_HOME/progress``::

    progress/<run folder>/plan.json          every shard of the run (id, label, dataset, files)
    progress/<run folder>/<shard_id>.jsonl   one JSON record per line, appended as the shard runs

A record carries ``ts`` (Unix seconds), ``shard_id``, ``label``, ``dataset``,
``state`` (``running`` | ``success`` | ``failed``), ``device``, ``fallback_reason``,
``done``, ``total``, ``extracted``, ``skipped``, ``bad``, ``files_per_s`` and
``elapsed_s``. Readers take the last record of a shard as its state and the
sequence as its throughput over time. Records are never parsed out of logs.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from cnn_features.storage import write_json_atomic

PLAN_NAME = "plan.json"
# Characters kept in a run folder name; Airflow run ids hold ':' and '+'.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def run_folder(root: Path, run_id: str) -> Path:
    """Return the folder of a run's records (the run id made safe as a file name)."""
    return root / _UNSAFE.sub("_", run_id)


def write_plan(folder: Path, run_id: str, shards: list[dict[str, Any]]) -> None:
    """Record every shard of a run before any of them starts."""
    write_json_atomic(
        folder / PLAN_NAME,
        {
            "run_id": run_id,
            "created": time.time(),
            "shards": [
                {
                    "shard_id": s["shard_id"],
                    "label": s["label"],
                    "dataset": s["dataset"],
                    "files": len(s["files"]),
                    "output": s["output"],
                }
                for s in shards
            ],
        },
    )


class ProgressLog:
    """Appends one shard's records to its ``.jsonl`` file, a whole line at a time."""

    def __init__(self, folder: Path, spec: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{spec['shard_id']}.jsonl"
        self.base = {
            "shard_id": spec["shard_id"],
            "label": spec["label"],
            "dataset": spec["dataset"],
            "total": len(spec["files"]),
        }

    def write(self, **fields: Any) -> None:
        """Append a record; one ``write`` call per line so readers never see half of one."""
        record = {"ts": round(time.time(), 3), **self.base, **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
