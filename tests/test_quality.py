"""The codebase stays ruff- and mypy-clean: part of the test command, so CI enforces it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_clean() -> None:
    out = _run("ruff", "check", "src", "tests")
    assert out.returncode == 0, out.stdout[-4000:]
    out = _run("ruff", "format", "--check", "src", "tests")
    assert out.returncode == 0, out.stdout[-4000:]


def test_mypy_clean() -> None:
    out = _run("mypy")
    assert out.returncode == 0, out.stdout[-4000:]
