"""Transformers checkpoints: ``config.json`` and a tensor listing → the GGUF llama.cpp's converter writes. Pure.

A model published as SafeTensors or PyTorch ``.bin`` weights is planned before anything is
downloaded: its ``config.json`` and the SafeTensors headers (read by :mod:`deployer.conversion.resolve`)
say which tensors there are; llama.cpp's converter (``convert_hf_to_gguf.py``) renames them with the
``gguf`` package's tensor map and picks each one's type by its rules; the result is a
:class:`~deployer.facts.GgufHeader` the estimator and the planner read as they read a real one.

    LAYOUTS                            Hugging Face architecture → its ArchitectureLayout (the one table)
    ArchitectureLayout                 how one Hugging Face architecture converts: llama.cpp's architecture,
                                       the tensors its decoder layers hold, when llama.cpp calls it "70B"
    layout_of(config, repo)            the ArchitectureLayout, or PlanError: quantized weights, an unsupported architecture
    tensors_from_config(config, layout)  the tensor listing of a ``.bin`` checkpoint (no header to read there)
    predict(config, tensors, quant)    → PredictedGguf: the header (tensors, types, architecture fields), size
    quantized_type(name, shape, quant, where)  the type llama.cpp's quantizer gives a matrix (rules: MIXES)
    intermediate_quant(tensors)        F16 or BF16: what the converter writes for the quantizer to read

The converter's type rules (``conversion/base.py``, ``prepare_tensors``) for the types it writes
directly (``--outtype``): 1-D tensors, norms and anything not named ``*.weight`` stay F32; every
other tensor gets the target type; a Q8_0 tensor whose rows are not a multiple of 32 falls back to
F16. Tensors are aligned to 32 bytes in the file.

Any other type is quantized by llama.cpp's quantizer from the converter's F16 (BF16 for a bf16
checkpoint) output, with its mix of types per tensor (``src/llama-quant.cpp``,
``llama_tensor_get_type``), predicted by ``quantized_type`` from the table ``MIXES``: the matrices
it may quantize get the file type's default type, some (attn_v, ffn_down, attn_output, output) a
larger one by layer and model shape, and a type whose blocks do not divide a row falls back
(``FALLBACKS``); the rest keep the converter's type.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, MODEL_ARCH, MODEL_ARCH_NAMES, GGMLQuantizationType
from gguf.tensor_mapping import get_tensor_name_map

from deployer.errors import PlanError
from deployer.facts import GgufHeader, TensorInfo
from deployer.quants import CONVERT_QUANTS, CONVERTER_QUANTS, FILE_TYPES, QUANTIZER_QUANTS

ALIGNMENT = 32  # general.alignment the converter writes
# The header besides tensor infos and the tokenizer: general.* and {arch}.* keys, special tokens.
HEADER_BASE_BYTES = 8 * 1024
TENSOR_INFO_BYTES = 8 + 4 + 4 * 8 + 4 + 8  # name length, n_dims, up to 4 dims, type, offset (plus the name)
# The tokenizer in the header: per token its string (8-byte length + ~7 bytes), score and type,
# and about one BPE merge (8 + ~9 bytes): at most this much per vocabulary entry. tokenizer.json
# says the same more loosely (pretty-printed JSON, added-token objects): the smaller of the two.
TOKENIZER_BYTES_PER_TOKEN = 48
# Quantization methods whose weights llama.cpp can neither load nor convert back
REFUSED_QUANT_METHODS = ("gptq", "awq", "bitsandbytes")
# Tensors a checkpoint may hold that the converter drops (buffers, not weights)
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)

_TYPES = {
    "F32": GGMLQuantizationType.F32,
    "F16": GGMLQuantizationType.F16,
    "BF16": GGMLQuantizationType.BF16,
    "Q8_0": GGMLQuantizationType.Q8_0,
}
# bytes per element of the dtypes a checkpoint stores (safetensors names; torch_dtype names too)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ArchitectureLayout:
    """How one Hugging Face architecture converts: llama.cpp's architecture and its tensor layout."""

    arch: MODEL_ARCH
    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    qk_norm: bool = False  # per-head RMS norms of q and k (Qwen3)
    # the layer count at which llama.cpp calls a model of this architecture "70B" (its quantizer
    # gives such a model's attn_v more bits); for Llama only with grouped-query attention (else 65B)
    layers_70b: int | None = None
    gqa_70b_only: bool = False

    def is_70b(self, layers: int, heads: int, kv_heads: int) -> bool:
        """llama.cpp's model type is 70B (``load_arch_hparams`` of the architecture)."""
        return layers == self.layers_70b and not (self.gqa_70b_only and heads == kv_heads)

    @property
    def name(self) -> str:
        """``general.architecture`` of the converted file ("llama", "qwen2", ...)."""
        return MODEL_ARCH_NAMES[self.arch]


