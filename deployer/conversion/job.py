"""The Modal app's conversion job, planned: what its download step fetches, the job as plain data, its container's size.

Pure; :mod:`deployer.render` writes these into the rendered app. For a model whose facts carry a
:class:`~deployer.facts.Conversion`, the app's download step fetches the checkpoint's files
(verified) into the Volume, and its conversion function writes the planned GGUF beside them
(:func:`deployer.conversion.converter.convert_checkpoint`). For a GGUF model there is no job.

    download_files(facts)     the files the download step fetches: the GGUF shards, or the checkpoint
    convert_jobs(facts)       [] or [the job]: output file, type, and the header the result must have
    convert_resources(facts)  memory and timeout of the conversion container, from the checkpoint's size
                              and, for a type llama.cpp's quantizer writes, its 16-bit intermediate's

The intermediate (two bytes a weight) lies in the Volume beside the checkpoint while the quantizer
reads it (memory-mapped) and is deleted after: the Volume is the disk; the memory covers it too.
"""

from __future__ import annotations

import math
from typing import Any

from deployer.facts import ModelFacts, ShardFacts
from deployer.quants import QUANTIZER_QUANTS

MIB = 1024 * 1024
# The converter reads tensors lazily from memory-mapped files and writes them one at a time; a
# PyTorch .bin is unpickled whole. Memory: the checkpoint plus a quarter and 2 GiB for Python,
# torch and the largest tensors in float32, so that neither format runs out.
CONVERT_MEMORY_MIN_MIB = 4096
CONVERT_MEMORY_MAX_MIB = 256 * 1024
CONVERT_MEMORY_FACTOR = 1.25
CONVERT_MEMORY_BASE_MIB = 2048
# The quantizer memory-maps the 16-bit intermediate and quantizes it a slab at a time: the same
# rule sized from the intermediate, the larger of the two wins.
INTERMEDIATE_BYTES_PER_WEIGHT = 2
# Time: the converter quantizes in numpy on the CPU, assumed no faster than 20 MB/s, plus a base;
# the intermediate is written and read again at no more than that rate.
CONVERT_BASE_S = 1800
CONVERT_BYTES_PER_S = 20 * 1000**2
CONVERT_MAX_S = 86400


def download_files(facts: ModelFacts) -> tuple[ShardFacts, ...]:
    """What the download step puts into the Volume: the GGUF's shards, or the checkpoint's files;
    and the multimodal projector beside them, verified by size and sha256 like them."""
    files = facts.conversion.files if facts.conversion else facts.shards
    projector = facts.projector
    return files if projector is None else (*files, ShardFacts(projector.file, projector.size, projector.sha256))


def download_bytes(facts: ModelFacts) -> int:
    return sum(f.size for f in download_files(facts))


def convert_jobs(facts: ModelFacts) -> list[dict[str, Any]]:
    """The conversion the app runs after downloading, as plain data: none for a GGUF model."""
    conversion = facts.conversion
    if conversion is None:
        return []
    header = facts.header
    return [
        {
            "source": conversion.source,
            "architecture": conversion.architecture,
            "quant": conversion.quant,
            "file": facts.file,  # below the commit's folder, beside the checkpoint
            "expected": {"arch": header.arch, "tensor_count": len(header.tensors), "file_type": header.file_type},
        }
    ]


def intermediate_bytes(facts: ModelFacts) -> int:
    """Bytes of the 16-bit file the quantizer reads; 0 when the converter writes the type itself."""
    if facts.conversion is None or facts.conversion.quant not in QUANTIZER_QUANTS:
        return 0
    return facts.header.params * INTERMEDIATE_BYTES_PER_WEIGHT


def convert_memory_mib(source_bytes: int, intermediate_bytes: int = 0) -> int:
    """The conversion container's memory request for a checkpoint of ``source_bytes`` (and an intermediate)."""
    largest = max(source_bytes, intermediate_bytes)
    wanted = math.ceil(largest * CONVERT_MEMORY_FACTOR / MIB) + CONVERT_MEMORY_BASE_MIB
    return max(CONVERT_MEMORY_MIN_MIB, min(CONVERT_MEMORY_MAX_MIB, wanted))


def convert_timeout(source_bytes: int, intermediate_bytes: int = 0) -> int:
    """Seconds the conversion may take for a checkpoint of ``source_bytes`` (and an intermediate, written and read)."""
    work = source_bytes + 2 * intermediate_bytes
    return min(CONVERT_MAX_S, CONVERT_BASE_S + math.ceil(work / CONVERT_BYTES_PER_S))


def convert_resources(facts: ModelFacts) -> dict[str, int]:
    """``convert_memory_mib`` and ``convert_timeout`` for the app's resources (the minimum for a GGUF model)."""
    source = facts.conversion.source_bytes if facts.conversion else 0
    between = intermediate_bytes(facts)
    return {
        "convert_memory_mib": convert_memory_mib(source, between),
        "convert_timeout": convert_timeout(source, between),
    }
