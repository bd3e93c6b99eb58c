"""Memory estimate: a pure function of model facts and settings (no I/O, no environment).

FIRST CUT — the types are the contract the planner uses; the arithmetic is refined against
llama.cpp's own reports (``benchmarks/estimate_vs_llama.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from deployer.facts import GgufHeader

MIB = 1024 * 1024


@dataclass(frozen=True)
class EstimateSettings:
    """What changes the memory use of one loaded model besides the model itself."""

    context: int
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = True
    kv_cache_type: str = "f16"
    n_gpus: int = 1
    embeddings: bool = False
    logits_all: bool = False


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, as llama.cpp would allocate them. Device figures are totals over all GPUs."""

    weights: int  # model buffers (tensor data)
    kv: int  # KV cache buffers
    compute: int  # compute (scratch) buffers llama.cpp reserves for the graph
    output: int  # output (logits/embeddings) buffer; host memory
    overhead: int  # CUDA context and allocator slack, per GPU times n_gpus
    host: int  # container RAM: scores array, output buffer, runtime, mapped pages
    n_gpus: int = 1

    @property
    def total(self) -> int:
        """GPU memory over all GPUs."""
        return self.weights + self.kv + self.compute + self.overhead

    @property
    def per_gpu(self) -> int:
        """GPU memory of the fullest GPU (weights and KV split by layer)."""
        return -(-self.total // self.n_gpus)


_KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
             "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}  # fmt: skip
CUDA_OVERHEAD = 512 * MIB  # per GPU: CUDA context, cuBLAS workspace


def estimate(header: GgufHeader, settings: EstimateSettings) -> MemoryEstimate:
    """Estimate GPU and host memory for ``header`` loaded with ``settings`` (first cut)."""
    per_elem = _KV_BYTES[settings.kv_cache_type]
    kv = 0
    for layer in range(header.block_count):
        swa = bool(header.swa_layers) and header.swa_layers[layer] and header.sliding_window
        cells = min(settings.context, header.sliding_window + settings.n_ubatch) if swa else settings.context
        width = header.head_count_kv[layer] * (header.key_length + header.value_length)
        kv += int(width * cells * per_elem)
    ubatch = min(settings.n_ubatch, settings.context)
    compute = header.vocab_size * ubatch * 4
    if not settings.flash_attn:
        compute += max(header.head_count) * settings.context * ubatch * 4
    outputs = settings.context if settings.logits_all else settings.n_batch
    output = header.vocab_size * min(outputs, settings.context) * 4
    host = output + header.vocab_size * outputs * 4 + 512 * MIB
    return MemoryEstimate(
        weights=header.weight_bytes,
        kv=kv,
        compute=compute,
        output=output,
        overhead=CUDA_OVERHEAD * settings.n_gpus,
        host=host,
        n_gpus=settings.n_gpus,
    )
