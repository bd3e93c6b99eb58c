"""Planning is pure: manifest + model facts + catalogue → Plan. Real-size headers and the real estimator
for the issue's models; a fixed estimator to prove the selection logic itself."""

from __future__ import annotations

from dataclasses import replace

import pytest
import tomli_w

from deployer.catalogue import load_catalogue
from deployer.errors import HubError, PlanError
from deployer.estimate import EstimateSettings, MemoryEstimate, estimate
from deployer.facts import GgufHeader, ModelFacts, ShardFacts
from deployer.gguf_header import read_header
from deployer.loading import parse_manifest
from deployer.plan import MAX_AUTO_SLOTS, SAME_MEMORY, Plan, PlanFailure, estimate_settings, gib, plan, plan_all
from tests import ggufgen

GIB = 1024**3
CATALOGUE = load_catalogue()


@pytest.fixture(scope="module")
def facts_of(sparse_gguf):
    """``facts_of(spec)``: ModelFacts of a header-only real-size file (headers read once)."""
    cache: dict[ggufgen.ModelSpec, ModelFacts] = {}

    def make(spec: ggufgen.ModelSpec) -> ModelFacts:
        if spec not in cache:
            path = sparse_gguf(spec)
            shard = ShardFacts(path.name, path.stat().st_size, None)
            cache[spec] = ModelFacts("org/model-GGUF", "main", "c" * 40, (shard,), read_header(path))
        return cache[spec]

    return make


def manifest(spec: ggufgen.ModelSpec | None = None, path: str = "manifests/m.toml", **keys):
    data = {"repo": "org/model-GGUF", "file": "m.gguf", "quant": spec.quant if spec else "Q8_0", "context": 4096}
    return parse_manifest(tomli_w.dumps({**data, **keys}).encode(), path)


# ## The models, with the real estimator


@pytest.mark.parametrize(
    ("spec", "context", "expected"),
    [
        pytest.param(ggufgen.DARK_CHAMPION_18B, 32768, ("H100", 1), id="dark-champion-18b-moe-q8-32k-h100"),
        pytest.param(ggufgen.QWEN_0_5B, 32768, ("L4", 1), id="0.5b-l4"),
        pytest.param(ggufgen.LLAMA_8B, 8192, ("L40S", 1), id="8b-q8-8k-l40s"),
        pytest.param(ggufgen.LLAMA_70B_Q4KM, 8192, ("H100", 1), id="70b-q4-8k-h100"),
    ],
)
def test_table_choice_with_no_override(facts_of, spec, context, expected):
    result = plan(manifest(spec, context=context), facts_of(spec), CATALOGUE)
    assert (result.gpu.type, result.gpu.count) == expected
    assert result.reason.startswith("table row ")
    assert result.headroom_bytes >= 0


@pytest.mark.parametrize(
    ("spec", "context"),
    [
        pytest.param(ggufgen.MISTRAL_LARGE_123B_Q4KM, 8192, id="123b-q4-73gb-escalates"),
        pytest.param(ggufgen.LLAMA_70B_Q4KM, 131072, id="70b-q4-131k-escalates"),
    ],
)
def test_escalates_beyond_a_single_h100(facts_of, spec, context):
    result = plan(manifest(spec, context=context), facts_of(spec), CATALOGUE)
    h100 = CATALOGUE.gpus["H100"]
    assert result.estimate.per_gpu > h100.usable_bytes or result.gpu.count > 1  # it really does not fit one
    assert (result.gpu.type, result.gpu.count) != ("H100", 1)
    assert result.reason.startswith("escalated: table row '>= 13B, quantized'")
    assert result.headroom_bytes >= 0


