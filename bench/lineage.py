"""Benchmark what lineage costs: the extraction stage with it and without it, and a re-run over done features.

One run, on one machine, on the full fixed corpus of ``bench/extraction.py``
(1,440 + 7,442 clips of 128 x 256, generated once under ``--root``):

1. the extraction stage on CPU as the DAG runs it (shards through
   ``runner.run_shard``), with lineage (every input and feature hashed,
   records written ahead of the features) and without it (the worker as
   before lineage: fault hook ``no_lineage``). The corpus is cut into shards
   of ``BENCH_SHARD_SIZE`` and each shard runs once each way, back to back,
   in alternating order, into two output folders: the pair sees the same
   machine, even one shared with other work. The ratio is the median of the
   pairs' ratios; files/s is the workers' own extraction time, model loaded
   to last write, as ``bench/extraction.py``'s stage figure; target:
   with/without >= 0.97;
2. a re-run of the default plan (one shard per dataset) over the unchanged,
   fully extracted corpus:
   every feature hashed and matched to its record, every input trusted by
   its stat; wall time of all shards, worker start-up included; target
   <= 5 s;
3. the same re-run after every input's mtime changed (``os.utime``): every
   input read and hashed again, nothing re-extracted (the slow path, for
   reference).

    .venv/bin/python bench/lineage.py                    # ~8 min on 2 cores
    .venv/bin/python bench/lineage.py --smoke --root /tmp/b   # 16 clips, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "include"))

from bench.extraction import (  # noqa: E402
    FULL_COUNTS,
    HEADLINE_FRAMES,
    NO_GPU,
    SMOKE_FRAMES,
    SMOKE_NOTE,
    clear_outputs,
    corpus_settings,
    ensure_corpus,
    log,
    machine,
)
from cnn_features.config import Settings  # noqa: E402
from cnn_features.faults import ENV_VAR  # noqa: E402
from cnn_features.plan import DatasetIO, RunConf, check_model, plan_run  # noqa: E402
from cnn_features.runner import run_shard  # noqa: E402
from cnn_features.storage import write_json_atomic  # noqa: E402

SMOKE_COUNTS = {"ravdess": 8, "crema_d": 8}
# Files per shard of the paired stage runs: ~5 s of extraction each, so a
# pair's two runs are seconds apart; 10 pairs per round on the full corpus.
BENCH_SHARD_SIZE = 1000
SMOKE_SHARD_SIZE = 8
# Targets of the figures (README, docs/benchmarks.md "Lineage").
TARGET_RATIO = 0.97
TARGET_RERUN_S = 5.0
MODES = ("without lineage", "with lineage")


def plan(settings: Settings, *, shard_size: int, outputs: Path | None = None) -> list[dict[str, Any]]:
    """Return every shard of ``settings``' corpus (features under ``outputs``/<dataset> when given), with the reference model."""
    model = check_model(None, settings)
    datasets = tuple(
        DatasetIO(name, Path(io["input"]), outputs / name if outputs else Path(io["output"]))
        for name, io in settings.default_datasets().items()
    )
    conf = RunConf(datasets, "cpu", shard_size, None, 0.0)
    return [{**s, "run_id": "bench"} for s in plan_run(conf, model, batch_size=settings.batch_size, settings=settings)]


def run_all(shards: list[dict[str, Any]], *, lineage: bool) -> dict[str, Any]:
    """Run every shard through ``run_shard`` on CPU; return files, the workers' loop time and the wall time."""
    if lineage:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = "no_lineage"
    try:
        started = time.perf_counter()
        results = [run_shard(shard, requested_device="cpu", probe=NO_GPU) for shard in shards]
        wall = time.perf_counter() - started
    finally:
        os.environ.pop(ENV_VAR, None)
    files = sum(r["extracted"] for r in results)
    loop = sum(r["elapsed_s"] for r in results)
    return {
        "files": files,
        "skipped": sum(r["skipped_existing"] for r in results),
        "inputs_hashed": sum(r.get("inputs_hashed_for_reuse", 0) for r in results),
        "loop_s": loop,
        "wall_s": wall,
        "files_per_s": files / loop if files and loop else None,
    }


