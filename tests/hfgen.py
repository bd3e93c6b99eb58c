"""A tiny Llama-architecture model in Transformers format, written by the tests.

``write_tiny_llama(folder)`` writes what a Hugging Face repository of such a model holds:
``config.json``, a real ``tokenizer.json`` (a byte-fallback BPE tokenizer of the Llama kind, trained
with the ``tokenizers`` library on a few sentences), ``tokenizer_config.json`` with a chat template,
and random weights as ``model.safetensors`` (``safetensors``, from numpy) or ``pytorch_model.bin`` (torch).
Small enough to convert in seconds, large enough (about 5 M parameters) that a range read of a
header is visibly less than the file.

    files = write_tiny_llama(tmp_path / "tiny", fmt="safetensors")   # {path in repo: Path}
    fake_hub.add_repo("org/tiny-llama", files)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the tokens before it.",
    "Hello! How are you today? I am fine, thank you.",
    "GGUF files hold the weights and the tokenizer of a llama.cpp model.",
    "Modal runs containers with GPUs, and scales them to zero when idle.",
] * 20
SPECIAL = ["<unk>", "<s>", "</s>"]
# byte-fallback tokens, as every Llama vocabulary has: text outside the trained pieces (a newline
# in a chat template) becomes these instead of unknown tokens
BYTES = [f"<0x{b:02X}>" for b in range(256)]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """The shape of the tiny model (Llama layout: GQA attention, SwiGLU feed-forward)."""

    hidden: int = 512
    intermediate: int = 1024
    layers: int = 2
    heads: int = 8
    kv_heads: int = 4
    context: int = 2048
    tied: bool = False
    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"


TINY = TinySpec()


def build_tokenizer(folder: Path) -> int:
    """Train the tokenizer, write ``tokenizer.json`` into ``folder``; its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=SPECIAL + BYTES, show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def config_json(spec: TinySpec, vocab_size: int, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` of a model of ``spec``."""
    return {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": spec.context,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        **extra,
    }


def state_dict(spec: TinySpec, vocab_size: int, seed: int = 0) -> dict[str, Any]:
    """Random float32 weights (numpy arrays) with the Transformers names of a Llama model."""
    import numpy as np

    generator = np.random.default_rng(seed)
    head_dim = spec.hidden // spec.heads

    def weight(*shape: int) -> Any:
        return (generator.standard_normal(shape) * 0.02).astype(np.float32)

    tensors = {"model.embed_tokens.weight": weight(vocab_size, spec.hidden)}
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.input_layernorm.weight": np.ones(spec.hidden, dtype=np.float32),
            f"{p}.self_attn.q_proj.weight": weight(spec.heads * head_dim, spec.hidden),
            f"{p}.self_attn.k_proj.weight": weight(spec.kv_heads * head_dim, spec.hidden),
            f"{p}.self_attn.v_proj.weight": weight(spec.kv_heads * head_dim, spec.hidden),
            f"{p}.self_attn.o_proj.weight": weight(spec.hidden, spec.heads * head_dim),
            f"{p}.post_attention_layernorm.weight": np.ones(spec.hidden, dtype=np.float32),
            f"{p}.mlp.gate_proj.weight": weight(spec.intermediate, spec.hidden),
            f"{p}.mlp.up_proj.weight": weight(spec.intermediate, spec.hidden),
            f"{p}.mlp.down_proj.weight": weight(spec.hidden, spec.intermediate),
        }
    tensors["model.norm.weight"] = np.ones(spec.hidden, dtype=np.float32)
    if not spec.tied:
        tensors["lm_head.weight"] = weight(vocab_size, spec.hidden)
    return tensors


def write_tiny_llama(
    folder: Path, *, fmt: str = "safetensors", spec: TinySpec = TINY, config_extra: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write the model into ``folder``; return {path in the repo: file} for the fake hub."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(folder)
    config = config_json(spec, vocab_size, **(config_extra or {}))
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": spec.context,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    weights = state_dict(spec, vocab_size)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "pytorch":  # needs torch (the convert extra)
        import torch

        torch.save({name: torch.from_numpy(array) for name, array in weights.items()}, folder / "pytorch_model.bin")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}


def tied(spec: TinySpec = TINY) -> TinySpec:
    """The same model with the output matrix tied to the token embeddings."""
    return replace(spec, tied=True)
