"""The one configuration object of the runtime, and the only place it reads the environment.

CONTRACT FIRST — fields may be added (with defaults); none renamed without updating render.

    RuntimeConfig            how to serve one model file (JSON in the Modal container)
    runtime_config()         pure: a manifest + a model path (+ the planned slots) -> RuntimeConfig
    default_concurrency()    requests a server holds when the manifest sets no [scaling] concurrency
    RuntimeConfig.with_environment()   the API key from GGUF_DEPLOY_API_KEY, when the config has none
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for the annotations: the runtime never imports planning or loading
    from deployer.loading import LoadedManifest
    from deployer.manifest import Manifest

API_KEY_ENV = "GGUF_DEPLOY_API_KEY"  # what the Modal secret (or a local user) sets
# ggml type ids of the KV cache types a manifest may name (ggml.h; llama_cpp lacks a BF16 constant)
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # a full 131k-token prompt is ~0.5 MB of text; 16x headroom for JSON
DEFAULT_PARALLEL = 4  # slots when neither the manifest nor the plan says: llama-server's default (-np 4)
QUEUED_PER_SLOT = 1  # default [scaling] concurrency: every slot busy and as many requests waiting


@dataclass(frozen=True)
class RuntimeConfig:
    """How to serve one model file.

    ``to_json()`` is what the Modal container receives (``python -m deployer.runtime --config``);
    it never needs to carry the API key, which the container reads from ``GGUF_DEPLOY_API_KEY``.
    """

    model_name: str  # the manifest name; the model id in /v1/models
    model_path: str  # local path of the .gguf (the first shard of a split model)
    n_ctx: int  # tokens of one slot: the context holds n_ctx x parallel cells, every slot a full n_ctx
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = True
    kv_cache_type: str = "f16"
    swa_full: bool = False  # sliding-window layers cache the whole context (llama.cpp's default is their window)
    ctx_checkpoints: int = 8  # per slot, with a window-sized SWA cache: see deployer.runtime.engine.checkpoints
    chat_format: str | None = None  # None: the GGUF's own chat template
    embeddings: bool = False
    n_gpu_layers: int = -1  # every layer on the GPU (ignored by a CPU-only build)
    parallel: int = 4  # slots: sequences decoded together in one batch (n_seq_max), each with n_ctx tokens
    concurrency: int = 8  # requests in flight per server: `parallel` decoding, the rest queued; beyond it 429
    api_key: str | None = None  # None: no auth (local default), unless GGUF_DEPLOY_API_KEY is set
    require_api_key: bool = False  # refuse to start without a key (deployed endpoints: auth on by default)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    n_threads: int | None = None  # CPU threads; None: one per physical core, as llama.cpp's own tools choose
    # llama.cpp's extra CPU buffer types (weights repacked for AVX2/AVX512/NEON kernels; AMX). None: on,
    # except on CPUs with AMX, where the first decode segfaults (deployer.runtime.cpu.repack_weights).
    # On a GPU every layer is offloaded, so nothing is repacked either way.
    cpu_repack: bool | None = None
    shutdown_grace_s: float = 10.0  # on SIGTERM, running requests get this long before they are cancelled
    verbose: bool = False  # llama.cpp's own log lines on stderr
    reasoning_format: str = "auto"  # "auto": <think> text goes to reasoning_content; "none": kept in content
    thinking: bool | None = None  # the chat template's enable_thinking default; None: the template's own
    mmproj_path: str | None = None  # the multimodal projector (mmproj-*.gguf): images (or audio) in chat messages
    max_images: int = 8  # images per request (a 400 names the limit beyond it)
    max_image_bytes: int = 20 * 1024 * 1024  # one image's encoded bytes (413 beyond)
    max_image_pixels: int = 50_000_000  # one image's width × height (400 beyond: decoding it would take GBs)
    remote_images: bool = False  # fetch http(s) image URLs (public addresses only: deployer.runtime.media.fetch)
    remote_image_timeout_s: float = 10.0  # one remote image, from the lookup to its last byte
    max_audio_clips: int = 4  # input_audio clips per request, with an audio projector (a 400 beyond)
    max_audio_bytes: int = 20 * 1024 * 1024  # one clip's encoded bytes (413 beyond)
    max_audio_seconds: float = 600.0  # one clip's length, from its header (400 beyond: decoded whole, at once)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuntimeConfig:
        """Build from ``to_dict()`` output; unknown keys are ignored (a newer renderer's fields)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RuntimeConfig:
        """Parse ``to_json()`` output; ValueError with a readable message when it is not one."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object of runtime settings")
        missing = [name for name in ("model_name", "model_path", "n_ctx") if name not in data]
        if missing:
            raise ValueError(f"missing required key(s): {', '.join(missing)}")
        return cls.from_dict(data)

    def with_environment(self, environ: Mapping[str, str] | None = None) -> RuntimeConfig:
        """This config with the API key from ``GGUF_DEPLOY_API_KEY`` when it has none of its own.

        The only place the runtime reads the environment. Keys are stripped (an HTTP header cannot
        carry the spaces around one, so a key with them could never match); an empty key counts as unset.
        """
        env = os.environ if environ is None else environ
        key = (self.api_key or "").strip() or env.get(API_KEY_ENV, "").strip()
        return replace(self, api_key=key or None)

    def __repr__(self) -> str:  # never print the key
        shown = {**self.to_dict(), "api_key": "***" if self.api_key else None}
        return f"RuntimeConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def default_concurrency(parallel: int) -> int:
    """Requests one server holds when the manifest sets no ``[scaling] concurrency``: a request
    in every slot, and ``QUEUED_PER_SLOT`` more waiting per slot."""
    return parallel * (1 + QUEUED_PER_SLOT)


def runtime_config(
    manifest: LoadedManifest | Manifest,
    model_path: str,
    *,
    api_key: str | None = None,
    require_api_key: bool | None = None,
    parallel: int | None = None,
    n_threads: int | None = None,
    mmproj_path: str | None = None,
) -> RuntimeConfig:
    """The runtime settings of a manifest, serving the file at ``model_path``. Pure.

    ``parallel`` (the planned slots, or ``serve --parallel``) defaults to the manifest's
    ``[server] parallel``, else :data:`DEFAULT_PARALLEL`; ``n_threads`` (``serve --threads``, or
    the container's cores) to ``[server] threads``, else None (the physical cores). ``concurrency``
    is ``[scaling] concurrency``, else :func:`default_concurrency` of the slots.
    ``require_api_key`` defaults to the manifest's ``[auth] enabled`` (deployed endpoints refuse
    to start without a key); local serving passes ``False``. ``mmproj_path`` is the manifest's
    projector's local path (None: a text-only model).
    """
    spec: Manifest = getattr(manifest, "manifest", manifest)  # LoadedManifest wraps a Manifest
    server, scaling = spec.server, spec.scaling
    slots = parallel or server.parallel or DEFAULT_PARALLEL
    return RuntimeConfig(
        model_name=spec.model_name,
        model_path=str(model_path),
        n_ctx=spec.context,
        n_batch=server.n_batch,
        n_ubatch=server.n_ubatch,
        flash_attn=server.flash_attn,
        kv_cache_type=server.kv_cache_type,
        swa_full=server.swa_full,
        ctx_checkpoints=server.ctx_checkpoints,
        chat_format=server.chat_format,
        embeddings=server.embeddings,
        remote_images=server.remote_images,
        reasoning_format=server.reasoning_format,
        thinking=server.thinking,
        concurrency=scaling.concurrency or default_concurrency(slots),
        parallel=slots,
        n_threads=n_threads or server.threads,
        api_key=api_key,
        require_api_key=spec.auth.enabled if require_api_key is None else require_api_key,
        mmproj_path=mmproj_path,
    )
