"""Read progress records back: per run, each dataset and shard, done / total, device, rate, ETA.

The read side of ``progress``: the Airflow progress page (``plugins/``) and the
terminal command ``python -m cnn_features progress`` both build on
:func:`load_run`. Records are read from the files the shards append to, never
from logs. A record file may be appended to while it is read, so a line that
does not parse (half written, or a torn write) is skipped, not fatal.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cnn_features.errors import CnnFeaturesError
from cnn_features.progress import PLAN_NAME, PROBE_NAME, VERIFICATION_NAME, run_folder

log = logging.getLogger(__name__)

# Folder inside a run's progress folder where verification writes its plots.
PLOTS_DIR = "plots"
# Plot files verification writes, in the order the page shows them.
PLOT_NAMES = ("pca.png", "throughput.png")
# Seconds without a new record after which a running shard is shown as quiet:
# a worker reports every 2 s, so this is many missed reports, not a slow batch.
QUIET_AFTER_S = 60.0
# States a shard can be in, as the page and the terminal show them.
SHARD_STATES = ("pending", "running", "success", "failed")
# A run's states: its shards' ones, and "verifying" once every shard is done but
# verification has not said yet. A run is "success" only once verification passed.
RUN_STATES = (*SHARD_STATES, "verifying")
# Run states that no longer change.
FINAL_STATES = ("success", "failed")


class ProgressNotFound(CnnFeaturesError):
    """No progress records exist for the run asked for."""


@dataclass(frozen=True)
class Sample:
    """One point of the throughput chart: a shard's rate at a moment of the run."""

    t: float  # seconds since the run's first record
    shard_id: str
    dataset: str
    done: int
    files_per_s: float


@dataclass(frozen=True)
class ShardProgress:
    """Where one shard stands, from its last record."""

    shard_id: str
    label: str
    dataset: str
    total: int
    done: int
    state: str
    device: str | None
    fallback_reason: str | None
    files_per_s: float
    extracted: int
    skipped: int
    bad: int
    eta_s: float | None
    error: str | None
    attempts: int
    updated: float | None  # Unix time of the last record


@dataclass(frozen=True)
class DatasetProgress:
    """One dataset of a run: its shards and their sums."""

    name: str
    total: int
    done: int
    state: str
    shards: tuple[ShardProgress, ...]
    extracted: int = 0
    skipped: int = 0
    bad: int = 0
    ignored: int = 0


@dataclass(frozen=True)
class RunProgress:
    """Everything the progress page and the terminal show for one DAG run."""

    run_id: str
    folder: Path
    created: float
    state: str
    total: int
    done: int
    files_per_s: float
    eta_s: float | None
    updated: float | None
    datasets: tuple[DatasetProgress, ...]
    samples: tuple[Sample, ...]
    plots: tuple[Path, ...]
    extracted: int = 0
    skipped: int = 0
    bad: int = 0
    ignored: int = 0
    verification: str = "pending"  # "passed", "failed", or "pending" (not verified yet)
    error: str | None = None  # why the run failed, when the plan or verification says
    dag_state: str | None = None  # the Airflow DAG run's state, where Airflow was asked
    probe: dict[str, Any] | None = None  # probe_gpu's report (progress.PROBE_FIELDS), once it has run
    note: str | None = None  # the plan's note: the shard size was raised to fit core.max_map_length

    @property
    def shards(self) -> tuple[ShardProgress, ...]:
        """Return every shard of the run, dataset by dataset."""
        return tuple(shard for dataset in self.datasets for shard in dataset.shards)


@dataclass(frozen=True)
class RunSummary:
    """A run that has progress records, for the list of runs."""

    run_id: str
    folder: Path
    created: float
    shards: int
    files: int
    state: str = "pending"
    error: str | None = None


