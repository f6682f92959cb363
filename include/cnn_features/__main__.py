"""Command line: ``python -m cnn_features <command>``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cnn_features.config import load_settings


def main(argv: list[str] | None = None) -> int:
    """Run a command: ``demo-corpus`` or ``probe``."""
    parser = argparse.ArgumentParser(prog="python -m cnn_features")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-corpus", help="generate the demo corpus (RAVDESS and CREMA-D layouts)")
    demo.add_argument("--out", type=Path, help="corpus root (default: $CNN_FEATURES_HOME/demo)")
    demo.add_argument("--full", action="store_true", help="real corpus sizes: 1,440 + 7,442 files")
    demo.add_argument("--frames", type=int, help="fixed frames per clip instead of realistic lengths")
    commands.add_parser("probe", help="probe the GPU in a fresh process and print the report")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
