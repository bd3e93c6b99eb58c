"""The multimodal projector through libmtmd (llama_cpp.mtmd_cpp): prompts with images into
tokens the scheduler can batch, and image chunks evaluated into one sequence of the context.

    Projector(model, config)           mtmd_init_from_file on the loaded model (on the model thread)
    Projector.tokenize(pieces, images) the prompt's text pieces and images → :class:`MediaPrompt`
    Projector.evaluate(...)            one image chunk: encoded, then decoded into a sequence at a position

A prompt with images is one token list, as every prompt is: each image stands as a run of
placeholder ids (negative, so never a vocabulary id), one per position it fills, derived from the
image's hash. The scheduler needs nothing else: a run is one unit of work (it is encoded and decoded
whole, between two decode steps), and a slot's cached prompt matches a new one over the same image
at the same place, so a second turn about the same screenshot reuses its KV instead of encoding it.

Only projectors whose image tokens fill one position each are served (n_pos == n_tokens: Gemma 3,
SmolVLM, Pixtral/Mistral, LLaVA, MiniCPM-V, InternVL, ...). M-RoPE models (Qwen2/2.5/3-VL) place an
image on a 2-D grid of fewer positions; their projector loads, and an image request is a 400 saying so.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

from deployer.runtime.media import Image
from deployer.runtime.protocol import bad_request

PLACEHOLDER_RANGE = 1 << 30  # placeholder ids are -1 ... -2**30


class ProjectorError(Exception):
    pass


def placeholder(digest: str, occurrence: int) -> int:
    """The id that stands for every position of one image: its hash, and which of the request's
    images it is (two identical images side by side stay two units)."""
    return -1 - (int(digest[:12], 16) * 31 + occurrence) % PLACEHOLDER_RANGE


@dataclass(eq=False)
class MediaPrompt:
    """A tokenized prompt with images; owns libmtmd's chunks until :meth:`free`."""

    tokens: list[int]
    spans: list[tuple[int, int]]  # [start, end) of each image's positions in tokens
    chunk_at: dict[int, Any]  # start → the mtmd_input_chunk of that image
    image_tokens: int
    _chunks: Any = field(default=None, repr=False)
    _mtmd: Any = field(default=None, repr=False)

    def free(self) -> None:
        if self._chunks is not None:
            self._mtmd.mtmd_input_chunks_free(self._chunks)
            self._chunks = None

    def __del__(self) -> None:  # a request refused after tokenizing (429, a 400) never reaches the engine
        self.free()


