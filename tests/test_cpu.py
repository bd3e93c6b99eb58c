"""The host-CPU facts the runtime decides with (deployer.runtime.cpu): pure rules, no llama.cpp."""

from __future__ import annotations

import pytest

from deployer.runtime import cpu

EPYC = frozenset({"fpu", "sse2", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"})
SAPPHIRE_RAPIDS = EPYC | {"amx_tile", "amx_int8", "amx_bf16", "avx512_fp16"}


@pytest.mark.parametrize(
    ("requested", "flags", "expected"),
    [
        pytest.param(None, EPYC, True, id="auto-repacks-on-avx512-without-amx"),
        pytest.param(None, frozenset({"avx2", "fma"}), True, id="auto-repacks-on-avx2"),
        pytest.param(None, SAPPHIRE_RAPIDS, False, id="auto-never-on-amx-llama.cpp-20824"),
        pytest.param(None, frozenset({"amx_tile"}), False, id="any-amx-flag-counts"),
        pytest.param(None, frozenset(), True, id="unknown-cpu-repacks"),
        pytest.param(True, SAPPHIRE_RAPIDS, True, id="asked-for-is-honoured-even-on-amx"),
        pytest.param(False, EPYC, False, id="asked-off-is-off"),
    ],
)
def test_repack_weights(requested, flags, expected):
    assert cpu.repack_weights(requested, flags) is expected


def test_cpuinfo_fields_are_read(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f\n"
    )
    monkeypatch.setattr(cpu, "CPUINFO", info)
    assert cpu.cpu_name() == "AMD EPYC 9R14"
    assert cpu.cpu_flags() == {"fpu", "avx2", "avx512f"}


def test_unreadable_cpuinfo_means_no_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "missing")
    assert cpu.cpu_flags() == frozenset()
    assert cpu.cpu_name() == "unknown CPU"
    assert cpu.repack_weights(None, cpu.cpu_flags()) is True


def test_physical_cores_is_at_least_one_and_at_most_the_usable_cpus():
    import os

    assert 1 <= cpu.physical_cores() <= len(os.sched_getaffinity(0))
