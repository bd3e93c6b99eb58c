"""Writing a file so that a reader sees the old one or the new one, never half of either.

The text goes to a temporary file in the target's folder (same file system), is flushed to disk,
then takes the target's name in one step: ``os.replace``, or ``os.link`` when an existing file
must never be replaced. The temporary file is removed whatever happens. ``OSError`` reaches the
caller, who knows what the file is and says so in its own error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FILE_MODE = 0o644  # mkstemp makes 0600; these are ordinary files (manifests, app files, cache entries)


def write_atomic(path: str | Path, text: str, *, exclusive: bool = False, mode: int = FILE_MODE) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path``, creating its folder.

    ``exclusive``: raise ``FileExistsError`` if ``path`` exists, even if it appears meanwhile.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.chmod(mode)
        if exclusive:
            _link_new(temporary, path)
        else:
            temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _link_new(temporary: Path, path: Path) -> None:
    try:
        os.link(temporary, path)  # atomic, and unlike a rename it never replaces an existing file
    except FileExistsError:
        raise  # "it exists" must not fall into the fallback below
    except OSError:  # a file system without hard links: rename, after one more look
        if path.exists():
            raise FileExistsError(path) from None
        temporary.rename(path)
