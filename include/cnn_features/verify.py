"""Verify a run's features against its plan; write a JSON report and a manifest per dataset."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from cnn_features import lineage
from cnn_features.config import Settings
from cnn_features.crosscheck import check_dataset, describe
from cnn_features.datasets import get_dataset, label_all
from cnn_features.errors import InvalidSpectrogram, StoreError, VerificationFailed
from cnn_features.names import MANIFEST_NAME, ORPHANS_DIR, PLANS_DIR, REPORT_NAME, is_own
from cnn_features.plan import plan_digest, plan_file, plan_files
from cnn_features.s3 import S3Access
from cnn_features.storage import MAX_FEATURE_FILE_BYTES, check_feature_bytes
from cnn_features.stores import LocalStore, Store, open_store

log = logging.getLogger(__name__)

# Problems listed in the task's error message; the report holds all of them.
_MAX_LISTED = 50
# A passing verification removes other runs' shard plans older than this: a
# week leaves any shard of a recent run free to be cleared and re-run (it
# reads its plan when it starts); a run cleared after that fails, naming the
# missing plan file, and is triggered again. Every run writes its plan
# afresh, so only a plan no run has written for a week is this old.
PLAN_KEEP_S = 7 * 24 * 3600
# ... and lineage pieces every line of which a whole record holds, once not
# written for this long: a live worker appends to its piece after every pass.
PIECE_IDLE_S = 3600


def _scan_outputs(store: Store) -> tuple[dict[str, int], list[str]]:
    """Return feature files (relative, with sizes) and leftover temporaries under an output.

    Only the pipeline's own top-level folders (``names.OWN_DIRS``) hold no
    features: a corpus folder such as ``_extra/`` holds features like any other.
    """
    features = {rel: size for rel, size in store.list() if rel.endswith(".npy") and not is_own(rel)}
    temps = store.stale_temps() if isinstance(store, LocalStore) else []
    return features, temps


def _check_features(
    store: Store, found: dict[str, int], rels: list[str], feature_dim: int, digests: dict[str, str]
) -> dict[str, str | None]:
    """Return, for each of ``rels`` that exists, why its feature is invalid (None when valid).

    Reads go through the store in order (concurrent GETs on S3); each valid
    feature's SHA-256 goes into ``digests``.
    """
    limit = MAX_FEATURE_FILE_BYTES
    checked: dict[str, str | None] = {}
    for rel, data in store.read_many(((rel, found[rel]) for rel in rels if rel in found), max_bytes=limit):
        if isinstance(data, InvalidSpectrogram):
            checked[rel] = f"unreadable ({data})"
        else:
            checked[rel] = check_feature_bytes(data, feature_dim=feature_dim)[1]
            if checked[rel] is None:
                digests[rel] = lineage.sha256_hex(data)
    return checked


def _check_lineage(
    source: Store, output: Store, digests: dict[str, str], *, model_digest: str
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Return each valid feature's lineage entry, and why the others' lineage does not hold.

    A feature holds when a record line names its SHA-256 with the plan's
    model, and its input still has the digest that line records.
    """
    entries = lineage.load_entries(output)
    wrong: dict[str, str] = {}
    matches: dict[str, dict[str, Any]] = {}
    for rel, digest in digests.items():
        found = entries.get(rel, [])
        match = lineage.matching_entry(found, feature_sha256=digest, model_digest=model_digest)
        if match is not None:
            matches[rel] = match
        elif not found:
            wrong[rel] = "has no lineage record (written by hand, or by a worker that did not record it)"
        elif all(e.get("model_digest") != model_digest for e in found):
            wrong[rel] = f"was made by another model (digest {found[-1].get('model_digest')}, not {model_digest})"
        else:
            wrong[rel] = (
                f"SHA-256 {digest} is not what this model made from its input "
                "(the file changed after it was written, or was swapped with another)"
            )
    kept, _ = lineage.unchanged_inputs(source, matches)
    for rel in sorted(set(matches) - set(kept)):
        wrong[rel] = f"its input changed since the feature was made (the input's SHA-256 was {matches[rel].get('input_sha256')})"
    return kept, wrong


