"""Memory estimate: a pure function of a GGUF header and settings (no I/O, no environment).

Each component follows what llama.cpp (the version llama-cpp-python 0.3.36 vendors,
ggml-org/llama.cpp@0c1e57098) allocates when it creates a context; ``benchmarks/estimate_vs_llama.py``
checks the arithmetic against llama.cpp's own ``... buffer size`` lines.

    weights   tensor bytes from the header. On CUDA the input embedding stays in host memory
              (llama.cpp never offloads the input layer); a model with tied embeddings gets a
              copy as its output matrix on the GPU. Split over GPUs by layer, as llama.cpp does.
    kv        per layer: K and V rows (head_count_kv × head size, ggml block sizes for quantized
              cache types) × cells × slots. Cells are the context padded to 256; sliding-window
              layers hold min(context, window + n_ubatch) cells padded to 256 unless ``swa_full``.
              ``parallel`` slots are llama.cpp sequences with a KV stream each (n_seq_max =
              parallel, kv_unified = false, n_ctx = context × parallel): every slot a full context.
    compute   the graph allocator's peak for the worst-case batch (n_ubatch tokens, all of them
              outputs; split evenly over the slots, so rounded up to a multiple of them): the
              largest of the logits phase (vocabulary × n_ubatch × 4), the attention phase (KQ
              mask; without flash attention also the n_ubatch × cells × heads KQ matrix) and the
              feed-forward phase (MoE: the selected experts' activations). It does not grow with
              the slots: each slot's tokens attend to its own stream's cells.
    output    llama.cpp's output buffer (host): logits for the rows a decode call returns, at
              least one per slot.
    embeddings with ``embeddings`` on, the runtime's second context (:class:`EmbeddingsContext`):
              one sequence of n_batch cells in embeddings mode, beside the generation context
              (which stays as it is). Its own KV cache, compute buffer and, on CUDA, cuBLAS
              workspace and pool temporaries on the GPUs; its output buffer (n_batch rows of
              logits and embeddings once it embeds a full batch) and graph inputs in host memory.
    overhead  per GPU: CUDA context, cuBLAS workspace, and the CUDA pool's temporaries.
    host      the container: the runtime, llama-cpp-python's float32 scores array, the output
              buffer, the host-side weights and compute buffer, the embeddings context's host
              part, and with window-sized SWA caches
              the context checkpoints (``ctx_checkpoints`` per slot, each a window of every
              windowed layer: :func:`checkpoint_bytes`).

Every allowance that is not exact arithmetic errs high: the estimator is conservative.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from deployer.errors import PlanError
from deployer.facts import GgufHeader, TensorInfo
from deployer.quants import KV_CACHE_BLOCKS, is_quantized_cache

MIB = 1024 * 1024
GIB = 1024 * MIB

Backend = Literal["cuda", "cpu"]

CELL_PAD = 256  # llama.cpp pads n_ctx (and the SWA cache) to a multiple of 256 cells
MAX_SEQ = 256  # LLAMA_MAX_SEQ: llama.cpp allows at most this many sequences in a context
ALIGN = {"cuda": 128, "cpu": 32}  # buffer alignment of ggml's CUDA and CPU backends

# Per-GPU constants. The CUDA context (driver state plus the kernels llama.cpp loads lazily) is
# about 330 MiB measured on a 24 GB card (unsloth/unsloth#6718); 512 MiB leaves room for larger
# GPUs and driver versions. cuBLAS: NVIDIA recommends a 32 MiB workspace on Hopper and newer
# (cuBLAS reference, cublasSetWorkspace), 4 MiB before; 32 MiB is taken everywhere.
CUDA_CONTEXT = 512 * MIB
CUBLAS_WORKSPACE = 32 * MIB
PIPELINE_COPIES = 4  # GGML_SCHED_MAX_COPIES: graph inputs are replicated this often across GPUs

# Host: the Python process with llama-cpp-python's server measures about 75 MiB on the CPU build;
# a CUDA process adds the driver, cudart and cuBLAS host state (several hundred MiB).
RUNTIME_HOST = {"cuda": 1 * GIB, "cpu": 256 * MIB}

# Fragmentation margins of the graph allocator, in units of one n_embd × n_ubatch float32 tensor;
# calibrated on the benchmark's models and on header-only shapes of 8B-70B llamas, Mixtral,
# Qwen2 and Gemma 3 (never exceeded there).
LOGITS_MARGIN = 3
FFN_MARGIN = 5
MOE_MARGIN = 5
COMPUTE_MARGIN = 1 * MIB  # small tensors' fragmentation, seen only on tiny models (under 1 MiB)
GRAPH_INPUT_BYTES_PER_TOKEN = 64  # token ids, positions, KV row indices, output ids

_LAYER = re.compile(r"^blk\.(\d+)\.")
_UNPADDED_TYPES = frozenset({0, 1, 30})  # F32, F16, BF16: ggml-cuda pads only quantized rows


@dataclass(frozen=True)
class EstimateSettings:
    """What changes the memory use of one loaded model besides the model itself."""

    context: int
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = True
    kv_cache_type: str = "f16"
    n_gpus: int = 1
    embeddings: bool = False  # [server] embeddings: the runtime adds a second context (EmbeddingsContext)
    logits_all: bool = False
    swa_full: bool = False  # [server] swa_full: sliding-window layers cache the whole context, not their window
    parallel: int = 1  # slots: sequences with a KV stream of `context` cells each (kv_unified = false)
    ctx_checkpoints: int = 8  # per slot: context checkpoints of the windowed layers, in host memory
    backend: Backend = "cuda"  # "cpu": what llama.cpp's CPU backend allocates (benchmarks, tests)


@dataclass(frozen=True)
class KvLayout:
    """Where the KV cache goes: cells per slot of the full-attention and of the sliding-window layers."""

    global_layers: int  # layers attending to the whole context
    global_cells: int  # their cells per slot: the context padded to 256
    windowed_layers: int  # sliding-window (or chunked-attention) layers
    windowed_cells: int  # their cells per slot: window + n_ubatch padded to 256, or the context with swa_full
    slots: int


@dataclass(frozen=True)
class EmbeddingsContext:
    """The second llama.cpp context the runtime creates for ``/v1/embeddings``.

    ``deployer.runtime.llama.context_params(config, embeddings=True)``: n_ctx = n_batch, one
    sequence, embeddings mode, and the generation context's n_batch, n_ubatch, flash attention,
    cache types and ``swa_full``. llama.cpp gives every context its own KV cache, compute buffer
    and output buffer (and, on CUDA, its own backend: cuBLAS handles and memory pool), so none of
    it is shared with the generation context; only the weights are. Device figures are totals
    over all GPUs.
    """

    kv: int  # n_batch cells (padded to 256), one stream; windowed layers capped as in the main context
    compute: int  # its worst-case graph: n_ubatch tokens attending to n_batch cells
    overhead: int  # CUDA: its cuBLAS workspace and its pool's largest temporary, per GPU (0 on the CPU)
    output: int  # host: the output buffer llama.cpp creates it with, one row of logits + embeddings
    output_peak: int  # host: that buffer once an input of n_batch tokens is embedded (every token an output)
    host: int  # its share of MemoryEstimate.host
    compute_phase: str = ""

    @property
    def device(self) -> int:
        """What it adds to the GPUs (on the CPU backend: to the host, like every buffer)."""
        return self.kv + self.compute + self.overhead


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
    gpu_bytes: tuple[int, ...] = ()  # per GPU, in device order; a split model's includes a layer of slack
    compute_phase: str = ""  # which graph phase sets the compute buffer: logits, attention or ffn
    kv_layout: KvLayout | None = None  # which layers hold how many cells (None: an estimate made by hand)
    checkpoints: int = 0  # host: the context checkpoints of every slot, at most (part of ``host``)
    projector: int = 0  # a multimodal projector on the first GPU: weights + one image's compute (projector.py)
    embeddings_context: EmbeddingsContext | None = None  # [server] embeddings: the runtime's second context

    @property
    def embeddings(self) -> int:
        """Device bytes of the embeddings context, over all GPUs (0 without embeddings)."""
        return self.embeddings_context.device if self.embeddings_context else 0

    @property
    def total(self) -> int:
        """GPU memory over all GPUs."""
        return self.weights + self.kv + self.compute + self.overhead + self.projector + self.embeddings

    @property
    def per_gpu(self) -> int:
        """GPU memory of the fullest GPU (weights and KV split by layer)."""
        if self.gpu_bytes:
            return max(self.gpu_bytes)
        return -(-self.total // self.n_gpus)


def estimate(header: GgufHeader, settings: EstimateSettings) -> MemoryEstimate:
    """Estimate GPU and host memory for ``header`` loaded with ``settings``.

    Raises PlanError for settings llama.cpp refuses (an unknown or, without flash attention,
    quantized V cache type).
    """
    _check(settings)
    shape = _Shape.of(header, settings)
    layer_kv = _kv_by_layer(header, settings, shape)
    compute, phase = _compute(header, settings, shape)

    output = _output(header, settings, shape)
    layout = _layout(header, shape)
    checkpoints = settings.parallel * settings.ctx_checkpoints * checkpoint_bytes(header, settings)
    embed, embed_layer_kv = _embeddings_context(header, settings)
    if settings.backend == "cpu":  # one device, the host: everything llama.cpp allocates is RAM
        weights, kv = header.weight_bytes, sum(layer_kv)
        host = RUNTIME_HOST["cpu"] + _scores(header, settings) + output + weights + kv + compute + checkpoints
        host += embed.host if embed else 0
        return MemoryEstimate(
            weights,
            kv,
            compute,
            output,
            0,
            host,
            compute_phase=phase,
            kv_layout=layout,
            checkpoints=checkpoints,
            embeddings_context=embed,
        )

    layer_weights, input_bytes, output_bytes = _weights_by_layer(header)
    n = settings.n_gpus
    overhead = CUDA_CONTEXT + CUBLAS_WORKSPACE + _cuda_pool(header, settings, shape)
    if n > 1:  # pipeline parallelism replicates the graph inputs (the KQ masks) on every GPU
        compute += (PIPELINE_COPIES - 1) * _masks(header, settings, shape)
    device = [(layer * n) // (header.block_count + 1) for layer in range(header.block_count + 1)]
    # the embeddings context's KV cache is split by layer like the generation context's; its
    # compute buffer and CUDA backend are on every GPU
    embed_per_gpu = (embed.compute + embed.overhead) // n if embed else 0
    both_kv = [main + extra for main, extra in zip(layer_kv, embed_layer_kv, strict=True)]
    per_device_layers = [0] * n
    for layer, dev in enumerate(device[:-1]):
        per_device_layers[dev] += layer_weights[layer] + both_kv[layer]
    per_device_layers[device[-1]] += output_bytes
    # llama.cpp splits by free memory, which differs slightly between GPUs: any GPU may get one
    # more layer than an even split gives it.
    slack = max((w + k for w, k in zip(layer_weights, both_kv, strict=True)), default=0) if n > 1 else 0
    gpu_bytes = tuple(b + compute + overhead + embed_per_gpu + slack for b in per_device_layers)
    weights = sum(layer_weights) + output_bytes
    host = RUNTIME_HOST["cuda"] + _scores(header, settings) + output + input_bytes + checkpoints
    host += _host_compute(header, settings, shape) + (embed.host if embed else 0)
    return MemoryEstimate(
        weights=weights,
        kv=sum(layer_kv),
        compute=compute * n,
        output=output,
        overhead=overhead * n,
        host=host,
        n_gpus=n,
        gpu_bytes=gpu_bytes,
        compute_phase=phase,
        kv_layout=layout,
        checkpoints=checkpoints,
        embeddings_context=embed,
    )


def _embeddings_context(header: GgufHeader, settings: EstimateSettings) -> tuple[EmbeddingsContext | None, list[int]]:
    """The embeddings context, and its KV cache per layer (all 0 without embeddings).

    A context like the generation context, with what ``context_params(config, embeddings=True)``
    changes: n_ctx = n_batch and one sequence. Its output buffer is :func:`_embeddings_output`'s.
    """
    if not settings.embeddings:
        return None, [0] * header.block_count
    own = replace(settings, context=settings.n_batch, parallel=1, logits_all=False, embeddings=False)
    shape = _Shape.of(header, own)
    layer_kv = _kv_by_layer(header, own, shape)
    kv = sum(layer_kv)
    compute, phase = _compute(header, own, shape)
    output, peak = _embeddings_output(header, shape)
    if settings.backend == "cpu":
        return EmbeddingsContext(kv, compute, 0, output, peak, kv + compute + peak, phase), layer_kv
    n = settings.n_gpus
    if n > 1:  # its own scheduler: pipeline copies of its graph inputs too
        compute += (PIPELINE_COPIES - 1) * _masks(header, own, shape)
    # its own ggml-cuda backend: cuBLAS handles with their workspace and a memory pool (the CUDA
    # context is the process's, counted once)
    overhead = CUBLAS_WORKSPACE + _cuda_pool(header, own, shape)
    host = peak + _host_compute(header, own, shape)
    return EmbeddingsContext(kv, compute * n, overhead * n, output, peak, host, phase), layer_kv


def _host_compute(header: GgufHeader, settings: EstimateSettings, shape: _Shape) -> int:
    """The host side of a context's graph on CUDA: its inputs (copied per pipeline stage) and the
    embedding lookup (the input layer stays in host memory)."""
    copies = PIPELINE_COPIES if settings.n_gpus > 1 else 1
    inputs = _masks(header, settings, shape) + GRAPH_INPUT_BYTES_PER_TOKEN * shape.ubatch
    return copies * inputs + 4 * header.embedding_length * shape.ubatch


def kv_row_bytes(cache_type: str, n_elements: int) -> int:
    """Bytes of one KV cache row of ``n_elements`` values of ``cache_type`` (ggml's row size)."""
    per_block, block_bytes = KV_CACHE_BLOCKS[cache_type]
    return -(-n_elements // per_block) * block_bytes


def checkpoint_bytes(header: GgufHeader, settings: EstimateSettings) -> int:
    """One context checkpoint: the windowed layers' K and V rows of the cells the window still sees.

    What ``llama_state_seq_get_data_ext(..., LLAMA_STATE_SEQ_FLAGS_SWA_ONLY)`` writes: per cell its
    position and sequence (12 bytes), per layer the rows of K and V (a type and a row size first).
    0 without windowed layers or with ``swa_full`` (the runtime takes no checkpoints then).
    """
    if not header.sliding_window or settings.swa_full:
        return 0
    cells = header.sliding_window
    per_cell, per_layer = 12, 2 * (4 + 8)
    swa = [i for i in range(header.block_count) if header.swa_layers[i] and header.head_count_kv[i]]
    for layer in swa:
        per_cell += kv_row_bytes(settings.kv_cache_type, header.head_count_kv[layer] * header.key_length)
        per_cell += kv_row_bytes(settings.kv_cache_type, header.head_count_kv[layer] * header.value_length)
    return cells * per_cell + len(swa) * per_layer + 4 * (settings.parallel + 4)


def _check(settings: EstimateSettings) -> None:
    if settings.kv_cache_type not in KV_CACHE_BLOCKS:
        raise PlanError(f"kv_cache_type: unknown cache type {settings.kv_cache_type!r}")
    if not settings.flash_attn and is_quantized_cache(settings.kv_cache_type):
        raise PlanError(f"kv_cache_type: a {settings.kv_cache_type} V cache needs flash_attn = true")
    if min(settings.context, settings.n_batch, settings.n_ubatch, settings.n_gpus, settings.parallel) < 1:
        raise PlanError("context, n_batch, n_ubatch, n_gpus and parallel must be positive")
    if settings.parallel > MAX_SEQ:
        raise PlanError(f"parallel: llama.cpp allows at most {MAX_SEQ} sequences, not {settings.parallel}")


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class _Shape:
    """Sizes llama.cpp derives from the settings (its clamps and paddings)."""

    batch: int  # n_batch after clamping to the context
    ubatch: int  # tokens in the worst-case graph (split evenly over the sequences)
    outputs: int  # rows of logits in the worst-case graph: n_ubatch, not rounded to the sequences
    n_seq: int  # sequences: the slots
    streams: int  # KV streams: one per slot (kv_unified = false); 1 for a unified cache
    cells: int  # KV cells of a full-attention layer, per stream
    swa_cells: int  # KV cells of a sliding-window layer, per stream

    @classmethod
    def of(cls, header: GgufHeader, settings: EstimateSettings) -> _Shape:
        slots = settings.parallel
        # causal attention: a batch fits the context, which holds every slot's cells
        batch = min(settings.context * slots, settings.n_batch)
        ubatch = min(batch, settings.n_ubatch)
        # the worst-case graph splits its tokens evenly over the sequences, rounding up
        graph_tokens = _pad(ubatch, slots)
        cells = _pad(settings.context, CELL_PAD)
        swa_cells = cells
        if header.sliding_window and not settings.swa_full:  # each stream its own window
            swa_cells = _pad(min(cells, header.sliding_window + ubatch), CELL_PAD)
        return cls(batch, graph_tokens, ubatch, n_seq=slots, streams=slots, cells=cells, swa_cells=swa_cells)

    def layer_cells(self, header: GgufHeader, layer: int) -> int:
        swa = bool(header.swa_layers) and header.swa_layers[layer]
        return self.swa_cells if swa else self.cells


def _layout(header: GgufHeader, shape: _Shape) -> KvLayout:
    attending = [i for i in range(header.block_count) if header.head_count_kv[i] > 0]
    windowed = sum(bool(header.swa_layers) and header.swa_layers[i] for i in attending)
    return KvLayout(len(attending) - windowed, shape.cells, windowed, shape.swa_cells, shape.streams)


def _weights_by_layer(header: GgufHeader) -> tuple[list[int], int, int]:
    """CUDA buffer bytes per repeating layer, of the input layer (kept in host memory), of the output layer."""
    align = ALIGN["cuda"]
    per_layer = [0] * header.block_count
    input_bytes = output_bytes = 0
    tied = not any(t.name == "output.weight" for t in header.tensors)
    for t in header.tensors:
        size = _pad(t.n_bytes, align) + _row_padding(t)
        match = _LAYER.match(t.name)
        if match and int(match.group(1)) < header.block_count:
            per_layer[int(match.group(1))] += size
        elif t.name == "token_embd.weight":
            input_bytes += t.n_bytes
            if tied:  # llama.cpp loads a copy as the output matrix, on the output layer's device
                output_bytes += size
        else:  # output norm and matrix, rope factors, ...: the output layer's device
            output_bytes += size
    return per_layer, input_bytes, output_bytes


def _row_padding(tensor: TensorInfo) -> int:
    # ggml-cuda pads the last row of a quantized matrix to a multiple of 512 values: under 1 KiB
    return 0 if tensor.ggml_type in _UNPADDED_TYPES else 1024


def _kv_by_layer(header: GgufHeader, settings: EstimateSettings, shape: _Shape) -> list[int]:
    align = ALIGN[settings.backend]
    kv_heads = header.head_count_kv
    # without flash attention V is stored transposed, every layer at the widest layer's width
    v_width_max = max((h * header.value_length for h in kv_heads), default=0)
    out = []
    for layer in range(header.block_count):
        if kv_heads[layer] == 0:  # a layer without attention (hybrid models)
            out.append(0)
            continue
        cells = shape.layer_cells(header, layer)
        k_width = kv_heads[layer] * header.key_length
        v_width = kv_heads[layer] * header.value_length if settings.flash_attn else v_width_max
        k = kv_row_bytes(settings.kv_cache_type, k_width) * cells * shape.streams
        v = kv_row_bytes(settings.kv_cache_type, v_width) * cells * shape.streams
        out.append(_pad(k, align) + _pad(v, align))
    return out


def _masks(header: GgufHeader, settings: EstimateSettings, shape: _Shape) -> int:
    """The KQ mask inputs: one per cache (two with sliding-window layers), f16 for flash attention."""
    per_cell = shape.ubatch * (2 if settings.flash_attn else 4)
    total = shape.cells * per_cell
    if header.sliding_window:
        total += shape.swa_cells * per_cell
    return total


def _ffn_widths(header: GgufHeader) -> tuple[int, int, int]:
    """Widest dense FFN, widest expert FFN and widest shared-expert FFN, from tensor shapes."""
    dense = expert = shared = 0
    for t in header.tensors:
        if len(t.shape) < 2:
            continue
        if t.name.endswith((".ffn_up.weight", ".ffn_gate.weight")):
            dense = max(dense, t.shape[1])
        elif t.name.endswith((".ffn_up_exps.weight", ".ffn_gate_exps.weight")):
            expert = max(expert, t.shape[1])
        elif t.name.endswith((".ffn_up_shexp.weight", ".ffn_gate_shexp.weight")):
            shared = max(shared, t.shape[1])
    return dense, expert, shared


def _compute(header: GgufHeader, settings: EstimateSettings, shape: _Shape) -> tuple[int, str]:
    """The compute buffer: the graph allocator's peak over the logits, attention and FFN phases.

    The graph is reserved for n_ubatch tokens, all of them outputs. Activations are float32.
    Inputs (token ids, positions, the KQ masks) live until the last layer; each phase's big
    tensors land above the holes the previous operations left, which the slack terms cover.
    """
    t = shape.ubatch
    n_embd = header.embedding_length
    heads = max(header.head_count, default=0)
    kv_heads = max(header.head_count_kv, default=0)
    unit = 4 * n_embd * t  # one activation of the batch: the residual stream, a norm
    q = 4 * heads * header.key_length * t  # Q
    o = 4 * heads * header.value_length * t  # attention output
    w = 4 * kv_heads * max(header.key_length, header.value_length) * t  # K or V of the batch
    names = {tensor.name.split(".", 2)[-1] for tensor in header.tensors if tensor.name.startswith("blk.")}
    # Q and K norms and post-attention/FFN norms (Gemma, Qwen3, ...) are extra tensors of the layer
    qk_norm = q + w if "attn_q_norm.weight" in names else 0
    post_norm = unit * len(names & {"post_attention_norm.weight", "post_ffw_norm.weight"})
    fixed = GRAPH_INPUT_BYTES_PER_TOKEN * t + _masks(header, settings, shape)
    slack = unit + 2 * q + 2 * w + 2 * o + qk_norm + post_norm

    logits = 4 * header.vocab_size * shape.outputs + LOGITS_MARGIN * unit
    attention = fixed + slack
    if not settings.flash_attn:  # KQ: cells × n_ubatch × n_head (the softmax runs in place)
        layers = range(header.block_count)
        attention += 4 * t * max((shape.layer_cells(header, i) * header.head_count[i] for i in layers), default=0)
    if is_quantized_cache(settings.kv_cache_type):
        attention += q + 2 * w + o  # quantized caches: Hadamard rotations of Q, K, V and the output

    dense, expert, shared = _ffn_widths(header)
    used = header.expert_used_count
    # up, gate and their product; they are larger than any hole the attention left
    ffn = 3 * 4 * dense * t + FFN_MARGIN * unit + post_norm
    if expert and used:
        router = 4 * t * (3 * header.expert_count + used)  # logits, probabilities, order, weights
        act = 4 * expert * used * t  # one of up, gate, product for the selected experts
        down = 4 * n_embd * used * t  # the experts' outputs: in the hole up and gate leave, if it fits
        ffn = max(ffn, 3 * act + max(0, down - 2 * act) + router + MOE_MARGIN * unit)
    ffn += fixed + 3 * 4 * shared * t

    phases = {"logits": logits, "attention": attention, "ffn": ffn}
    phase = max(phases, key=lambda name: phases[name])
    return _pad(phases[phase] + COMPUTE_MARGIN, ALIGN[settings.backend]), phase


def _output(header: GgufHeader, settings: EstimateSettings, shape: _Shape) -> int:
    """The generation context's output buffer once decoding: rows × vocabulary float32."""
    rows = max(shape.n_seq, shape.batch if settings.logits_all else 1)
    return 4 * rows * header.vocab_size


def _embeddings_output(header: GgufHeader, shape: _Shape) -> tuple[int, int]:
    """The embeddings context's output buffer: when created, and once it embeds a full batch.

    llama.cpp's ``output_reserve`` sizes it for max(outputs, n_seq_max) rows of logits (always)
    and, in embeddings mode, of n_embd floats; the context is created with one row, and embeddings
    mode makes every token of a batch an output, so an input of n_batch tokens grows it (it never
    shrinks) to n_batch rows.
    """
    row = 4 * (header.vocab_size + header.embedding_length)
    return row, row * shape.batch


def _scores(header: GgufHeader, settings: EstimateSettings) -> int:
    """llama-cpp-python's ``Llama.scores``: float32 rows of the vocabulary, n_batch or n_ctx of them."""
    rows = settings.context if settings.logits_all else min(settings.context, settings.n_batch)
    return 4 * rows * header.vocab_size


def _cuda_pool(header: GgufHeader, settings: EstimateSettings, shape: _Shape) -> int:
    """The largest temporary ggml-cuda takes from its memory pool during one graph.

    Without flash attention cuBLAS multiplies V by the softmax converted to f16 (half the KQ
    matrix); with a quantized cache, flash attention converts one layer's K and V to f16; MoE
    matrix products gather the selected experts' inputs and outputs.
    """
    t = shape.ubatch
    kv_width = max(header.head_count_kv, default=0) * max(header.key_length, header.value_length)
    dense, expert, _ = _ffn_widths(header)
    # cuBLAS multiplies unquantized weights by f16 copies of the activations (the FFN's are widest)
    candidates = [4 * header.embedding_length * t, 2 * max(dense, expert * header.expert_used_count) * t]
    if not settings.flash_attn:
        candidates.append(2 * t * shape.cells * max(header.head_count, default=0))
    elif is_quantized_cache(settings.kv_cache_type):  # every stream's cells of the layer
        candidates.append(2 * 2 * shape.cells * shape.streams * kv_width)
    if expert and header.expert_used_count:
        candidates.append(4 * header.expert_used_count * t * (header.embedding_length + expert))
    return max(candidates)
