"""The one configuration object of the runtime, and the only place it reads the environment.

CONTRACT FIRST — fields may be added (with defaults); none renamed without updating render.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

API_KEY_ENV = "GGUF_DEPLOY_API_KEY"  # what the Modal secret (or a local user) sets


@dataclass(frozen=True)
class RuntimeConfig:
    """How to serve one model file."""

    model_name: str  # the manifest name; the model id in /v1/models
    model_path: str  # local path of the .gguf (the first shard of a split model)
    n_ctx: int
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = True
    kv_cache_type: str = "f16"
    chat_format: str | None = None  # None: the GGUF's own chat template
    embeddings: bool = False
    n_gpu_layers: int = -1  # every layer on the GPU (ignored by a CPU-only build)
    concurrency: int = 4  # requests accepted at once: one generating, the rest queued
    api_key: str | None = None  # None: no auth (local default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