# The architectures gguf-deploy plans conversions for: each is registered in llama.cpp's
# converter (a test checks it against the converter's own registry) and has the standard
# decoder layout below. Another architecture is refused at plan time, by name.
LAYOUTS: dict[str, ArchitectureLayout] = {
    "LlamaForCausalLM": ArchitectureLayout(MODEL_ARCH.LLAMA, layers_70b=80, gqa_70b_only=True),
    "MistralForCausalLM": ArchitectureLayout(MODEL_ARCH.LLAMA, layers_70b=80, gqa_70b_only=True),
    "Qwen2ForCausalLM": ArchitectureLayout(MODEL_ARCH.QWEN2, qkv_bias=True, layers_70b=80),
    "Qwen3ForCausalLM": ArchitectureLayout(MODEL_ARCH.QWEN3, qk_norm=True),
}


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the checkpoint: its Hugging Face name, shape (PyTorch order) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "F32", "F16", "BF16", ...


@dataclass(frozen=True)
class PredictedGguf:
    """What the conversion will write."""

    header: GgufHeader
    size: int  # bytes of the whole file


# ## Refusals


def layout_of(config: Mapping[str, Any], repo: str) -> ArchitectureLayout:
    """The layout of a checkpoint's ``config.json``; PlanError (one line) when it cannot be converted."""
    quant_config = config.get("quantization_config")
    if isinstance(quant_config, Mapping):
        method = str(quant_config.get("quant_method") or "an unknown method").lower()
        known = method in REFUSED_QUANT_METHODS or "load_in_4bit" in quant_config or "load_in_8bit" in quant_config
        kind = "GPTQ/AWQ/bitsandbytes" if known else "pre-quantized"
        raise PlanError(
            f"{repo}: its weights are {method}-quantized ({kind}, config.json: quantization_config); llama.cpp "
            "cannot use or convert them: deploy the unquantized base model, or a GGUF repository of it"
        )
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise PlanError(f"{repo}: config.json names no architecture ('architectures'); it cannot be converted")
    name = architectures[0]
    layout = LAYOUTS.get(name)
    if layout is None:
        raise PlanError(
            f"{repo}: architecture '{name}' cannot be converted by gguf-deploy (it converts {', '.join(LAYOUTS)}); "
            "deploy a GGUF repository of the model instead"
        )
    return layout


# ## Tensor listings


def _int(config: Mapping[str, Any], key: str, repo: str = "config.json") -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PlanError(f"{repo}: config.json has no positive integer '{key}' (found {value!r})")
    return value


def _dims(config: Mapping[str, Any], repo: str) -> tuple[int, int, int, int, int, int, int]:
    """hidden, intermediate, layers, heads, kv heads, head size, vocabulary."""
    hidden = _int(config, "hidden_size", repo)
    heads = _int(config, "num_attention_heads", repo)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return (
        hidden,
        _int(config, "intermediate_size", repo),
        _int(config, "num_hidden_layers", repo),
        heads,
        int(kv_heads),
        int(head_dim),
        _int(config, "vocab_size", repo),
    )