def read_records(path: Path) -> list[dict[str, Any]]:
    """Return the records of one shard file in order, skipping lines that do not parse."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.debug("%s:%d: skipping a line that is not whole JSON (being written?)", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _int(record: dict[str, Any], key: str) -> int:
    value = record.get(key)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _float(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return 0.0


def shard_progress(entry: dict[str, Any], records: list[dict[str, Any]]) -> ShardProgress:
    """Return one shard's standing from its plan entry and its records (oldest first).

    The last record gives the state. Each attempt (a task try, or a cleared
    shard run again) starts with a record the runner writes before any worker
    output, the only ``running`` record without ``extracted``.
    """
    total = int(entry["files"])
    base = {"shard_id": entry["shard_id"], "label": entry["label"], "dataset": entry["dataset"], "total": total}
    if not records:
        return ShardProgress(
            **base, done=0, state="pending", device=None, fallback_reason=None, files_per_s=0.0,
            extracted=0, skipped=0, bad=0, eta_s=None, error=None, attempts=0, updated=None,
        )
    last = records[-1]
    state = str(last.get("state", "running"))
    if state not in SHARD_STATES:
        state = "running"
    attempts = sum(1 for r in records if r.get("state") == "running" and "extracted" not in r)
    # A failure record carries no counts: take them from the last record that has them.
    counted = next((r for r in reversed(records) if "done" in r), last)
    done = min(_int(counted, "done"), total)
    rate = _float(counted, "files_per_s")
    if state == "success":
        done = total
    eta: float | None = None
    if state == "running" and rate > 0:
        eta = (total - done) / rate
    elif state == "success":
        eta = 0.0
    device = last.get("device") or counted.get("device")
    return ShardProgress(
        **base,
        done=done,
        state=state,
        device=str(device) if device else None,
        fallback_reason=last.get("fallback_reason") or None,
        files_per_s=rate,
        extracted=_int(counted, "extracted"),
        skipped=_int(counted, "skipped"),
        bad=_int(counted, "bad"),
        eta_s=eta,
        error=str(last["error"]) if state == "failed" and last.get("error") else None,
        attempts=attempts,
        updated=_float(last, "ts") or None,
    )


def combined_state(states: list[str]) -> str:
    """Return the state of a group of shards: running while any is running or some, not all, are pending."""
    kinds = set(states)
    if not kinds or kinds == {"pending"}:
        return "pending"
    if "running" in kinds or "pending" in kinds:
        return "running"
    if "failed" in kinds:
        return "failed"
    return "success"


def run_state(shards_state: str, verification: str, *, dag_state: str | None = None, error: str | None = None) -> str:
    """Return a run's state: failed if its plan, a shard, verification or the DAG run failed; success only once verified."""
    if error or dag_state == "failed" or shards_state == "failed" or verification == "failed":
        return "failed"
    if shards_state == "success":
        return "success" if verification == "passed" or dag_state == "success" else "verifying"
    return shards_state


def _read_record(path: Path) -> dict[str, Any] | None:
    """Return a JSON object record, or None when it is absent, unreadable (logged) or not an object."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable (%s)", path, exc)
        return None
    return record if isinstance(record, dict) else None


def read_verification(folder: Path) -> dict[str, Any] | None:
    """Return the run's verification record, or None when verification has not recorded one."""
    return _read_record(folder / VERIFICATION_NAME)


def read_probe(folder: Path) -> dict[str, Any] | None:
    """Return the run's GPU probe report, or None when probe_gpu has not recorded one."""
    return _read_record(folder / PROBE_NAME)


def gpu_text(probe: dict[str, Any] | None) -> str:
    """Return the probe's finding in one line: usable with the device, or not with the error (its fix apart)."""
    if probe is None:
        return "GPU: not probed yet"
    framework = " ".join(str(probe[k]) for k in ("framework", "framework_version") if probe.get(k))
    if probe.get("usable"):
        memory = f", {probe['memory_total_mb']} MiB" if probe.get("memory_total_mb") else ""
        return f"GPU: usable: {probe.get('device_name') or 'unnamed device'}{memory}" + (f" ({framework})" if framework else "")
    error = str(probe.get("error") or "no error given")
    fix = str(probe.get("fix") or "")
    if fix and error.endswith(f". Fix: {fix}"):  # the probe's error quotes its fix; show it once, on its own line
        error = error[: -len(f". Fix: {fix}")]
    return f"GPU: not usable, shards run on CPU: {error}" + (f" ({framework})" if framework else "")


def _samples(records_by_shard: dict[str, list[dict[str, Any]]], datasets: dict[str, str], start: float) -> list[Sample]:
    samples = [
        Sample(
            t=round(_float(r, "ts") - start, 3),
            shard_id=shard_id,
            dataset=datasets[shard_id],
            done=_int(r, "done"),
            files_per_s=_float(r, "files_per_s"),
        )
        for shard_id, records in records_by_shard.items()
        for r in records
        if "extracted" in r and _float(r, "ts") > 0
    ]
    return sorted(samples, key=lambda s: (s.t, s.shard_id))


