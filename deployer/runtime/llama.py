"""The llama.cpp edge: the only module that imports llama-cpp-python.

    load(config)        route llama.cpp's log into ours, then load the :class:`Model`
    load_vocabulary     a :class:`Vocabulary` only (no weights): the API server's, when the engine
                        runs in a process of its own (:mod:`deployer.runtime.engine.process`)
    Model               one model, one context of ``parallel`` sequences, a batch, samplers, the
                        projector; implements :class:`deployer.runtime.engine.model.ModelInterface`
    Sampler             one sequence's llama.cpp sampler chain
    Projector           libmtmd (``llama_cpp.mtmd_cpp``): prompts with images and audio as chunks, an
                        image (or audio) chunk encoded and decoded into one sequence
    json_grammar, schema_converter, chat_formatter
                        what the runtime borrows from llama-cpp-python's Python side: its
                        JSON-schema-to-GBNF converter and its named chat formats

Everything here calls llama-cpp-python's low-level API (``llama_cpp.llama_cpp``): no
``llama_cpp.Llama``, whose context holds one sequence. Nothing above this module touches a
ctypes object; it passes token lists and gets token ids, text bytes and numpy logits back.

The context holds ``parallel`` sequences, each with a KV stream of ``n_ctx`` cells of its own
(``kv_unified = false``, as llama-server's ``-np N``): the scheduler lets no sequence grow past
``n_ctx`` tokens, so no stream can fill up, and attention reads only a sequence's own cells.

Imported on the model thread only (lean imports: see ``deployer.runtime``).
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import llama_chat_format, mtmd_cpp
from llama_cpp.llama_grammar import JSON_GBNF, SchemaConverter, json_schema_to_gbnf

from deployer.runtime import logs
from deployer.runtime.config import KV_TYPES, RuntimeConfig
from deployer.runtime.cpu import cpu_flags, physical_cores, repack_weights
from deployer.runtime.engine.sampling import Sampling
from deployer.runtime.errors import bad_request
from deployer.runtime.media.audio import Audio
from deployer.runtime.media.images import Media
from deployer.runtime.media.projector import MediaPrompt, placeholder


def _gil_keeping(*names: str) -> Any:
    """The short llama.cpp calls of the model thread's loop, bound through :class:`ctypes.PyDLL`: the
    GIL is kept during the call. ctypes releases it around every foreign call, and the thread that
    releases it must wait to get it back while the event loop runs Python (encoding, sending): for a
    call of a few microseconds that wait is the whole cost. ``llama_decode``, which computes for
    milliseconds, still releases it, so the event loop works while the model computes."""
    source = llama_cpp.llama_cpp._lib
    keeping = ctypes.PyDLL(source._name)
    calls = {}
    for name in names:
        function = getattr(keeping, name)
        function.argtypes, function.restype = getattr(source, name).argtypes, getattr(source, name).restype
        calls[name] = function
    return type("GilKeeping", (), calls)


_fast = _gil_keeping(
    "llama_sampler_sample", "llama_get_logits_ith", "llama_memory_seq_rm", "llama_memory_seq_cp",
    "llama_memory_seq_pos_min", "llama_sampler_accept",
)  # fmt: skip
# Sampling reads every candidate of the vocabulary: with a small one it takes microseconds (keep the
# GIL), with a large one (Llama 3's 128k, Gemma's 262k) up to a millisecond per row, which the event
# loop should have (release it: measured on Gemma 3 270M, TTFT at 4 clients 220-260 ms vs 290 ms)
GIL_KEEPING_VOCAB = 32768
_SWA_ONLY = llama_cpp.LLAMA_STATE_SEQ_FLAGS_SWA_ONLY  # a sequence's state: only the sliding-window layers' cache
PENALTY_LAST_N = 64  # llama-cpp-python's (and llama.cpp's) default window for repeat/presence/frequency penalties


class LlamaError(Exception):
    """llama.cpp refused something (a model it cannot load, a failed decode)."""


class Sampler:
    """A llama.cpp sampler chain for one sequence (penalties, bias, grammar, top-k/p, min-p, temperature)."""

    def __init__(self, model: Model, sampling: Sampling, seed: int) -> None:
        short = model.n_vocab <= GIL_KEEPING_VOCAB
        self._sample = _fast.llama_sampler_sample if short else llama_cpp.llama_sampler_sample
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.chain = llama_cpp.llama_sampler_chain_init(chain_params)
        add = lambda sampler: llama_cpp.llama_sampler_chain_add(self.chain, sampler)  # noqa: E731
        if sampling.logit_bias:  # llama.cpp copies the array; numpy fills it a column at a time (not per entry)
            tokens, values = zip(*sampling.logit_bias, strict=True)
            biases = np.empty(len(tokens), dtype=[("token", "<i4"), ("bias", "<f4")])
            biases["token"], biases["bias"] = tokens, values
            pointer = biases.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_logit_bias))
            add(llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(biases), pointer))
        if sampling.repeat_penalty != 1.0 or sampling.presence_penalty or sampling.frequency_penalty:
            add(
                llama_cpp.llama_sampler_init_penalties(
                    model.n_vocab,
                    PENALTY_LAST_N,
                    sampling.repeat_penalty,
                    sampling.frequency_penalty,
                    sampling.presence_penalty,
                )
            )
        self.grammar = None
        if sampling.grammar is not None:
            # applied apart from the chain, and only when the chain's choice breaks it (as llama.cpp's
            # common_sampler does): checking every token of a 256k vocabulary per step costs milliseconds
            self.grammar = llama_cpp.llama_sampler_init_grammar(model.vocab, sampling.grammar.encode(), b"root")
            if not self.grammar:
                llama_cpp.llama_sampler_free(self.chain)
                raise LlamaError("the grammar could not be parsed")
        if sampling.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        elif sampling.mirostat_mode:
            add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
            if sampling.mirostat_mode == 1:
                add(
                    llama_cpp.llama_sampler_init_mirostat(
                        model.n_vocab, seed, sampling.mirostat_tau, sampling.mirostat_eta, 100
                    )
                )
            else:
                add(llama_cpp.llama_sampler_init_mirostat_v2(seed, sampling.mirostat_tau, sampling.mirostat_eta))
        else:
            add(llama_cpp.llama_sampler_init_top_k(sampling.top_k if sampling.top_k > 0 else model.n_vocab))
            add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
            add(llama_cpp.llama_sampler_init_dist(seed))
        self._model = model
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(self._one, 1, -1, False)
        self._full: Any = None

    def sample(self, row: int, banned: Sequence[int] = ()) -> int:
        """The next token from one batch row of the last decode; the chain then accepts it."""
        if self.grammar is None and not banned:  # the common case, all in C
            return int(self._sample(self.chain, self._model.ctx, row))
        logits = self._model.logits(row)
        if banned:
            logits = logits.copy()
            logits[list(banned)] = -np.inf
        token = self._apply_chain(logits)
        if self.grammar is not None and not self._grammar_allows(token, float(logits[token])):
            # resample with the grammar first: every token it forbids gets -inf, then the chain chooses
            self._fill(logits)
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(self._full_array))
            llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(self._full_array))
            token = self._selected()
        if self.grammar is not None:
            _fast.llama_sampler_accept(self.grammar, token)
        _fast.llama_sampler_accept(self.chain, token)
        return token

    def _apply_chain(self, logits: np.ndarray) -> int:
        self._fill(logits)
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(self._full_array))
        return self._selected()

    def _fill(self, logits: np.ndarray) -> None:
        n = logits.shape[0]
        if self._full is None:
            self._full = (llama_cpp.llama_token_data * n)()
            self._full_np = np.ctypeslib.as_array(
                ctypes.cast(self._full, ctypes.POINTER(ctypes.c_byte)),
                shape=(n * ctypes.sizeof(llama_cpp.llama_token_data),),
            ).view(np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
            self._full_array = llama_cpp.llama_token_data_array(self._full, n, -1, False)
        self._full_np["id"] = np.arange(n, dtype=np.int32)
        self._full_np["logit"] = logits
        self._full_np["p"] = 0.0
        self._full_array.data, self._full_array.size = self._full, n
        self._full_array.selected, self._full_array.sorted = -1, False

    def _selected(self) -> int:
        array = self._full_array
        return int(array.data[array.selected].id)

    def _grammar_allows(self, token: int, logit: float) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = token, logit, 0.0
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(self._one_array))
        return self._one[0].logit != float("-inf")

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


def check_grammar(vocab: Any, text: str) -> bool:
    """Whether llama.cpp parses ``text`` as a GBNF grammar with a ``root`` rule (a bad one must never reach sampling)."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def json_grammar(schema: dict[str, Any] | None) -> str:
    """GBNF for JSON valid for ``schema`` (any JSON when None), by llama-cpp-python's converter.

    ValueError naming what the converter cannot express (it raises plain exceptions on such schemas).
    """
    if schema is None:
        return JSON_GBNF
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:
        raise ValueError(str(exc)) from exc


