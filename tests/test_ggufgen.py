"""The test-model generator writes what it claims: checked with gguf's own reader."""

from __future__ import annotations

import os

import gguf
import pytest

from tests import ggufgen as g


@pytest.mark.parametrize("spec", [g.TINY_LLAMA, g.TINY_MOE, g.TINY_QWEN2, g.TINY_GEMMA3], ids=lambda s: s.name)
def test_loadable_models_read_back(tmp_path, spec):
    path = g.write_gguf(tmp_path / "m.gguf", spec)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == spec.arch
    assert sum(int(t.n_elements) for t in reader.tensors) == g.n_params(spec)
    assert os.path.getsize(path) == reader.tensors[-1].data_offset + reader.tensors[-1].n_bytes


@pytest.mark.parametrize(
    ("spec", "params_b", "size_gb"),
    [
        pytest.param(g.DARK_CHAMPION_18B, 18.4, 19.6, id="dark-champion-18b-q8"),
        pytest.param(g.LLAMA_70B_Q4KM, 70.6, 42.5, id="llama-70b-q4km"),
        pytest.param(g.MISTRAL_LARGE_123B_Q4KM, 122.6, 73.2, id="mistral-large-123b-q4km"),
    ],
)
def test_header_only_files_have_real_sizes_and_are_sparse(tmp_path, spec, params_b, size_gb):
    path = g.write_gguf(tmp_path / "m.gguf", spec, header_only=True)
    assert round(g.n_params(spec) / 1e9, 1) == params_b
    assert round(os.path.getsize(path) / 1e9, 1) == size_gb
    assert os.stat(path).st_blocks * 512 < 64 * 1024 * 1024  # sparse: only the header is on disk


def test_split_shards_sum_to_the_whole(tmp_path):
    whole = g.write_gguf(tmp_path / "whole.gguf", g.LLAMA_70B_Q4KM, header_only=True)
    shards = g.write_split(tmp_path / "split", g.LLAMA_70B_Q4KM, 3)
    assert [p.name for p in shards] == [f"Llama-3.3-70B-Instruct-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    data = sum(os.path.getsize(p) for p in shards)
    assert abs(data - os.path.getsize(whole)) < 3 * 16 * 1024 * 1024  # headers differ, tensor data equal
