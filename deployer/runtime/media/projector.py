"""Prompts with images and audio as tokens the scheduler can batch (libmtmd itself: :class:`deployer.runtime.llama.Projector`).

    media_prompt(model, prompt, ...)   the rendered prompt cut at its media markers → :class:`MediaPrompt`
    MediaPrompt                        the tokens, each media chunk's span, and its libmtmd chunk

A prompt with images is one token list, as every prompt is: each image stands as a run of
placeholder ids (negative, so never a vocabulary id), one per position it fills, derived from the
image's hash. The scheduler needs nothing else: a run is one unit of work (it is encoded and decoded
whole, between two decode steps), and a slot's cached prompt matches a new one over the same image
at the same place, so a second turn about the same screenshot reuses its KV instead of encoding it.

An audio clip is the same: libmtmd cuts it into chunks (Whisper-style encoders: one per 30 s, 750
tokens each for Qwen2-Audio), and each chunk is a run and a unit of its own.

Only projectors whose image tokens fill one position each are served (n_pos == n_tokens: Gemma 3,
SmolVLM, Pixtral/Mistral, LLaVA, MiniCPM-V, InternVL, ...). M-RoPE models (Qwen2/2.5/3-VL) place an
image on a 2-D grid of fewer positions; their projector loads, and an image request is a 400 saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deployer.runtime.errors import bad_request

if TYPE_CHECKING:
    from deployer.runtime.engine.model import ModelInterface
    from deployer.runtime.media.images import Media

PLACEHOLDER_RANGE = 1 << 30  # placeholder ids are -1 ... -2**30


def placeholder(digest: str, occurrence: int) -> int:
    """The id that stands for every position of one image (or audio chunk): its hash, and which of
    the request's runs it is (two identical images side by side stay two units)."""
    return -1 - (int(digest[:12], 16) * 31 + occurrence) % PLACEHOLDER_RANGE


@dataclass(eq=False)
class MediaPrompt:
    """A tokenized prompt with images (or audio); owns libmtmd's chunks until :meth:`free`."""

    tokens: list[int]
    spans: list[tuple[int, int]]  # [start, end) of each image's (or audio chunk's) positions in tokens
    chunk_at: dict[int, Any]  # start → the mtmd_input_chunk of that span
    media_tokens: int  # the images' and clips' tokens
    release: Callable[[], None] | None = field(default=None, repr=False)  # frees libmtmd's chunks

    def free(self) -> None:
        if self.release is not None:
            release, self.release = self.release, None
            release()

    def __del__(self) -> None:  # a request refused after tokenizing (429, a 400) never reaches the engine
        self.free()


def media_prompt(model: ModelInterface, prompt: str, *, add_bos: bool, marker: str, images: list[Media]) -> MediaPrompt:
    """The rendered chat prompt, cut at the request's media markers, tokenized with its images and clips.

    Decoding and preprocessing them is CPU work: the caller runs this off the event loop.
    """
    from deployer.runtime.media.images import split_prompt

    if model.projector is None:  # take_images refused them already; a guard
        raise bad_request("this model has no multimodal projector: it reads text only", "messages")
    return model.projector.tokenize(split_prompt(prompt, marker, len(images)), images, add_bos=add_bos)
