"""gguf-deploy: GGUF models served as OpenAI-compatible APIs on Modal, one TOML manifest per model.

The library API, in pipeline order (each stage returns an immutable value):

    load_manifest / load_manifests      manifest files -> LoadedManifest            (deployer.loading)
    manifest_schema                     the JSON schema of a manifest               (deployer.manifest)
    Resolver, HfHubClient, FactsCache   (repo, revision, file) -> ModelFacts        (deployer.hub, deployer.cache)
    read_header                         a local .gguf -> GgufHeader                 (deployer.gguf_header)
    EstimateSettings, MemoryEstimate    GgufHeader + settings -> memory (deployer.estimate.estimate)
    plan_all, Plan, PlanFailure         manifests + facts -> plans (deployer.plan.plan for one)
                                        Plan -> the Modal app file: deployer.render.render
    RuntimeConfig, runtime_config, serve  the serving runtime                       (deployer.runtime)

Errors are all subclasses of :class:`GgufDeployError` (see :mod:`deployer.errors`).

Functions named like their module (``deployer.plan.plan``, ``deployer.estimate.estimate``,
``deployer.render.render``) are imported from the module, so that the package attribute stays
the module. Names are imported on first use (PEP 562), so ``import deployer`` costs nothing: the
serving runtime starts without loading pydantic, and validation without loading huggingface_hub.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "GgufDeployError": "deployer.errors",
    "ManifestInvalid": "deployer.errors",
    "Problem": "deployer.errors",
    "LoadedManifest": "deployer.loading",
    "load_manifest": "deployer.loading",
    "load_manifests": "deployer.loading",
    "load_valid_manifests": "deployer.loading",
    "parse_manifest": "deployer.loading",
    "Manifest": "deployer.manifest",
    "manifest_schema": "deployer.manifest",
    "ModelFacts": "deployer.facts",
    "GgufHeader": "deployer.facts",
    "read_header": "deployer.gguf_header",
    "FactsCache": "deployer.cache",
    "default_cache_dir": "deployer.cache",
    "HfHubClient": "deployer.hub",
    "Resolver": "deployer.hub",
    "EstimateSettings": "deployer.estimate",
    "MemoryEstimate": "deployer.estimate",
    "Plan": "deployer.plan",
    "plan_all": "deployer.plan",
    "PlanFailure": "deployer.plan",
    "RuntimeConfig": "deployer.runtime",
    "runtime_config": "deployer.runtime",
    "serve": "deployer.runtime",
}

__all__ = [
    "EstimateSettings",
    "FactsCache",
    "GgufDeployError",
    "GgufHeader",
    "HfHubClient",
    "LoadedManifest",
    "Manifest",
    "ManifestInvalid",
    "MemoryEstimate",
    "ModelFacts",
    "Plan",
    "PlanFailure",
    "Problem",
    "Resolver",
    "RuntimeConfig",
    "__version__",
    "default_cache_dir",
    "load_manifest",
    "load_manifests",
    "load_valid_manifests",
    "manifest_schema",
    "parse_manifest",
    "plan_all",
    "read_header",
    "runtime_config",
    "serve",
]  # the keys of _EXPORTS (a test checks)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deployer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from deployer.cache import FactsCache, default_cache_dir
    from deployer.errors import GgufDeployError, ManifestInvalid, Problem
    from deployer.estimate import EstimateSettings, MemoryEstimate
    from deployer.facts import GgufHeader, ModelFacts
    from deployer.gguf_header import read_header
    from deployer.hub import HfHubClient, Resolver
    from deployer.loading import LoadedManifest, load_manifest, load_manifests, load_valid_manifests, parse_manifest
    from deployer.manifest import Manifest, manifest_schema
    from deployer.plan import Plan, PlanFailure, plan_all
    from deployer.runtime import RuntimeConfig, runtime_config, serve