@pytest.mark.parametrize(
    ("spec", "context", "expected"),
    [
        # the seed's target: 17.8 GiB of weights + 8 × 3.5 GiB of KV cache (32k each) fit one H100
        pytest.param(ggufgen.DARK_CHAMPION_18B, 32768, ("H100", 1, 8), id="dark-champion-q8-32k-h100-8-slots"),
        pytest.param(ggufgen.QWEN_0_5B, 32768, ("L4", 1, 8), id="0.5b-32k-l4-8-slots-the-cap"),
        pytest.param(ggufgen.LLAMA_70B_Q4KM, 32768, ("H100", 1, 2), id="70b-q4-32k-h100-2-slots-memory-bound"),
        pytest.param(ggufgen.LLAMA_8B, 131072, ("L40S", 1, 1), id="8b-131k-l40s-one-slot"),
        # issue 20: sliding-window layers cache their window (1,536 cells), not 32k: 3 slots became 8
        pytest.param(ggufgen.GEMMA3_27B_Q4KM, 32768, ("H100", 1, 8), id="gemma3-27b-q4-32k-h100-8-slots"),
        pytest.param(ggufgen.GPT_OSS_20B, 131072, ("H100", 1, 8), id="gpt-oss-20b-131k-h100-8-slots"),
    ],
)
def test_slots_fill_the_chosen_gpu(facts_of, spec, context, expected):
    """Without [server] parallel: the GPU is chosen for one slot, then holds as many as fit, at most 8."""
    facts = facts_of(spec)
    loaded = manifest(spec, context=context)
    result = plan(loaded, facts, CATALOGUE)
    assert (result.gpu.type, result.gpu.count, result.slots.parallel) == expected
    one = estimate(facts.header, estimate_settings(loaded.manifest, 1, 1))
    assert result.estimate.kv == result.slots.parallel * one.kv, "every slot has a full context of KV cache"
    assert result.headroom_bytes >= 0
    if result.slots.parallel < MAX_AUTO_SLOTS:  # memory-bound: one slot more would not fit
        more = estimate(facts.header, estimate_settings(loaded.manifest, 1, result.slots.parallel + 1))
        assert more.per_gpu > result.gpu.usable_bytes
        assert result.slots.reason.startswith("as many as fit beside weights, compute and overhead: ")
    else:
        assert result.slots.reason.startswith("the most the planner gives: with 8 slots of ")
    assert result.slots.concurrency == 2 * result.slots.parallel
    for fallback in result.fallbacks:  # Modal may start any of them: each holds the slots too
        assert result.estimate.per_gpu <= fallback.usable_bytes


@pytest.mark.parametrize(
    ("spec", "context", "full", "capped"),
    [
        pytest.param(ggufgen.GEMMA3_27B_Q4KM, 32768, 3, 8, id="gemma3-27b-32k"),
        pytest.param(ggufgen.GEMMA3_27B_Q4KM, 131072, 0, 4, id="gemma3-27b-131k"),
        pytest.param(ggufgen.GPT_OSS_120B, 32768, 3, 7, id="gpt-oss-120b-32k"),
    ],
)
def test_window_sized_swa_cache_gives_more_slots_on_an_h100(facts_of, spec, context, full, capped):
    """[server] swa_full = true keeps every layer's cache at the whole context: fewer slots (0: no fit)."""
    facts = facts_of(spec)

    def slots_on_h100(swa_full: bool) -> int:
        loaded = manifest(spec, context=context, server={"swa_full": swa_full}, gpu="H100")
        try:
            return plan(loaded, facts, CATALOGUE).slots.parallel
        except PlanError:
            return 0

    assert (slots_on_h100(True), slots_on_h100(False)) == (full, capped)


def test_the_kv_line_names_the_windowed_layers(facts_of):
    from deployer.plan_report import plan_json, plan_markdown

    spec = ggufgen.GEMMA3_27B_Q4KM
    result = plan(manifest(spec, context=32768), facts_of(spec), CATALOGUE)
    words = "10 global layers × 32,768 tokens + 52 windowed layers × 1,536 tokens, × 8 slots = "
    assert f"**KV**: {words}" in plan_markdown([result])
    kv = plan_json([result])[0]["kv_cache"]
    assert kv == {
        "swa_full": False,
        "global_layers": 10,
        "global_tokens": 32768,
        "windowed_layers": 52,
        "windowed_tokens": 1536,
        "slots": 8,
        "bytes": result.estimate.kv,
    }
    # K and V of 16 heads × 128 in f16: 8 KiB a cell per layer
    assert result.estimate.kv == 8 * (10 * 32768 + 52 * 1536) * 8 * 1024