class Projector:
    """libmtmd's context for one loaded model."""

    def __init__(self, model: Any, path: str, *, n_threads: int, use_gpu: bool = True) -> None:
        from llama_cpp import mtmd_cpp

        self._m = mtmd_cpp
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu  # llama-server's default (--no-mmproj-offload turns it off): a CPU build ignores it
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = True  # reserve the compute buffer of one image now, not on the first request
        self.ctx = mtmd_cpp.mtmd_init_from_file(path.encode(), model, params)
        if not self.ctx:
            raise ProjectorError(f"{path}: libmtmd could not load the projector (see its log above)")
        self.vision = bool(mtmd_cpp.mtmd_support_vision(self.ctx))
        self.audio = bool(mtmd_cpp.mtmd_support_audio(self.ctx))
        self.mrope = bool(mtmd_cpp.mtmd_decode_use_mrope(self.ctx))

    def tokenize(self, pieces: list[str], images: list[Image], *, add_bos: bool) -> MediaPrompt:
        """``pieces[0] image[0] pieces[1] ... pieces[-1]`` as chunks; a 400 for an image libmtmd cannot decode."""
        m = self._m
        if not self.vision:
            raise bad_request("this model's projector has no vision encoder: it takes no images", "messages")
        if self.mrope:
            raise bad_request(
                "images for this model (an M-RoPE projector, Qwen-VL style) are not served yet", "messages"
            )
        keep: list[Any] = []  # ctypes objects that must outlive mtmd_tokenize_from_parts
        bitmaps: list[Any] = []
        parts: list[Any] = []
        try:
            for i, piece in enumerate(pieces):
                if piece:
                    raw = piece.encode("utf-8")
                    text = m.mtmd_input_text()
                    text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), add_bos, True
                    keep += [raw, text]
                    parts.append(m.mtmd_input_part(ctypes.pointer(text), None))
                if i < len(images):
                    bitmap = self._bitmap(images[i], i)
                    bitmaps.append(bitmap)
                    parts.append(m.mtmd_input_part(None, bitmap))
            array = (ctypes.POINTER(m.mtmd_input_part) * len(parts))(*(ctypes.pointer(p) for p in parts))
            chunks = m.mtmd_input_chunks_init()
            status = m.mtmd_tokenize_from_parts(self.ctx, chunks, array, len(parts), add_bos)
            if status != 0:
                m.mtmd_input_chunks_free(chunks)
                raise bad_request(f"the images could not be tokenized (libmtmd status {status})", "messages")
        finally:
            for bitmap in bitmaps:
                m.mtmd_bitmap_free(bitmap)
        return self._prompt(chunks, images)

    def _bitmap(self, image: Image, index: int) -> Any:
        m = self._m
        buffer = (ctypes.c_uint8 * len(image.data)).from_buffer_copy(image.data)
        bitmap = m.mtmd_helper_bitmap_init_from_buf(self.ctx, buffer, len(image.data), False)
        if not bitmap:
            hint = " (libmtmd decodes WebP only where ffmpeg is installed)" if image.format == "WebP" else ""
            raise bad_request(
                f"image {index + 1} of the request could not be decoded as {image.format}: it is truncated or "
                f"corrupt{hint}",
                "messages",
                "invalid_image",
            )
        if m.mtmd_bitmap_is_audio(bitmap):
            m.mtmd_bitmap_free(bitmap)
            raise bad_request(f"image {index + 1} of the request is audio, not an image", "messages", "invalid_image")
        return bitmap

    def _prompt(self, chunks: Any, images: list[Image]) -> MediaPrompt:
        m = self._m
        tokens: list[int] = []
        spans: list[tuple[int, int]] = []
        chunk_at: dict[int, Any] = {}
        image_tokens = 0
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            kind = m.mtmd_input_chunk_get_type(chunk)
            if kind == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                pointer = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens.extend(pointer[k] for k in range(n.value))
                continue
            n_tokens = m.mtmd_input_chunk_get_n_tokens(chunk)
            occurrence = len(spans)
            value = placeholder(images[occurrence].digest, occurrence)
            spans.append((len(tokens), len(tokens) + n_tokens))
            chunk_at[len(tokens)] = chunk
            tokens.extend([value] * n_tokens)
            image_tokens += n_tokens
        return MediaPrompt(tokens, spans, chunk_at, image_tokens, chunks, m)

    def evaluate(self, lctx: Any, chunk: Any, pos: int, seq: int, n_batch: int, logits: bool) -> None:
        """Encode one image chunk and decode its embeddings into ``seq`` from ``pos`` on."""
        from llama_cpp import llama_cpp

        new_pos = llama_cpp.llama_pos(0)
        status = self._m.mtmd_helper_eval_chunk_single(
            self.ctx, lctx, chunk, pos, seq, n_batch, logits, ctypes.byref(new_pos)
        )
        if status != 0:
            raise ProjectorError(f"libmtmd could not evaluate an image (status {status})")

    def close(self) -> None:
        if self.ctx:
            self._m.mtmd_free(self.ctx)
            self.ctx = None


def media_prompt(model: Any, prompt: str, *, add_bos: bool, marker: str, images: list[Image]) -> MediaPrompt:
    """The rendered chat prompt, cut at the request's image markers, tokenized with its images.

    Decoding and preprocessing the images is CPU work: the caller runs this off the event loop.
    """
    from deployer.runtime.media import split_prompt

    if model.projector is None:  # take_images refused them already; a guard
        raise bad_request("this model has no vision projector: it reads text only", "messages")
    return model.projector.tokenize(split_prompt(prompt, marker, len(images)), images, add_bos=add_bos)
