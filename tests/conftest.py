"""Shared fixtures: run the real CLI in a subprocess, as users and CI do."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@pytest.fixture(autouse=True, scope="session")
def _stock_llama_repacks_as_the_runtime_does() -> Any:
    """Stock ``llama_cpp.Llama`` objects in tests repack CPU weights only where the runtime does:
    everywhere except on CPUs with AMX (``deployer.runtime.cpu.repack_weights``).

    llama.cpp's AMX kernels crash the first decode on CPUs with AMX (llama.cpp issue 20824: a
    segfault on a Sapphire Rapids Xeon); ``Llama`` has no argument for it, so the default model
    parameters it starts from are changed for the session there. Servers under test are processes
    of their own and follow ``RuntimeConfig.cpu_repack``.
    """
    try:
        from llama_cpp import llama_cpp  # the module Llama calls
    except ImportError:  # the pull-request check runs without the serve extra
        yield
        return
    from deployer.runtime.cpu import cpu_flags, repack_weights

    if repack_weights(None, cpu_flags()):
        yield
        return
    original = llama_cpp.llama_model_default_params

    def without_repack() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_model_default_params = without_repack
    yield
    llama_cpp.llama_model_default_params = original