def schema_converter() -> Any:
    """A fresh JSON-schema-to-GBNF converter (llama-cpp-python's port of llama.cpp's), no remote refs."""
    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def chat_formatter(name: str) -> Callable[..., Any]:
    """The prompt formatter llama-cpp-python registered as ``name`` (``format_gemma`` for "gemma", ...)."""
    try:
        handler = llama_chat_format.LlamaChatCompletionHandlerRegistry().get_chat_completion_handler_by_name(name)
    except Exception as exc:
        raise ValueError(f"chat_format '{name}' is not one llama-cpp-python knows") from exc
    formatter = inspect.getclosurevars(handler).nonlocals.get("chat_formatter")
    if formatter is None:
        raise ValueError(f"chat_format '{name}' has its own handler, not a prompt format this server can use")
    return formatter


_LEVELS = {1: "debug", 2: "info", 3: "warn", 4: "error", 5: "cont"}  # enum ggml_log_level
_callbacks: list[Any] = []  # ctypes callbacks must outlive every call llama.cpp makes to them


def route_logs(verbose: bool) -> None:
    """llama.cpp's own log lines as JSON events too (warnings and errors; everything when verbose)."""

    @llama_cpp.llama_log_callback  # type: ignore[misc]
    def callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if verbose or level in (3, 4):  # called for every line llama.cpp writes: the check comes first
            message = text.decode("utf-8", errors="replace").strip()
            if message:
                logs.event("llama.cpp", level=_LEVELS.get(level, str(level)), text=message)

    _callbacks.append(callback)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def load(config: RuntimeConfig) -> Model:
    """The model of ``config``, llama.cpp's log routed into the runtime's (on the model thread)."""
    route_logs(config.verbose)
    return Model(config)


