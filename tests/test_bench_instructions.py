"""benchmarks/bench_instructions.py runs, with tiny numbers, so it cannot rot silently.

No figure is checked, only that the run counts a positive number of instructions per
message for the tree given (valgrind comes from Debian: scripts/test installs it).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_instructions_counts_instructions_per_message() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_instructions.py"),
            "--src",
            str(ROOT / "src"),
            "--kinds",
            "wsnursery",
            "--sizes",
            "32",
            "--base",
            "5",
            "--messages",
            "20",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = re.search(r"^  wsnursery 32 B\s+([\d,]+)\s*$", proc.stdout, re.MULTILINE)
    assert row is not None, proc.stdout
    assert int(row.group(1).replace(",", "")) > 0
