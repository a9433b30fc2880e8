"""Run a script in a fresh interpreter: for measurements of process-wide state (the heap,
interned strings) that the test runner's own process has long since disturbed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fresh_python(script: str, timeout: float) -> str:
    """`script`'s standard output; it imports the project from the checkout only."""
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    ).stdout
