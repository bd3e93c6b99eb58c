"""Pure GGUF header parsing: header bytes → :class:`~deployer.facts.GgufHeader`.

A GGUF file starts with its header: magic, version, metadata key/values and tensor infos, padded
to the alignment; the tensor data follows. Only the header is ever read, so a 20 GB model costs a
few megabytes (most of it the tokenizer arrays). ``gguf.GGUFReader`` memory-maps whole files and
cannot work on a partial range, hence this small parser.

    parse_gguf(data)           bytes of a header prefix → RawGguf (every key, every tensor info)
    header_from(raw, *more)    RawGguf of the first shard (and the others) → GgufHeader
    parse_header(data)         both at once, for a single-file model
    read_growing(read, size)   a header read by ``read(start, end)`` in growing ranges (a file, HTTP)
    read_gguf / read_header    the same for local files (a split model's shards are found beside it)

When ``data`` stops short, :class:`NeedMoreBytes` says how long the prefix must at least be;
:func:`read_growing` grows its range with :func:`next_read_size` and tries again.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from deployer.errors import GgufError
from deployer.facts import GgufHeader, TensorInfo

MIB = 1024 * 1024
GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 64 * MIB  # a tokenizer's chat template is KBs; anything bigger is a corrupt length
# Today's largest headers (260k-token vocabularies with merges) are tens of MB; a header that
# claims more is corrupt, and following it would read the tensor data of a many-GB file.
MAX_HEADER = 256 * MIB
DECODED_ARRAY_MAX = 4096  # numeric arrays up to this length are kept (per-layer values); longer ones only counted
SHARD_NAME = re.compile(r"^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")

# Architectures whose sliding-window layer pattern llama.cpp hard-codes when the file has no
# {arch}.attention.sliding_window_pattern key (src/llama-model.cpp, load_hparams: set_swa_pattern(n)
# marks layer il as sliding when il % n < n - 1, so every n-th layer is global).
DEFAULT_SWA_PERIOD: dict[str, int] = {"gemma2": 2, "gemma3": 6, "gemma-embedding": 6, "cohere2": 4, "gpt-oss": 2}

_SCALARS: dict[int, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

Scalar = int | float | bool | str


class NeedMoreBytes(Exception):  # a signal between the parser and a reader, not a user-facing error
    """The header continues past the bytes given; ``needed`` is the least total length to retry with."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"need at least {needed} bytes")
        self.needed = needed


@dataclass(frozen=True)
class GgufArray:
    """An array value: its element type and length; the values only for short numeric arrays."""

    item_type: int  # GGUFValueType
    length: int
    values: tuple[Scalar, ...] | None = None


@dataclass(frozen=True)
class RawGguf:
    """Everything one GGUF header holds: every metadata key, every tensor info."""

    version: int
    metadata: Mapping[str, Scalar | GgufArray]
    tensors: tuple[TensorInfo, ...]
    data_offset: int  # where tensor data begins: the header's size, padding included
    alignment: int


