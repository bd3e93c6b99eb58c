"""Generate GGUF files for tests and benchmarks with the ``gguf`` package.

Two kinds of file:

* **loadable** tiny models (``TINY_*``): every tensor written with (random, small) data and an
  SPM tokenizer, so llama.cpp loads them and runs them, with nonsense output;
* **header-only** real-size models (``DARK_CHAMPION_18B``, ``LLAMA_70B_Q4KM``, ...): metadata,
  tokenizer and tensor infos exactly as a real file would have them, then the file is
  ``os.truncate``d to its real size, so it is sparse (a few MB on disk) but every byte offset,
  size and header matches. Serving such a file over HTTP Range requests is how the tests prove
  that planning never downloads tensor data.

    write_gguf(path, spec, header_only=False)      -> Path
    write_split(folder, spec, n_shards)           -> [Path, ...]   "<stem>-0000i-of-0000N.gguf"
    write_projector(path, spec)                   -> Path   a vision mmproj (gemma3, qwen2.5vl layouts)
    write_audio_projector(path, spec)             -> Path   an audio mmproj (qwen2a layout)

The tiny audio projector is clip.cpp's ``qwen2a`` (Qwen2-Audio): of the audio projectors libmtmd
loads it needs the fewest tensors. It is a Whisper encoder (two 1-D convolutions, a position
embedding, pre-norm blocks, an average pool, a final norm) and one linear layer into the text
model, with no metadata beyond widths and mel bins: Ultravox, Voxtral, GLM-ASR and MERaLiON add a
frame-stacking factor and a two- or four-layer MLP, LFM2-Audio and Qwen3-Omni's a convolution
subsampler and their own blocks. It pairs with ``TINY_QWEN2``, as Qwen2-Audio pairs with Qwen2.

Tensor names and shapes follow llama.cpp's loaders (src/models/{llama,qwen2,gemma3}.cpp); the
tensor types of a quant follow llama.cpp's choices closely enough for planning (Q4_K_M puts
attn_v, ffn_down and the output in Q6_K, the rest in Q4_K).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

from deployer.quants import FILE_TYPES

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class ModelSpec:
    """One architecture and size. A llama with ``n_expert > 0`` is a Mixtral-style MoE."""

    name: str
    arch: str  # "llama" | "qwen2" | "gemma3" | "gpt-oss" (header-only: llama.cpp needs its real tokenizer)
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    head_dim: int | None = None  # default n_embd // n_head
    n_expert: int = 0
    n_expert_used: int = 0
    sliding_window: int | None = None  # gemma3: the SWA window
    swa_period: int | None = None  # gemma3: every swa_period-th layer is global (llama.cpp default 6)
    tied_embeddings: bool = False  # no output.weight: the token embedding is reused
    quant: str = "F32"  # deployer.quants name
    tokenizer: str = "llama"  # "llama" (SPM, loadable) or "gpt2" (BPE with merges; header-only realism)
    n_merges: int = 0  # gpt2 tokenizer: number of merges written (header size realism)

    @property
    def n_embd_head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


# ## Tensor layout


def _main_type(quant: str) -> Q:
    table = {
        "F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1,
        "Q5_0": Q.Q5_0, "Q5_1": Q.Q5_1, "Q2_K": Q.Q2_K, "Q3_K_M": Q.Q3_K, "Q4_K_S": Q.Q4_K,
        "Q4_K_M": Q.Q4_K, "Q5_K_S": Q.Q5_K, "Q5_K_M": Q.Q5_K, "Q6_K": Q.Q6_K,
    }  # fmt: skip
    if quant not in table:
        raise ValueError(f"ggufgen: no tensor layout for quant {quant}")
    return table[quant]


def _type_for(spec: ModelSpec, name: str, shape: tuple[int, ...]) -> Q:
    """The GGML type llama.cpp's quantizer would give this tensor for ``spec.quant``."""
    if len(shape) == 1:
        return Q.F32  # norms and biases stay F32
    if spec.quant == "MXFP4_MOE":  # gpt-oss as published: experts in MXFP4, the rest in Q8_0
        return Q.MXFP4 if "_exps." in name else Q.Q8_0
    if name == "ffn_gate_inp.weight" or name.endswith("ffn_gate_inp.weight"):
        return Q.F32 if spec.quant not in ("F16", "BF16") else _main_type(spec.quant)
    main = _main_type(spec.quant)
    if spec.quant.endswith("_K_M") and (name == "output.weight" or _more_bits(spec, name)):
        return Q.Q6_K
    block = gguf.GGML_QUANT_SIZES[main][0]
    return main if shape[0] % block == 0 else Q.F16  # llama.cpp falls back when rows don't divide


