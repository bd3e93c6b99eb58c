"""What the runtime needs to know about the host CPU: its physical cores, its name, and whether
llama.cpp may repack weights on it.

Read from Linux's ``/proc`` and ``/sys`` (elsewhere: the affinity count, no flags). Pure decisions
(:func:`repack_weights`) take the facts as arguments so that they are tested without the machine.
Imported without llama.cpp: the benchmarks and the tests' stock ``Llama`` settings use it too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# Flags of CPUs with Intel AMX. With them, llama.cpp's extra buffer types include the AMX one, whose
# ``ggml_backend_amx_mul_mat`` segfaults at the first decode of the demo's Q4_K_M model
# (ggml-org/llama.cpp#20824, open upstream; reproduced on a Sapphire Rapids Xeon). Elsewhere the
# extra buffer types are llama.cpp's CPU repacking (Q4_0, IQ4_NL, Q4_K, Q2_K ... into interleaved
# layouts for AVX2/AVX512/NEON kernels), which is safe and faster: see BENCHMARKS.md "CPU weight repacking".
AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})


def physical_cores() -> int:
    """The CPU threads llama.cpp's own tools default to: one per physical core (not per hyperthread)."""
    usable = len(os.sched_getaffinity(0))
    try:
        cores = {
            path.read_text(encoding="ascii").strip()
            for path in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings_list")
        }
    except OSError:
        cores = set()
    return max(1, min(len(cores), usable)) if cores else max(1, usable)


def _cpuinfo_field(name: str) -> str:
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (``/proc/cpuinfo``); empty where that cannot be read."""
    return frozenset(_cpuinfo_field("flags").split())


def cpu_name() -> str:
    """The CPU's model name, as BENCHMARKS.md records it ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8488C")."""
    return _cpuinfo_field("model name") or "unknown CPU"


def has_amx(flags: Iterable[str]) -> bool:
    return not AMX_FLAGS.isdisjoint(flags)


def repack_weights(requested: bool | None, flags: Iterable[str]) -> bool:
    """Whether llama.cpp may use its extra CPU buffer types (``use_extra_bufts``, llama-server's
    ``--repack`` / ``--no-repack``): what was asked for, else on except where AMX makes it crash."""
    if requested is not None:
        return requested
    return not has_amx(flags)