def load_vocabulary(config: RuntimeConfig) -> Vocabulary:
    """The vocabulary and metadata of ``config``'s model, without its weights (milliseconds)."""
    route_logs(config.verbose)
    return Vocabulary(config)


def model_params(config: RuntimeConfig) -> Any:
    """``llama_model_params`` of ``config`` (the memory benchmark loads models with the same)."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = config.n_gpu_layers
    params.use_extra_bufts = repack_weights(config.cpu_repack, cpu_flags())
    return params


def context_params(config: RuntimeConfig, *, embeddings: bool = False) -> Any:
    """``llama_context_params`` of ``config``: ``parallel`` sequences of ``n_ctx`` tokens, each in a KV
    stream of its own; or, for ``embeddings``, the one-sequence context that embeds an input at a time."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = config.n_batch if embeddings else config.n_ctx * config.parallel
    params.n_seq_max = 1 if embeddings else config.parallel
    params.kv_unified = False
    params.embeddings = embeddings
    params.n_batch = max(config.n_batch, config.parallel)
    params.n_ubatch = min(config.n_ubatch, params.n_batch)
    params.n_threads = params.n_threads_batch = config.n_threads or physical_cores()
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    params.type_k = params.type_v = KV_TYPES[config.kv_cache_type]
    # llama-cpp-python defaults to true; llama-server (and so the runtime) to false: sliding-window
    # layers keep their window only, and the engine's context checkpoints keep the prompt cache
    params.swa_full = config.swa_full
    params.no_perf = True
    return params