def _more_bits(spec: ModelSpec, name: str) -> bool:
    # llama.cpp's use_more_bits(): attn_v and ffn_down of the first and last eighth of the layers
    # and of every third layer between them get Q6_K in the _K_M quants
    if not name.startswith("blk.") or not any(part in name for part in ("attn_v.", "ffn_down")):
        return False
    layer, n = int(name.split(".")[1]), spec.n_layer
    return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2


def tensor_shapes(spec: ModelSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, shapes in GGUF order (ne[0] first)."""
    e, v, ff, hd = spec.n_embd, spec.n_vocab, spec.n_ff, spec.n_embd_head
    q, kv = spec.n_head * hd, spec.n_head_kv * hd
    yield "token_embd.weight", (e, v)
    yield "output_norm.weight", (e,)
    if not spec.tied_embeddings:
        yield "output.weight", (e, v)
    for i in range(spec.n_layer):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (e,)
        yield b + "attn_q.weight", (e, q)
        yield b + "attn_k.weight", (e, kv)
        yield b + "attn_v.weight", (e, kv)
        if spec.arch == "qwen2":
            yield b + "attn_q.bias", (q,)
            yield b + "attn_k.bias", (kv,)
            yield b + "attn_v.bias", (kv,)
        yield b + "attn_output.weight", (q, e)
        if spec.arch == "gpt-oss":  # biases everywhere, attention sinks, a post-attention norm
            yield from ((b + f"attn_{x}.bias", (n,)) for x, n in (("q", q), ("k", kv), ("v", kv), ("output", e)))
            yield b + "attn_sinks.weight", (spec.n_head,)
            yield b + "post_attention_norm.weight", (e,)
        if spec.arch == "gemma3":
            yield b + "attn_q_norm.weight", (hd,)
            yield b + "attn_k_norm.weight", (hd,)
            yield b + "post_attention_norm.weight", (e,)
            yield b + "post_ffw_norm.weight", (e,)
        if spec.arch != "gpt-oss":  # its post_attention_norm is the FFN's input norm
            yield b + "ffn_norm.weight", (e,)
        if spec.n_expert:
            yield b + "ffn_gate_inp.weight", (e, spec.n_expert)
            yield b + "ffn_gate_exps.weight", (e, ff, spec.n_expert)
            yield b + "ffn_up_exps.weight", (e, ff, spec.n_expert)
            yield b + "ffn_down_exps.weight", (ff, e, spec.n_expert)
            if spec.arch == "gpt-oss":
                yield b + "ffn_gate_inp.bias", (spec.n_expert,)
                yield from (
                    (b + f"ffn_{x}_exps.bias", (n, spec.n_expert)) for x, n in (("gate", ff), ("up", ff), ("down", e))
                )
        else:
            yield b + "ffn_gate.weight", (e, ff)
            yield b + "ffn_up.weight", (e, ff)
            yield b + "ffn_down.weight", (ff, e)


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def n_params(spec: ModelSpec) -> int:
    return sum(int(np.prod(shape)) for _, shape in tensor_shapes(spec))


# ## Metadata


def _add_metadata(writer: gguf.GGUFWriter, spec: ModelSpec, chat_template: str | None) -> None:
    writer.add_name(spec.name)
    writer.add_type("model")
    writer.add_file_type(FILE_TYPES[spec.quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if spec.head_dim:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.n_embd_head)
    if spec.n_expert:
        writer.add_expert_count(spec.n_expert)
        writer.add_expert_used_count(spec.n_expert_used)
    if spec.sliding_window:
        writer.add_sliding_window(spec.sliding_window)
        if spec.swa_period:
            writer.add_uint32(f"{spec.arch}.attention.sliding_window_pattern", spec.swa_period)
    if chat_template:
        writer.add_chat_template(chat_template)
    _add_tokenizer(writer, spec)


def _add_tokenizer(writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
    v = spec.n_vocab
    if spec.tokenizer == "gpt2":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list([f"tok{i}" for i in range(v)])
        writer.add_token_types([gguf.TokenType.NORMAL] * v)
        if spec.n_merges:
            writer.add_token_merges([f"t{i % 977} k{i}" for i in range(spec.n_merges)])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
        return
    # SPM ("llama"): <unk>, <s>, </s>, the 256 byte tokens, then plain pieces; loadable by llama.cpp
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    if v < len(specials) + len(byte_tokens) + 1:
        raise ValueError("ggufgen: an SPM vocabulary needs at least 260 tokens")
    pieces = [f"▁w{i}" for i in range(v - len(specials) - len(byte_tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(specials + byte_tokens + pieces)
    writer.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types(
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.BYTE] * 256
        + [gguf.TokenType.NORMAL] * len(pieces)
    )
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)


# ## Writing


def _data(shape: tuple[int, ...], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Small random weights in ``qtype`` (zeros where gguf cannot quantize to it)."""
    rows = tuple(reversed(shape))  # numpy order
    values = rng.standard_normal(rows, dtype=np.float32) * 0.02
    if len(shape) == 1:
        values = np.ones(rows, dtype=np.float32)  # norms of one: keeps activations finite
    try:
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:
        return np.zeros(gguf.quants.quant_shape_to_byte_shape(rows, qtype), dtype=np.uint8)


def _write_tensors(
    writer: gguf.GGUFWriter,
    path: Path,
    tensors: list[tuple[str, tuple[int, ...], Q]],
    *,
    header_only: bool,
    seed: int,
) -> Path:
    """Write ``writer``'s metadata and ``tensors`` (name, shape, type): random data, or for a
    header-only file none, the file truncated (sparse) to the size the data would have."""
    rng = np.random.default_rng(seed)
    data_bytes = 0
    for name, shape, qtype in tensors:
        nbytes = _nbytes(shape, qtype)
        data_bytes += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
        if header_only:
            writer.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nbytes, raw_dtype=qtype)
        else:
            writer.add_tensor(name, _data(shape, qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    if header_only:
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        start = gguf.GGUFWriter.ggml_pad(writer.fout[0].tell(), writer.data_alignment)
        writer.close()
        os.truncate(path, start + data_bytes)
    else:
        writer.write_tensors_to_file()
        writer.close()
    return path


def write_gguf(
    path: str | Path, spec: ModelSpec, *, header_only: bool = False, chat_template: str | None = None, seed: int = 0
) -> Path:
    """Write ``spec`` to ``path``; header-only files are truncated (sparse) to their real size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, spec.arch)
    _add_metadata(writer, spec, chat_template)
    tensors = [(name, shape, _type_for(spec, name, shape)) for name, shape in tensor_shapes(spec)]
    return _write_tensors(writer, path, tensors, header_only=header_only, seed=seed)


def write_split(folder: str | Path, spec: ModelSpec, n_shards: int, *, header_only: bool = True) -> list[Path]:
    """Write ``spec`` as ``n_shards`` files named like llama.cpp's gguf-split does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = list(tensor_shapes(spec))
    per_shard = -(-len(tensors) // n_shards)
    stem = f"{spec.name}-{spec.quant}"
    writer = gguf.GGUFWriter(folder / f"{stem}.gguf", spec.arch, split_max_tensors=per_shard)
    _add_metadata(writer, spec, None)
    rng = np.random.default_rng(0)
    shard_data = [0] * n_shards
    for index, (name, shape) in enumerate(tensors):
        qtype = _type_for(spec, name, shape)
        nbytes = _nbytes(shape, qtype)
        shard_data[index // per_shard] += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
        if header_only:
            writer.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nbytes, raw_dtype=qtype)
        else:
            writer.add_tensor(name, _data(shape, qtype, rng), raw_dtype=qtype)
    paths = writer.format_shard_names(folder / f"{stem}.gguf")
    assert len(paths) == n_shards, (len(paths), n_shards)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    if header_only:
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        starts = [gguf.GGUFWriter.ggml_pad(f.tell(), writer.data_alignment) for f in writer.fout]
        writer.close()
        for path, start, data in zip(paths, starts, shard_data, strict=True):
            os.truncate(path, start + data)
    else:
        writer.write_tensors_to_file()
        writer.close()
    return paths


# ## Presets

# Tiny and loadable: for estimator benchmarks and serving tests (random weights, nonsense output).
TINY_LLAMA = ModelSpec("tiny-llama", "llama", 4, 256, 4, 2, 512, 1024, 4096, quant="F32")
TINY_MOE = ModelSpec("tiny-moe", "llama", 4, 256, 4, 2, 512, 1024, 4096, n_expert=4, n_expert_used=2, quant="F32")
TINY_QWEN2 = ModelSpec("tiny-qwen2", "qwen2", 4, 256, 4, 2, 512, 1536, 32768, tied_embeddings=True, quant="F32")
TINY_GEMMA3 = ModelSpec(
    "tiny-gemma3", "gemma3", 6, 256, 4, 1, 512, 2048, 32768,
    head_dim=64, sliding_window=512, swa_period=6, tied_embeddings=True, quant="F32",
)  # fmt: skip

# Real sizes, for header-only files (tensor shapes as published; tokenizers as sized by the real ones).
DARK_CHAMPION_18B = ModelSpec(
    "L3.2-8X3B-MOE-Dark-Champion-Inst-18.4B-uncen-ablit_D_AU", "llama", 28, 3072, 24, 8, 8192, 128256, 131072,
    n_expert=8, n_expert_used=2, quant="Q8_0", tokenizer="gpt2", n_merges=280147,
)  # fmt: skip
QWEN_0_5B = ModelSpec(
    "qwen2.5-0.5b-instruct", "qwen2", 24, 896, 14, 2, 4864, 151936, 32768,
    tied_embeddings=True, quant="Q8_0", tokenizer="gpt2",
)  # fmt: skip
LLAMA_8B = ModelSpec(
    "Meta-Llama-3.1-8B-Instruct", "llama", 32, 4096, 32, 8, 14336, 128256, 131072, quant="Q8_0", tokenizer="gpt2"
)
LLAMA_70B_Q4KM = ModelSpec(
    "Llama-3.3-70B-Instruct", "llama", 80, 8192, 64, 8, 28672, 128256, 131072, quant="Q4_K_M", tokenizer="gpt2"
)
MISTRAL_LARGE_123B_Q4KM = ModelSpec(
    "Mistral-Large-Instruct-2411", "llama", 88, 12288, 96, 8, 28672, 32768, 131072, quant="Q4_K_M", tokenizer="gpt2"
)
# Sliding-window models at real size (planning: issue 20). Gemma 3 27B: 62 layers, every 6th global,
# the others over 1,024 tokens; gpt-oss: every other layer over 128 tokens, experts in MXFP4.
GEMMA3_27B_Q4KM = ModelSpec(
    "gemma-3-27b-it", "gemma3", 62, 5376, 32, 16, 21504, 262208, 131072,
    head_dim=128, sliding_window=1024, tied_embeddings=True, quant="Q4_K_M", tokenizer="gpt2",
)  # fmt: skip
GPT_OSS_20B = ModelSpec(
    "gpt-oss-20b", "gpt-oss", 24, 2880, 64, 8, 2880, 201088, 131072,
    head_dim=64, n_expert=32, n_expert_used=4, sliding_window=128, quant="MXFP4_MOE", tokenizer="gpt2",
)  # fmt: skip
GPT_OSS_120B = replace(GPT_OSS_20B, name="gpt-oss-120b", n_layer=36, n_expert=128)
# ~1.3 trillion parameters in F16 (~2.7 TB): more than 8 x B200 can hold.
TOO_BIG_1T_F16 = ModelSpec("too-big-1t", "llama", 200, 20480, 160, 16, 81920, 32768, 32768, quant="F16")


def with_quant(spec: ModelSpec, quant: str) -> ModelSpec:
    """The same model in another quant."""
    return replace(spec, quant=quant)


# ## Multimodal projectors (mmproj-*.gguf, llama.cpp's tools/mtmd/clip.cpp layout)


@dataclass(frozen=True)
class ProjectorSpec:
    """A vision encoder (a ViT) and its projector into a language model of ``projection_dim`` width.

    ``kind`` is clip.cpp's projector type: ``gemma3`` (SigLIP, LayerNorm with biases, GELU, an
    average pool then one matrix) or ``qwen2.5vl`` (RMSNorm, SwiGLU, a two-layer MLP merger).
    """

    name: str
    kind: str
    n_layer: int
    n_embd: int
    n_head: int
    n_ff: int
    image_size: int
    patch_size: int
    projection_dim: int
    quant: str = "F16"
    scale_factor: int | None = None  # gemma3: the pooling kernel (clip.cpp's default 4)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def projector_tensor_shapes(spec: ProjectorSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of ``spec``, GGUF order (ne[0] first)."""
    d, f, p = spec.n_embd, spec.n_ff, spec.patch_size
    qwen = spec.kind == "qwen2.5vl"
    yield "v.patch_embd.weight", (p, p, 3, d)
    if qwen:  # two temporal patches (video frames), one image uses both
        yield "v.patch_embd.weight.1", (p, p, 3, d)
    else:
        yield "v.patch_embd.bias", (d,)
        yield "v.position_embd.weight", (d, spec.n_patches)
    norm = ("weight",) if qwen else ("weight", "bias")
    for i in range(spec.n_layer):
        b = f"v.blk.{i}."
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            yield b + part + ".weight", (d, d)
            yield b + part + ".bias", (d,)
        for ln in ("ln1", "ln2"):
            for suffix in norm:
                yield f"{b}{ln}.{suffix}", (d,)
        ffn = ("ffn_gate", "ffn_up") if qwen else ("ffn_up",)
        for part in ffn:
            yield b + part + ".weight", (d, f)
            yield b + part + ".bias", (f,)
        yield b + "ffn_down.weight", (f, d)
        yield b + "ffn_down.bias", (d,)
    if qwen:
        merged = 4 * d  # 2×2 patches merged
        yield "v.post_ln.weight", (d,)
        yield "mm.0.weight", (merged, merged)
        yield "mm.0.bias", (merged,)
        yield "mm.2.weight", (merged, spec.projection_dim)
        yield "mm.2.bias", (spec.projection_dim,)
    else:
        yield "v.post_ln.weight", (d,)
        yield "v.post_ln.bias", (d,)
        yield "mm.soft_emb_norm.weight", (d,)
        yield "mm.input_projection.weight", (spec.projection_dim, d)


def _projector_type(spec: ProjectorSpec, name: str, shape: tuple[int, ...]) -> Q:
    # clip.cpp keeps norms, biases and positions in F32; the patch embedding is a convolution kernel, F16 at most
    if len(shape) == 1 or "position_embd" in name:
        return Q.F32
    if "patch_embd" in name:
        return Q.F16 if spec.quant != "F32" else Q.F32
    return _main_type(spec.quant)


def _mmproj_writer(path: Path, name: str, quant: str, kind: str, *, vision: bool) -> gguf.GGUFWriter:
    """A writer with the keys every mmproj file starts with: a vision or an audio encoder, and its projector type."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_name(name)
    writer.add_type("mmproj")
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_bool("clip.has_vision_encoder", vision)
    writer.add_bool("clip.has_audio_encoder", not vision)
    writer.add_string("clip.projector_type", kind)
    return writer


def write_projector(path: str | Path, spec: ProjectorSpec, *, header_only: bool = False, seed: int = 0) -> Path:
    """Write an mmproj GGUF of ``spec``; header-only files are truncated (sparse) to their real size."""
    path = Path(path)
    writer = _mmproj_writer(path, spec.name, spec.quant, spec.kind, vision=True)
    writer.add_bool("clip.use_gelu", spec.kind == "gemma3")
    writer.add_bool("clip.use_silu", spec.kind == "qwen2.5vl")
    writer.add_uint32("clip.vision.image_size", spec.image_size)
    writer.add_uint32("clip.vision.patch_size", spec.patch_size)
    writer.add_uint32("clip.vision.embedding_length", spec.n_embd)
    writer.add_uint32("clip.vision.feed_forward_length", spec.n_ff)
    writer.add_uint32("clip.vision.block_count", spec.n_layer)
    writer.add_uint32("clip.vision.projection_dim", spec.projection_dim)
    writer.add_uint32("clip.vision.attention.head_count", spec.n_head)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    if spec.scale_factor is not None:
        writer.add_uint32("clip.vision.projector.scale_factor", spec.scale_factor)
    tensors = [(name, shape, _projector_type(spec, name, shape)) for name, shape in projector_tensor_shapes(spec)]
    return _write_tensors(writer, path, tensors, header_only=header_only, seed=seed)


# Tiny and loadable, paired with TINY_GEMMA3 (its 256-wide embeddings): gemma3 is the projector type
# libmtmd loads with the fewest tensors (a ViT and two: mm.soft_emb_norm and mm.input_projection; no
# merger MLP, no 2-D RoPE, no dynamic resolution), and the text model beside it is one of our own. A
# 112 px image is 8×8 patches of 14 px, average-pooled 2×2 into 16 image tokens.
TINY_GEMMA3_MMPROJ = ProjectorSpec(
    "tiny-gemma3-mmproj", "gemma3", 1, 64, 2, 128, 112, 14, 256, quant="F32", scale_factor=2
)

# Real shapes (header-only): Gemma 3 27B's SigLIP-So400m encoder (mmproj-model-f16.gguf, ~0.8 GiB)
# and Qwen2.5-VL 7B's (mmproj-Qwen2.5-VL-7B-Instruct-f16.gguf, ~1.3 GiB), beside their text models.
GEMMA3_27B_MMPROJ = ProjectorSpec("gemma-3-27b-it-mmproj", "gemma3", 27, 1152, 16, 4304, 896, 14, 5376)
QWEN25VL_7B_MMPROJ = ProjectorSpec("qwen2.5-vl-7b-mmproj", "qwen2.5vl", 32, 1280, 16, 3420, 560, 14, 3584)
GEMMA3_27B = ModelSpec(
    "gemma-3-27b-it", "gemma3", 62, 5376, 32, 16, 21504, 262208, 131072,
    head_dim=128, sliding_window=1024, swa_period=6, tied_embeddings=True, quant="Q4_K_M",
)  # fmt: skip
QWEN25VL_7B = ModelSpec(
    "Qwen2.5-VL-7B-Instruct", "qwen2vl", 28, 3584, 28, 4, 18944, 152064, 128000, quant="Q4_K_M", tokenizer="gpt2"
)


# ## Audio projectors (a Whisper-style encoder, clip.cpp's qwen2a layout)


@dataclass(frozen=True)
class AudioProjectorSpec:
    """An audio encoder (Whisper's: two 1-D convolutions over a log-mel spectrogram, a transformer,
    an average pool) and its projector into a language model of ``projection_dim`` width."""

    name: str
    kind: str  # clip.cpp's projector type: only "qwen2a" is written (one linear layer after the encoder)
    n_layer: int
    n_embd: int
    n_head: int
    n_ff: int
    n_mel_bins: int
    projection_dim: int
    n_positions: int = 1500  # 30 s of audio after the stride-2 convolution: clip.cpp's encode length
    quant: str = "F16"


def audio_projector_tensor_shapes(spec: AudioProjectorSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of ``spec``, GGUF order (ne[0] first): clip.cpp's whisper encoder."""
    d, f = spec.n_embd, spec.n_ff
    yield "a.conv1d.1.weight", (3, spec.n_mel_bins, d)  # kernel 3, mel bins in, width out
    yield "a.conv1d.1.bias", (1, d)  # the converter unsqueezes conv biases: they broadcast over frames
    yield "a.conv1d.2.weight", (3, d, d)
    yield "a.conv1d.2.bias", (1, d)
    yield "a.position_embd.weight", (d, spec.n_positions)
    for i in range(spec.n_layer):
        b = f"a.blk.{i}."
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            yield b + part + ".weight", (d, d)
            if part != "attn_k":  # Whisper's key projection has no bias (clip.cpp asserts it)
                yield b + part + ".bias", (d,)
        for ln in ("ln1", "ln2"):
            yield f"{b}{ln}.weight", (d,)
            yield f"{b}{ln}.bias", (d,)
        yield b + "ffn_up.weight", (d, f)
        yield b + "ffn_up.bias", (f,)
        yield b + "ffn_down.weight", (f, d)
        yield b + "ffn_down.bias", (d,)
    yield "a.post_ln.weight", (d,)
    yield "a.post_ln.bias", (d,)
    yield "mm.a.fc.weight", (d, spec.projection_dim)
    yield "mm.a.fc.bias", (spec.projection_dim,)


def _audio_projector_type(spec: AudioProjectorSpec, name: str, shape: tuple[int, ...]) -> Q:
    # as the converter writes them: norms, biases and positions F32, the convolution kernels F16 at most
    if len(shape) == 1 or "position_embd" in name or name.endswith(".bias"):
        return Q.F32
    if "conv1d" in name:
        return Q.F16 if spec.quant != "F32" else Q.F32
    return _main_type(spec.quant)


def write_audio_projector(
    path: str | Path, spec: AudioProjectorSpec, *, header_only: bool = False, seed: int = 0
) -> Path:
    """Write an audio-only mmproj GGUF of ``spec``; header-only files are truncated (sparse) to their real size."""
    path = Path(path)
    writer = _mmproj_writer(path, spec.name, spec.quant, spec.kind, vision=False)
    writer.add_uint32("clip.audio.num_mel_bins", spec.n_mel_bins)
    writer.add_uint32("clip.audio.embedding_length", spec.n_embd)
    writer.add_uint32("clip.audio.feed_forward_length", spec.n_ff)
    writer.add_uint32("clip.audio.block_count", spec.n_layer)
    writer.add_uint32("clip.audio.projection_dim", spec.projection_dim)
    writer.add_uint32("clip.audio.attention.head_count", spec.n_head)
    writer.add_float32("clip.audio.attention.layer_norm_epsilon", 1e-5)
    tensors = [
        (name, shape, _audio_projector_type(spec, name, shape)) for name, shape in audio_projector_tensor_shapes(spec)
    ]
    return _write_tensors(writer, path, tensors, header_only=header_only, seed=seed)


# Tiny and loadable, paired with TINY_QWEN2 (its 256-wide embeddings): one 64-wide block over Whisper's
# 80 mel bins (the module docstring says why qwen2a). libmtmd encodes 30 s at a time: 3,000 mel frames,
# 1,500 positions after the stride-2 convolution, 750 audio tokens after the pool, for any clip up to 30 s.
TINY_QWEN2_AUDIO_MMPROJ = AudioProjectorSpec("tiny-qwen2-audio-mmproj", "qwen2a", 1, 64, 2, 128, 80, 256, quant="F32")

# Real shapes (header-only): Qwen2-Audio 7B's Whisper-large-v3 encoder (32 layers, 1280 wide, 128 mel
# bins) projected into its 4096-wide Qwen2 7B, beside that text model.
QWEN2_AUDIO_7B_MMPROJ = AudioProjectorSpec("qwen2-audio-7b-mmproj", "qwen2a", 32, 1280, 20, 5120, 128, 4096)
QWEN2_AUDIO_7B = ModelSpec(
    "Qwen2-Audio-7B-Instruct", "qwen2", 32, 4096, 32, 32, 11008, 156032, 8192, quant="Q4_K_M", tokenizer="gpt2"
)