def test_the_target_manifest_plans_to_an_h100_with_8_slots(facts_of):
    from deployer.loading import load_manifest
    from tests.conftest import ROOT

    result = plan(load_manifest(ROOT / "manifests" / "dark-champion-18b.toml"), facts_of(ggufgen.DARK_CHAMPION_18B))
    assert (result.gpu.modal, result.slots.parallel, result.slots.concurrency) == ("H100", 8, 16)
    assert "with 8 slots of 32,768 tokens the model needs " in result.slots.reason
    assert "of H100's 67.7 GiB usable per GPU" in result.slots.reason


def test_8b_at_131072_context_counts_its_16_gib_kv_cache(facts_of):
    spec = ggufgen.LLAMA_8B  # 32 layers × 8 KV heads × 128 × (K + V) × 2 bytes × 131072 cells = 16 GiB
    result = plan(manifest(spec, context=131072), facts_of(spec), CATALOGUE)
    assert 16 * GIB <= result.estimate.kv <= 16.5 * GIB
    assert result.estimate.total >= result.estimate.weights + 16 * GIB
    assert result.estimate.per_gpu <= result.gpu.usable_bytes


def test_a_model_too_large_for_8_b200_fails_with_the_numbers(facts_of):
    spec = ggufgen.TOO_BIG_1T_F16
    with pytest.raises(PlanError) as error:
        plan(manifest(spec, path="manifests/huge.toml"), facts_of(spec), CATALOGUE)
    message = str(error.value)
    assert message.startswith("manifests/huge.toml: the model fits on no GPU set: 8× B200 offers 170.1 GiB usable")
    assert "but the model needs" in message and "weights 2," in message  # over two thousand GiB of weights


def test_an_l4_override_on_the_target_is_refused_with_the_numbers(facts_of):
    spec = ggufgen.DARK_CHAMPION_18B
    with pytest.raises(PlanError) as error:
        plan(manifest(spec, path="manifests/dc.toml", context=32768, gpu="L4"), facts_of(spec), CATALOGUE)
    need = estimate(facts_of(spec).header, estimate_settings(manifest(spec, context=32768).manifest)).per_gpu
    assert str(error.value).startswith(
        f"manifests/dc.toml: gpu: L4 offers 15.7 GiB usable per GPU (70% of 22.5 GiB) "
        f"but the model needs {need / GIB:,.1f} GiB per GPU (weights "
    )
    assert "the smallest single GPU that holds it is" in str(error.value)


def test_an_override_that_holds_is_used_as_given(facts_of):
    spec = ggufgen.DARK_CHAMPION_18B
    result = plan(manifest(spec, gpu=["A100-80GB", "H100:2"]), facts_of(spec), CATALOGUE)
    assert result.modal_gpus == ["A100-80GB", "H100:2"]
    assert result.reason.startswith("override: gpu = A100-80GB, H100:2")


# ## The manifest must agree with the file


def test_quant_must_match_the_file_type(facts_of):
    spec = ggufgen.QWEN_0_5B
    with pytest.raises(
        PlanError,
        match=r"^manifests/q\.toml: quant: 'Q4_K_M' does not match the file, whose general\.file_type is 7 \(Q8_0\)$",
    ):
        plan(manifest(spec, path="manifests/q.toml", quant="Q4_K_M"), facts_of(spec), CATALOGUE)


def test_context_within_the_trained_context(facts_of):
    spec = ggufgen.LLAMA_8B
    with pytest.raises(PlanError) as error:
        plan(manifest(spec, path="manifests/x.toml", context=200000), facts_of(spec), CATALOGUE)
    assert str(error.value) == "manifests/x.toml: context: 200000 exceeds the model's trained context 131072"


def test_estimate_settings_come_from_the_server_table():
    loaded = manifest(
        context=8192, server={"n_batch": 1024, "n_ubatch": 256, "kv_cache_type": "q8_0", "embeddings": True}
    )
    assert estimate_settings(loaded.manifest, 4) == EstimateSettings(
        context=8192, n_batch=1024, n_ubatch=256, flash_attn=True, kv_cache_type="q8_0", n_gpus=4, embeddings=True
    )


