"""Predicting the GGUF llama.cpp's converter writes from a Transformers checkpoint (pure), the
manifest's convert_from key, and the one-line refusals."""

from __future__ import annotations

import re

import pytest
from gguf.constants import GGMLQuantizationType as T

from deployer.conversion.checkpoint import (
    DEFAULT_TYPES,
    LAYOUTS,
    MIXES,
    SourceTensor,
    Where,
    converted_type,
    intermediate_quant,
    layout_of,
    more_bits,
    predict,
    quantized_type,
    source_bytes,
    tensors_from_config,
)
from deployer.conversion.job import convert_memory_mib, convert_timeout
from deployer.conversion.resolve import checkpoint_files, conversion_of, converted_file
from deployer.errors import HubError, ManifestInvalid, PlanError
from deployer.quants import CONVERT_QUANTS, NOT_CONVERTED, QUANTIZER_QUANTS, QUANTS
from tests.plans import loaded_manifest

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "vocab_size": 1000,
    "tie_word_embeddings": False,
}


# ## Types, as the converter picks them


@pytest.mark.parametrize(
    ("name", "shape", "quant", "expected"),
    [
        pytest.param("blk.0.attn_q.weight", (512, 512), "Q8_0", T.Q8_0, id="matrix-q8_0"),
        pytest.param("token_embd.weight", (512, 1000), "Q8_0", T.Q8_0, id="embeddings-q8_0-too"),
        pytest.param("blk.0.attn_norm.weight", (512,), "Q8_0", T.F32, id="norm-stays-f32"),
        pytest.param("blk.0.attn_q_norm.weight", (64,), "F16", T.F32, id="qk-norm-stays-f32"),
        pytest.param("blk.0.attn_q.bias", (512,), "Q8_0", T.F32, id="bias-stays-f32"),
        pytest.param("blk.0.ffn_down.weight", (100, 512), "Q8_0", T.F16, id="rows-not-multiple-of-32-fall-back-to-f16"),
        pytest.param("blk.0.ffn_down.weight", (100, 512), "BF16", T.BF16, id="bf16-has-no-blocks"),
        pytest.param("output.weight", (512, 1000), "F16", T.F16, id="f16"),
        pytest.param("output.weight", (512, 1000), "F32", T.F32, id="f32"),
    ],
)
def test_converted_type(name, shape, quant, expected):
    assert converted_type(name, shape, quant) == expected


# ## Types, as llama.cpp's quantizer picks them (src/llama-quant.cpp, llama_tensor_get_type)

L32 = Where(layer=4, layers=32, gqa=4)  # a middle layer of a Llama-3-8B-like model