class ProjectorError(Exception):
    pass


class Projector:
    """libmtmd's context for one loaded model."""

    def __init__(self, model: Any, path: str, *, n_threads: int, use_gpu: bool = True) -> None:
        self._m = mtmd_cpp
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu  # llama-server's default (--no-mmproj-offload turns it off): a CPU build ignores it
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = True  # reserve the compute buffer of one image (or 30 s of audio) now, not on the first request
        self.ctx = mtmd_cpp.mtmd_init_from_file(path.encode(), model, params)
        if not self.ctx:
            raise ProjectorError(f"{path}: libmtmd could not load the projector (see its log above)")
        self.vision = bool(mtmd_cpp.mtmd_support_vision(self.ctx))
        self.audio = bool(mtmd_cpp.mtmd_support_audio(self.ctx))
        self.mrope = bool(mtmd_cpp.mtmd_decode_use_mrope(self.ctx))

    def tokenize(self, pieces: list[str], media: list[Media], *, add_bos: bool) -> MediaPrompt:
        """``pieces[0] media[0] pieces[1] ... pieces[-1]`` as chunks; a 400 for an image or a clip libmtmd
        cannot decode, or one this projector has no encoder for."""
        m = self._m
        for item in media:  # the request's checks said so already (media.images.limits_of): a guard
            audio = isinstance(item, Audio)
            if not (self.audio if audio else self.vision):
                kind, takes = ("audio", "audio") if audio else ("vision", "images")
                raise bad_request(f"this model's projector has no {kind} encoder: it takes no {takes}", "messages")
        if self.mrope:
            raise bad_request(
                "images and audio for this model (an M-RoPE projector, Qwen-VL style) are not served yet", "messages"
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
                if i < len(media):
                    bitmap = self._bitmap(media[i], i)
                    bitmaps.append(bitmap)
                    parts.append(m.mtmd_input_part(None, bitmap))
            array = (ctypes.POINTER(m.mtmd_input_part) * len(parts))(*(ctypes.pointer(p) for p in parts))
            chunks = m.mtmd_input_chunks_init()
            status = m.mtmd_tokenize_from_parts(self.ctx, chunks, array, len(parts), add_bos)
            if status != 0:
                m.mtmd_input_chunks_free(chunks)
                raise bad_request(f"the images or audio could not be tokenized (libmtmd status {status})", "messages")
        finally:
            for bitmap in bitmaps:
                m.mtmd_bitmap_free(bitmap)
        return self._prompt(chunks, media)

    def _bitmap(self, item: Media, index: int) -> Any:
        """``item`` decoded by libmtmd's helper (stb_image, miniaudio), its id the item's index: every
        chunk libmtmd cuts from it (an audio clip's 30 s pieces) carries that id."""
        m = self._m
        audio = isinstance(item, Audio)
        what = f"{'audio clip' if audio else 'image'} {index + 1} of the request"
        buffer = (ctypes.c_uint8 * len(item.data)).from_buffer_copy(item.data)
        bitmap = m.mtmd_helper_bitmap_init_from_buf(self.ctx, buffer, len(item.data), False)
        if not bitmap:
            hint = " (libmtmd decodes WebP only where ffmpeg is installed)" if item.format == "WebP" else ""
            raise bad_request(
                f"{what} could not be decoded as {item.format}: it is truncated or corrupt{hint}",
                "messages",
                "invalid_audio" if audio else "invalid_image",
            )
        problem = None
        if bool(m.mtmd_bitmap_is_audio(bitmap)) != audio:
            problem = f"{what} is {'not audio' if audio else 'audio, not an image'}"
        elif audio and m.mtmd_bitmap_get_n_bytes(bitmap) < 2 * ctypes.sizeof(ctypes.c_float):
            problem = f"{what} holds no samples"  # libmtmd asserts (ends the process) on fewer than two
        if problem is not None:
            m.mtmd_bitmap_free(bitmap)
            raise bad_request(problem, "messages", "invalid_audio" if audio else "invalid_image")
        m.mtmd_bitmap_set_id(bitmap, str(index).encode())
        return bitmap

    def _prompt(self, chunks: Any, media: list[Media]) -> MediaPrompt:
        m = self._m
        tokens: list[int] = []
        spans: list[tuple[int, int]] = []
        chunk_at: dict[int, Any] = {}
        media_tokens = 0
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            kind = m.mtmd_input_chunk_get_type(chunk)
            if kind == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                pointer = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens.extend(pointer[k] for k in range(n.value))
                continue
            n_tokens = m.mtmd_input_chunk_get_n_tokens(chunk)
            item = media[int(m.mtmd_input_chunk_get_id(chunk))]  # the id _bitmap gave its bitmap
            value = placeholder(item.digest, len(spans))
            spans.append((len(tokens), len(tokens) + n_tokens))
            chunk_at[len(tokens)] = chunk
            tokens.extend([value] * n_tokens)
            media_tokens += n_tokens
        return MediaPrompt(tokens, spans, chunk_at, media_tokens, lambda: m.mtmd_input_chunks_free(chunks))

    def evaluate(self, lctx: Any, chunk: Any, pos: int, seq: int, n_batch: int, logits: bool) -> None:
        """Encode one image (or audio) chunk and decode its embeddings into ``seq`` from ``pos`` on."""
        new_pos = llama_cpp.llama_pos(0)
        status = self._m.mtmd_helper_eval_chunk_single(
            self.ctx, lctx, chunk, pos, seq, n_batch, logits, ctypes.byref(new_pos)
        )
        if status != 0:
            raise ProjectorError(f"libmtmd could not evaluate an image or audio chunk (status {status})")

    def close(self) -> None:
        if self.ctx:
            self._m.mtmd_free(self.ctx)
            self.ctx = None


class Vocabulary:
    """A model's vocabulary and metadata: tokenizing, token text, grammars, chat formats.

    Loaded alone (:func:`load_vocabulary`: ``vocab_only``, no weights, no context) by the API server
    when the engine runs in a process of its own; :class:`Model` is one too.
    """

    def __init__(self, config: RuntimeConfig, *, vocab_only: bool = True) -> None:
        llama_cpp.llama_backend_init()
        params = model_params(config)
        params.vocab_only = vocab_only
        no_devices = (ctypes.c_void_p * 1)()  # an empty, NULL-terminated device list
        if vocab_only:  # llama.cpp would still ask every GPU for its free memory (a CUDA context here)
            params.n_gpu_layers = 0
            params.devices = ctypes.addressof(no_devices)
        self.model = llama_cpp.llama_model_load_from_file(config.model_path.encode(), params)
        if not self.model:
            raise LlamaError("llama.cpp could not load the file (see its log above)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.metadata = self._metadata()

    # -- text

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8
        buffer = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, room, add_special, parse_special)
        if n < 0:
            buffer = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, -n, add_special, parse_special)
        return list(buffer[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens as their text, like the stock server).

        Remembered per token: every generated token is detokenized, and a call into llama.cpp
        gives the GIL away (the event loop may keep it for a while) where a dict lookup does not.
        """
        data = self._pieces.get(token)
        if data is None:
            data = self._pieces[token] = self._piece(token)
        return data

    def _piece(self, token: int) -> bytes:
        buffer = self._piece_buffer
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, True)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -n, 0, True)
        return buffer.raw[:n]

    _piece_buffer = ctypes.create_string_buffer(256)

    def token_text(self, token: int) -> str:
        """A token's text in the vocabulary, for BOS/EOS strings handed to chat templates."""
        return self.piece(token).decode("utf-8", errors="replace") if token >= 0 else ""

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (EOS, EOT, end-of-turn...); remembered, as :meth:`piece` is."""
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return eog

    @functools.cached_property
    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token (min_tokens bans them); found once, when first needed."""
        return tuple(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))

    @property
    def bos(self) -> int:
        return llama_cpp.llama_vocab_bos(self.vocab)

    @property
    def eos(self) -> int:
        return llama_cpp.llama_vocab_eos(self.vocab)

    def _metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        buffer = ctypes.create_string_buffer(1024)
        for i in range(llama_cpp.llama_model_meta_count(self.model)):
            n = llama_cpp.llama_model_meta_key_by_index(self.model, i, buffer, len(buffer))
            key = buffer.value.decode("utf-8", errors="replace") if n >= 0 else ""
            n = llama_cpp.llama_model_meta_val_str_by_index(self.model, i, buffer, len(buffer))
            if n >= len(buffer):
                big = ctypes.create_string_buffer(n + 1)
                llama_cpp.llama_model_meta_val_str_by_index(self.model, i, big, n + 1)
                out[key] = big.value.decode("utf-8", errors="replace")
            elif n >= 0:
                out[key] = buffer.value.decode("utf-8", errors="replace")
        return out

    def check_grammar(self, text: str) -> bool:
        return check_grammar(self.vocab, text)

    def json_grammar(self, schema: dict[str, Any] | None) -> str:
        return json_grammar(schema)

    def schema_converter(self) -> Any:
        return schema_converter()

    def chat_formatter(self, name: str) -> Callable[..., Any]:
        return chat_formatter(name)

    @property
    def n_embd(self) -> int:
        return llama_cpp.llama_model_n_embd(self.model)

    def close(self) -> None:
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


