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
from dataclasses import asdict, dataclass, replace
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
# States a shard can be in, as the page and the terminal show them: "retrying"
# is a failed try with tries left (Airflow will run it again), "failed" one
# with none left.
SHARD_STATES = ("pending", "running", "retrying", "success", "failed")
# How a single try of a shard ended: "interrupted" is a try that stopped
# without a record of its end (its task process was killed or lost).
ATTEMPT_STATES = ("running", "success", "failed", "interrupted")
# Longest failure reason kept per try, in characters: one line on the page.
MAX_REASON_CHARS = 240
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
class Attempt:
    """One try of a shard, from the records between its start and the next try's start."""

    try_number: int | None  # Airflow's try number, where the task recorded it
    state: str  # one of ATTEMPT_STATES
    device: str | None
    fallback_reason: str | None  # why this try's GPU worker gave way to a CPU one
    reason: str | None  # one line: why a failed try failed
    started: float | None  # Unix time of the try's first record
    ended: float | None  # Unix time of its last record
    extracted: int  # files this try extracted


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
    history: tuple[Attempt, ...] = ()  # every try, oldest first
    try_number: int | None = None  # the latest try's number, where recorded
    max_tries: int | None = None  # tries Airflow allows in all (its max_tries + 1), where recorded
    retry_at: float | None = None  # Unix time the next try is due, while retrying


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
    files_per_s: float  # files extracted per second of time some shard was working (busy_s)
    eta_s: float | None
    updated: float | None
    datasets: tuple[DatasetProgress, ...]
    samples: tuple[Sample, ...]
    plots: tuple[Path, ...]
    extracted: int = 0
    skipped: int = 0
    bad: int = 0
    ignored: int = 0
    verification: str = "pending"  # "passed", "failed", "pending" (not verified yet) or "not run" (the run failed first)
    error: str | None = None  # why the run failed, when the plan or verification says
    dag_state: str | None = None  # the Airflow DAG run's state, where Airflow was asked
    probe: dict[str, Any] | None = None  # probe_gpu's report (progress.PROBE_FIELDS), once it has run
    note: str | None = None  # the plan's note: the shard size was raised to fit core.max_map_length
    busy_s: float = 0.0  # seconds in which at least one shard was working (retry waits and queueing not counted)

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


def one_line(text: str, *, limit: int = MAX_REASON_CHARS) -> str:
    """Return the first non-empty line of ``text``; past ``limit`` characters its middle gives way to an ellipsis.

    The start says what failed and the end usually names the file, so both stay.
    """
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if len(line) <= limit:
        return line
    head = (limit - 1) // 2
    return f"{line[:head].rstrip()}…{line[len(line) - (limit - 1 - head):].lstrip()}"


def _optional_int(record: dict[str, Any], key: str) -> int | None:
    value = record.get(key)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _is_start(record: dict[str, Any]) -> bool:
    """Return whether a record opens a try: the runner's first record, before any worker output."""
    return record.get("state") == "running" and "extracted" not in record


def attempts_of(records: list[dict[str, Any]]) -> list[Attempt]:
    """Split a shard's records (oldest first) into its tries and say how each ended."""
    groups: list[list[dict[str, Any]]] = []
    for record in records:
        if _is_start(record) or not groups:
            groups.append([])
        groups[-1].append(record)
    tries: list[Attempt] = []
    for index, group in enumerate(groups):
        last = group[-1]
        state = str(last.get("state", "running"))
        if state not in ("success", "failed"):
            # A later try started without this one recording its end: it was killed or lost.
            state = "interrupted" if index < len(groups) - 1 else "running"
        stamps = [_float(r, "ts") for r in group if _float(r, "ts") > 0]
        device = last.get("device") or next((r.get("device") for r in reversed(group) if r.get("device")), None)
        fallback = next((r.get("fallback_reason") for r in reversed(group) if r.get("fallback_reason")), None)
        tries.append(
            Attempt(
                try_number=next((n for r in group if (n := _optional_int(r, "try_number")) is not None), None),
                state=state,
                device=str(device) if device else None,
                fallback_reason=str(fallback) if fallback else None,
                reason=one_line(str(last["error"])) if state == "failed" and last.get("error") else None,
                started=min(stamps) if stamps else None,
                ended=max(stamps) if stamps else None,
                extracted=max((_int(r, "extracted") for r in group), default=0),
            )
        )
    return tries


