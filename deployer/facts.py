"""Model facts: what the Hub and the GGUF header say about a model. Immutable data, no I/O.

    GgufHeader   one parsed GGUF header (metadata + tensor infos), from gguf_header.py
    ShardFacts   one file on the Hub: path, size, sha256
    Conversion   for Transformers weights: the files the converter reads, and what it makes
    ModelFacts   a resolved model: repo, commit, every shard, and the header merged over shards
                 (and its multimodal projector's facts, deployer.projector.ProjectorFacts)

The planner and the estimator read only these types; hub.py and gguf_header.py produce them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import TYPE_CHECKING

from deployer.quants import quant_for_file_type

if TYPE_CHECKING:  # projector.py reads headers, which import this module
    from deployer.projector import ProjectorFacts


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it (no data)."""

    name: str
    shape: tuple[int, ...]  # GGUF order: ne[0] first (the fastest-varying dimension)
    ggml_type: int  # gguf.GGMLQuantizationType value
    n_bytes: int  # exact size of its data in the file

    @property
    def n_elements(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class GgufHeader:
    """The parts of a GGUF header that planning and estimating need.

    Per-layer values (head counts, sliding-window flags) are tuples of length ``block_count``;
    a model that gives one number for all layers gets it repeated.
    """

    arch: str  # general.architecture ("llama", "qwen2", "gemma3", ...)
    file_type: int | None  # general.file_type (llama_ftype), None when absent
    context_length: int  # {arch}.context_length: the trained context
    block_count: int
    embedding_length: int
    head_count: tuple[int, ...]
    head_count_kv: tuple[int, ...]
    key_length: int  # head size of K ({arch}.attention.key_length, default n_embd / n_head)
    value_length: int  # head size of V
    vocab_size: int  # tokenizer.ggml.tokens length (or {arch}.vocab_size)
    sliding_window: int | None = None  # {arch}.attention.sliding_window
    swa_layers: tuple[bool, ...] = ()  # True where a layer uses the sliding window
    expert_count: int = 0
    expert_used_count: int = 0
    has_chat_template: bool = False
    chat_template: str = ""  # tokenizer.chat_template: the plan learns the model's chat syntax from it
    tensors: tuple[TensorInfo, ...] = ()
    data_offset: int = 0  # where tensor data begins (the header's size, alignment included)
    split_count: int = 1  # split.count; 1 for a single-file model
    extra: dict[str, int | float | str | bool] = field(default_factory=dict)  # other scalar {arch}.* keys

    @property
    def quant(self) -> str | None:
        """The quant name of ``general.file_type`` (None when absent or unknown)."""
        return None if self.file_type is None else quant_for_file_type(self.file_type)

    @property
    def params(self) -> int:
        """Total parameters from tensor shapes, every expert counted."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def weight_bytes(self) -> int:
        """Exact bytes of tensor data."""
        return sum(t.n_bytes for t in self.tensors)


@dataclass(frozen=True)
class ShardFacts:
    """One GGUF file of a model on the Hub."""

    file: str  # path inside the repo
    size: int  # bytes
    sha256: str | None  # the LFS sha256 (None for a non-LFS file)


@dataclass(frozen=True)
class Conversion:
    """A GGUF made from Transformers weights: what the converter reads, and the type it writes.

    The model's ``shards`` then hold the one GGUF the conversion will write (its path below the
    commit's folder, its predicted size, no sha256) and its ``header`` is the prediction.
    """

    source: str  # "safetensors" or "pytorch" (the manifest's convert_from)
    quant: str  # the type the converter writes (--outtype)
    files: tuple[ShardFacts, ...]  # config, tokenizer and weight files, downloaded and verified
    architecture: str  # the Hugging Face architecture (config.json), e.g. "LlamaForCausalLM"

    @property
    def source_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class ModelFacts:
    """A model resolved on the Hub: the commit, its shards, and the (merged) header."""

    repo: str
    revision: str  # as the manifest asked
    commit: str  # 40-hex commit it resolved to
    shards: tuple[ShardFacts, ...]  # the first shard first
    header: GgufHeader  # tensors of every shard merged into one list
    conversion: Conversion | None = None  # set when the GGUF is to be converted from Transformers weights
    projector: ProjectorFacts | None = None  # the manifest's mmproj file, when it names one

    @property
    def file(self) -> str:
        return self.shards[0].file

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self.shards)
