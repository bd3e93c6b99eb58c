"""Model facts: what the Hub and the GGUF header say about a model. Immutable data, no I/O.

    GgufHeader   one parsed GGUF header (metadata + tensor infos), from gguf_header.py
    ShardFacts   one file on the Hub: path, size, sha256
    Conversion   for Transformers weights: the files the converter reads, and what it makes
    ProjectorFacts  a multimodal projector (mmproj) file and what its header says (deployer.projector
                 reads it), and its memory: weights and one encode's compute buffer
    ModelFacts   a resolved model: repo, commit, every shard, and the header merged over shards
                 (and its multimodal projector's facts)

The planner and the estimator read only these types; hub.py and gguf_header.py produce them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

from deployer.quants import quant_for_file_type

# The compute buffer of one encode, in f32 activations of n tokens × width: the attention
# scores (tokens² per head, as clip.cpp computes them without flash attention: the larger case),
# the feed-forward's two intermediates and a few residual-stream copies the allocator keeps alive.
RESIDUAL_COPIES = 6
AUDIO_FRAMES = 1500  # Whisper-style encoders: 30 s of audio after the conv stem


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
class ProjectorFacts:
    """An mmproj file on the Hub and what its header says."""

    file: str  # path in the repo
    size: int  # bytes
    sha256: str | None
    projector_type: str  # clip.projector_type: "gemma3", "qwen2.5vl", "ultravox", ...
    has_vision: bool
    has_audio: bool
    image_size: int  # clip.vision.image_size (pixels per side the encoder sees); 0 without vision
    patch_size: int  # clip.vision.patch_size; 0 without vision
    embedding_length: int  # the encoder's width (clip.vision/audio.embedding_length)
    projection_dim: int  # the width of what it hands the language model: must equal the model's n_embd
    head_count: int
    feed_forward_length: int
    image_max_pixels: int = 0  # clip.vision.image_max_pixels: dynamic-resolution encoders' cap
    weight_bytes: int = 0  # tensor data

    @property
    def modalities(self) -> str:
        """``vision``, ``audio`` or ``vision+audio``."""
        return "+".join(m for m, on in (("vision", self.has_vision), ("audio", self.has_audio)) if on)

    @property
    def encoder_tokens(self) -> int:
        """Tokens one encode works on: the patches of the largest image (or audio frames)."""
        if not self.has_vision or not self.patch_size:
            return AUDIO_FRAMES
        side = self.image_size // self.patch_size
        tokens = side * side
        if self.image_max_pixels:
            tokens = max(tokens, self.image_max_pixels // (self.patch_size * self.patch_size))
        return tokens

    @property
    def compute_bytes(self) -> int:
        """The compute buffer of one encode (one image batch), f32 activations."""
        n = self.encoder_tokens
        return 4 * n * (self.head_count * n + 2 * self.feed_forward_length + RESIDUAL_COPIES * self.embedding_length)

    @property
    def memory_bytes(self) -> int:
        """GPU bytes the projector adds: its weights and one encode's compute buffer."""
        return self.weight_bytes + self.compute_bytes


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
