"""Progress records: what each shard of a run has done, written as it runs.

Layout, one folder per DAG run under ``$CNN_FEATURES_HOME/progress``, named
``run=<run id>`` with unsafe characters escaped (``folder_name``)::

    progress/<run folder>/plan.json          every shard of the run (id, label, dataset, file count, ignored),
                                             a note when the shard size was raised, or the plan's
                                             error when plan_shards failed; the file lists themselves
                                             lie in each output's _plans/<sha256>.json
    progress/<run folder>/<shard_id>.jsonl   one JSON record per line, appended as the shard runs
    progress/<run folder>/verification.json  verify_features' outcome: passed, counts, problems
    progress/<run folder>/probe.json         probe_gpu's report: usable, device, versions, error, fix

A record carries ``ts`` (Unix seconds), ``shard_id``, ``label``, ``dataset``,
``state`` (``running`` | ``success`` | ``failed``), ``device``, ``fallback_reason``,
``done``, ``total``, ``extracted``, ``skipped``, ``bad``, ``files_per_s`` and
``elapsed_s``; where the Airflow task says, also ``try_number``, ``max_tries``
(tries allowed in all) and ``retry_delay_s``, so a failed try with tries left
reads as retrying. Readers take the last record of a shard as its state and the
sequence as its throughput over time. Records are never parsed out of logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnn_features.storage import write_json_atomic

log = logging.getLogger(__name__)

PLAN_NAME = "plan.json"
VERIFICATION_NAME = "verification.json"
PROBE_NAME = "probe.json"
# The probe report's fields a run's records keep: the device, versions, error
# and fix the page shows. An allowlist, so nothing else a report may grow
# (environment, paths) reaches a file the page serves.
PROBE_FIELDS = (
    "usable", "device_name", "device_count", "memory_total_mb", "driver_found", "driver_version",
    "cuda_version", "cudnn_version", "framework", "framework_version", "error", "fix", "elapsed_s",
)
# Problems kept in the verification record; the reports in the output folders hold all.
MAX_RECORDED_PROBLEMS = 20
# Characters kept as they are in a run folder name; any other (Airflow run ids
# hold ':' and '+') is written as %XX per UTF-8 byte, '%' included.
_KEPT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
# Start of every run folder name: '=' is a character the first layout never
# wrote, so no new name equals an old one, and no name is '.', '..' or hidden.
_PREFIX = "run="
# Longest escaped name kept whole: file systems allow 255 bytes; a longer one
# is cut and given a SHA-256 suffix after '~', a character escaping never leaves.
_MAX_NAME = 200
# What the first layout made of a run id: unsafe characters became '_', so
# 'a:b' and 'a_b' shared a folder and '..' named the progress root's parent.
_LEGACY_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def folder_name(run_id: str) -> str:
    """Return a run id as a folder name: one name per run id, never '.', '..' or hidden.

    ``run=``, then the run id with every byte outside ``[A-Za-z0-9_.-]``
    written as ``%XX``: decoding is unique, so different run ids give
    different names, and none leaves the root. A name over ``_MAX_NAME``
    characters is cut and ends ``~<sha256 of the run id>``.
    """
    escaped = _PREFIX + "".join(
        ch if ch in _KEPT else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")) for ch in run_id
    )
    if len(escaped) > _MAX_NAME:
        digest = hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()
        escaped = f"{escaped[: _MAX_NAME - len(digest) - 1]}~{digest}"
    return escaped


def run_folder(root: Path, run_id: str) -> Path:
    """Return the folder of a run's records under ``root`` (``folder_name``).

    A run recorded under the first layout's name (unsafe characters as '_')
    keeps its folder, but only where that folder's plan names exactly this
    run id: 'a_b' never finds the records of 'a:b', nor '..' the root's parent.
    """
    legacy = _LEGACY_UNSAFE.sub("_", run_id)
    new = root / folder_name(run_id)
    if legacy not in ("", ".", "..") and not (new / PLAN_NAME).exists():
        try:
            recorded = json.loads((root / legacy / PLAN_NAME).read_text(encoding="utf-8")).get("run_id")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded == run_id:
            return root / legacy
    return new


def write_plan(folder: Path, run_id: str, shards: list[dict[str, Any]], *, note: str | None = None) -> None:
    """Record every shard of a run before any of them starts: counts per shard, never file lists.

    ``note`` says why the shard size differs from the one asked for (raised
    to keep within Airflow's core.max_map_length); the page shows it.
    """
    write_json_atomic(
        folder / PLAN_NAME,
        {
            "run_id": run_id,
            "created": time.time(),
            **({"note": note} if note else {}),
            "shards": [
                {
                    "shard_id": s["shard_id"],
                    "label": s["label"],
                    "dataset": s["dataset"],
                    "files": len(s["files"]),
                    "ignored": int(s.get("ignored_count", 0)),
                    "output": s["output"],
                }
                for s in shards
            ],
        },
    )


def write_plan_error(folder: Path, run_id: str, error: str) -> None:
    """Record that a run's plan failed, with the error, so the run is listed with it (best-effort)."""
    try:
        write_json_atomic(folder / PLAN_NAME, {"run_id": run_id, "created": time.time(), "shards": [], "error": error})
    except OSError as exc:
        log.warning("cannot record the plan error of run %s under %s: %s", run_id, folder, exc)


def write_verification(folder: Path, *, passed: bool, datasets: dict[str, Any], problems: list[str]) -> None:
    """Record verify_features' outcome for the run's progress (best-effort: a failure is logged)."""
    record = {
        "ts": round(time.time(), 3),
        "passed": passed,
        "datasets": datasets,
        "problem_count": len(problems),
        "problems": problems[:MAX_RECORDED_PROBLEMS],
    }
    try:
        write_json_atomic(folder / VERIFICATION_NAME, record)
    except OSError as exc:
        log.warning("cannot record the verification outcome under %s: %s", folder, exc)


def write_probe(folder: Path, report: dict[str, Any]) -> None:
    """Record probe_gpu's report (``PROBE_FIELDS`` only) for the run's progress (best-effort: a failure is logged)."""
    record = {"ts": round(time.time(), 3), **{k: report.get(k) for k in PROBE_FIELDS}}
    try:
        write_json_atomic(folder / PROBE_NAME, record)
    except OSError as exc:
        log.warning("cannot record the GPU probe's report under %s: %s", folder, exc)


@dataclass(frozen=True)
class Tries:
    """Which Airflow try of a task a shard attempt is, out of how many, and the wait before the next one."""

    try_number: int  # Airflow's try number, from 1
    max_tries: int  # tries allowed in all: Airflow's ``max_tries`` + 1 (it counts retries)
    retry_delay_s: float  # seconds Airflow waits before the next try

    def fields(self) -> dict[str, Any]:
        """Return the record fields that carry these numbers."""
        return {"try_number": self.try_number, "max_tries": self.max_tries, "retry_delay_s": self.retry_delay_s}


class ProgressLog:
    """Appends one shard's records to its ``.jsonl`` file, a whole line at a time.

    Best-effort: records only show progress, so a record that cannot be
    written (full disk, read-only folder) is logged once and the shard goes on.
    With ``tries``, every record names the Airflow try it belongs to.
    """

    def __init__(self, folder: Path, spec: dict[str, Any], *, tries: Tries | None = None) -> None:
        self.path = folder / f"{spec['shard_id']}.jsonl"
        self.failed = False
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._warn(exc)
        self.base = {
            "shard_id": spec["shard_id"],
            "label": spec["label"],
            "dataset": spec["dataset"],
            "total": len(spec["files"]),
            **(tries.fields() if tries is not None else {}),
        }

    def write(self, **fields: Any) -> None:
        """Append a record; one ``write`` call per line so readers never see half of one."""
        record = {"ts": round(time.time(), 3), **self.base, **fields}
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as exc:
            self._warn(exc)

    def _warn(self, exc: OSError) -> None:
        """Log the first failure to write a record; later ones are silent."""
        if not self.failed:
            self.failed = True
            log.warning("progress records %s cannot be written (%s); the shard goes on without them", self.path, exc)