def test_embeddings_plan_holds_the_second_context_and_says_so(facts_of):
    from deployer.plan_report import plan_json, plan_markdown

    spec = ggufgen.LLAMA_8B
    off = plan(manifest(spec, context=8192, server={"parallel": 2}), facts_of(spec), CATALOGUE)
    on = plan(manifest(spec, context=8192, server={"parallel": 2, "embeddings": True}), facts_of(spec), CATALOGUE)
    ctx = on.estimate.embeddings_context
    assert ctx is not None and off.estimate.embeddings_context is None
    # one more compute buffer (128256 x 512 float32 logits: 250.5 MiB) and 512 cells of KV cache (64 MiB)
    assert ctx.compute == off.estimate.compute and ctx.kv == 64 * 1024**2
    assert on.estimate.total - off.estimate.total == on.estimate.embeddings > ctx.compute + ctx.kv
    assert on.estimate.host > off.estimate.host + ctx.output_peak
    assert plan_json([on])[0]["estimate_bytes"]["embeddings"] == on.estimate.embeddings
    assert plan_json([off])[0]["estimate_bytes"]["embeddings"] == 0
    assert f" + overhead {gib(on.estimate.overhead)} + embeddings context {gib(on.estimate.embeddings)};" in (
        plan_markdown([on])
    )
    assert "embeddings context" not in plan_markdown([off])


# ## The selection logic, with a fixed estimator: exact numbers, independent of the estimator


def _header(params: int, quant: str) -> GgufHeader:
    from deployer.facts import TensorInfo
    from deployer.quants import FILE_TYPES

    return GgufHeader(
        arch="llama", file_type=FILE_TYPES[quant], context_length=131072, block_count=1, embedding_length=8,
        head_count=(1,), head_count_kv=(1,), key_length=8, value_length=8, vocab_size=8,
        tensors=(TensorInfo("w", (params,), 0, 0),),
    )  # fmt: skip


def _needs(total_gib: float):
    """An estimator whose total is ``total_gib`` whatever the GPU count (split evenly over GPUs)."""

    def estimator(header: GgufHeader, settings: EstimateSettings) -> MemoryEstimate:
        return MemoryEstimate(int(total_gib * GIB), 0, 0, 0, 0, 0, n_gpus=settings.n_gpus)

    return estimator


def _plan(params: float, quant: str, need: float, policy="table", **keys) -> Plan:
    facts = ModelFacts("org/m", "main", "c" * 40, (ShardFacts("m.gguf", 1, None),), _header(int(params * 1e9), quant))
    return plan(manifest(quant=quant, **keys), facts, CATALOGUE, policy, estimator=_needs(need))


@pytest.mark.parametrize(
    ("params", "quant", "need", "expected", "reason"),
    [
        pytest.param(0.5, "Q8_0", 10, "L4", "table row '< 3B'", id="small-fits-its-row"),
        pytest.param(0.5, "Q8_0", 16, "A10", "escalated: ", id="small-but-long-context-escalates-one-step"),
        pytest.param(5, "F16", 20, "L40S", "escalated: ", id="5b-f16-escalates-to-l40s"),
        pytest.param(8, "Q4_K_M", 30, "L40S", "table row '7B - 13B'", id="8b-l40s"),
        pytest.param(20, "BF16", 60, "A100-80GB", "table row '13B - 30B, unquantized'", id="20b-bf16-a100"),
        pytest.param(70, "Q4_K_M", 60, "H100", "table row '>= 13B, quantized'", id="70b-q4-h100"),
        pytest.param(70, "Q4_K_M", 80, "H200", "escalated: ", id="70b-q4-131k-escalates"),
        pytest.param(123, "Q4_K_M", 150, "B200", "escalated: ", id="123b-needs-b200"),
        pytest.param(123, "F16", 160, "B200", "table row '> 70B, unquantized'", id="123b-f16-b200-row"),
        pytest.param(123, "F16", 250, "H200:2", "escalated: ", id="beyond-b200-two-of-the-cheapest"),
        pytest.param(405, "F16", 800, "H200:8", "escalated: ", id="800-gib-eight-h200"),
        pytest.param(405, "F16", 1300, "B200:8", "escalated: ", id="1300-gib-eight-b200"),
    ],
)
def test_selection_and_escalation(params, quant, need, expected, reason):
    result = _plan(params, quant, need)
    assert result.gpu.modal == expected
    assert result.reason.startswith(reason)