def load_run(folder: Path, *, dag_state: str | None = None) -> RunProgress:
    """Read one run's plan, records and verification outcome into a ``RunProgress``.

    The run's rate is the files extracted (not skipped) per second of wall
    time between its first and last record (shard start-up included), so the
    ETA it gives for the files left counts the start-up of the shards still
    to come. The state comes from the shards, verification's record and,
    where the caller asked Airflow, ``dag_state`` (``run_state``).

    Raises:
        ProgressNotFound: the folder has no readable ``plan.json``.
    """
    try:
        plan = json.loads((folder / PLAN_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        msg = f"{folder}: no progress records (no {PLAN_NAME}); has plan_shards run for this run?"
        raise ProgressNotFound(msg) from None
    except json.JSONDecodeError as exc:
        msg = f"{folder / PLAN_NAME}: unreadable ({exc})"
        raise ProgressNotFound(msg) from None
    entries: list[dict[str, Any]] = list(plan.get("shards", []))
    records = {e["shard_id"]: read_records(folder / f"{e['shard_id']}.jsonl") for e in entries}
    shards = [shard_progress(e, records[e["shard_id"]]) for e in entries]
    ignored_of: dict[str, int] = {}
    for entry in entries:
        ignored_of[entry["dataset"]] = ignored_of.get(entry["dataset"], 0) + _int(entry, "ignored")
    verified = read_verification(folder)
    verified_sets: dict[str, Any] = verified.get("datasets", {}) if verified else {}

    by_dataset: dict[str, list[ShardProgress]] = {}
    for shard in shards:
        by_dataset.setdefault(shard.dataset, []).append(shard)
    datasets = tuple(_dataset(name, group, ignored_of.get(name, 0), verified_sets.get(name)) for name, group in by_dataset.items())
    stamps = [_float(r, "ts") for rs in records.values() for r in rs if _float(r, "ts") > 0]
    first, last = (min(stamps), max(stamps)) if stamps else (None, None)
    total = sum(s.total for s in shards)
    done = sum(s.done for s in shards)
    extracted = sum(s.extracted for s in shards)
    verification = "pending" if verified is None else ("passed" if verified.get("passed") is True else "failed")
    error = str(plan["error"]) if plan.get("error") else None
    if error is None and verification == "failed":
        problems = [str(p) for p in verified.get("problems", [])] if verified else []
        error = f"verification failed with {_int(verified or {}, 'problem_count')} problem(s)"
        error += f", e.g. {problems[0]}" if problems else ""
    state = run_state(combined_state([s.state for s in shards]), verification, dag_state=dag_state, error=error)
    rate = extracted / (last - first) if first is not None and last is not None and last > first else 0.0
    eta: float | None = None
    if state == "success":
        eta = 0.0
    elif state == "running" and rate > 0:
        eta = (total - done) / rate
    plots_dir = folder / PLOTS_DIR
    return RunProgress(
        run_id=str(plan.get("run_id", folder.name)),
        folder=folder,
        created=_float(plan, "created"),
        state=state,
        total=total,
        done=done,
        files_per_s=round(rate, 3),
        eta_s=eta,
        updated=last,
        datasets=datasets,
        samples=tuple(_samples(records, {s.shard_id: s.dataset for s in shards}, first or 0.0)),
        plots=tuple(plots_dir / name for name in PLOT_NAMES if (plots_dir / name).is_file()),
        extracted=extracted,
        skipped=sum(d.skipped for d in datasets),
        bad=sum(d.bad for d in datasets),
        ignored=sum(ignored_of.values()),
        verification=verification,
        error=error,
        dag_state=dag_state,
        probe=read_probe(folder),
        note=str(plan["note"]) if plan.get("note") else None,
    )


def _dataset(name: str, group: list[ShardProgress], ignored: int, verified: Any) -> DatasetProgress:
    """Sum one dataset's shards; verification's record, when there is one, gives its bad count and can fail it."""
    state = combined_state([s.state for s in group])
    bad = sum(s.bad for s in group)
    if isinstance(verified, dict):
        bad = _int(verified, "bad_inputs") if "bad_inputs" in verified else bad
        if verified.get("passed") is False:
            state = "failed"
    return DatasetProgress(
        name=name,
        total=sum(s.total for s in group),
        done=sum(s.done for s in group),
        state=state,
        shards=tuple(group),
        extracted=sum(s.extracted for s in group),
        skipped=sum(s.skipped for s in group),
        bad=bad,
        ignored=ignored,
    )


def find_run(root: Path, run_id: str | None) -> Path:
    """Return the progress folder of ``run_id``, or of the newest run when None.

    Raises:
        ProgressNotFound: no such run, or no runs at all under ``root``.
    """
    if run_id:
        folder = run_folder(root, run_id)
        if not (folder / PLAN_NAME).is_file():
            msg = f"no progress records for run {run_id!r} under {root}"
            raise ProgressNotFound(msg)
        return folder
    runs = list_runs(root)
    if not runs:
        msg = f"no progress records under {root}; trigger cnn_feature_extraction first"
        raise ProgressNotFound(msg)
    return runs[0].folder


def list_runs(root: Path, *, dag_runs: dict[str, tuple[str, float]] | None = None) -> list[RunSummary]:
    """Return every run under ``root`` with its state (and error), newest first.

    ``dag_runs`` maps the DAG's run ids to (state, created Unix time), where
    Airflow was asked: their states count (``run_state``), and a run with no
    records at all (it failed before its plan was recorded) is listed too.
    """
    runs: list[RunSummary] = []
    known = dag_runs or {}
    if root.is_dir():
        for plan_path in root.glob(f"*/{PLAN_NAME}"):
            try:
                plan = json.loads(plan_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                log.warning("%s: skipped, unreadable (%s)", plan_path, exc)
                continue
            run_id = str(plan.get("run_id", plan_path.parent.name))
            try:
                progress = load_run(plan_path.parent, dag_state=known.get(run_id, (None, 0.0))[0])
            except ProgressNotFound as exc:
                state, error = "failed", str(exc)
            else:
                state, error = progress.state, progress.error
            shards = plan.get("shards", [])
            runs.append(
                RunSummary(
                    run_id=run_id,
                    folder=plan_path.parent,
                    created=_float(plan, "created"),
                    shards=len(shards),
                    files=sum(int(s.get("files", 0)) for s in shards),
                    state=state,
                    error=error,
                )
            )
    seen = {r.run_id for r in runs}
    for run_id, (dag_state, created) in known.items():
        if run_id not in seen:
            error = "no plan recorded: the run failed before plan_shards recorded one (see its log)" if dag_state == "failed" else None
            runs.append(RunSummary(run_id, run_folder(root, run_id), created, 0, 0, state=dag_state, error=error))
    return sorted(runs, key=lambda r: (r.created, r.run_id), reverse=True)


def to_dict(run: RunProgress) -> dict[str, Any]:
    """Return a run's progress as JSON-ready data (paths as strings)."""
    data = asdict(run)
    data["folder"] = str(run.folder)
    data["plots"] = [p.name for p in run.plots]
    return data


def format_duration(seconds: float | None) -> str:
    """Return ``1h02m``, ``3m05s`` or ``42s``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def device_text(shard: ShardProgress) -> str:
    """Return the device a shard runs on, with the reason when it fell back to CPU."""
    if not shard.device:
        return "-"
    text = shard.device.upper()
    if shard.fallback_reason:
        text += f" (fallback: {shard.fallback_reason})"
    return text


def rate_text(shard: ShardProgress) -> str:
    """Return a shard's files/s over the files it extracted; ``-`` for a finished shard that extracted none (all skipped)."""
    if shard.extracted == 0 and shard.state in FINAL_STATES:
        return "-"
    return f"{shard.files_per_s:.1f}"


def format_run(run: RunProgress, *, now: float | None = None) -> str:
    """Return the run's progress as a plain-text table for a terminal."""
    now = time.time() if now is None else now
    lines = [
        f"run {run.run_id}: {run.state}, {run.done}/{run.total} files "
        f"({run.extracted} extracted, {run.skipped} skipped, {run.bad} bad, {run.ignored} ignored), "
        f"{run.files_per_s:.1f} files/s extracted, ETA {format_duration(run.eta_s)}",
    ]
    if run.updated is not None:
        lines[0] += f", last record {format_duration(now - run.updated)} ago"
    lines.append(f"verification: {run.verification}" + (f"; DAG run: {run.dag_state}" if run.dag_state else ""))
    if run.error:
        lines.append(f"error: {run.error}")
    lines.append(gpu_text(run.probe))
    if run.probe and run.probe.get("fix"):
        lines.append(f"GPU fix: {run.probe['fix']}")
    header = f"  {'shard':<16} {'state':<8} {'files':>11} {'skipped':>8} {'bad':>5} {'files/s':>8} {'ETA':>7}  device"
    for dataset in run.datasets:
        lines.append(
            f"{dataset.name}: {dataset.state}, {dataset.done}/{dataset.total} files "
            f"({dataset.skipped} skipped, {dataset.bad} bad, {dataset.ignored} ignored)"
        )
        lines.append(header)
        for shard in dataset.shards:
            state = shard.state
            if state == "running" and shard.updated is not None and now - shard.updated > QUIET_AFTER_S:
                state = "quiet"
            lines.append(
                f"  {shard.label:<16} {state:<8} {f'{shard.done}/{shard.total}':>11} {shard.skipped:>8} {shard.bad:>5} "
                f"{rate_text(shard):>8} {format_duration(shard.eta_s):>7}  {device_text(shard)}"
            )
            if shard.error:
                lines.append(f"    error: {shard.error}")
    for plot in run.plots:
        lines.append(f"plot: {plot}")
    return "\n".join(lines)