def shard_progress(entry: dict[str, Any], records: list[dict[str, Any]]) -> ShardProgress:
    """Return one shard's standing from its plan entry and its records (oldest first).

    The last record gives the state. Each attempt (a task try, or a cleared
    shard run again) starts with a record the runner writes before any worker
    output, the only ``running`` record without ``extracted``. A failed try
    whose records say Airflow has tries left is ``retrying``, not ``failed``.
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
    history = attempts_of(records)
    attempts = sum(1 for r in records if _is_start(r))
    try_number, max_tries = _optional_int(last, "try_number"), _optional_int(last, "max_tries")
    retry_at: float | None = None
    if state == "failed" and try_number is not None and max_tries is not None and try_number < max_tries:
        state = "retrying"
        retry_at = _float(last, "ts") + _float(last, "retry_delay_s")
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
        error=str(last["error"]) if state in ("failed", "retrying") and last.get("error") else None,
        attempts=attempts,
        updated=_float(last, "ts") or None,
        history=tuple(history),
        try_number=try_number,
        max_tries=max_tries,
        retry_at=retry_at,
    )


def busy_seconds(shards: list[ShardProgress]) -> float:
    """Return the seconds in which at least one shard was working: the union of every try's first-to-last record span."""
    spans = sorted(
        (a.started, a.ended) for s in shards for a in s.history if a.started is not None and a.ended is not None
    )
    busy, reach = 0.0, float("-inf")
    for start, end in spans:
        if end <= reach:
            continue
        busy += end - max(start, reach)
        reach = end
    return busy


def combined_state(states: list[str]) -> str:
    """Return the state of a group of shards: running while any is running or some, not all, are pending.

    Once none runs or waits to start, a group with a shard waiting for its
    next try is ``retrying``; one whose failed shard has no try left is ``failed``.
    """
    kinds = set(states)
    if not kinds or kinds == {"pending"}:
        return "pending"
    if "running" in kinds or "pending" in kinds:
        return "running"
    if "retrying" in kinds:
        return "retrying"
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

    The run's rate is the files extracted (not skipped) by every try per
    second in which at least one shard was working (``busy_seconds``: from a
    try's first record to its last, shard start-up included; retry waits and
    time spent queued are not). The state comes from the shards,
    verification's record and, where the caller asked Airflow, ``dag_state``
    (``run_state``): once Airflow says the run failed, no shard is retrying.

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
    if dag_state == "failed":  # Airflow gave up on the run: no try is coming
        shards = [replace(s, state="failed", retry_at=None) if s.state == "retrying" else s for s in shards]
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
    if verification == "pending" and state == "failed":
        verification = "not run"  # the run failed before verify_features could say
    busy = busy_seconds(shards)
    worked = sum(a.extracted for s in shards for a in s.history)
    rate = worked / busy if busy > 0 else 0.0
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
        busy_s=round(busy, 3),
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


def state_text(shard: ShardProgress, *, now: float) -> str:
    """Return a shard's state in words: ``retrying (try 2 of 3, next in 30s)`` while Airflow has tries left."""
    if shard.state != "retrying":
        return shard.state
    upcoming = (shard.try_number or 0) + 1
    due = "due now" if shard.retry_at is None or shard.retry_at <= now else f"next in {format_duration(shard.retry_at - now)}"
    return f"retrying (try {upcoming} of {shard.max_tries}, {due})"