def test_nothing_fits_names_the_largest_set():
    with pytest.raises(PlanError, match=r"8× B200 offers 170\.1 GiB usable per GPU .* needs 187\.5 GiB per GPU"):
        _plan(405, "F16", 1500)


@pytest.mark.parametrize(
    ("params", "quant", "need"),
    [
        pytest.param(0.5, "Q8_0", 1, id="tiny"),
        pytest.param(18.4, "Q8_0", 22, id="target-size"),
        pytest.param(70, "Q4_K_M", 80, id="70b-long-context"),
        pytest.param(405, "F16", 800, id="huge"),
    ],
)
def test_cheapest_is_the_cheapest_set_that_fits(params, quant, need):
    table, cheapest = _plan(params, quant, need), _plan(params, quant, need, policy="cheapest")
    assert cheapest.gpu == table.cheapest == cheapest.cheapest
    assert cheapest.reason.startswith("policy 'cheapest'")
    assert cheapest.gpu.usd_per_hour <= table.gpu.usd_per_hour
    for gpu in CATALOGUE.gpus.values():  # nothing cheaper holds it
        for count in (1, *CATALOGUE.multi_gpu_counts):
            if count <= gpu.max_count and gpu.usd_per_hour * count < cheapest.gpu.usd_per_hour:
                assert need * GIB / count > gpu.usable_bytes, (gpu.name, count)


def test_fallbacks_have_the_same_or_more_memory_and_hold_the_model():
    result = _plan(0.5, "Q8_0", 10)
    chosen = CATALOGUE.gpus[result.gpu.type]
    assert result.fallbacks, "an L4 has fallbacks"
    for fallback in result.fallbacks:
        gpu = CATALOGUE.gpus[fallback.type]
        assert gpu.memory_mib >= chosen.memory_mib * SAME_MEMORY
        assert gpu.usable_bytes >= 10 * GIB
    prices = [f.usd_per_hour for f in result.fallbacks]
    assert prices == sorted(prices)
    assert result.fallbacks[0].type == "A10"  # 24 GB like the L4


def test_the_rows_own_fallback_comes_first():
    result = _plan(123, "F16", 130)
    assert result.modal_gpus[:2] == ["B200", "H200"]  # the table's "B200 (fallback H200)"


def test_multi_gpu_fallbacks_keep_the_count():
    result = _plan(123, "F16", 250)
    assert all(f.count == 2 for f in result.fallbacks)


# ## Slots, with a fixed estimator: weights and the like, plus a KV cache per slot


def _per_slot(base_gib: float, slot_gib: float):
    """An estimator needing ``base_gib`` plus ``slot_gib`` per slot (one GPU)."""

    def estimator(header: GgufHeader, settings: EstimateSettings) -> MemoryEstimate:
        kv = int(slot_gib * settings.parallel * GIB)
        return MemoryEstimate(int(base_gib * GIB), kv, 0, 0, 0, 0, n_gpus=settings.n_gpus)

    return estimator


def _slots_plan(params: float, base: float, per_slot: float, quant: str = "Q8_0", **keys) -> Plan:
    facts = ModelFacts("org/m", "main", "c" * 40, (ShardFacts("m.gguf", 1, None),), _header(int(params * 1e9), quant))
    return plan(manifest(quant=quant, **keys), facts, CATALOGUE, estimator=_per_slot(base, per_slot))