def _move_orphans(store: Store, orphans: list[str]) -> list[str]:
    """Move feature files under ``names.ORPHANS_DIR`` (no input, or a bad one); return where each went."""
    moved: list[str] = []
    for rel in orphans:
        target = f"{ORPHANS_DIR}/{rel}"
        try:
            if isinstance(store, LocalStore):
                (store.root / target).parent.mkdir(parents=True, exist_ok=True)
                os.replace(store.root / rel, store.root / target)
            else:
                store.write(target, store.read(rel, max_bytes=MAX_FEATURE_FILE_BYTES))
                store.delete(rel)
        except (OSError, StoreError) as exc:
            log.warning("cannot move %s aside: %s", store.name(rel), exc)
            moved.append(f"{rel}: could not be moved aside ({exc}); remove it")
            continue
        moved.append(f"{rel}: moved to {store.name(target)}")
    return moved


def remove_leftovers(output: Store, shards: list[dict[str, Any]], *, now: float | None = None) -> list[str]:
    """Remove what killed workers and earlier runs left in a passing dataset's output; return what went.

    Two kinds of file go, and nothing a live or later-retried shard may
    still need: shard plans (``_plans/``) other than this run's, last
    written more than ``PLAN_KEEP_S`` ago, and lineage pieces of killed
    workers every line of which a whole record holds, not written for
    ``PIECE_IDLE_S`` (``lineage.covered_pieces``). When this run's own plan
    files are not all found (the shards were not loaded from a published
    plan), no plan is removed. A file that cannot be removed is logged and kept.
    """
    now = time.time() if now is None else now
    try:
        gone = _old_plans(output, shards, before=now - PLAN_KEEP_S)
        gone += lineage.covered_pieces(output, idle_before=now - PIECE_IDLE_S)
    except (OSError, StoreError) as exc:
        log.warning("%s: leftovers not looked for: %s", output.uri, exc)
        return []
    removed: list[str] = []
    for rel in gone:
        try:
            output.delete(rel)
        except (OSError, StoreError) as exc:
            log.warning("cannot remove leftover %s: %s", output.name(rel), exc)
            continue
        removed.append(rel)
    if removed:
        log.info("%s: removed %d leftover plan file(s) and lineage piece(s), e.g. %s", output.uri, len(removed), removed[0])
    return removed


def _old_plans(output: Store, shards: list[dict[str, Any]], *, before: float) -> list[str]:
    """Return the plan files in ``output`` that are not this run's and were last written before ``before``."""
    listed = output.modified(PLANS_DIR)
    try:
        index, own = plan_files(shards)
    except KeyError:  # not the shards of a published plan: this run's files are unknown
        return []
    current = {plan_file(plan_digest(index)), *(plan_file(plan_digest(data)) for data in own.values())}
    if not current <= {rel for rel, _ in listed}:
        return []
    return [rel for rel, mtime in listed if rel not in current and mtime < before]


