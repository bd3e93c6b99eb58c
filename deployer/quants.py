"""llama.cpp's quantization names and the ``general.file_type`` values that stand for them, and
the KV cache types with their block geometry.

Kept as data here (not read from the ``gguf`` package at import time) so that the manifest
schema does not change under a user when ``gguf`` is upgraded; tests check the tables against
``gguf.LlamaFileType`` and ``gguf.GGML_QUANT_SIZES``.
"""

from __future__ import annotations

# name -> general.file_type (llama.cpp's enum llama_ftype)
FILE_TYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "IQ2_XXS": 19,
    "IQ2_XS": 20,
    "Q2_K_S": 21,
    "IQ3_XS": 22,
    "IQ3_XXS": 23,
    "IQ1_S": 24,
    "IQ4_NL": 25,
    "IQ3_S": 26,
    "IQ3_M": 27,
    "IQ2_S": 28,
    "IQ2_M": 29,
    "IQ4_XS": 30,
    "IQ1_M": 31,
    "BF16": 32,
    "TQ1_0": 36,
    "TQ2_0": 37,
    "MXFP4_MOE": 38,
}

QUANTS: tuple[str, ...] = tuple(FILE_TYPES)
# What a conversion of Transformers weights can produce. llama.cpp's converter writes the first
# four itself (--outtype); the others are quantized from its F16 (or BF16) output by llama.cpp's
# quantizer (llama_model_quantize), whose per-tensor mixes deployer.conversion.checkpoint predicts.
CONVERTER_QUANTS: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0")
QUANTIZER_QUANTS: tuple[str, ...] = (
    *("Q4_0", "Q4_1", "Q5_0", "Q5_1"),
    *("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"),
    *("IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS"),
)
CONVERT_QUANTS: tuple[str, ...] = CONVERTER_QUANTS + QUANTIZER_QUANTS
_IMATRIX = "needs an importance matrix, which llama.cpp's quantizer refuses to go without"
# The types llama.cpp has that a conversion does not produce, and why (the manifest's error says it)
NOT_CONVERTED: dict[str, str] = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"), _IMATRIX),
    "TQ1_0": "is ternary, for models trained ternary (BitNet); the models converted here are not",
    "TQ2_0": "is ternary, for models trained ternary (BitNet); the models converted here are not",
    "MXFP4_MOE": "quantizes mixture-of-experts tensors; the models converted here are dense",
}
UNQUANTIZED: frozenset[str] = frozenset({"F32", "F16", "BF16"})

# KV cache element types llama.cpp accepts for --cache-type-k / --cache-type-v, with ggml's block
# geometry (elements per block, bytes per block), which sizes the cache
KV_CACHE_BLOCKS: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "iq4_nl": (32, 18),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
}
KV_CACHE_TYPES: tuple[str, ...] = tuple(KV_CACHE_BLOCKS)


def quant_for_file_type(file_type: int) -> str | None:
    """The quant name of a ``general.file_type`` value, or None when llama.cpp has none."""
    for name, value in FILE_TYPES.items():
        if value == file_type:
            return name
    return None


def is_quantized_cache(cache_type: str) -> bool:
    """A block-quantized KV cache type (``q8_0``, ...): llama.cpp needs flash attention for its V."""
    return KV_CACHE_BLOCKS[cache_type][0] > 1


def is_quantized(quant: str) -> bool:
    """The selection table's meaning: any file type other than F32, F16 and BF16."""
    return quant not in UNQUANTIZED