def _try_words(tries: list[tuple[int, Attempt]]) -> str:
    """Return `` on try 4`` or `` on tries 1-3`` for tries given with their place in the shard's history (1-based)."""
    numbers = [a.try_number if a.try_number is not None else place for place, a in tries]
    if not numbers:
        return ""
    if len(numbers) == 1:
        return f" on try {numbers[0]}"
    return f" on tries {numbers[0]}-{numbers[-1]}" if numbers == list(range(numbers[0], numbers[-1] + 1)) else ""


def history_text(shard: ShardProgress) -> str:
    """Return every try of a shard in one line, e.g. ``failed ×3: cannot write …; succeeded on try 4``.

    Consecutive tries that ended the same way for the same reason are counted
    together; a try whose GPU worker gave way to a CPU one says so. Empty for
    a shard with one try and no fallback: its state says it all.
    """
    history = list(shard.history)
    if len(history) <= 1 and not any(a.fallback_reason for a in history):
        return ""
    groups: list[list[tuple[int, Attempt]]] = []
    for place, attempt in enumerate(history, start=1):
        key = (attempt.state, attempt.reason, attempt.fallback_reason)
        held = groups[-1][0][1] if groups else None
        if held is not None and (held.state, held.reason, held.fallback_reason) == key:
            groups[-1].append((place, attempt))
        else:
            groups.append([(place, attempt)])
    parts = []
    for group in groups:
        first, count = group[0][1], len(group)
        times = f" ×{count}" if count > 1 else ""
        if first.state == "failed":
            text = f"failed{times}{_try_words(group) if count == 1 else ''}: {first.reason or 'no reason recorded'}"
        elif first.state == "interrupted":
            text = f"stopped without a result{times} (its task was killed or lost)"
        elif first.state == "success":
            text = f"succeeded{_try_words(group)}"
        else:
            text = f"running{_try_words(group)}"
        if first.fallback_reason:
            text += f" (re-run on CPU: {one_line(first.fallback_reason)})"
        parts.append(text)
    return "; ".join(parts)


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
        f"{run.files_per_s:.1f} files/s extracted while shards worked ({format_duration(run.busy_s)}; "
        f"retry waits and queueing not counted), ETA {format_duration(run.eta_s)}",
    ]
    if run.updated is not None:
        lines[0] += f", last record {format_duration(now - run.updated)} ago"
    lines.append(f"verification: {run.verification}" + (f"; DAG run: {run.dag_state}" if run.dag_state else ""))
    if run.error:
        lines.append(f"error: {run.error}")
    lines.append(gpu_text(run.probe))
    if run.probe and run.probe.get("fix"):
        lines.append(f"GPU fix: {run.probe['fix']}")
    header = f"  {'shard':<16} {'state':<10} {'files':>11} {'skipped':>8} {'bad':>5} {'files/s':>8} {'ETA':>7}  device"
    for dataset in run.datasets:
        lines.append(
            f"{dataset.name}: {dataset.state}, {dataset.done}/{dataset.total} files "
            f"({dataset.skipped} skipped, {dataset.bad} bad, {dataset.ignored} ignored)"
        )
        lines.append(header)
        for shard in dataset.shards:
            state = state_text(shard, now=now)
            if state == "running" and shard.updated is not None and now - shard.updated > QUIET_AFTER_S:
                state = "quiet"
            lines.append(
                f"  {shard.label:<16} {state:<10} {f'{shard.done}/{shard.total}':>11} {shard.skipped:>8} {shard.bad:>5} "
                f"{rate_text(shard):>8} {format_duration(shard.eta_s):>7}  {device_text(shard)}"
            )
            if shard.error:
                lines.append(f"    {'last error' if shard.state == 'retrying' else 'error'}: {shard.error}")
            if history := history_text(shard):
                lines.append(f"    tries: {history}")
    for plot in run.plots:
        lines.append(f"plot: {plot}")
    return "\n".join(lines)
