"""The linters CI would otherwise leave to memory: ruff (lint and format) over the
repository, and mypy --strict over the scope pyproject.toml gives it (app, agents and
bench)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "check",
    [("ruff", "check", "."), ("ruff", "format", "--check", "."), ("mypy",)],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_static_check_passes(check: tuple[str, ...]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *check],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(check)}:\n{done.stdout}{done.stderr}"