@pytest.mark.parametrize(
    ("name", "shape", "quant", "where", "expected"),
    [
        pytest.param("blk.4.attn_q.weight", (4096, 4096), "Q4_K_M", L32, T.Q4_K, id="q4_k_m-default"),
        pytest.param("blk.4.attn_v.weight", (4096, 1024), "Q4_K_M", L32, T.Q4_K, id="q4_k_m-attn_v-middle"),
        pytest.param("blk.0.attn_v.weight", (4096, 1024), "Q4_K_M", Where(0, 32, 4), T.Q6_K, id="q4_k_m-attn_v-first-eighth"),
        pytest.param("blk.6.ffn_down.weight", (14336, 4096), "Q4_K_M", Where(6, 32, 4), T.Q6_K, id="q4_k_m-ffn_down-every-third"),
        pytest.param("blk.28.ffn_down.weight", (14336, 4096), "Q5_K_M", Where(28, 32, 4), T.Q6_K, id="q5_k_m-ffn_down-last-eighth"),
        pytest.param("output.weight", (4096, 128256), "Q4_0", L32, T.Q6_K, id="output-is-q6_k-for-legacy-types-too"),
        pytest.param("output.weight", (4128, 1000), "Q4_K_M", L32, T.Q8_0, id="output-rows-not-multiple-of-256-q8_0"),
        pytest.param("output.weight", (100, 1000), "Q4_0", L32, T.F16, id="output-rows-not-multiple-of-32-f16"),
        pytest.param("token_embd.weight", (4096, 128256), "Q4_K_M", L32, T.Q4_K, id="token_embd-default-when-untied"),
        pytest.param("blk.4.attn_k.weight", (896, 128), "Q4_K_M", L32, T.Q5_0, id="q4_k-falls-back-to-q5_0"),
        pytest.param("blk.4.attn_q.weight", (896, 896), "Q6_K", L32, T.Q8_0, id="q6_k-falls-back-to-q8_0"),
        pytest.param("blk.4.attn_q.weight", (896, 896), "Q5_K_S", L32, T.Q5_1, id="q5_k-falls-back-to-q5_1"),
        pytest.param("blk.4.attn_q.weight", (896, 896), "Q3_K_S", L32, T.Q4_0, id="q3_k-falls-back-to-q4_0"),
        pytest.param("blk.4.attn_q.weight", (896, 896), "IQ4_XS", L32, T.IQ4_NL, id="iq4_xs-falls-back-to-iq4_nl"),
        pytest.param("blk.4.attn_q.weight", (100, 896), "Q4_K_M", L32, T.F16, id="no-block-fits-f16"),
        pytest.param("blk.4.attn_v.weight", (4096, 1024), "Q2_K", L32, T.Q4_K, id="q2_k-attn_v-gqa-4"),
        pytest.param("blk.4.attn_v.weight", (4096, 2048), "Q2_K", Where(4, 32, 2), T.Q3_K, id="q2_k-attn_v-gqa-2"),
        pytest.param("blk.4.attn_output.weight", (4096, 4096), "Q2_K", L32, T.Q3_K, id="q2_k-attn_output"),
        pytest.param("blk.1.ffn_down.weight", (14336, 4096), "Q3_K_M", Where(1, 32, 4), T.Q5_K, id="q3_k_m-ffn_down-first-16th"),
        pytest.param("blk.2.ffn_down.weight", (14336, 4096), "Q3_K_M", Where(2, 32, 4), T.Q4_K, id="q3_k_m-ffn_down-after"),
        pytest.param("blk.3.ffn_down.weight", (14336, 4096), "IQ4_NL", Where(3, 32, 4), T.Q5_K, id="iq4_nl-ffn_down-first-eighth"),
        pytest.param("blk.4.ffn_down.weight", (14336, 4096), "IQ4_NL", L32, T.IQ4_NL, id="iq4_nl-ffn_down-after"),
        pytest.param("blk.3.attn_v.weight", (4096, 1024), "Q4_K_S", Where(3, 32, 4), T.Q5_K, id="q4_k_s-attn_v-first-four"),
        pytest.param("blk.11.attn_v.weight", (8192, 1024), "Q4_K_M", Where(11, 80, 8, is_70b=True), T.Q5_K, id="70b-attn_v-bumped"),
        pytest.param("blk.4.attn_v.weight", (8192, 1024), "Q6_K", Where(4, 80, 8, is_70b=True), T.Q6_K, id="70b-q6_k-unchanged"),
        pytest.param("blk.4.attn_v.weight", (4096, 1024), "IQ3_M", L32, T.Q4_K, id="iq3_m-attn_v"),
        pytest.param("blk.4.ffn_up.weight", (4096, 14336), "IQ3_M", L32, T.IQ3_S, id="iq3_m-default-iq3_s"),
    ],
)  # fmt: skip
def test_quantized_type(name, shape, quant, where, expected):
    assert quantized_type(name, shape, quant, where) == expected


def test_tied_embeddings_are_quantized_as_the_output():
    assert quantized_type("token_embd.weight", (4096, 128256), "Q4_K_M", L32, tied=True) == T.Q6_K


def test_more_bits_is_llama_cpps_use_more_bits():
    # i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, for 32 layers
    assert [i for i in range(32) if more_bits(Where(i, 32, 1))] == [
        0,
        1,
        2,
        3,
        6,
        9,
        12,
        15,
        18,
        21,
        24,
        27,
        28,
        29,
        30,
        31,
    ]
    assert [i for i in range(2) if more_bits(Where(i, 2, 1))] == [1]