def tensors_from_config(config: Mapping[str, Any], layout: ArchitectureLayout, repo: str = "") -> list[SourceTensor]:
    """The tensors of a checkpoint of ``layout`` as Transformers names them (for ``.bin`` files,
    whose pickled headers cannot be read by a range request)."""
    hidden, inter, layers, heads, kv_heads, head_dim, vocab = _dims(config, repo)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype, "F32")
    out = [SourceTensor("model.embed_tokens.weight", (vocab, hidden), dtype)]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            SourceTensor(f"{p}.input_layernorm.weight", (hidden,), dtype),
            SourceTensor(f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden), dtype),
            SourceTensor(f"{p}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden), dtype),
            SourceTensor(f"{p}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden), dtype),
            SourceTensor(f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim), dtype),
            SourceTensor(f"{p}.post_attention_layernorm.weight", (hidden,), dtype),
            SourceTensor(f"{p}.mlp.gate_proj.weight", (inter, hidden), dtype),
            SourceTensor(f"{p}.mlp.up_proj.weight", (inter, hidden), dtype),
            SourceTensor(f"{p}.mlp.down_proj.weight", (hidden, inter), dtype),
        ]
        if layout.qkv_bias:
            out += [
                SourceTensor(f"{p}.self_attn.q_proj.bias", (heads * head_dim,), dtype),
                SourceTensor(f"{p}.self_attn.k_proj.bias", (kv_heads * head_dim,), dtype),
                SourceTensor(f"{p}.self_attn.v_proj.bias", (kv_heads * head_dim,), dtype),
            ]
        if layout.qk_norm:
            out += [
                SourceTensor(f"{p}.self_attn.q_norm.weight", (head_dim,), dtype),
                SourceTensor(f"{p}.self_attn.k_norm.weight", (head_dim,), dtype),
            ]
    out.append(SourceTensor("model.norm.weight", (hidden,), dtype))
    if not config.get("tie_word_embeddings", False):
        out.append(SourceTensor("lm_head.weight", (vocab, hidden), dtype))
    return out


def source_bytes(tensors: Iterable[SourceTensor]) -> int:
    """Bytes of the checkpoint's tensor data."""
    total = 0
    for t in tensors:
        n = 1
        for d in t.shape:
            n *= d
        total += n * DTYPE_BYTES.get(t.dtype, 4)
    return total


# ## The prediction


def converted_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> GGMLQuantizationType:
    """The type the converter gives one tensor (``shape`` in GGUF order: rows first) for ``--outtype quant``."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return GGMLQuantizationType.F32
    target = _TYPES[quant]
    block = GGML_QUANT_SIZES[target][0]
    if shape[0] % block:
        return GGMLQuantizationType.F16  # gguf.quants raises QuantError; the converter falls back to F16
    return target


# ## llama.cpp's quantizer: its mix of types per tensor
#
# llama_tensor_get_type (src/llama-quant.cpp) for the dense models converted here, without an
# importance matrix. Its tensor categories, found in the name in this order (tensor_get_category):
CATEGORIES = ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
              "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down")  # fmt: skip


@dataclass(frozen=True)
class Where:
    """What the quantizer's rules read besides the file type: the tensor's layer and the model's shape."""

    layer: int  # the block the tensor is in (its order among the attn_v/ffn_down tensors: by layer)
    layers: int
    gqa: int  # attention heads per KV head
    is_70b: bool = False


