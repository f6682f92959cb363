"""Benchmark smoke tests: each runs one bench script with --smoke and reads its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# Seconds one smoke run may take: a tiny corpus, but worker starts and Airflow.
SMOKE_TIMEOUT_S = 600


def smoke_report(script: Path, root: Path, *args: str, name: str = "results.json") -> dict[str, Any]:
    """Run ``script --smoke ARGS --root ROOT --json ROOT/NAME``; return its JSON with its stdout under "stdout"."""
    out = root / name
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", *args, "--root", str(root), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    report["stdout"] = proc.stdout
    return report
