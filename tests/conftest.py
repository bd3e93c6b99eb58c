"""Shared fixtures: run the real CLI in a subprocess, as users and CI do."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(
    *args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> Result:
    """Run ``python -m deployer ARGS`` and capture everything; a traceback is always a bug.

    ``python -P`` keeps ``cwd`` off ``sys.path``: a folder with its own ``deployer/`` (the test
    git repositories have one) must not shadow the installed package.
    """
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "deployer", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli():
    return run_cli


# Fixture modules of the test suite (fake Hugging Face hub, local server, ...), one per line.
pytest_plugins: list[str] = [
    "tests.fakehub",
    "tests.serving",
]