def more_bits(w: Where) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third between."""
    return w.layer < w.layers // 8 or w.layer >= 7 * w.layers // 8 or (w.layer - w.layers // 8) % 3 == 2


_T = GGMLQuantizationType
Rule = Callable[[Where], GGMLQuantizationType | None]  # None: the file type's default type
# The default type of each file type (llama_ftype_get_default_type)
DEFAULT_TYPES: dict[str, GGMLQuantizationType] = {
    **{q: _T[q] for q in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_S")},
    **dict.fromkeys(("Q3_K_S", "Q3_K_M", "Q3_K_L"), _T.Q3_K),
    **dict.fromkeys(("Q4_K_S", "Q4_K_M"), _T.Q4_K),
    **dict.fromkeys(("Q5_K_S", "Q5_K_M"), _T.Q5_K),
    "IQ3_M": _T.IQ3_S,
}
# (file type, category) -> the rule that picks another type than the default; absent: the default.
# output.weight (and token_embd.weight when the embeddings are tied) is Q6_K for every file type
# here, Q8_0 when the default type's blocks do not divide its rows (OUTPUT_TYPE).
MIXES: dict[tuple[str, str], Rule] = {
    ("Q2_K", "attn_v"): lambda w: _T.Q4_K if w.gqa >= 4 else _T.Q3_K,
    ("Q2_K", "ffn_down"): lambda w: _T.Q3_K,
    ("Q2_K", "attn_output"): lambda w: _T.Q3_K,
    ("Q3_K_M", "attn_v"): lambda w: _T.Q5_K if w.layer < 2 else _T.Q4_K,
    ("Q3_K_M", "ffn_down"): lambda w: _T.Q5_K if w.layer < w.layers // 16 else _T.Q4_K,
    ("Q3_K_M", "attn_output"): lambda w: _T.Q4_K,
    ("Q3_K_L", "attn_v"): lambda w: _T.Q5_K,
    ("Q3_K_L", "ffn_down"): lambda w: _T.Q5_K,
    ("Q3_K_L", "attn_output"): lambda w: _T.Q5_K,
    ("Q4_K_S", "attn_v"): lambda w: _T.Q5_K if w.layer < 4 else None,
    ("Q4_K_S", "ffn_down"): lambda w: _T.Q5_K if w.layer < w.layers // 8 else None,
    ("Q4_K_M", "attn_v"): lambda w: _T.Q6_K if more_bits(w) else None,
    ("Q4_K_M", "ffn_down"): lambda w: _T.Q6_K if more_bits(w) else None,
    ("Q5_K_M", "attn_v"): lambda w: _T.Q6_K if more_bits(w) else None,
    ("Q5_K_M", "ffn_down"): lambda w: _T.Q6_K if more_bits(w) else None,
    ("IQ3_S", "attn_v"): lambda w: _T.Q4_K if w.gqa >= 4 else None,
    ("IQ3_M", "attn_v"): lambda w: _T.Q4_K,
    ("IQ3_M", "ffn_down"): lambda w: _T.Q4_K if w.layer < w.layers // 8 else None,
    ("IQ3_M", "attn_output"): lambda w: _T.Q4_K,
    ("IQ4_NL", "attn_v"): lambda w: _T.Q5_K if w.gqa >= 4 else None,
    ("IQ4_NL", "ffn_down"): lambda w: _T.Q5_K if w.layer < w.layers // 8 else None,
    ("IQ4_XS", "attn_v"): lambda w: _T.Q5_K if w.gqa >= 4 else None,
    ("IQ4_XS", "ffn_down"): lambda w: _T.Q5_K if w.layer < w.layers // 8 else None,
}
OUTPUT_TYPE = _T.Q6_K
# In a 70B model attn_v is 8x smaller than attn_q: its Q3_K or Q4_K becomes Q5_K
BUMP_70B = ({_T.Q3_K, _T.Q4_K}, _T.Q5_K)
# A type whose blocks do not divide a tensor's rows (ne[0]) falls back (tensor_type_fallback);
# a block-32 type stays, and whatever still does not divide the rows becomes F16
FALLBACKS: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    **dict.fromkeys((_T.Q2_K, _T.Q3_K, _T.TQ1_0, _T.TQ2_0), _T.Q4_0),
    _T.Q4_K: _T.Q5_0,
    _T.Q5_K: _T.Q5_1,
    _T.Q6_K: _T.Q8_0,
    **dict.fromkeys((_T.IQ1_S, _T.IQ1_M, _T.IQ2_XXS, _T.IQ2_XS, _T.IQ2_S, _T.IQ3_XXS, _T.IQ3_S, _T.IQ4_XS), _T.IQ4_NL),
}
_LAYER = re.compile(r"^blk\.(\d+)\.")  # the block of a layer's tensor


def quantizable(gguf_name: str, shape: tuple[int, ...]) -> bool:
    """The quantizer may change this tensor's type (tensor_allows_quantization for the architectures here:
    a matrix named ``*weight``, not a norm); the others keep the converter's type."""
    return len(shape) >= 2 and gguf_name.endswith("weight") and "_norm.weight" not in gguf_name


def category_of(gguf_name: str) -> str:
    """llama.cpp's tensor category: "output", "token_embd", "attn_v", "ffn_down", ..., or "other"."""
    if gguf_name == "output.weight":
        return "output"
    if gguf_name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    found = next((c for c in CATEGORIES if c in gguf_name), "other")
    return found.removesuffix(".weight")


def _fits(ncols: int, ggml_type: GGMLQuantizationType) -> bool:
    return ncols % GGML_QUANT_SIZES[ggml_type][0] == 0


def quantized_type(
    gguf_name: str, shape: tuple[int, ...], quant: str, where: Where, *, tied: bool = False
) -> GGMLQuantizationType:
    """The type llama.cpp's quantizer gives a quantizable matrix (``shape`` in GGUF order) for file type ``quant``.

    ``tied``: the model has no output.weight; token_embd.weight is quantized as the output then.
    """
    default = DEFAULT_TYPES[quant]
    category = category_of(gguf_name)
    if category == "output" or (tied and category == "token_embd"):
        chosen: GGMLQuantizationType = OUTPUT_TYPE if _fits(shape[0], default) else _T.Q8_0
    else:
        rule = MIXES.get((quant, category))
        chosen = (rule(where) if rule else None) or default
        if category in ("attn_v", "attn_qkv", "attn_kv_b") and where.is_70b and chosen in BUMP_70B[0]:
            chosen = BUMP_70B[1]
    if not _fits(shape[0], chosen):
        chosen = FALLBACKS.get(chosen, chosen)
        if not _fits(shape[0], chosen):
            chosen = _T.F16
    return chosen


