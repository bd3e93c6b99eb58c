"""Structured logs: one JSON object per line on stderr, one line per request.

Modal and most log collectors index JSON lines; people can still read them. Lines look like::

    {"event": "request", "id": "req_5f0c…", "method": "POST", "route": "/v1/chat/completions",
     "status": 200, "stream": true, "prompt_tokens": 12, "completion_tokens": 40, "cached_tokens": 0,
     "queue_ms": 0, "latency_ms": 812}
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO, Any

LOGGER_NAME = "gguf_deploy.runtime"
_logger = logging.getLogger(LOGGER_NAME)


def configure(stream: IO[str] | None = None) -> None:
    """Send the runtime's events to ``stream`` (stderr by default), one JSON object per line."""
    handler = logging.StreamHandler(stream or _own_stderr())
    handler.setFormatter(logging.Formatter("%(message)s"))
    _logger.handlers[:] = [handler]
    _logger.setLevel(logging.INFO)
    _logger.propagate = False


def event(name: str, **fields: Any) -> None:
    """Log one event: ``{"event": name, "time": ..., **fields}``; None values are left out."""
    record = {"event": name, "time": _now(), **{k: v for k, v in fields.items() if v is not None}}
    _logger.info(json.dumps(record, separators=(",", ":"), default=str))


def _own_stderr() -> IO[str]:
    # llama-cpp-python points file descriptor 2 at /dev/null while it loads a model (verbose=False),
    # which would swallow every request line logged meanwhile: write to a copy of it instead
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):  # no real file descriptor (an embedding host)
        return sys.stderr


def _now() -> str:
    seconds = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"