# L4 holds 15.7 GiB usable, A10 16.9, L40S 33.7, H100 67.7, H200 133.4, B200 170.1
@pytest.mark.parametrize(
    ("params", "base", "per_slot", "keys", "expected", "reason"),
    [
        pytest.param(0.5, 2, 1, {}, ("L4", 8, 16), "the most the planner gives: with 8 slots", id="small-gets-the-cap"),
        pytest.param(0.5, 10, 1.5, {}, ("L4", 3, 6), "as many as fit beside weights", id="memory-bound-3-slots"),
        pytest.param(
            0.5, 15, 1, {}, ("A10", 1, 2), "as many as fit beside weights", id="escalates-for-one-slot-then-fills-it"
        ),
        pytest.param(
            0.5, 10, 1.5, {"server": {"parallel": 4}}, ("A10", 4, 8), "[server] parallel = 4 in the manifest",
            id="manifest-parallel-escalates-l4-to-a10",
        ),
        pytest.param(
            0.5, 2, 1, {"scaling": {"concurrency": 3}}, ("L4", 3, 3), "capped by [scaling] concurrency = 3",
            id="concurrency-caps-the-slots",
        ),
        pytest.param(
            0.5, 2, 1, {"server": {"parallel": 2}, "scaling": {"concurrency": 5}}, ("L4", 2, 5), "[server] parallel",
            id="manifest-parallel-and-concurrency-as-written",
        ),
        pytest.param(
            8, 10, 1.5, {"gpu": ["L40S", "L4"]}, ("L40S", 3, 6), "of L4's 15.7 GiB usable per GPU (the tightest listed)",
            id="override-every-listed-gpu-holds-the-slots",
        ),
    ],
)  # fmt: skip
def test_slots(params, base, per_slot, keys, expected, reason):
    result = _slots_plan(params, base, per_slot, **keys)
    assert (result.gpu.modal, result.slots.parallel, result.slots.concurrency) == expected
    assert reason in result.slots.reason, result.slots.reason
    assert result.estimate.kv == int(per_slot * result.slots.parallel * GIB)


def test_fallbacks_hold_the_slots_too():
    # 100 GiB + 8 × 5 GiB: a B200 holds 8 slots; its row's own fallback, the H200, only 6
    result = _slots_plan(123, 100, 5, quant="F16")
    assert (result.gpu.modal, result.slots.parallel) == ("B200", 8)
    assert "H200" not in result.modal_gpus, "an H200 cannot hold the 8 slots the B200 is given"
    with_four = _slots_plan(123, 100, 5, quant="F16", server={"parallel": 4})
    assert with_four.modal_gpus[:2] == ["B200", "H200"]  # 120 GiB: the row's own fallback holds them


def test_a_manifest_parallel_no_gpu_holds_fails_with_the_numbers():
    with pytest.raises(
        PlanError, match=r"8× B200 offers 170\.1 GiB usable per GPU .* needs [\d.]+ GiB per GPU with 64 slots"
    ):
        _slots_plan(0.5, 2, 30, server={"parallel": 64})


def test_a_manifest_parallel_an_override_cannot_hold_is_refused():
    with pytest.raises(PlanError, match=r"^manifests/m\.toml: gpu: L4 offers 15\.7 GiB usable per GPU .* with 4 slots"):
        _slots_plan(0.5, 10, 1.5, gpu="L4", server={"parallel": 4})


def test_override_too_small_even_as_a_fallback():
    with pytest.raises(PlanError, match=r"^manifests/m\.toml: gpu: A10 offers 16\.9 GiB usable per GPU"):
        _plan(8, "Q8_0", 20, gpu=["L40S", "A10"])


# ## Many manifests: one failure does not stop the others


def test_plan_all_collects_failures_and_goes_on(facts_of):
    good = manifest(ggufgen.QWEN_0_5B, path="manifests/a.toml", name="a")
    bad = manifest(ggufgen.QWEN_0_5B, path="manifests/b.toml", name="b", context=65536)
    missing = manifest(ggufgen.QWEN_0_5B, path="manifests/c.toml", name="c")

    def resolve(loaded):
        if loaded.name == "c":
            raise HubError("org/model-GGUF: repository not found")
        return facts_of(ggufgen.QWEN_0_5B)

    results = plan_all([bad, good, missing], resolve, catalogue=CATALOGUE)
    assert [type(r) for r in results] == [PlanFailure, Plan, PlanFailure]
    assert results[0].error == "manifests/b.toml: context: 65536 exceeds the model's trained context 32768"
    assert results[2].error == "manifests/c.toml: org/model-GGUF: repository not found"
    assert results[1].gpu.type == "L4"


def test_plan_does_not_change_its_inputs(facts_of):
    facts = facts_of(ggufgen.QWEN_0_5B)
    before = replace(facts)
    plan(manifest(ggufgen.QWEN_0_5B), facts, CATALOGUE)
    assert facts == before
