"""Command line: ``python -m cnn_features <command>``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from cnn_features.config import load_settings


def main(argv: list[str] | None = None) -> int:
    """Run a command: ``demo-corpus``, ``probe`` or ``progress``."""
    parser = argparse.ArgumentParser(prog="python -m cnn_features")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-corpus", help="generate the demo corpus (RAVDESS and CREMA-D layouts)")
    demo.add_argument("--out", type=Path, help="corpus root (default: $CNN_FEATURES_HOME/demo)")
    demo.add_argument("--full", action="store_true", help="real corpus sizes: 1,440 + 7,442 files")
    demo.add_argument("--frames", type=int, help="fixed frames per clip instead of realistic lengths")
    commands.add_parser("probe", help="probe the GPU in a fresh process and print the report")
    progress = commands.add_parser("progress", help="show a run's progress: shards, files done, device, files/s, ETA")
    progress.add_argument("run_id", nargs="?", help="DAG run id (default: the newest run)")
    progress.add_argument("--list", action="store_true", help="list the runs that have progress records")
    progress.add_argument("--json", action="store_true", help="print the progress as JSON")
    progress.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS until the run ends")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings()

    if args.command == "demo-corpus":
        from cnn_features.demo import generate

        counts = generate(args.out or settings.demo_input_root, full=args.full, frames=args.frames)
        print(json.dumps(counts))
    elif args.command == "probe":
        from cnn_features.probe import run_probe

        print(json.dumps(run_probe(timeout_s=settings.probe_timeout_s), indent=2))
    elif args.command == "progress":
        return show_progress(settings.progress_root, args.run_id, listing=args.list, as_json=args.json, watch=args.watch)
    return 0


def show_progress(root: Path, run_id: str | None, *, listing: bool, as_json: bool, watch: float | None) -> int:
    """Print a run's progress (or the list of runs); with ``watch``, redraw until the run ends."""
    from cnn_features.progress_report import (
        FINAL_STATES,
        ProgressNotFound,
        find_run,
        format_run,
        list_runs,
        load_run,
        to_dict,
    )

    if listing:
        for run in list_runs(root):
            error = f"  error: {run.error}" if run.error else ""
            print(f"{run.run_id}  {run.state}, {run.shards} shards, {run.files} files  ({run.folder}){error}")
        return 0
    try:
        folder = find_run(root, run_id)
        while True:
            run = load_run(folder)
            text = json.dumps(to_dict(run), indent=2) if as_json else format_run(run)
            if watch and sys.stdout.isatty():
                sys.stdout.write("\033[H\033[J")
            print(text, flush=True)
            if not watch or run.state in FINAL_STATES:
                return 0 if run.state != "failed" else 1
            time.sleep(watch)
    except ProgressNotFound as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
