"""gguf-deploy: GGUF models served as OpenAI-compatible APIs on Modal, one TOML manifest per model.

The library API, in pipeline order (each stage returns an immutable value):

    load_manifest / load_manifests      manifest files -> LoadedManifest (deployer.loading)
    manifest_schema                     the JSON schema of a manifest (deployer.manifest)

Errors are all subclasses of :class:`GgufDeployError` (see :mod:`deployer.errors`).
"""

__version__ = "0.1.0"

from deployer.errors import GgufDeployError, ManifestInvalid, Problem
from deployer.loading import LoadedManifest, load_manifest, load_manifests, load_valid_manifests, parse_manifest
from deployer.manifest import Manifest, manifest_schema

__all__ = [
    "GgufDeployError",
    "LoadedManifest",
    "Manifest",
    "ManifestInvalid",
    "Problem",
    "__version__",
    "load_manifest",
    "load_manifests",
    "load_valid_manifests",
    "manifest_schema",
    "parse_manifest",
]
