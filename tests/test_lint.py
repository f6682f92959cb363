"""The code base passes ruff with the project's rules (pyproject.toml), Airflow's AIR rules included."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean() -> None:
    """`ruff check` finds nothing in dags/, include/, plugins/, scripts/, bench/ and tests/."""
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        found = shutil.which("ruff")
        if found is None:
            pytest.skip("ruff is not installed (scripts/setup.sh installs it from requirements.txt)")
        ruff = Path(found)
    proc = subprocess.run([str(ruff), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_file_cites_a_figures_file_outside_the_repository() -> None:
    """Every figure a tracked file cites comes with the project: no comment or doc points at an untracked notes file."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    tracked = {Path(name) for name in listed.decode().split("\0") if name}
    tracked_names = {path.name for path in tracked}
    citing = []
    for rel in sorted(tracked):
        if rel.suffix not in {".py", ".md", ".sh", ".yaml", ".toml"} or not (REPO / rel).is_file():
            continue
        for lineno, line in enumerate((REPO / rel).read_text(encoding="utf-8").splitlines(), 1):
            for cited in _CITED_DOC.findall(line):
                if Path(cited).name not in tracked_names:
                    citing.append(f"{rel}:{lineno}: {cited}")
    assert not citing, "cited files that are not in the repository:\n" + "\n".join(citing)


# An upper-case notes file named in text (NOTES dot md, say): the kind of citation
# that only makes sense where that file ships.
_CITED_DOC = re.compile(r"\b([A-Z][A-Z_]+\.md)\b")
