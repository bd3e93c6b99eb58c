"""Real git repositories for tests: write files, commit, and get commit ids back."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import Result, run_cli

# Deterministic, isolated git: no user or system config, fixed identity and dates.
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}


def manifest(stem: str, *, context: int = 4096, name: str | None = None, quant: str = "Q8_0") -> str:
    """A valid manifest whose app name derives from ``stem`` (or is ``name``).

    The comment lines keep git's rename detection stable when one value changes, as in a real
    manifest with its explanatory comments.
    """
    lines = [
        "#:schema ../schema/manifest.schema.json",
        f"# {stem}: a test model. These comment lines are here so that a rename with a small edit",
        "# is still detected as a rename by git (similarity above 50 %), as with real manifests,",
        "# which carry a few lines of explanation above their keys.",
        *([f'name = "{name}"'] if name else []),
        f'repo = "owner/{stem}-GGUF"',
        f'file = "{stem}-{quant}.gguf"',
        f'quant = "{quant}"',
        f"context = {context}",
    ]
    return "\n".join(lines) + "\n"


class Repo:
    """A git work tree in a temporary folder."""

    def __init__(self, path: Path, *, init: bool = True) -> None:
        self.path = path
        if init:
            path.mkdir(parents=True, exist_ok=True)
            self.git("init", "-q", "-b", "main")

    def git(self, *args: str) -> str:
        proc = subprocess.run(
            ["git", *args],
            cwd=self.path,
            env={**os.environ, **GIT_ENV},
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
        return proc.stdout.strip()

    def write(self, rel: str, text: str) -> None:
        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    def rm(self, rel: str) -> None:
        self.git("rm", "-q", "--", rel)

    def mv(self, old: str, new: str) -> None:
        (self.path / new).parent.mkdir(parents=True, exist_ok=True)
        self.git("mv", "--", old, new)

    def commit(self, message: str = "change") -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")

    def apply(self, ops: list[tuple[str, ...]]) -> None:
        """Apply ``("write", path, text)``, ``("rm", path)`` and ``("mv", old, new)`` operations."""
        for op, *args in ops:
            getattr(self, op)(*args)


def run_cli_in(repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
    """Run the CLI inside a repository, as CI does, with the isolated git of ``GIT_ENV``."""
    return run_cli(*args, cwd=repo, env={**GIT_ENV, **(env or {})}, timeout=timeout)
