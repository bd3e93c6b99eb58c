"""Hand-made plans and modal introspection for the render and deploy tests (no network).

make_plan(**manifest_keys)      a Plan built directly from a manifest and hand-made facts
import_app(path)                import a rendered app file with the real modal library
recorded(module)                what modal recorded for it, as plain data (the one place
                                that reads modal's internals; see its docstring)
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import tomli_w

from deployer.catalogue import load_catalogue
from deployer.estimate import MemoryEstimate
from deployer.facts import GgufHeader, ModelFacts, ShardFacts
from deployer.loading import LoadedManifest, parse_manifest
from deployer.plan import GpuChoice, Plan, Slots
from deployer.runtime.config import default_concurrency

GIB = 1024**3
COMMIT = "c0ffee" + "0" * 34
BASE = {"repo": "org/model-GGUF", "file": "model-Q8_0.gguf", "quant": "Q8_0", "context": 8192}


def choice(spec: str) -> GpuChoice:
    """A GpuChoice from the catalogue: ``"H100"`` or ``"H100:2"``."""
    name, _, count = spec.partition(":")
    gpu = load_catalogue().gpus[name]
    n = int(count or 1)
    return GpuChoice(name, n, round(gpu.usd_per_hour * n, 2), gpu.usable_bytes)


def loaded_manifest(path: str = "manifests/model.toml", prefix: str = "gguf", **keys: Any) -> LoadedManifest:
    """A validated manifest: BASE updated with ``keys`` (nested tables as dicts; None removes a key)."""
    data = {key: value for key, value in {**BASE, **keys}.items() if value is not None}
    return parse_manifest(tomli_w.dumps(data).encode(), path, app_prefix=prefix)


def make_plan(
    loaded: LoadedManifest | None = None,
    *,
    gpus: tuple[str, ...] = ("H100", "A100-80GB"),
    commit: str = COMMIT,
    shard_sizes: tuple[int, ...] = (20 * GIB,),
    host: int = 3 * GIB,
    slots: int | None = None,
    **keys: Any,
) -> Plan:
    """A plan for ``loaded`` (or a manifest made of BASE + ``keys``) with hand-made facts; ``slots``
    as the planner would choose them (default: the manifest's ``parallel``, else 4)."""
    loaded = loaded or loaded_manifest(**keys)
    m = loaded.manifest
    if len(shard_sizes) == 1:
        files = [m.file]
    else:
        stem = m.file.removesuffix(".gguf")
        files = [f"{stem}-{i:05d}-of-{len(shard_sizes):05d}.gguf" for i in range(1, len(shard_sizes) + 1)]
    shards = tuple(
        ShardFacts(file, size, f"{i:064x}") for i, (file, size) in enumerate(zip(files, shard_sizes, strict=True))
    )
    header = GgufHeader(
        arch="llama",
        file_type=None,
        context_length=131072,
        block_count=1,
        embedding_length=64,
        head_count=(1,),
        head_count_kv=(1,),
        key_length=64,
        value_length=64,
        vocab_size=1000,
        split_count=len(shards),
    )
    facts = ModelFacts(repo=m.repo, revision=m.revision, commit=commit, shards=shards, header=header)
    estimate = MemoryEstimate(
        weights=sum(shard_sizes), kv=GIB, compute=GIB // 4, output=GIB // 8, overhead=GIB // 2, host=host
    )
    chosen, *fallbacks = (choice(g) for g in gpus)
    parallel = slots or m.server.parallel or 4
    planned = Slots(parallel, m.scaling.concurrency or default_concurrency(parallel), "test slots")
    return Plan(loaded, facts, estimate, chosen, tuple(fallbacks), "test plan", chosen, planned)


_counter = itertools.count()


def import_app(path: str | Path) -> ModuleType:
    """Import an app file as modal deploy would: a fresh module each time."""
    name = f"rendered_app_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def recorded(module: ModuleType) -> dict[str, Any]:
    """What the real modal library recorded for the app in ``module``, as plain data.

    Building an App needs no network: modal keeps every decorator's arguments locally until
    deploy. Names and secrets are public attributes; the function options (GPU, scaling,
    timeouts, concurrency, snapshots, web server) are only kept in the loader closure modal
    1.6 builds in ``_Function.from_local``, whose free variables are named after the
    decorator's own keywords. Keeping that knowledge here means a modal upgrade that moves it
    breaks one helper, loudly, and no test silently.
    """
    app = module.app
    state = app._local_state
    out: dict[str, Any] = {
        "name": app.name,
        "tags": dict(state.tags),
        "functions": sorted(state.functions),
        "classes": sorted(state.classes),
    }
    for key, function in state.functions.items():
        closure = inspect.getclosurevars(function._load).nonlocals
        spec = function._spec
        autoscaler = closure["autoscaler_settings"]
        web = {
            name: {
                "port": method.webhook_config.web_server_port,
                "startup_timeout": method.webhook_config.web_server_startup_timeout,
            }
            for name, method in (closure["method_definitions"] or {}).items()
            if method.webhook_config.web_server_port
        }
        out[key] = {
            "gpu": spec.gpus,
            "cpu": spec.cpu,
            "memory": spec.memory,
            "volumes": {str(path): _volume(volume) for path, volume in spec.volumes.items()},
            "secrets": [_secret(secret) for secret in spec.secrets],
            "timeout": closure["timeout"],
            "startup_timeout": closure["startup_timeout"],
            "min_containers": autoscaler.min_containers if autoscaler.HasField("min_containers") else None,
            "max_containers": autoscaler.max_containers if autoscaler.HasField("max_containers") else None,
            "scaledown_window": autoscaler.scaledown_window if autoscaler.HasField("scaledown_window") else None,
            "max_concurrent_inputs": closure["max_concurrent_inputs"],
            "target_concurrent_inputs": closure["target_concurrent_inputs_int"] or None,  # 0: not set
            "memory_snapshot": closure["enable_memory_snapshot"],
            "experimental_options": dict(closure["experimental_options"] or {}),
            "web_servers": web,
        }
    return out


def _volume(volume: Any) -> dict[str, Any]:
    loader = inspect.getclosurevars(volume._load).nonlocals
    return {"name": volume.name, "create_if_missing": loader["create_if_missing"]}


def _secret(secret: Any) -> dict[str, Any]:
    loader = inspect.getclosurevars(secret._load).nonlocals
    return {"name": secret.name, "required_keys": list(loader.get("required_keys", []))}