def next_read_size(have: int, needed: int) -> int:
    """How long the next prefix should be: at least ``needed``, growing by max(1 MiB, 10 %).

    Growing by a tenth (not doubling) keeps what is read past the header under max(1 MiB, 10 %).
    """
    return max(needed, have + max(MIB, have // 10))


def read_growing(read: Callable[[int, int], bytes], size: int, first_read: int = MIB) -> RawGguf:
    """Parse the header of a file of ``size`` bytes, given ``read(start, end)`` for its byte ranges.

    Each range continues where the last one ended and is sized by :func:`next_read_size`, so what
    is read past the header stays small; the tensor data is never read. ``read`` may return fewer
    bytes than asked for, but not none.
    """
    if size <= 0:
        raise GgufError("the file is empty")
    data = b""
    end = min(first_read, size)
    while True:
        chunk = read(len(data), end)
        if not chunk:  # a file that shrank, a server that answers with nothing: never loop forever
            raise GgufError(f"no bytes came for range {len(data):,}-{end - 1:,} of a file of {size:,} bytes")
        data += chunk
        try:
            return parse_gguf(data, file_size=size)
        except NeedMoreBytes as more:
            end = min(next_read_size(len(data), more.needed), size)


# ## Bytes → RawGguf


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> int:
        """Reserve ``n`` bytes; return where they start."""
        start, end = self.pos, self.pos + n
        if end > len(self.data):
            raise NeedMoreBytes(end)
        self.pos = end
        return start

    def unpack(self, fmt: struct.Struct) -> Scalar:
        return fmt.unpack_from(self.data, self.take(fmt.size))[0]

    def u32(self) -> int:
        return _U32.unpack_from(self.data, self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.data, self.take(8))[0]

    def string(self, what: str) -> str:
        length = self.u64()
        if length > MAX_STRING:
            raise GgufError(f"malformed GGUF header: {what} claims a string of {length:,} bytes")
        start = self.take(length)
        return self.data[start : start + length].decode("utf-8", errors="replace")


def parse_gguf(data: bytes, *, file_size: int | None = None) -> RawGguf:
    """Parse a GGUF header from a prefix of the file.

    Raises :class:`NeedMoreBytes` when ``data`` ends inside the header, and
    :class:`~deployer.errors.GgufError` when the bytes are not a GGUF header (or, given
    ``file_size``, when the header or the tensor data it describes would end past the file).
    """
    if data[:4] != GGUF_MAGIC[: len(data)] or (file_size is not None and file_size < len(GGUF_MAGIC)):
        raise GgufError(f"not a GGUF file (it starts with {bytes(data[:4])!r}, not b'GGUF')")
    try:
        return _parse(_Cursor(data), file_size)
    except NeedMoreBytes as more:
        if file_size is not None and more.needed > file_size:
            raise GgufError(f"malformed GGUF header: it runs past the end of the file ({file_size:,} bytes)") from None
        if more.needed > MAX_HEADER:
            raise GgufError(f"malformed GGUF header: it claims more than {MAX_HEADER // MIB} MiB") from None
        raise


def _parse(cur: _Cursor, file_size: int | None) -> RawGguf:
    cur.take(len(GGUF_MAGIC))  # checked by the caller
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        if struct.unpack(">I", struct.pack("<I", version))[0] in SUPPORTED_VERSIONS:
            raise GgufError("big-endian GGUF files are not supported")
        raise GgufError(f"GGUF version {version} is not supported (only {' and '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors, n_kv = cur.u64(), cur.u64()
    if n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise GgufError(f"malformed GGUF header: {n_tensors:,} tensors and {n_kv:,} keys")
    metadata: dict[str, Scalar | GgufArray] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        metadata[key] = _value(cur, cur.u32(), key)
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    tensors = tuple(info for info, _ in infos)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise GgufError(f"malformed GGUF header: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment
    if file_size is not None and tensors:
        end = data_offset + max(offset + info.n_bytes for info, offset in infos)
        if end > file_size:
            raise GgufError(f"the file is truncated: its tensors need {end:,} bytes, the file has {file_size:,}")
    return RawGguf(version, metadata, tensors, data_offset, alignment)


def _value(cur: _Cursor, value_type: int, key: str) -> Scalar | GgufArray:
    if value_type == GGUFValueType.STRING:
        return cur.string(key)
    if value_type in _SCALARS:
        return cur.unpack(_SCALARS[value_type])
    if value_type != GGUFValueType.ARRAY:
        raise GgufError(f"malformed GGUF header: key '{key}' has unknown value type {value_type}")
    item_type, length = cur.u32(), cur.u64()
    if item_type in _SCALARS:
        size = _SCALARS[item_type].size
        start = cur.take(size * length)  # numbers are skipped, not decoded, unless short
        if length > DECODED_ARRAY_MAX:
            return GgufArray(item_type, length)
        fmt = "<" + _SCALARS[item_type].format[1:] * length
        return GgufArray(item_type, length, struct.unpack_from(fmt, cur.data, start))
    if item_type == GGUFValueType.STRING:
        _skip_strings(cur, length, key)
    elif item_type == GGUFValueType.ARRAY:
        for _ in range(length):
            _value(cur, item_type, key)
    else:
        raise GgufError(f"malformed GGUF header: key '{key}' is an array of unknown type {item_type}")
    return GgufArray(item_type, length)


def _skip_strings(cur: _Cursor, count: int, key: str) -> None:
    """Walk ``count`` strings without decoding them (a vocabulary: hundreds of thousands)."""
    data, pos, end, unpack = cur.data, cur.pos, len(cur.data), _U64.unpack_from
    for _ in range(count):
        if pos + 8 > end:
            raise NeedMoreBytes(pos + 8)
        length = unpack(data, pos)[0]
        if length > MAX_STRING:
            raise GgufError(f"malformed GGUF header: '{key}' claims a string of {length:,} bytes")
        pos += 8 + length
    if pos > end:
        raise NeedMoreBytes(pos)
    cur.pos = pos


def _tensor_info(cur: _Cursor) -> tuple[TensorInfo, int]:
    name = cur.string("a tensor name")
    n_dims = cur.u32()
    if not 1 <= n_dims <= MAX_DIMS:
        raise GgufError(f"malformed GGUF header: tensor '{name}' has {n_dims} dimensions")
    shape = tuple(cur.u64() for _ in range(n_dims))
    type_id, offset = cur.u32(), cur.u64()
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError) as exc:
        raise GgufError(f"tensor '{name}' has ggml type {type_id}, which this version of gguf does not know") from exc
    if shape[0] % block:
        raise GgufError(f"malformed GGUF header: tensor '{name}' has rows of {shape[0]}, not a multiple of {block}")
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    return TensorInfo(name, shape, type_id, n_elements // block * type_size), offset


# ## RawGguf → GgufHeader


def header_from(first: RawGguf, *others: RawGguf) -> GgufHeader:
    """The planning view of a model: metadata of the first shard, tensors of every shard.

    Raises :class:`~deployer.errors.GgufError` naming the key when a required one is missing.
    """
    md = first.metadata
    arch = _str(md, "general.architecture")
    split_count = _int(md, "split.count", 1)
    for number, shard in enumerate(others, start=2):
        if shard.metadata.get("split.count") != split_count:
            found = shard.metadata.get("split.count")
            raise GgufError(f"shard {number} says split.count = {found}, the first shard {split_count}")
    n_layer = _int(md, f"{arch}.block_count")
    n_embd = _int(md, f"{arch}.embedding_length")
    head_count = _per_layer(md, f"{arch}.attention.head_count", n_layer, (0,) * n_layer)
    head_count_kv = _per_layer(md, f"{arch}.attention.head_count_kv", n_layer, head_count)
    # llama.cpp's default head size is n_embd / n_head (llama_hparams.n_embd_head_k)
    key_length = _int(md, f"{arch}.attention.key_length", n_embd // head_count[0] if n_layer and head_count[0] else 0)
    tensors = first.tensors + tuple(t for shard in others for t in shard.tensors)
    sliding_window = _int(md, f"{arch}.attention.sliding_window", 0) or None
    return GgufHeader(
        arch=arch,
        file_type=_int(md, "general.file_type") if "general.file_type" in md else None,
        context_length=_int(md, f"{arch}.context_length"),
        block_count=n_layer,
        embedding_length=n_embd,
        head_count=head_count,
        head_count_kv=head_count_kv,
        key_length=key_length,
        value_length=_int(md, f"{arch}.attention.value_length", key_length),
        vocab_size=_vocab_size(md, arch, tensors),
        sliding_window=sliding_window,
        swa_layers=_swa_layers(md, arch, n_layer) if sliding_window else (),
        expert_count=_int(md, f"{arch}.expert_count", 0),
        expert_used_count=_int(md, f"{arch}.expert_used_count", 0),
        has_chat_template="tokenizer.chat_template" in md,
        chat_template=template if isinstance(template := md.get("tokenizer.chat_template"), str) else "",
        tensors=tensors,
        data_offset=first.data_offset,
        split_count=split_count,
        extra={k: v for k, v in md.items() if k.startswith(f"{arch}.") and not isinstance(v, GgufArray)},
    )


def parse_header(data: bytes, *, file_size: int | None = None) -> GgufHeader:
    """:func:`parse_gguf` then :func:`header_from`, for a single file."""
    return header_from(parse_gguf(data, file_size=file_size))


def _int(md: Mapping[str, Scalar | GgufArray], name: str, default: int | None = None) -> int:
    """An integer key; ``default`` when absent, an error naming the key when required (no default)."""
    value = md.get(name, default)
    if value is None:
        raise GgufError(f"the GGUF header has no '{name}' key")
    if not isinstance(value, int) or isinstance(value, bool):
        raise GgufError(f"the GGUF header's '{name}' is {_shown(value)}, not an integer")
    return value


def _str(md: Mapping[str, Scalar | GgufArray], name: str) -> str:
    value = md.get(name)
    if value is None:
        raise GgufError(f"the GGUF header has no '{name}' key")
    if not isinstance(value, str):
        raise GgufError(f"the GGUF header's '{name}' is {_shown(value)}, not a string")
    return value


def _shown(value: object) -> str:
    return f"an array of {value.length}" if isinstance(value, GgufArray) else repr(value)


def _per_layer(
    md: Mapping[str, Scalar | GgufArray], name: str, n_layer: int, default: tuple[int, ...]
) -> tuple[int, ...]:
    """A value given once for every layer, or once per layer (an array of ``block_count``)."""
    value = md.get(name)
    if value is None:
        return default
    if isinstance(value, GgufArray):
        if value.values is None or len(value.values) != n_layer:
            raise GgufError(f"the GGUF header's '{name}' has {value.length} values for {n_layer} layers")
        return tuple(int(v) for v in value.values)
    return (_int(md, name),) * n_layer


def _vocab_size(md: Mapping[str, Scalar | GgufArray], arch: str, tensors: Sequence[TensorInfo]) -> int:
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, GgufArray):
        return tokens.length
    if f"{arch}.vocab_size" in md:
        return _int(md, f"{arch}.vocab_size")
    embeddings = next((t for t in tensors if t.name == "token_embd.weight"), None)
    return embeddings.shape[1] if embeddings and len(embeddings.shape) > 1 else 0


def _swa_layers(md: Mapping[str, Scalar | GgufArray], arch: str, n_layer: int) -> tuple[bool, ...]:
    """Which layers use the sliding window, as llama.cpp decides it.

    An explicit ``{arch}.attention.sliding_window_pattern`` wins: an array (true = sliding) or a
    period n (every n-th layer global). Otherwise the architecture's llama.cpp default; for an
    architecture without one, no layer is marked, which over- rather than under-estimates the KV cache.
    """
    name = f"{arch}.attention.sliding_window_pattern"
    pattern = md.get(name)
    if isinstance(pattern, GgufArray):
        if pattern.values is None or len(pattern.values) != n_layer:
            raise GgufError(f"the GGUF header's '{name}' has {pattern.length} values for {n_layer} layers")
        return tuple(bool(v) for v in pattern.values)
    period = _int(md, name) if pattern is not None else DEFAULT_SWA_PERIOD.get(arch)
    if period is None:
        return ()
    return tuple(period == 0 or layer % period < period - 1 for layer in range(n_layer))


# ## Local files


@contextmanager
def _about(file: Path) -> Iterator[None]:
    """Prefix the message of a :class:`GgufError` raised inside with the file it is about."""
    try:
        yield
    except GgufError as exc:
        raise GgufError(f"{file}: {exc}") from exc


def read_gguf(path: str | Path) -> RawGguf:
    """Read one local GGUF file's header, never its tensor data."""
    file = Path(path)
    with _about(file):
        try:
            with file.open("rb") as handle:

                def read(start: int, end: int) -> bytes:
                    handle.seek(start)
                    return handle.read(end - start)

                return read_growing(read, file.stat().st_size)
        except OSError as exc:
            raise GgufError(f"cannot read: {exc.strerror or exc}") from exc


def shard_names(file: str) -> list[str] | None:
    """Every shard's name of a split model, given any one of them; None for a single file.

    >>> shard_names("m-00002-of-00003.gguf")
    ['m-00001-of-00003.gguf', 'm-00002-of-00003.gguf', 'm-00003-of-00003.gguf']
    """
    found = SHARD_NAME.match(file)
    if not found:
        return None
    count = int(found["count"])
    return [f"{found['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def read_header(path: str | Path) -> GgufHeader:
    """Read a local model's header; for a split model, pass the first shard (the others are read beside it)."""
    file = Path(path)
    first = read_gguf(file)
    with _about(file):
        others = _other_shards(file, _int(first.metadata, "split.count", 1))
    raws = [read_gguf(file.parent / name) for name in others]  # their errors name their own file
    with _about(file):
        return header_from(first, *raws)


def _other_shards(file: Path, count: int) -> list[str]:
    """The names of the shards after ``file``, the first of ``count``, all of them present beside it."""
    if count == 1:
        return []
    names = shard_names(file.name)
    if names is None or len(names) != count or names[0] != file.name:
        raise GgufError(f"a split model of {count} shards; name its first shard '<name>-00001-of-{count:05d}.gguf'")
    missing = [name for name in names[1:] if not (file.parent / name).is_file()]
    if missing:
        raise GgufError(f"shard {missing[0]} is missing")
    return names[1:]
