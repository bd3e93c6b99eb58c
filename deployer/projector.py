"""Multimodal projectors (``mmproj-*.gguf``): what their header says, and what they cost.

A vision (or audio) GGUF ships its encoder and projector as a second file beside the weights;
llama.cpp's libmtmd loads it (tools/mtmd/clip.cpp). Its header is read like the model's, by
growing range requests, and reduced to :class:`~deployer.facts.ProjectorFacts` (with the other facts,
which hold it):

    projector_facts(raw, file, size, sha256)   RawGguf of an mmproj file → ProjectorFacts
    add_projector(estimate, facts)               the model's memory estimate with the projector on GPU 0
    pick_projector(files)                        the mmproj file `gguf-deploy new` offers (F16/BF16, then Q8_0)

The keys are clip.cpp's (clip-impl.h): ``clip.projector_type`` (or ``clip.vision.projector_type`` /
``clip.audio.projector_type`` in a file with both), ``clip.has_vision_encoder``,
``clip.has_audio_encoder``, ``clip.vision.{image_size,patch_size,embedding_length,
projection_dim,attention.head_count,feed_forward_length}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace

from deployer.errors import GgufError
from deployer.estimate import MemoryEstimate
from deployer.facts import ProjectorFacts
from deployer.gguf_header import GgufArray, RawGguf, Scalar

PROJECTOR_PATTERN = re.compile(r"(^|/)mmproj[^/]*\.gguf$", re.IGNORECASE)
# Precisions `gguf-deploy new` prefers, best first: the encoder is small and sensitive to rounding
PREFERRED_PRECISIONS = ("F16", "BF16", "Q8_0")


def projector_facts(raw: RawGguf, file: str, size: int, sha256: str | None = None) -> ProjectorFacts:
    """The facts of an mmproj header; GgufError naming the key when one it needs is missing."""
    md = raw.metadata
    has_vision = _bool(md, "clip.has_vision_encoder")
    has_audio = _bool(md, "clip.has_audio_encoder")
    if not has_vision and not has_audio:
        arch = md.get("general.architecture")
        raise GgufError(
            f"not a multimodal projector: general.architecture is {arch!r} and clip.has_vision_encoder / "
            "clip.has_audio_encoder are unset (name the mmproj-*.gguf file, not the model)"
        )
    which = "vision" if has_vision else "audio"
    kind = md.get("clip.projector_type") or md.get(f"clip.{which}.projector_type")
    if not isinstance(kind, str) or not kind:
        raise GgufError(f"the projector's header has no 'clip.projector_type' (nor 'clip.{which}.projector_type')")
    return ProjectorFacts(
        file=file,
        size=size,
        sha256=sha256,
        projector_type=kind,
        has_vision=has_vision,
        has_audio=has_audio,
        image_size=_int(md, "clip.vision.image_size") if has_vision else 0,
        patch_size=_int(md, "clip.vision.patch_size") if has_vision else 0,
        embedding_length=_int(md, f"clip.{which}.embedding_length"),
        projection_dim=_int(md, f"clip.{which}.projection_dim"),
        head_count=_int(md, f"clip.{which}.attention.head_count"),
        feed_forward_length=_int(md, f"clip.{which}.feed_forward_length"),
        image_max_pixels=_int(md, "clip.vision.image_max_pixels", 0) if has_vision else 0,
        weight_bytes=sum(t.n_bytes for t in raw.tensors),
    )


def summary(facts: ProjectorFacts) -> str:
    """``gemma3 projector, 896 px, 1.9 GiB (weights 0.8 + one image's compute 1.1)``: the plan's words."""
    gib = 1024**3
    size = f"{facts.image_size} px, " if facts.has_vision else ""
    return (
        f"{facts.projector_type} projector, {size}{facts.memory_bytes / gib:.1f} GiB "
        f"(weights {facts.weight_bytes / gib:.1f} + one {'image' if facts.has_vision else 'clip'}'s compute "
        f"{facts.compute_bytes / gib:.1f})"
    )


def add_projector(est: MemoryEstimate, facts: ProjectorFacts | None) -> MemoryEstimate:
    """``est`` with the projector on the first GPU (libmtmd loads it on one device)."""
    if facts is None:
        return est
    extra = facts.memory_bytes
    gpu_bytes = (est.gpu_bytes[0] + extra, *est.gpu_bytes[1:]) if est.gpu_bytes else ()
    return replace(est, projector=est.projector + extra, gpu_bytes=gpu_bytes)


def projector_files(files: Iterable[str]) -> list[str]:
    """The repo's mmproj files, sorted."""
    return sorted(f for f in files if PROJECTOR_PATTERN.search(f))


def pick_projector(files: Iterable[str]) -> str | None:
    """The mmproj file to offer: F16 or BF16 first, then Q8_0, else the first; None when there is none."""
    found = projector_files(files)
    for precision in PREFERRED_PRECISIONS:
        rx = re.compile(rf"(^|[-_.]){precision}([-_.]|$)", re.IGNORECASE)
        matches = [f for f in found if rx.search(f.rsplit("/", 1)[-1].removesuffix(".gguf"))]
        if matches:
            return matches[0]
    return found[0] if found else None


def _int(md: Mapping[str, Scalar | GgufArray], name: str, default: int | None = None) -> int:
    value = md.get(name, default)
    if value is None:
        raise GgufError(f"the projector's header has no '{name}' key")
    if not isinstance(value, int) or isinstance(value, bool):
        raise GgufError(f"the projector's header's '{name}' is {value!r}, not an integer")
    return value


def _bool(md: Mapping[str, Scalar | GgufArray], name: str) -> bool:
    value = md.get(name, False)
    return value is True or (isinstance(value, int) and value == 1)