def test_the_intermediate_is_the_checkpoints_16_bit_type():
    def tensor(dtype: str, shape: tuple[int, ...] = (8, 8)) -> SourceTensor:
        return SourceTensor("w", shape, dtype)

    assert intermediate_quant([tensor("BF16", (8,)), tensor("F32"), tensor("BF16")]) == "BF16"
    assert intermediate_quant([tensor("F16")]) == "F16"
    assert intermediate_quant([tensor("F32")]) == "F16"


# A Llama-3-8B-shaped model (32 layers, hidden 4096, FFN 14336, 32 heads over 8 KV heads, 128256 tokens,
# untied): 7 matrices a layer + token_embd + output = 226 quantized, 2 norms a layer + output_norm = 65 F32.
# The layers use_more_bits picks: 0-3, 6, 9, ..., 27, 28-31 (16). Counts derived from llama-quant.cpp by hand:
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "vocab_size": 128256, "torch_dtype": "bfloat16",
}  # fmt: skip


@pytest.mark.parametrize(
    ("quant", "counts", "published_gb"),
    [
        # 16 attn_v + 16 ffn_down + output in Q6_K, the rest Q4_K
        pytest.param("Q4_K_M", {T.Q4_K: 193, T.Q6_K: 33}, 4.92, id="q4_k_m"),
        pytest.param("Q5_K_M", {T.Q5_K: 193, T.Q6_K: 33}, 5.73, id="q5_k_m"),
        # the output Q6_K, everything else the legacy type
        pytest.param("Q4_0", {T.Q4_0: 225, T.Q6_K: 1}, 4.66, id="q4_0"),
        pytest.param("Q6_K", {T.Q6_K: 226}, 6.60, id="q6_k"),
        # attn_v and ffn_down Q5_K in layers 0-1, else Q4_K; attn_output Q4_K; output Q6_K
        pytest.param("Q3_K_M", {T.Q3_K: 129, T.Q4_K: 92, T.Q5_K: 4, T.Q6_K: 1}, 4.02, id="q3_k_m"),
        # attn_v Q4_K (8B has 4 heads a KV head), ffn_down and attn_output Q3_K
        pytest.param("Q2_K", {T.Q2_K: 129, T.Q3_K: 64, T.Q4_K: 32, T.Q6_K: 1}, 3.18, id="q2_k"),
        # attn_v and ffn_down Q5_K in layers 0-3 (4 = 32/8)
        pytest.param("Q4_K_S", {T.Q4_K: 217, T.Q5_K: 8, T.Q6_K: 1}, 4.69, id="q4_k_s"),
        # attn_v Q5_K (GQA 4), ffn_down Q5_K in layers 0-3 (no importance matrix)
        pytest.param("IQ4_XS", {T.IQ4_XS: 189, T.Q5_K: 36, T.Q6_K: 1}, None, id="iq4_xs"),
        # attn_v and attn_output Q4_K, ffn_down Q4_K in layers 0-3, the rest IQ3_S
        pytest.param("IQ3_M", {T.IQ3_S: 157, T.Q4_K: 68, T.Q6_K: 1}, None, id="iq3_m"),
    ],
)  # fmt: skip
def test_llama3_8b_shaped_mixes(quant, counts, published_gb):
    from collections import Counter

    tensors = tensors_from_config(LLAMA3_8B, LAYOUTS["LlamaForCausalLM"])
    predicted = predict(LLAMA3_8B, tensors, quant, tokenizer_bytes=9_000_000)
    found = Counter(T(t.ggml_type) for t in predicted.header.tensors)
    assert found == {**counts, T.F32: 65}
    q6 = {t.name for t in predicted.header.tensors if t.ggml_type == T.Q6_K}
    if quant == "Q4_K_M":
        assert "blk.6.attn_v.weight" in q6 and "blk.7.attn_v.weight" not in q6 and "blk.31.ffn_down.weight" in q6
    if published_gb is not None:  # the Meta-Llama-3-8B-Instruct GGUFs on the Hub, as their model cards list them
        assert predicted.size / 1e9 == pytest.approx(published_gb, rel=0.01)