def _write_json(store: Store, rel: str, payload: Any) -> None:
    store.write(rel, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def verify_dataset(
    name: str,
    shards: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    *,
    feature_dim: int,
    max_bad_fraction: float,
    settings: Settings | None = None,
    access: S3Access | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Check one dataset's outputs and their lineage; write its report and manifest; return the report.

    Every feature must be valid, and its lineage must say this model made
    it from its input's current bytes. Feature files with no input in the
    plan are moved aside (``ORPHANS_DIR``) and named; so are, without
    failing the dataset, those of inputs that are now bad (unreadable,
    say): the stale vector stays out of the folder read as features. A
    dataset that passes is then tidied (``remove_leftovers``).
    """
    output = open_store(shards[0]["output"], settings, access=access)
    source = open_store(shards[0]["input"], settings, access=access)
    model = shards[0]["model"]
    files = [rel for shard in shards for rel in shard["files"]]
    bad: dict[str, str] = {}
    for shard in shards:
        bad.update(shard["rejected"])
        for item in results.get(shard["shard_id"], {}).get("bad", []):
            bad[item["file"]] = item["reason"]
    labels, _ = label_all(get_dataset(name), files)
    found, temps = _scan_outputs(output)
    digests: dict[str, str] = {}
    checked = _check_features(output, found, [rel for rel in files if rel not in bad], feature_dim, digests)
    entries, wrong = _check_lineage(source, output, digests, model_digest=str(model["digest"]))
    checked.update(wrong)

    missing: list[str] = []
    invalid: list[dict[str, str]] = []
    manifest: list[dict[str, Any]] = []
    for rel in files:
        if rel in bad:
            continue
        reason = checked.get(rel, "missing")
        if reason == "missing":
            missing.append(rel)
        elif reason is not None:
            invalid.append({"file": rel, "reason": f"{rel}: feature file {reason}"})
        else:
            label = labels[rel]
            entry = entries[rel]
            manifest.append(
                {
                    "feature": rel,
                    "clip_id": label.clip_id,
                    "emotion": label.emotion,
                    "actor": label.actor,
                    "sha256": digests[rel],
                    "input_sha256": entry["input_sha256"],
                    "device": entry.get("device"),
                    "keras_backend": entry.get("keras_backend"),
                    "shard_id": entry.get("shard_id"),
                    "run_id": entry.get("run_id"),
                }
            )
    orphans = sorted(set(found) - set(files))
    moved = _move_orphans(output, orphans)
    stale = sorted(rel for rel in found if rel in bad)
    stale_moved = _move_orphans(output, stale)
    ignored = sorted(rel for shard in shards for rel in shard.get("ignored", []))
    ignored_count = sum(int(shard.get("ignored_count", 0)) for shard in shards)
    bad_fraction = len(bad) / len(files) if files else 0.0
    problems = [f"{name}: {rel}: no feature file" for rel in missing]
    problems += [f"{name}: {item['reason']}" for item in invalid]
    problems += [f"{name}: feature file with no input in the plan (added by hand, or its input removed): {m}" for m in moved]
    if bad_fraction > max_bad_fraction:
        problems.append(
            f"{name}: {len(bad)} of {len(files)} inputs are bad ({bad_fraction:.1%}), "
            f"above max_bad_fraction {max_bad_fraction:.1%}"
        )
        problems += [f"{name}: bad input {reason}" for reason in bad.values()]

    crosscheck = check_dataset(shards, entries, bad=set(bad), settings=settings, access=access)
    if not crosscheck["passed"]:
        problems.append(f"{name}: {describe(crosscheck)}")
    report = {
        "dataset": name,
        "input": shards[0]["input"],
        "output": output.uri,
        "passed": not problems,
        "input_files": len(files),
        "features_ok": len(manifest),
        "bad_inputs": [{"file": rel, "reason": reason} for rel, reason in sorted(bad.items())],
        "bad_fraction": round(bad_fraction, 6),
        "ignored_files": ignored,
        "ignored_count": ignored_count,
        "max_bad_fraction": max_bad_fraction,
        "missing_features": missing,
        "invalid_features": invalid,
        "orphan_features": orphans,
        "orphans_moved": moved,
        "bad_input_features": stale,
        "bad_input_features_moved": stale_moved,
        "stale_temp_files": temps,
        "feature_dim": feature_dim,
        "devices": sorted({r.get("device", "?") for r in results.values()}),
        "fallbacks": [
            {"shard_id": sid, "reason": r["fallback_reason"]}
            for sid, r in sorted(results.items())
            if r.get("fallback_reason")
        ],
        "device_crosscheck": crosscheck,
        "problems": problems,
    }
    report["leftovers_removed"] = remove_leftovers(output, shards) if report["passed"] else []
    # Training takes only a passing dataset's manifest (it checks ``passed``):
    # a failing dataset has none, and an older one is removed.
    if report["passed"]:
        manifest_doc = {
            "dataset": name,
            "feature_dim": feature_dim,
            "passed": True,
            "model_digest": model["digest"],
            "model_sha256": model["sha256"],
            "model_path": model["path"],
            "verified_by_run": run_id,
            "items": manifest,
        }
        _write_json(output, MANIFEST_NAME, manifest_doc)
    else:
        output.delete(MANIFEST_NAME)
    _write_json(output, REPORT_NAME, report)
    report["report_at"] = output.name(REPORT_NAME)
    report["manifest_at"] = output.name(MANIFEST_NAME) if report["passed"] else None
    return report


def verify_run(
    shards: list[dict[str, Any]],
    results: list[dict[str, Any]],
    *,
    max_bad_fraction: float,
    settings: Settings | None = None,
    access: S3Access | None = None,
    record_dir: Path | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Verify every dataset of a run; raise listing all problems if any.

    With ``record_dir`` (the run's progress folder), the outcome is recorded
    there too, passed or not, for the progress page and command.

    Returns:
        A summary with each dataset's counts, report and manifest paths, and
        ``training_conf``, the conf the training DAG takes.

    Raises:
        VerificationFailed: features are missing or invalid, or too many inputs
            are bad; the reports are written first.
    """
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for shard in shards:
        by_dataset.setdefault(shard["dataset"], []).append(shard)
    by_id = {r["shard_id"]: r for r in results}
    summary: dict[str, Any] = {"passed": True, "datasets": {}, "training_conf": {"datasets": {}}}
    problems: list[str] = []
    for name, dataset_shards in sorted(by_dataset.items()):
        report = verify_dataset(
            name,
            dataset_shards,
            {s["shard_id"]: by_id[s["shard_id"]] for s in dataset_shards if s["shard_id"] in by_id},
            feature_dim=int(dataset_shards[0]["model"]["feature_dim"]),
            max_bad_fraction=max_bad_fraction,
            settings=settings,
            access=access,
            run_id=run_id,
        )
        summary["datasets"][name] = {
            "passed": report["passed"],
            "input_files": report["input_files"],
            "features_ok": report["features_ok"],
            "bad_inputs": len(report["bad_inputs"]),
            "ignored": report["ignored_count"],
            "missing": len(report["missing_features"]),
            "invalid": len(report["invalid_features"]),
            "report": report["report_at"],
            "manifest": report["manifest_at"],
        }
        summary["training_conf"]["datasets"][name] = {
            "features": report["output"],
            "manifest": report["manifest_at"],
        }
        problems += report["problems"]
        _log_report(report)
    summary["passed"] = not problems
    if record_dir is not None:
        from cnn_features.progress import write_verification

        write_verification(record_dir, passed=not problems, datasets=summary["datasets"], problems=problems)
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more (see the reports)" if len(problems) > _MAX_LISTED else ""
        msg = f"verification failed with {len(problems)} problem(s):\n  {listed}{more}"
        raise VerificationFailed(msg)
    return summary


def _log_report(report: dict[str, Any]) -> None:
    log.info(
        "%s: %s - %d inputs, %d features ok, %d bad inputs, %d ignored (not .npy), %d missing, %d invalid, %d orphan, "
        "devices %s; report %s",
        report["dataset"],
        "PASSED" if report["passed"] else "FAILED",
        report["input_files"],
        report["features_ok"],
        len(report["bad_inputs"]),
        report["ignored_count"],
        len(report["missing_features"]),
        len(report["invalid_features"]),
        len(report["orphan_features"]),
        ",".join(report["devices"]) or "-",
        report["report_at"],
    )
    for item in report["bad_inputs"]:
        log.warning("%s: bad input %s", report["dataset"], item["reason"])
    for shard in report["fallbacks"]:
        log.warning("%s: shard %s ran on CPU after GPU failure: %s", report["dataset"], shard["shard_id"], shard["reason"])
    if report["orphan_features"]:
        log.warning(
            "%s: %d feature file(s) have no input (input removed?), e.g. %s",
            report["dataset"],
            len(report["orphan_features"]),
            report["orphan_features"][0],
        )
    for moved in report["bad_input_features_moved"]:
        log.warning("%s: feature of a bad input, stale: %s", report["dataset"], moved)