def bench(settings: Settings, *, runs: int, shard_size: int) -> dict[str, Any]:
    """Measure both modes over ``runs`` rounds of shard pairs, then the two re-runs."""
    paired = {
        mode: plan(settings, shard_size=shard_size, outputs=settings.home / "bench-features" / mode.replace(" ", "-"))
        for mode in MODES
    }
    rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    pair_ratios: list[float] = []
    for n in range(runs):
        shutil.rmtree(settings.home / "bench-features", ignore_errors=True)
        log(f"  round {n + 1}/{runs}: {len(paired[MODES[0]])} shard pairs")
        for i, pair in enumerate(zip(paired[MODES[0]], paired[MODES[1]], strict=True)):
            order = (0, 1) if (n + i) % 2 == 0 else (1, 0)
            got = {MODES[k]: run_all([pair[k]], lineage=MODES[k] == "with lineage") for k in order}
            for mode in MODES:
                rounds[mode].append(got[mode])
            pair_ratios.append(got["with lineage"]["files_per_s"] / got["without lineage"]["files_per_s"])
    shards = plan(settings, shard_size=settings.shard_size)
    clear_outputs(settings)
    log("  the default plan with lineage, then a re-run over the unchanged, fully extracted corpus")
    first = run_all(shards, lineage=True)
    rerun = run_all(shards, lineage=True)
    for shard in shards:
        for rel in shard["files"]:
            os.utime(Path(shard["input"]) / rel)
    log("  re-run after every input's mtime changed")
    touched = run_all(shards, lineage=True)
    rates = {mode: sum(r["files"] for r in rounds[mode]) / sum(r["loop_s"] for r in rounds[mode]) for mode in MODES}
    ratio = statistics.median(pair_ratios)
    return {
        "files": sum(len(s["files"]) for s in shards),
        "shards": len(shards),
        "pairs": len(pair_ratios),
        "rounds": rounds,
        "pair_ratios": pair_ratios,
        "files_per_s": rates,
        "ratio": ratio,
        "first_run": first,
        "rerun": rerun,
        "rerun_touched": touched,
        "targets": {
            "ratio_at_least_0_97": ratio >= TARGET_RATIO,
            "rerun_at_most_5_s": rerun["wall_s"] <= TARGET_RERUN_S,
        },
    }


def table(result: dict[str, Any], *, smoke: bool = False) -> str:
    """Return the figures as a Markdown table (a smoke run's says so first, and judges no target)."""

    def judged(ok: bool) -> str:
        return "not judged (smoke run)" if smoke else ("met" if ok else "NOT met")

    rates, rerun, touched = result["files_per_s"], result["rerun"], result["rerun_touched"]
    lines = [SMOKE_NOTE, ""] if smoke else []
    lines += [
        f"{result['files']:,} files; {result['pairs']} shard pairs (each shard once with, once without lineage, back to back)",
        "",
        "| figure | value | target |",
        "| --- | ---: | --- |",
        f"| stage files/s without lineage (all pairs) | {rates['without lineage']:.1f} | |",
        f"| stage files/s with lineage (all pairs) | {rates['with lineage']:.1f} | |",
        f"| with / without, median of the pairs (range {min(result['pair_ratios']):.3f}-{max(result['pair_ratios']):.3f}) "
        f"| {result['ratio']:.3f} | >= {TARGET_RATIO}: {judged(result['targets']['ratio_at_least_0_97'])} |",
        f"| re-run, unchanged corpus: wall s (worker start-up included) | {rerun['wall_s']:.2f} "
        f"({rerun['skipped']:,} reused, {rerun['files']} extracted, {rerun['inputs_hashed']} inputs hashed) | "
        f"<= {TARGET_RERUN_S:.0f} s: {judged(result['targets']['rerun_at_most_5_s'])} |",
        f"| re-run, every input's mtime changed: wall s | {touched['wall_s']:.2f} "
        f"({touched['skipped']:,} reused, {touched['files']} extracted, {touched['inputs_hashed']:,} inputs hashed) | |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "data" / "bench" / "lineage", help="corpus and results")
    parser.add_argument("--json", type=Path, default=None, help="where the JSON goes (default ROOT/results.json)")
    parser.add_argument("--runs", type=int, default=2, help="rounds of shard pairs")
    parser.add_argument("--smoke", action="store_true", help="tiny corpus, one round: checks the script, not the machine")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    counts = SMOKE_COUNTS if args.smoke else FULL_COUNTS
    frames = SMOKE_FRAMES if args.smoke else HEADLINE_FRAMES
    home = root / f"fixed-{frames}"
    os.environ["CNN_FEATURES_HOME"] = str(home)
    started = time.perf_counter()
    load_before = os.getloadavg()
    if args.smoke:
        log(SMOKE_NOTE)
    log(f"corpus under {home / 'demo'}: {counts}")
    ensure_corpus(home, counts=counts, frames=frames)
    shard_size = SMOKE_SHARD_SIZE if args.smoke else BENCH_SHARD_SIZE
    result = bench(corpus_settings(home), runs=1 if args.smoke else args.runs, shard_size=shard_size)
    report = {
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "smoke": args.smoke,
        "note": SMOKE_NOTE if args.smoke else None,
        "seconds": time.perf_counter() - started,
        "machine": machine(),
        "counts": counts,
        "frames": frames,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        **result,
    }
    out = args.json or root / "results.json"
    write_json_atomic(out, json.loads(json.dumps(report, default=str)))
    print(table(result, smoke=args.smoke))
    print(f"\nload average before {load_before}, after {os.getloadavg()}; {time.perf_counter() - started:.0f} s")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