def test_qwen_widths_fall_back_where_k_blocks_do_not_fit():
    # Qwen2-0.5B: hidden 896 = 3.5 blocks of 256; FFN 4864 = 19 blocks; tied embeddings
    config = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "vocab_size": 151936, "tie_word_embeddings": True}  # fmt: skip
    types = {t.name: T(t.ggml_type) for t in _predict(config, "Q4_K_M").header.tensors}
    assert types["blk.5.attn_q.weight"] == T.Q5_0, "896 columns: Q4_K falls back to Q5_0"
    assert types["blk.4.ffn_down.weight"] == T.Q4_K, "4864 columns fit Q4_K"
    assert types["blk.5.ffn_down.weight"] == T.Q6_K, "use_more_bits(5, 24): (5 - 3) % 3 == 2"
    assert types["blk.0.ffn_down.weight"] == T.Q6_K
    assert types["blk.0.attn_v.weight"] == T.Q8_0, "Q6_K falls back to Q8_0"
    assert types["token_embd.weight"] == T.Q8_0, "tied: quantized as the output, whose rows do not fit Q6_K"
    assert types["blk.0.attn_q.bias"] == T.F32


def _predict(config, quant):
    return predict(config, tensors_from_config(config, layout_of(config, "org/m")), quant)


# ## Tensor names and shapes


def _by_name(config, quant="Q8_0", **kw):
    tensors = tensors_from_config(config, layout_of(config, "org/m"))
    return {t.name: t for t in predict(config, tensors, quant, **kw).header.tensors}


def test_llama_tensors_get_llama_cpp_names_and_reversed_shapes():
    tensors = _by_name(LLAMA)
    assert len(tensors) == 1 + 2 * 9 + 2
    assert tensors["token_embd.weight"].shape == (512, 1000)
    assert tensors["blk.1.attn_k.weight"].shape == (512, 256)  # 4 KV heads of 64
    assert tensors["blk.0.ffn_down.weight"].shape == (1024, 512)
    assert tensors["output.weight"].ggml_type == T.Q8_0
    assert tensors["blk.0.attn_q.weight"].n_bytes == 512 * 512 // 32 * 34


@pytest.mark.parametrize(
    ("architecture", "arch", "present", "absent"),
    [
        pytest.param("Qwen2ForCausalLM", "qwen2", "blk.0.attn_q.bias", "blk.0.attn_q_norm.weight", id="qwen2-biases"),
        pytest.param("Qwen3ForCausalLM", "qwen3", "blk.1.attn_k_norm.weight", "blk.0.attn_q.bias", id="qwen3-qk-norm"),
        pytest.param("MistralForCausalLM", "llama", "blk.0.attn_q.weight", "blk.0.attn_q.bias", id="mistral-is-llama"),
    ],
)
def test_architecture_layouts(architecture, arch, present, absent):
    config = {**LLAMA, "architectures": [architecture]}
    tensors = tensors_from_config(config, layout_of(config, "org/m"))
    predicted = predict(config, tensors, "Q8_0")
    names = {t.name for t in predicted.header.tensors}
    assert predicted.header.arch == arch
    assert present in names and absent not in names


def test_tied_embeddings_have_no_output_matrix():
    assert "output.weight" not in _by_name({**LLAMA, "tie_word_embeddings": True})


