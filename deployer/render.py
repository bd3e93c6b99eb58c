"""Render a :class:`~deployer.plan.Plan` into a Modal app file: the template with the plan as data.

The template (``templates/modal_app.py``) is a working Modal app whose only model-specific part
is one assignment, ``PLAN = {...}``. Rendering replaces that literal's value with the resolved
plan, written by ``repr`` of plain ``str``/``int``/``bool``/``None``/``list``/``dict`` data, and
replaces the template's header comment with where the app came from. No manifest string is ever
pasted into code: :func:`render` checks that the result's Python AST equals the template's except
for the value of ``PLAN``, and that the value reads back (``ast.literal_eval``) as the same data.

    app_data(plan)                          -> dict         the data literal, config hash and tags included
    render(plan, provenance)                -> RenderedApp  pure: the file's text
    write_app(rendered, folder)             -> Path         atomically (temporary file + rename)

The config hash is a stable hash of what is deployed: the data (which holds the resolved commit,
so a moved ``main`` redeploys), the template and the source the container runs (the runtime and
the package modules it imports, :data:`RUNTIME_SOURCES`). It is recorded in the app's tags;
``deploy`` skips a manifest whose hash equals the live app's.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from deployer import __version__
from deployer.atomic import write_atomic
from deployer.conversion.job import convert_jobs, convert_resources, download_bytes, download_files
from deployer.errors import RenderError
from deployer.plan import Plan
from deployer.runtime.config import runtime_config

MIB = 1024 * 1024
PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATE_PATH = PACKAGE_DIR.parent / "templates" / "modal_app.py"
PLAN_NAME = "PLAN"  # the one assignment rendering replaces
HEADER_START, HEADER_END = "# <gguf-deploy header>", "# </gguf-deploy header>"

# What the container runs of this package (`python -m deployer.runtime`): the runtime, and the
# package modules it imports (a test keeps this list complete). Its source is part of the deploy.
RUNTIME_SOURCES = (
    "__init__.py",
    "errors.py",
    "runtime",
    "conversion/__init__.py",
    "conversion/converter.py",
    "gguf_header.py",
    "facts.py",
    "quants.py",
)

MODELS_DIR = "/models"  # where the template mounts the Volume; the runtime config names files below it
TAG_MAX = 63  # Modal: tag keys and values are 1-63 characters of [A-Za-z0-9._-]
CONFIG_HASH_LENGTH = 16  # hex digits: 64 bits, plenty to tell two configurations apart

# Startup: the container boots, CUDA initialises and every weight is read from the Volume into
# GPU memory (and, the first time, the memory snapshot is taken). Volumes read at 1-2 GB/s; the
# timeout assumes 100 MB/s so that a slow read is not mistaken for a hung server.
STARTUP_BASE_S = 300
STARTUP_BYTES_PER_S = 100 * 1000**2
STARTUP_MAX_S = 3600
# Prefetch: Hugging Face to the Volume, assumed no faster than 25 MB/s.
DOWNLOAD_BASE_S = 600
DOWNLOAD_BYTES_PER_S = 25 * 1000**2
DOWNLOAD_MIN_S, DOWNLOAD_MAX_S = 1800, 86400
MEMORY_MIN_MIB = 2048  # the Python server and llama.cpp's host buffers, for the smallest model
MEMORY_STEP_MIB = 256
# Physical cores reserved per container (Modal's `cpu=` counts physical cores). The rule: one core
# per llama.cpp thread, plus one for each of the runtime's own busy threads, so that they never
# wait for each other: the event loop (HTTP, encoding every streamed token) and the model thread
# (scheduling, sampling, detokenizing between two decodes). llama.cpp's idle threads spin before
# they sleep, so a thread of ours sharing their cores waits for them (measured: BENCHMARKS.md,
# "Host cost per token"). On a GPU every layer is offloaded and llama.cpp's threads do little, but
# a starved event loop or model thread leaves the GPU idle between two decodes.
LLAMA_THREADS = 4  # llama.cpp's threads unless [server] threads says otherwise
HOST_THREADS = 2  # the event loop and the model thread


@dataclass(frozen=True)
class Provenance:
    """Where a rendered app came from; written into its header comment (not hashed)."""

    manifest_path: str
    source_commit: str | None = None  # git HEAD of the manifests' repository, when known
    deployer_version: str = __version__


@dataclass(frozen=True)
class RenderedApp:
    """A rendered Modal app file."""

    app_name: str
    filename: str  # "gguf_dark_champion_18b.py": an importable module name
    text: str
    data: dict[str, Any]
    config_hash: str


# ## The data


def app_data(plan: Plan) -> dict[str, Any]:
    """The value of ``PLAN`` for ``plan``: plain data only, config hash included in the tags."""
    loaded, facts = plan.manifest, plan.facts
    manifest = loaded.manifest
    model_dir = f"{MODELS_DIR}/{facts.repo}/{facts.commit}"
    threads = manifest.server.threads or LLAMA_THREADS
    # the API key is never in a file: the runtime reads GGUF_DEPLOY_API_KEY from the Modal secret
    mmproj = f"{model_dir}/{facts.projector.file}" if facts.projector else None
    runtime = runtime_config(
        loaded, f"{model_dir}/{facts.file}", parallel=plan.slots.parallel, n_threads=threads, mmproj_path=mmproj
    ).to_dict()
    runtime.pop("api_key", None)
    data: dict[str, Any] = {
        "app": {"name": loaded.app_name, "tags": {}},
        "model": {
            "repo": facts.repo,
            "revision": facts.revision,
            "commit": facts.commit,
            "quant": manifest.quant,
            "size_bytes": facts.size_bytes,
            # what the download step fetches: the GGUF's shards, or the checkpoint a conversion reads
            "shards": [{"file": s.file, "size": s.size, "sha256": s.sha256} for s in download_files(facts)],
        },
        "convert": convert_jobs(facts),
        "gpu": plan.modal_gpus,
        "runtime": runtime,
        "scaling": {
            "min_containers": manifest.scaling.min_containers,
            "max_containers": manifest.scaling.max_containers,
            "scaledown_window": manifest.scaling.scaledown_window,
            "slots": plan.slots.parallel,
            "concurrency": plan.slots.concurrency,
            "request_timeout": manifest.scaling.timeout,
            "memory_snapshot": manifest.scaling.memory_snapshot,
        },
        "resources": {
            "cpu": float(threads + HOST_THREADS),
            "memory_mib": memory_mib(plan.estimate.host),
            "startup_timeout": startup_timeout(facts.size_bytes),
            "download_timeout": download_timeout(download_bytes(facts)),
            **convert_resources(facts),
        },
        # Lists, so that the template needs no branch: no secret is an empty list.
        "secrets": {
            "api_key": [manifest.auth.secret] if manifest.auth.enabled else [],
            "hf_token": [manifest.auth.hf_token_secret] if manifest.auth.hf_token_secret else [],
        },
    }
    digest = config_hash(data)
    data["app"]["tags"] = app_tags(plan, digest)
    return data


def memory_mib(host_bytes: int) -> int:
    """The container memory request: the estimate's host memory, rounded up."""
    mib = max(MEMORY_MIN_MIB, math.ceil(host_bytes / MIB))
    return -(-mib // MEMORY_STEP_MIB) * MEMORY_STEP_MIB


def startup_timeout(size_bytes: int) -> int:
    """Seconds a container may take to become ready, from the model's size."""
    return min(STARTUP_MAX_S, STARTUP_BASE_S + math.ceil(size_bytes / STARTUP_BYTES_PER_S))


def download_timeout(size_bytes: int) -> int:
    """Seconds the prefetch may take, from the model's size."""
    wanted = DOWNLOAD_BASE_S + math.ceil(size_bytes / DOWNLOAD_BYTES_PER_S)
    return max(DOWNLOAD_MIN_S, min(DOWNLOAD_MAX_S, wanted))


# ## Config hash and tags


def config_hash(data: dict[str, Any]) -> str:
    """A stable hash of what a deploy ships: the data (tags aside), the template and the runtime."""
    untagged = {**data, "app": {**data["app"], "tags": {}}}
    canonical = json.dumps(untagged, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256()
    for part in (canonical, _template_text(), _runtime_source_digest()):
        digest.update(hashlib.sha256(part.encode("utf-8", "surrogatepass")).digest())
    return digest.hexdigest()[:CONFIG_HASH_LENGTH]


MANAGED_BY = ("managed-by", "gguf-deploy")  # on every app: `status` tells ours from look-alikes by it


def app_tags(plan: Plan, digest: str) -> dict[str, str]:
    """The app's tags, each within Modal's rules (see :func:`tag_value`)."""
    facts = plan.facts
    return {
        MANAGED_BY[0]: MANAGED_BY[1],
        "manifest": tag_value(plan.manifest.name),
        "config": digest,
        "repo": tag_value(facts.repo),
        "commit": tag_value(facts.commit),
        "quant": tag_value(plan.manifest.manifest.quant),
        "deployer": tag_value(__version__),
    }


_TAG_BAD_CHAR = re.compile(r"[^A-Za-z0-9._-]")


def tag_value(value: str) -> str:
    """``value`` as a Modal tag value: ``/`` becomes ``--``, other characters outside
    ``[A-Za-z0-9._-]`` become ``_``, and a value longer than 63 characters keeps its first 54
    followed by ``.`` and 8 hex digits of the sha256 of the whole value.

    Hugging Face forbids ``--`` in repo ids, so ``owner/name`` → ``owner--name`` is unambiguous
    (the Hub's own cache uses the same spelling).
    """
    encoded = _TAG_BAD_CHAR.sub("_", value.replace("/", "--")) or "_"
    if len(encoded) > TAG_MAX:
        short = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        encoded = f"{encoded[: TAG_MAX - 9]}.{short}"
    return encoded


# ## The file


def app_filename(app_name: str) -> str:
    """The rendered file's name: the app name as a Python module name."""
    return re.sub(r"[^a-z0-9_]", "_", app_name.lower()) + ".py"


def render(plan: Plan, provenance: Provenance) -> RenderedApp:
    """The app file for ``plan`` (pure: the template and the plan in, text out)."""
    data = app_data(plan)
    template = _template_text()
    text = _replace_header(_replace_plan(template, format_literal(data)), header_lines(data, provenance))
    check_rendered(text, data)
    return RenderedApp(
        app_name=data["app"]["name"],
        filename=app_filename(data["app"]["name"]),
        text=text,
        data=data,
        config_hash=data["app"]["tags"]["config"],
    )


def write_app(rendered: RenderedApp, folder: str | Path) -> Path:
    """Write the file into ``folder`` atomically: nothing half-written is ever left there."""
    target = Path(folder) / rendered.filename
    try:
        write_atomic(target, rendered.text)
    except OSError as exc:
        raise RenderError(f"{target}: cannot write the app file: {exc.strerror or exc}") from exc
    return target


def header_lines(data: dict[str, Any], provenance: Provenance) -> list[str]:
    """The header comment of a rendered app; every value made safe for a comment."""
    model = data["model"]
    safe = comment_safe
    return [
        f"# Modal app {safe(data['app']['name'])}, rendered by gguf-deploy {safe(provenance.deployer_version)}.",
        f"# Manifest: {safe(provenance.manifest_path)} (source commit {safe(provenance.source_commit or 'unknown')})",
        f"# Model: {safe(model['repo'])} at commit {safe(model['commit'])}, {safe(model['quant'])}",
        f"# Config hash: {safe(data['app']['tags']['config'])}",
        "# Do not edit: change the manifest, then run `gguf-deploy deploy` (or `gguf-deploy render`).",
    ]


_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9 ._/:@+=,()\[\]{}#~-]")
COMMENT_VALUE_MAX = 200


def comment_safe(value: str) -> str:
    """``value`` for a ``#`` comment: only printable ASCII (no line break can end the comment)."""
    cleaned = _COMMENT_UNSAFE.sub("?", value)
    return cleaned if len(cleaned) <= COMMENT_VALUE_MAX else cleaned[: COMMENT_VALUE_MAX - 3] + "..."


# ## The literal and the checks


def format_literal(value: Any, indent: int = 0) -> str:
    """``value`` as a Python literal, one dict key per line; scalars are written by ``repr``
    (NaN and infinities have no literal and are refused)."""
    pad, inner = "    " * indent, "    " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{_scalar(key)}: {format_literal(item, indent + 1)}," for key, item in value.items()]
        return "{\n" + "\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list):
        if not any(isinstance(item, (dict, list)) for item in value):
            return "[" + ", ".join(_scalar(item) for item in value) + "]"
        items = [f"{inner}{format_literal(item, indent + 1)}," for item in value]
        return "[\n" + "\n".join(items) + f"\n{pad}]"
    return _scalar(value)


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        written = repr(value)
        # repr's quotes are single unless the text holds one; the template's style is double
        if written.startswith("'") and '"' not in value:
            written = f'"{written[1:-1]}"'
        return written
    if value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return repr(value)  # repr of a finite float reads back as the same float
    raise RenderError(f"the plan holds {value!r}, which has no plain literal")


def check_rendered(text: str, data: dict[str, Any]) -> None:
    """Raise :class:`RenderError` unless ``text`` is the template with ``PLAN`` = ``data``."""
    try:
        rendered = ast.parse(text)
    except SyntaxError as exc:
        raise RenderError(f"the rendered app is not valid Python ({exc.msg}, line {exc.lineno})") from exc
    value = plan_value(rendered)
    try:
        parsed = ast.literal_eval(value)
    except ValueError as exc:
        raise RenderError("the rendered PLAN is not a plain literal") from exc
    if parsed != data:
        raise RenderError("the rendered PLAN does not read back as the plan")
    if skeleton(rendered) != _template_skeleton():
        raise RenderError("the rendered app differs from the template outside PLAN")


def plan_value(module: ast.Module) -> ast.expr:
    """The value of the module's one top-level ``PLAN = ...`` assignment."""
    found = [
        node.value
        for node in module.body
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [PLAN_NAME]
    ]
    if len(found) != 1:
        raise RenderError(f"the template must assign {PLAN_NAME} exactly once at the top level, found {len(found)}")
    return found[0]


def skeleton(module: ast.Module) -> str:
    """The module's AST with the value of ``PLAN`` blanked: equal for every rendering."""
    value = plan_value(module)
    blanked = ast.Module(
        body=[
            ast.Assign(targets=node.targets, value=ast.Constant(None), lineno=0)
            if isinstance(node, ast.Assign) and node.value is value
            else node
            for node in module.body
        ],
        type_ignores=[],
    )
    return ast.dump(blanked, include_attributes=False)


def _replace_plan(template: str, literal: str) -> str:
    value = plan_value(ast.parse(template))
    # ast positions are (line, UTF-8 byte column); bytes.splitlines breaks lines where Python does
    raw = template.encode("utf-8")
    starts = [0]
    for line in raw.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    begin = starts[value.lineno - 1] + value.col_offset
    end = starts[(value.end_lineno or value.lineno) - 1] + (value.end_col_offset or 0)
    return (raw[:begin] + literal.encode("utf-8") + raw[end:]).decode("utf-8")


def _replace_header(text: str, header: list[str]) -> str:
    lines = text.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == HEADER_START)
        end = next(i for i, line in enumerate(lines) if line.rstrip("\n") == HEADER_END)
    except StopIteration:
        raise RenderError(f"the template lacks its header markers ({HEADER_START} ... {HEADER_END})") from None
    return "".join([*lines[:start], *(line + "\n" for line in header), *lines[end + 1 :]])


@cache
def _template_text() -> str:
    try:
        return TEMPLATE_PATH.read_text(encoding="utf-8")
    except OSError as exc:
        raise RenderError(
            f"{TEMPLATE_PATH}: cannot read the Modal app template ({exc.strerror or exc}); "
            "gguf-deploy renders from a checkout of its repository"
        ) from exc


@cache
def _template_skeleton() -> str:
    return skeleton(ast.parse(_template_text()))


def runtime_source_files() -> list[Path]:
    """The files of :data:`RUNTIME_SOURCES`: every module of this package the container runs."""
    files: set[Path] = set()
    for name in RUNTIME_SOURCES:
        path = PACKAGE_DIR / name
        files.update(path.rglob("*.py") if path.is_dir() else [path])
    return sorted(files)


@cache
def _runtime_source_digest() -> str:
    """The serving runtime's source: it runs in the container, so it is part of the deploy."""
    digest = hashlib.sha256()
    for path in runtime_source_files():
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
