"""One exception hierarchy for gguf-deploy; every message is written for a person.

    GgufDeployError                 base: a user-facing message and an exit code
    ├── ManifestInvalid             one or more manifests break the format (carries Problems)
    ├── HubError                    Hugging Face could not resolve the model
    │   └── OfflineCacheMiss        --offline was given and the facts are not cached
    ├── GgufError                   the file is not a GGUF file, or its header is malformed
    ├── PlanError                   the model cannot be planned (does not fit, context, quant)
    ├── RenderError                 the Modal app file could not be rendered
    ├── ModalError                  the Modal edge failed (deploy, status, destroy)
    │   └── ModalAuthError          no Modal credentials
    ├── GitError                    git could not answer (unknown ref, not a repository)
    ├── ServeError                  the local server could not start
    └── ConversionError             Transformers weights could not be converted to a GGUF

Foreign exceptions (httpx, pydantic, modal, git, OSError) are translated where they enter
the program and re-raised ``from exc``; only the CLI turns these into output and exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1  # invalid input or a failed operation
EXIT_USAGE = 2  # the command line itself is wrong (click's own convention)


@dataclass(frozen=True, order=True)
class Problem:
    """One problem in one manifest: ``path:line: key: message``."""

    path: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class GgufDeployError(Exception):
    """Base class: ``str(error)`` is the whole user-facing message."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def show(self) -> list[str]:
        """The lines printed on stderr for this error."""
        return [f"error: {line}" for line in self.message.splitlines() or [""]]


class ManifestInvalid(GgufDeployError):
    """One or more manifests break the format; ``problems`` lists every one of them."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def show(self) -> list[str]:
        return [str(p) for p in self.problems]  # each already says file, line and key

    @classmethod
    def single(cls, path: str | Path, key: str, message: str, line: int | None = None) -> ManifestInvalid:
        return cls([Problem(str(path), line, key, message)])


class HubError(GgufDeployError):
    """Hugging Face could not resolve the repository, revision or file."""


class OfflineCacheMiss(HubError):
    """``--offline`` was given but the model facts are not in the local cache."""


class GgufError(GgufDeployError):
    """The file is not a GGUF file, or its header is malformed or unsupported."""


class PlanError(GgufDeployError):
    """The model cannot be planned: it does not fit, or the manifest contradicts the file."""


class RenderError(GgufDeployError):
    """The Modal app file could not be rendered."""


class ModalError(GgufDeployError):
    """A call to Modal failed."""


class ModalAuthError(ModalError):
    """No usable Modal credentials."""


class GitError(GgufDeployError):
    """git could not answer: an unknown ref, or not a repository."""


class ServeError(GgufDeployError):
    """The local server could not start (no model file, port in use, ...)."""


class ConversionError(GgufDeployError):
    """llama.cpp's converter could not be fetched or run, or wrote a GGUF that is not the planned one."""
