"""Predicting the GGUF llama.cpp's converter writes from a Transformers checkpoint (pure), the
manifest's convert_from key, and the one-line refusals."""

from __future__ import annotations

import re

import pytest
from gguf.constants import GGMLQuantizationType as T

from deployer.checkpoint import (
    FAMILIES,
    SourceTensor,
    converted_type,
    family_of,
    predict,
    source_bytes,
    tensors_from_config,
)
from deployer.checkpoint_hub import checkpoint_files, conversion_of, converted_file
from deployer.convert_app import convert_memory_mib, convert_timeout
from deployer.errors import HubError, ManifestInvalid, PlanError
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


# ## Tensor names and shapes


def _by_name(config, quant="Q8_0", **kw):
    tensors = tensors_from_config(config, family_of(config, "org/m"))
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
def test_families(architecture, arch, present, absent):
    config = {**LLAMA, "architectures": [architecture]}
    tensors = tensors_from_config(config, family_of(config, "org/m"))
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
    tensors = tensors_from_config(LLAMA, FAMILIES["LlamaForCausalLM"])
    header = predict(LLAMA, tensors, "Q8_0", has_chat_template=True).header
    assert (header.arch, header.file_type, header.quant) == ("llama", 7, "Q8_0")
    assert (header.context_length, header.block_count, header.embedding_length) == (4096, 2, 512)
    assert header.head_count == (8, 8) and header.head_count_kv == (4, 4)
    assert (header.key_length, header.value_length, header.vocab_size) == (64, 64, 1000)
    assert header.has_chat_template


def test_size_is_header_plus_aligned_tensors_and_grows_with_the_tokenizer():
    tensors = tensors_from_config(LLAMA, FAMILIES["LlamaForCausalLM"])
    small, large, huge = (predict(LLAMA, tensors, "Q8_0", tokenizer_bytes=n) for n in (0, 20_000, 10**6))
    assert small.size == small.header.data_offset + sum(-(-t.n_bytes // 32) * 32 for t in small.header.tensors)
    assert large.size - small.size == pytest.approx(20_000, abs=32)
    assert huge.size - small.size == pytest.approx(1000 * 48, abs=32), "at most 48 bytes per vocabulary entry"
    f16 = predict(LLAMA, tensors, "F16")
    assert f16.size > small.size > source_bytes(tensors) / 4


def test_a_tensor_without_a_llama_cpp_name_is_one_line():
    tensors = [*tensors_from_config(LLAMA, FAMILIES["LlamaForCausalLM"]), SourceTensor("model.mystery", (4, 4), "F32")]
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
        family_of(config, "org/m")
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
            {"file": None, "convert_from": "safetensors", "quant": "Q4_K_M"},
            "quant 'Q4_K_M' cannot be produced by a conversion",
            id="quant-the-converter-cannot-write",
        ),
        pytest.param({"file": None, "convert_from": "gptq"}, "unknown convert_from 'gptq'", id="unknown-source"),
    ],
)
def test_manifest_source_rules(keys, message):
    with pytest.raises(ManifestInvalid) as caught:
        loaded_manifest(**keys)
    assert message in str(caught.value), str(caught.value)
    assert len(caught.value.problems) == 1
