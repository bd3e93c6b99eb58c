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


def estimate(header: GgufHeader, settings: EstimateSettings) -> MemoryEstimate:
    """Estimate GPU and host memory for ``header`` loaded with ``settings``."""
    raise NotImplementedError("the estimator is being written")
