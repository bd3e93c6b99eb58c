"""The model interface: everything the engine (and the request preparation above it) asks of a model.

llama.cpp's implementation is :class:`deployer.runtime.llama.Model`, the one module that imports
llama-cpp-python; the tests' fake model (``tests/fakemodel.py``) implements the same interface
without it, so the HTTP app and the engine run in the pull-request check. A test checks that both
have every member declared here.

Tokens are ints; a sequence is a slot id; rows are the batch rows whose logits a decode computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from deployer.runtime.engine.sampling import Sampling
    from deployer.runtime.media.images import Media
    from deployer.runtime.media.projector import MediaPrompt


class SamplerInterface(Protocol):
    """One sequence's sampler chain (penalties, bias, grammar, top-k/p, min-p, temperature, seed)."""

    def sample(self, row: int, banned: Sequence[int] = ()) -> int:
        """The next token at ``row`` of the last decode; ``banned`` tokens are never chosen."""
        ...

    def close(self) -> None: ...


class ProjectorInterface(Protocol):
    """A multimodal projector (libmtmd): which media it reads, and prompts with images and audio as tokens."""

    vision: bool
    audio: bool

    def tokenize(self, pieces: list[str], media: list[Media], *, add_bos: bool) -> MediaPrompt:
        """``pieces[0] media[0] pieces[1] ... pieces[-1]`` as one token list (images and audio chunks as
        placeholder runs)."""
        ...


class ModelInterface(Protocol):
    """A loaded model with a context of ``parallel`` sequences of ``n_ctx`` tokens each."""

    # what the engine catches from decode (llama.cpp failed: the running requests get a 500)
    errors: tuple[type[BaseException], ...]
    n_ctx: int  # per sequence
    n_batch: int
    n_threads: int
    n_vocab: int
    n_embd: int
    bos: int
    eos: int
    eog_tokens: tuple[int, ...]
    metadata: dict[str, str]  # the GGUF's string metadata (the chat template among it)
    windowed: bool  # sliding-window layers cache only their window: rewinding needs a checkpoint
    projector: ProjectorInterface | None

    # -- text
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]: ...
    def piece(self, token: int) -> bytes: ...
    def token_text(self, token: int) -> str: ...
    def is_eog(self, token: int) -> bool: ...

    # -- the batch and the cache
    def decode(self, entries: Sequence[tuple[int, Sequence[int], int, bool]]) -> list[int]:
        """Decode ``(seq, tokens, pos, want_logits)`` entries as one batch; the rows with logits."""
        ...

    def evaluate_image(self, chunk: Any, pos: int, seq: int, logits: bool) -> None:
        """Encode one image (or audio) chunk of a :class:`MediaPrompt` and decode it into ``seq`` at ``pos``."""
        ...

    def logits(self, row: int) -> np.ndarray: ...
    def forget(self, seq: int, start: int = 0) -> None: ...
    def copy(self, source: int, target: int) -> None: ...
    def can_rewind(self, seq: int) -> bool: ...
    def save_window(self, seq: int) -> Any: ...
    def restore_window(self, seq: int, state: Any) -> None: ...

    # -- sampling and grammars
    def sampler(self, sampling: Sampling, seed: int) -> SamplerInterface: ...
    def check_grammar(self, text: str) -> bool:
        """Whether the GBNF parses (a grammar that does not must never reach sampling)."""
        ...

    def json_grammar(self, schema: dict[str, Any] | None) -> str:
        """GBNF for JSON valid for ``schema`` (any JSON object when None); ValueError when inexpressible."""
        ...

    def schema_converter(self) -> Any:
        """A fresh JSON-schema-to-GBNF converter (llama.cpp's SchemaConverter) for tool-call grammars."""
        ...

    def chat_formatter(self, name: str) -> Callable[..., Any]:
        """The prompt formatter registered as chat_format ``name``; ValueError when there is none."""
        ...

    # -- embeddings, and the end
    def embed(self, tokens: list[int]) -> list[float]: ...
    def close(self) -> None: ...


def members(protocol: type) -> set[str]:
    """The names a protocol class declares (attributes and methods): what an implementation must have."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")}
    return names