def intermediate_quant(tensors: Iterable[SourceTensor]) -> str:
    """What the converter writes for the quantizer (``--outtype auto``): the type of the first 16-bit
    matrix, BF16 or F16 (no range lost), else F16."""
    return next((t.dtype for t in tensors if len(t.shape) >= 2 and t.dtype in ("BF16", "F16")), "F16")


def tensor_bytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def predict(
    config: Mapping[str, Any],
    tensors: Iterable[SourceTensor],
    quant: str,
    *,
    repo: str = "",
    tokenizer_bytes: int = 0,
    has_chat_template: bool = False,
) -> PredictedGguf:
    """The GGUF a conversion to ``quant`` writes from this checkpoint: the converter's (``--outtype``), or
    the quantizer's from the converter's F16/BF16 output.

    ``tokenizer_bytes``: the size of the tokenizer files (tokenizer.json, tokenizer_config.json);
    the vocabulary and merges they hold become header arrays of at most that size.
    """
    if quant not in CONVERT_QUANTS:
        raise PlanError(f"{repo}: a conversion writes {', '.join(CONVERT_QUANTS)}, not {quant}")
    layout = layout_of(config, repo)
    hidden, _, layers, heads, kv_heads, head_dim, vocab = _dims(config, repo)
    names = get_tensor_name_map(layout.arch, layers)
    tensors = [t for t in tensors if not t.name.endswith(SKIPPED_SUFFIXES)]
    outtype = quant if quant in CONVERTER_QUANTS else intermediate_quant(tensors)
    named: list[tuple[str, tuple[int, ...]]] = []
    for t in tensors:
        gguf_name = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise PlanError(f"{repo}: tensor '{t.name}' has no llama.cpp name for architecture '{layout.name}'")
        named.append((gguf_name, tuple(reversed(t.shape))))  # GGUF lists the fastest-varying dimension first
    tied = "output.weight" not in {name for name, _ in named}
    infos: list[TensorInfo] = []
    for gguf_name, shape in named:
        ggml_type = converted_type(gguf_name, shape, outtype)
        if quant in QUANTIZER_QUANTS and quantizable(gguf_name, shape):
            layer = _LAYER.match(gguf_name)
            where = Where(
                int(layer[1]) if layer else -1, layers, heads // kv_heads, layout.is_70b(layers, heads, kv_heads)
            )
            ggml_type = quantized_type(gguf_name, shape, quant, where, tied=tied)
        infos.append(TensorInfo(gguf_name, shape, int(ggml_type), tensor_bytes(shape, ggml_type)))
    rope = config.get("rope_scaling")
    if isinstance(rope, Mapping) and (rope.get("rope_type") or rope.get("type")) == "llama3":
        # Llama 3.1+ rope scaling: the converter adds the per-frequency factors as a tensor
        infos.append(TensorInfo("rope_freqs.weight", (head_dim // 2,), 0, head_dim // 2 * 4))
    tokenizer = min(tokenizer_bytes, vocab * TOKENIZER_BYTES_PER_TOKEN)
    header_bytes = HEADER_BASE_BYTES + tokenizer + sum(TENSOR_INFO_BYTES + len(i.name.encode()) for i in infos)
    data_offset = _pad(header_bytes)
    header = GgufHeader(
        arch=layout.name,
        file_type=FILE_TYPES[quant],
        context_length=_int(config, "max_position_embeddings", repo),
        block_count=layers,
        embedding_length=hidden,
        head_count=(heads,) * layers,
        head_count_kv=(kv_heads,) * layers,
        key_length=head_dim,
        value_length=head_dim,
        vocab_size=vocab,
        has_chat_template=has_chat_template,
        tensors=tuple(infos),
        data_offset=data_offset,
    )
    return PredictedGguf(header, data_offset + sum(_pad(i.n_bytes) for i in infos))