class Model(Vocabulary):
    """The loaded model, its context of ``parallel`` sequences, and one reusable batch."""

    errors = (LlamaError,)  # what decode raises when llama.cpp fails (the engine fails the running requests)

    def __init__(self, config: RuntimeConfig) -> None:
        super().__init__(config, vocab_only=False)
        self.ctx: Any = None
        self.embed_ctx: Any = None
        self.projector: Projector | None = None  # when the config names an mmproj file
        self.batch: Any = None
        try:
            self._init(config)
        except Exception:
            self.close()
            raise

    def _init(self, config: RuntimeConfig) -> None:
        self.parallel = config.parallel
        self.n_threads = config.n_threads or physical_cores()
        self.n_batch = config.n_batch
        self.ctx = llama_cpp.llama_init_from_model(self.model, context_params(config))
        if not self.ctx:
            raise LlamaError(f"llama.cpp could not create a context of {config.parallel} x {config.n_ctx} tokens")
        self.n_ctx = config.n_ctx  # per sequence: the scheduler keeps every sequence inside it
        # sliding-window (or chunked-attention) layers that cache only their window: their state at
        # an earlier position comes back only from a context checkpoint
        self.windowed = llama_cpp.llama_model_n_swa(self.model) > 0 and not config.swa_full
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch_capacity = max(config.n_batch, config.parallel)  # a prompt chunk, or one decode token per slot
        self.batch = llama_cpp.llama_batch_init(self.batch_capacity, 0, 1)
        cap = self.batch_capacity
        self._tokens = np.ctypeslib.as_array(self.batch.token, shape=(cap,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(cap,))
        self._n_seq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(cap,))
        self._logits = np.ctypeslib.as_array(self.batch.logits, shape=(cap,))
        self._n_seq[:] = 1
        self._seq_ids = [self.batch.seq_id[i] for i in range(cap)]
        if config.embeddings:
            self.embed_ctx = llama_cpp.llama_init_from_model(self.model, context_params(config, embeddings=True))
            if not self.embed_ctx:
                raise LlamaError("llama.cpp could not create the embeddings context")
        if config.mmproj_path:
            try:
                self.projector = Projector(
                    self.model, config.mmproj_path, n_threads=self.n_threads, use_gpu=config.n_gpu_layers != 0
                )
            except ProjectorError as exc:
                raise LlamaError(str(exc)) from exc

    # -- decoding

    def decode(self, entries: Sequence[tuple[int, Sequence[int], int, bool]]) -> list[int]:
        """Decode one batch: (sequence, tokens, first position, logits for the last token) per entry.

        Returns, per entry that asked for logits, its row index for :meth:`logits`.
        """
        n = 0
        rows: list[int] = []
        for seq, tokens, pos, want in entries:
            k = len(tokens)
            self._tokens[n : n + k] = tokens
            self._pos[n : n + k] = np.arange(pos, pos + k, dtype=np.int32)
            self._logits[n : n + k] = 0
            for i in range(n, n + k):
                self._seq_ids[i][0] = seq
            if want:
                self._logits[n + k - 1] = 1
                rows.append(n + k - 1)
            n += k
        self.batch.n_tokens = n
        status = llama_cpp.llama_decode(self.ctx, self.batch)
        if status != 0:
            raise LlamaError(f"llama_decode failed (status {status})")
        return rows

    def logits(self, row: int) -> np.ndarray:
        """The logits of one batch row of the last decode (a view: valid until the next decode)."""
        pointer = _fast.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    # -- the KV cache of one sequence

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop the cache of ``seq`` from position ``start`` on."""
        _fast.llama_memory_seq_rm(self.memory, seq, start, -1)

    def copy(self, source: int, target: int) -> None:
        """Make ``target``'s cache a copy of ``source``'s (the whole stream: done before the next decode)."""
        _fast.llama_memory_seq_rm(self.memory, target, 0, -1)
        _fast.llama_memory_seq_cp(self.memory, source, target, -1, -1)

    def sampler(self, sampling: Sampling, seed: int) -> Sampler:
        """A sampler chain of one sequence's settings (the engine asks the model, so a fake one can answer)."""
        return Sampler(self, sampling, seed)

    def evaluate_image(self, chunk: Any, pos: int, seq: int, logits: bool) -> None:
        """Encode one image (or audio) chunk and decode it into ``seq`` from ``pos`` on (LlamaError when libmtmd fails)."""
        assert self.projector is not None
        try:
            self.projector.evaluate(self.ctx, chunk, pos, seq, self.n_batch, logits)
        except ProjectorError as exc:
            raise LlamaError(str(exc)) from exc

    def can_rewind(self, seq: int) -> bool:
        """Whether ``seq``'s cache still holds position 0 (a sliding-window cache may have dropped it)."""
        return _fast.llama_memory_seq_pos_min(self.memory, seq) <= 0

    def save_window(self, seq: int) -> Any:
        """A context checkpoint: the windowed layers' cache of ``seq`` (a host buffer, opaque above)."""
        size = llama_cpp.llama_state_seq_get_size_ext(self.ctx, seq, _SWA_ONLY)
        state = (ctypes.c_uint8 * size)()
        if size == 0 or llama_cpp.llama_state_seq_get_data_ext(self.ctx, state, size, seq, _SWA_ONLY) != size:
            raise LlamaError(f"llama.cpp could not save the sliding-window cache of sequence {seq}")
        return state

    def restore_window(self, seq: int, state: Any) -> None:
        """Put back a checkpoint of :meth:`save_window`: ``seq``'s windowed layers hold exactly its cells
        again, contiguous from the start of the stream (whatever cells they held before)."""
        if llama_cpp.llama_state_seq_set_data_ext(self.ctx, state, ctypes.sizeof(state), seq, _SWA_ONLY) == 0:
            raise LlamaError(f"llama.cpp could not restore the sliding-window cache of sequence {seq}")

    # -- embeddings

    def embed(self, tokens: list[int]) -> list[float]:
        """One input's embedding: the model's pooling, else the mean of its token vectors."""
        ctx = self.embed_ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(tokens)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise LlamaError("llama_decode failed while embedding")
            n_embd = llama_cpp.llama_model_n_embd(self.model)
            if llama_cpp.llama_pooling_type(ctx) != llama_cpp.LLAMA_POOLING_TYPE_NONE:
                pointer = llama_cpp.llama_get_embeddings_seq(ctx, 0)
                return np.ctypeslib.as_array(pointer, shape=(n_embd,)).astype(float).tolist()
            rows = [
                np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(ctx, i), shape=(n_embd,))
                for i in range(len(tokens))
            ]
            return np.mean(rows, axis=0).astype(float).tolist()
        finally:
            llama_cpp.llama_batch_free(batch)

    def close(self) -> None:
        if self.projector is not None:
            self.projector.close()
            self.projector = None
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        for name in ("embed_ctx", "ctx"):
            ctx = getattr(self, name)
            if ctx:
                llama_cpp.llama_free(ctx)
                setattr(self, name, None)
        super().close()