def test_llama3_rope_scaling_adds_the_frequency_factors():
    config = {**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert _by_name(config)["rope_freqs.weight"].shape == (32,)


def test_header_fields_for_the_estimator():
    tensors = tensors_from_config(LLAMA, LAYOUTS["LlamaForCausalLM"])
    header = predict(LLAMA, tensors, "Q8_0", has_chat_template=True).header
    assert (header.arch, header.file_type, header.quant) == ("llama", 7, "Q8_0")
    assert (header.context_length, header.block_count, header.embedding_length) == (4096, 2, 512)
    assert header.head_count == (8, 8) and header.head_count_kv == (4, 4)
    assert (header.key_length, header.value_length, header.vocab_size) == (64, 64, 1000)
    assert header.has_chat_template


def test_size_is_header_plus_aligned_tensors_and_grows_with_the_tokenizer():
    tensors = tensors_from_config(LLAMA, LAYOUTS["LlamaForCausalLM"])
    small, large, huge = (predict(LLAMA, tensors, "Q8_0", tokenizer_bytes=n) for n in (0, 20_000, 10**6))
    assert small.size == small.header.data_offset + sum(-(-t.n_bytes // 32) * 32 for t in small.header.tensors)
    assert large.size - small.size == pytest.approx(20_000, abs=32)
    assert huge.size - small.size == pytest.approx(1000 * 48, abs=32), "at most 48 bytes per vocabulary entry"
    f16 = predict(LLAMA, tensors, "F16")
    assert f16.size > small.size > source_bytes(tensors) / 4


def test_a_tensor_without_a_llama_cpp_name_is_one_line():
    tensors = [*tensors_from_config(LLAMA, LAYOUTS["LlamaForCausalLM"]), SourceTensor("model.mystery", (4, 4), "F32")]
    with pytest.raises(PlanError, match=r"^org/m: tensor 'model.mystery' has no llama.cpp name"):
        predict(LLAMA, tensors, "Q8_0", repo="org/m")


# ## Refusals: one line naming the repo and the reason


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param(
            {**LLAMA, "quantization_config": {"quant_method": "gptq", "bits": 4}},
            r"^org/m: its weights are gptq-quantized .*llama.cpp cannot use or convert them: deploy the unquantized base model, or a GGUF",
            id="gptq",
        ),
        pytest.param(
            {**LLAMA, "quantization_config": {"quant_method": "awq"}},
            r"^org/m: its weights are awq-quantized",
            id="awq",
        ),
        pytest.param(
            {**LLAMA, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
            r"^org/m: its weights are bitsandbytes-quantized",
            id="bitsandbytes",
        ),
        pytest.param(
            {**LLAMA, "architectures": ["MambaForCausalLM"]},
            r"^org/m: architecture 'MambaForCausalLM' cannot be converted by gguf-deploy \(it converts LlamaForCausalLM",
            id="unsupported-architecture",
        ),
        pytest.param({"hidden_size": 8}, r"^org/m: config.json names no architecture", id="no-architecture"),
    ],
)
def test_refusals(config, message):
    with pytest.raises(PlanError) as caught:
        layout_of(config, "org/m")
    assert re.search(message, str(caught.value)), str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("files", "source", "message"),
    [
        pytest.param(
            ["README.md", ".gitattributes"],
            "safetensors",
            "holds neither a GGUF file nor Transformers weights",
            id="nothing",
        ),
        pytest.param(
            ["m-Q8_0.gguf"],
            "safetensors",
            "holds GGUF files, not safetensors weights: set file (e.g. 'm-Q8_0.gguf')",
            id="gguf-only",
        ),
        pytest.param(
            ["config.json", "pytorch_model.bin"], "safetensors", "set convert_from = 'pytorch'", id="other-format"
        ),
        pytest.param(["model.safetensors"], "safetensors", "but no config.json", id="no-config"),
    ],
)
def test_what_the_repo_holds(files, source, message):
    with pytest.raises(HubError, match=re.escape(message)):
        checkpoint_files("org/m", files, source)


def test_checkpoint_files_are_the_weights_and_what_the_converter_reads():
    files = ["config.json", "tokenizer.json", "README.md", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "sub/other.safetensors"]  # fmt: skip
    weights, side = checkpoint_files("org/m", files, "safetensors")
    assert weights == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert side == ["config.json", "tokenizer.json", "model.safetensors.index.json"]


def test_converted_file_names_commit_quant_and_reads_back():
    path = converted_file("org/Tiny-Llama", "safetensors", "Q8_0")
    assert path == "gguf-deploy/safetensors-Q8_0/Tiny-Llama-Q8_0.gguf"
    assert conversion_of(path) == ("safetensors", "Q8_0")
    assert conversion_of("model-Q8_0.gguf") is None


def test_conversion_container_grows_with_the_checkpoint():
    assert convert_memory_mib(0) == 4096
    assert convert_memory_mib(16 * 2**30) == 16 * 1024 * 5 // 4 + 2048
    assert convert_memory_mib(10**15) == 256 * 1024
    assert convert_timeout(0) == 1800 < convert_timeout(10**11) <= 86400


def test_conversion_container_covers_the_quantizers_intermediate():
    from deployer.conversion.job import convert_resources, intermediate_bytes
    from deployer.facts import Conversion, ModelFacts, ShardFacts

    config = {**LLAMA, "torch_dtype": "float32"}  # an F32 checkpoint: its 16-bit intermediate is half of it
    tensors = tensors_from_config(config, LAYOUTS["LlamaForCausalLM"])
    weights = ShardFacts("model.safetensors", 64 * 2**30, None)  # as if it were large

    def facts(quant: str) -> ModelFacts:
        header = predict(config, tensors, quant).header
        conversion = Conversion("safetensors", quant, (weights,), "LlamaForCausalLM")
        return ModelFacts("org/m", "main", "0" * 40, (ShardFacts("m.gguf", 1, None),), header, conversion)

    assert intermediate_bytes(facts("Q8_0")) == 0, "the converter writes Q8_0 itself"
    assert intermediate_bytes(facts("Q4_K_M")) == 2 * source_bytes(tensors) // 4
    q8, q4 = convert_resources(facts("Q8_0")), convert_resources(facts("Q4_K_M"))
    assert q4["convert_memory_mib"] == q8["convert_memory_mib"] == convert_memory_mib(64 * 2**30)
    assert q4["convert_timeout"] > q8["convert_timeout"], "writing and reading the intermediate takes time"
    assert convert_memory_mib(2**30, 40 * 2**30) == convert_memory_mib(40 * 2**30), "the larger file sizes it"


# ## The manifest


def test_convert_from_manifest_is_valid_and_named_after_repo_and_quant():
    loaded = loaded_manifest(file=None, repo="org/Tiny-Llama", convert_from="safetensors", quant="Q8_0")
    assert loaded.manifest.file is None
    assert loaded.name == "tiny-llama-q8-0"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        pytest.param(
            {"convert_from": "safetensors"}, "set either file (a .gguf in the repo) or convert_from", id="both"
        ),
        pytest.param({"file": None}, "set file (a .gguf in the repo) or convert_from", id="neither"),
        pytest.param(
            {"file": None, "convert_from": "safetensors", "quant": "IQ2_XS"},
            "quant: 'IQ2_XS' needs an importance matrix, which llama.cpp's quantizer refuses to go without; "
            "with convert_from, quant is one of F32, F16, BF16, Q8_0, Q4_0,",
            id="imatrix-type",
        ),
        pytest.param(
            {"file": None, "convert_from": "safetensors", "quant": "TQ1_0"},
            "quant: 'TQ1_0' is ternary, for models trained ternary (BitNet)",
            id="ternary-type",
        ),
        pytest.param(
            {"file": None, "convert_from": "pytorch", "quant": "MXFP4_MOE"},
            "quant: 'MXFP4_MOE' quantizes mixture-of-experts tensors; the models converted here are dense",
            id="moe-type",
        ),
        pytest.param({"file": None, "convert_from": "gptq"}, "unknown convert_from 'gptq'", id="unknown-source"),
    ],
)
def test_manifest_source_rules(keys, message):
    with pytest.raises(ManifestInvalid) as caught:
        loaded_manifest(**keys)
    assert message in str(caught.value), str(caught.value)
    assert len(caught.value.problems) == 1


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_0", "IQ4_XS", "BF16"])
def test_a_conversion_may_target_any_type_the_quantizer_makes_without_an_importance_matrix(quant):
    loaded = loaded_manifest(file=None, repo="org/Tiny-Llama", convert_from="safetensors", quant=quant)
    assert loaded.manifest.quant == quant


def test_every_llama_cpp_type_is_converted_or_refused_with_a_reason():
    assert set(CONVERT_QUANTS) | set(NOT_CONVERTED) == set(QUANTS)
    assert not set(CONVERT_QUANTS) & set(NOT_CONVERTED)
    assert set(DEFAULT_TYPES) == set(QUANTIZER_QUANTS), "every quantizer type has its default tensor type"
    assert {quant for quant, _ in MIXES} <= set(QUANTIZER_QUANTS)
