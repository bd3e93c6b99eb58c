"""Images and audio clips in requests: found in the messages, decoded from base64, checked against the limits.

Pure (no llama.cpp): runs on the event loop before anything reaches the model thread.

    MediaLimits                     what the projector reads (vision, audio) and the limits: images per
                                    request, bytes and pixels per image; clips per request, bytes and
                                    seconds per clip (RuntimeConfig's)
    Media                           an :class:`Image` or an :class:`~deployer.runtime.media.audio.Audio` clip
    CHAT, RESPONSES, MESSAGES       where each protocol keeps its images and clips (:class:`Shape`)
    take_request_images(body, ...)  a request body → the same body with every image and audio part replaced
                                    by a text part holding a per-request marker, the marker, and the media
                                    (in the order they stand)
    image_from_bytes(mime, data)    a (mime, bytes) part of any protocol → :class:`Image` (sniffed, checked)
    audio_from_bytes(data)          the bytes of an ``input_audio`` part → ``Audio`` (sniffed, length checked)
    map_image_parts(body, shape, f) each image part of a body through f (also for deployer.runtime.media.fetch)
    image_part(marker)              what stands where an image (or a clip) stood

Chat Completions ``image_url`` parts, Responses ``input_image`` parts and Anthropic ``image`` blocks,
and the ``input_audio`` parts of Chat Completions and Responses (``{"data": base64, "format": "wav"}``,
OpenAI's shape in both), are taken out before the protocol's decoder sees them, so every protocol
reaches the model through the same path (``app._chat_generation``) with the same limits; errors name
the part as the protocol spells it (``messages[0].content[1]``, ``input[0].content[1]``). Anthropic's
Messages API has no audio blocks: an ``input_audio`` part there is a 400 that says so.

The marker is random per request, so no text a user sends can pose as an image. After the chat
template has rendered the prompt, :func:`split_prompt` cuts it at the markers: the text between them
is tokenized as text, each marker becomes the image's (or the clip's) chunks (libmtmd,
deployer.runtime.media.projector).

The format is read from the bytes' magic, never from the declared type, and the width and height
from the header, before any decoder sees them: a 40,000 × 40,000 PNG of a few kilobytes would decode
into 4.8 GB. SVG (a program, not pixels) and anything else unknown is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deployer.runtime.errors import ApiError, bad_request
from deployer.runtime.media.audio import AUDIO_FORMATS, Audio, sniff_audio

FORMATS = ("PNG", "JPEG", "WebP", "GIF")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.IGNORECASE)


@dataclass(frozen=True)
class MediaLimits:
    projector: bool  # the model has a multimodal projector
    max_images: int
    max_bytes: int  # per image
    max_pixels: int
    remote: bool = False  # http(s) image URLs are fetched (deployer.runtime.media.fetch); else a 400
    fetch_timeout_s: float = 10.0  # one remote image: lookup, connection and body
    vision: bool = True  # the projector has a vision encoder (read from the loaded projector)
    audio: bool = False  # the projector has an audio encoder
    max_clips: int = 4  # audio clips per request
    max_audio_bytes: int = 20 * 1024 * 1024  # one clip's encoded bytes (413 beyond)
    max_audio_seconds: float = 600.0  # one clip's length (400 beyond: libmtmd decodes it whole, at once)


@dataclass(frozen=True)
class Image:
    """One image of a request: its bytes (for libmtmd), what they are, and their hash (the cache key)."""

    format: str  # one of FORMATS
    data: bytes
    width: int
    height: int

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


Media = Image | Audio  # one item a marker stands for


def limits_of(config: Any, projector: Any = None) -> MediaLimits:
    """The limits of a RuntimeConfig; what the loaded ``projector`` reads (its ``vision`` and ``audio``,
    libmtmd's answer) when there is one."""
    configured = config.mmproj_path is not None
    return MediaLimits(
        projector=configured,
        max_images=config.max_images,
        max_bytes=config.max_image_bytes,
        max_pixels=config.max_image_pixels,
        remote=config.remote_images,
        fetch_timeout_s=config.remote_image_timeout_s,
        vision=bool(projector.vision) if projector is not None else configured,
        audio=bool(projector is not None and projector.audio),
        max_clips=config.max_audio_clips,
        max_audio_bytes=config.max_audio_bytes,
        max_audio_seconds=config.max_audio_seconds,
    )


def new_marker() -> str:
    """A marker no user text contains: random per request."""
    return f"<__image_{secrets.token_hex(8)}__>"


@dataclass(frozen=True)
class Shape:
    """Where a protocol keeps its images, and how it spells what stands in for one."""

    field: str  # the body's list of messages: "messages" (Chat, Anthropic) or "input" (Responses)
    image_types: tuple[str, ...]  # the part types that carry an image
    text_type: str  # the text part that stands where an image stood
    read: Callable[[dict[str, Any], str, MediaLimits, str], Image]  # (part, where, limits, param) → Image
    nested: tuple[str, ...] = ()  # part types whose own content may hold images (Anthropic's tool_result)
    content_keys: tuple[str, ...] = ("content",)  # where a message (or item) keeps its parts
    audio: bool = True  # the protocol has input_audio parts (OpenAI's; Anthropic has no audio blocks)


def take_request_images(
    body: Any,
    limits: MediaLimits,
    shape: Shape | None = None,
    *,
    marker: str | None = None,
    carried: tuple[Media, ...] = (),
) -> tuple[Any, str, list[Media]]:
    """``body`` with each image and audio part replaced by a text part holding the marker, the marker,
    and the media, in the order they stand.

    ``shape`` is the protocol's (:data:`CHAT` when None). ``marker`` and ``carried`` continue an
    earlier request whose ``carried`` media stand in its stored turns under that marker (Responses'
    ``previous_response_id``): they count against the request's limits. Raises :class:`ApiError`
    (4xx) for an image or a clip the model cannot take, naming the part.
    """
    shape = shape or CHAT
    marker = marker or new_marker()
    media: list[Media] = []
    param = shape.field

    def take(part: dict[str, Any], where: str) -> dict[str, Any]:
        audio = part.get("type") == "input_audio"
        if audio and not shape.audio:
            raise bad_request(
                f"{where}: the Messages API has no audio blocks ('input_audio' is an OpenAI part): send audio "
                "to /v1/chat/completions or /v1/responses",
                param,
                "unsupported_content_type",
            )
        if not limits.projector:
            raise _no_projector(where, param, "audio" if audio else "vision")
        if audio and not limits.audio:
            raise _no_encoder(where, param, "audio", "audio (it reads images)")
        if not audio and not limits.vision:
            raise _no_encoder(where, param, "vision", "images (it reads audio)")
        kind, cap, code = ("audio clips", limits.max_clips, "too_many_audio_clips") if audio else (
            "images", limits.max_images, "too_many_images")  # fmt: skip
        before = sum(isinstance(item, Audio) == audio for item in carried)
        if before + sum(isinstance(item, Audio) == audio for item in media) >= cap:
            raise bad_request(
                f"{where}: too many {kind}: at most {cap} {kind} per request"
                + (f" ({before} of them in the earlier turns)" if before else ""),
                param,
                code,
            )
        media.append(_input_audio(part, where, limits, param) if audio else shape.read(part, where, limits, param))
        return image_part(marker, shape.text_type)

    return map_image_parts(body, shape, take, also=("input_audio",)), marker, media


def map_image_parts(
    body: Any, shape: Shape, change: Callable[[dict[str, Any], str], dict[str, Any]], also: tuple[str, ...] = ()
) -> Any:
    """``body`` with ``change(part, where)`` in place of each image part (and of each part of a type in
    ``also``), in message content and in the content of a ``shape.nested`` part (an Anthropic
    ``tool_result``). The same object when nothing changed. Anything not a list of parts is left for
    the protocol's own checks (which name it)."""
    kinds = (*shape.image_types, *also)

    def parts(content: list[Any], where: str) -> list[Any]:
        out = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in kinds:
                out.append(change(part, f"{where}[{j}]"))
            elif kind in shape.nested and isinstance(part.get("content"), list):
                inner = parts(part["content"], f"{where}[{j}].content")
                out.append(part if inner == part["content"] else {**part, "content": inner})
            else:
                out.append(part)
        return out

    messages = body.get(shape.field) if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return body
    changed = False
    out = []
    for i, message in enumerate(messages):
        for key in shape.content_keys if isinstance(message, dict) else ():
            content = message.get(key)
            if isinstance(content, list):
                new = parts(content, f"{shape.field}[{i}].{key}")
                if new != content:
                    message, changed = {**message, key: new}, True
        out.append(message)
    return {**body, shape.field: out} if changed else body


def take_images(messages: Any, limits: MediaLimits, marker: str) -> tuple[Any, list[Media]]:
    """Chat Completions messages with their images taken out (see :func:`take_request_images`)."""
    body, _, images = take_request_images({"messages": messages}, limits, CHAT, marker=marker)
    return body["messages"], images


def image_part(marker: str, text_type: str = "text") -> dict[str, str]:
    """The text part that stands where an image stood, until the prompt is split at it."""
    return {"type": text_type, "text": marker}


def _no_projector(where: str, param: str, kind: str = "vision") -> ApiError:
    return bad_request(
        f"{where}: this model has no {kind} projector: it reads text only "
        '(a manifest names one with mmproj = "mmproj-...gguf")',
        param,
        "unsupported_content_type",
    )


def _no_encoder(where: str, param: str, kind: str, takes: str) -> ApiError:
    return bad_request(
        f"{where}: this model's projector has no {kind} encoder: it takes no {takes}",
        param,
        "unsupported_content_type",
    )


def _remote(where: str, param: str) -> ApiError:
    return bad_request(
        f"{where}: remote image URLs are not fetched by this server (fetching arbitrary URLs from it would "
        "be a server-side request forgery risk): send the image inline as base64 data",
        param,
        "remote_image_url",
    )


def _chat_image(part: dict[str, Any], where: str, limits: MediaLimits, param: str) -> Image:
    """A Chat Completions ``image_url`` part: ``{"image_url": {"url": "data:..."}}``."""
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise bad_request(f'{where}.image_url must be {{"url": "data:image/png;base64,..."}}', param)
    return _from_url(url, where, limits, param)


def _responses_image(part: dict[str, Any], where: str, limits: MediaLimits, param: str) -> Image:
    """A Responses ``input_image`` part: ``{"image_url": "data:...", "detail": ...}``; a ``file_id`` is refused."""
    if part.get("file_id") is not None:
        raise bad_request(
            f"{where}.file_id: files uploaded to OpenAI cannot be read by this server: send the image inline "
            'as "image_url": "data:image/png;base64,..."',
            param,
            "unsupported_file_id",
        )
    url = part.get("image_url")
    if not isinstance(url, str):
        raise bad_request(f'{where}.image_url must be a data: URL string ("data:image/png;base64,...")', param)
    return _from_url(url, where, limits, param)


def _anthropic_image(part: dict[str, Any], where: str, limits: MediaLimits, param: str) -> Image:
    """An Anthropic ``image`` block: ``{"source": {"type": "base64", "media_type": ..., "data": ...}}``."""
    source = part.get("source")
    shape = '{"type": "base64", "media_type": "image/png", "data": "..."}'
    if not isinstance(source, dict):
        raise bad_request(f"{where}.source must be {shape}", param)
    kind = source.get("type")
    if kind == "url":
        raise _remote(f"{where}.source", param)
    if kind != "base64":
        raise bad_request(f"{where}.source.type {kind!r} is not supported: send {shape}", param)
    data, mime = source.get("data"), source.get("media_type", "")
    if not isinstance(data, str) or not isinstance(mime, str):
        raise bad_request(f"{where}.source must be {shape}", param)
    return _from_base64(data, mime, where, limits, param)


def _from_url(url: str, where: str, limits: MediaLimits, param: str) -> Image:
    if url.startswith(("http://", "https://")):
        raise _remote(where, param)
    match = _DATA_URL.match(url)
    if match is None:
        raise bad_request(f"{where}: the image URL must be a base64 data: URL (data:image/png;base64,...)", param)
    return _from_base64(url[match.end() :], match["mime"] or "", where, limits, param)


def _from_base64(encoded: str, mime: str, where: str, limits: MediaLimits, param: str) -> Image:
    data = _base64_bytes(
        encoded, limits.max_bytes, lambda size: too_big(where, size, limits.max_bytes, param),
        f"{where}: the image's base64 data is not valid base64", param,
    )  # fmt: skip
    return image_from_bytes(mime, data, where, limits, param)


def _base64_bytes(encoded: str, cap: int, too_large: Callable[[int], ApiError], invalid: str, param: str) -> bytes:
    """The bytes of base64 text: over ``cap`` refused before decoding megabytes, bad base64 a 400 (``invalid``)."""
    if len(encoded) * 3 // 4 > cap + 3:
        raise too_large(len(encoded) * 3 // 4)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(invalid, param) from None


CHAT = Shape("messages", ("image_url", "input_image", "image"), "text", _chat_image)
# a Responses function_call_output's output may be a list of parts too (a tool's screenshot)
RESPONSES = Shape("input", ("input_image",), "input_text", _responses_image, content_keys=("content", "output"))
MESSAGES = Shape("messages", ("image",), "text", _anthropic_image, nested=("tool_result",), audio=False)


def image_from_bytes(mime: str, data: bytes, where: str, limits: MediaLimits, param: str = "messages") -> Image:
    """An image from its bytes, whichever protocol carried them (Chat ``image_url``, Responses
    ``input_image``, Anthropic ``image``): the format sniffed, the size checked. ``mime`` is only
    used to name an unsupported declared type (SVG)."""
    if not limits.projector:
        raise _no_projector(where, param)
    if not limits.vision:
        raise _no_encoder(where, param, "vision", "images (it reads audio)")
    if not data:
        raise bad_request(f"{where}: the image is empty (0 bytes)", param, "invalid_image")
    if len(data) > limits.max_bytes:
        raise too_big(where, len(data), limits.max_bytes, param)
    sniffed = sniff(data)
    if sniffed is None:
        declared = f" ({mime})" if mime else ""
        kind = "an SVG drawing" if b"<svg" in data[:1024].lower() or "svg" in mime.lower() else "not an image"
        raise bad_request(f"{where}: {kind}{declared}: images must be {', '.join(FORMATS)}", param, "invalid_image")
    fmt, width, height = sniffed
    if width <= 0 or height <= 0:
        raise bad_request(f"{where}: the {fmt} image says it is {width} × {height} pixels", param, "invalid_image")
    if width * height > limits.max_pixels:
        raise bad_request(
            f"{where}: the image is {width} × {height} = {width * height:,} pixels; at most {limits.max_pixels:,} "
            "pixels per image",
            param,
            "image_too_large",
        )
    return Image(fmt, data, width, height)


def too_big(where: str, size: int, cap: int, param: str) -> ApiError:
    return ApiError(
        413,
        f"{where}: the image is {size:,} bytes; at most {cap:,} bytes per image",
        param=param,
        code="image_too_large",
    )


# ## Audio: input_audio parts (Chat Completions and Responses alike)

AUDIO_PART = '{"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}'
_DECLARED_AUDIO = ("wav", "mp3", "flac")


def _input_audio(part: dict[str, Any], where: str, limits: MediaLimits, param: str) -> Audio:
    """An ``input_audio`` part: ``{"input_audio": {"data": <base64>, "format": "wav" | "mp3"}}``.

    The format is read from the bytes, as an image's is; a declared one must still be one the
    server reads (flac too: libmtmd decodes it)."""
    body = part.get("input_audio")
    if not isinstance(body, dict):
        raise bad_request(f"{where}.input_audio must be an object: {AUDIO_PART}", param)
    encoded, declared = body.get("data"), body.get("format")
    if not isinstance(encoded, str):
        raise bad_request(f"{where}.input_audio.data must be the clip's bytes as a base64 string", param)
    if declared is not None and declared not in _DECLARED_AUDIO:
        raise bad_request(
            f"{where}.input_audio.format {declared!r} is not one this server reads: {', '.join(_DECLARED_AUDIO)}",
            param,
            "invalid_audio",
        )
    if encoded.startswith("data:"):
        raise bad_request(f"{where}.input_audio.data must be the base64 bytes themselves, not a data: URL", param)
    data = _base64_bytes(
        encoded, limits.max_audio_bytes, lambda size: audio_too_big(where, size, limits.max_audio_bytes, param),
        f"{where}.input_audio.data is not valid base64", param,
    )  # fmt: skip
    return audio_from_bytes(data, where, limits, param, declared=declared or "")


def audio_from_bytes(
    data: bytes, where: str, limits: MediaLimits, param: str = "messages", declared: str = ""
) -> Audio:
    """An audio clip from its bytes: the format sniffed, the size and the length (from the header) checked."""
    if not limits.projector:
        raise _no_projector(where, param, "audio")
    if not limits.audio:
        raise _no_encoder(where, param, "audio", "audio (it reads images)")
    if not data:
        raise bad_request(f"{where}: the audio clip is empty (0 bytes)", param, "invalid_audio")
    if len(data) > limits.max_audio_bytes:
        raise audio_too_big(where, len(data), limits.max_audio_bytes, param)
    header = sniff_audio(data, stop_after_s=limits.max_audio_seconds)
    if header is None:
        said = f" (declared {declared})" if declared else ""
        raise bad_request(
            f"{where}: not audio{said}: audio clips must be {', '.join(AUDIO_FORMATS)}", param, "invalid_audio"
        )
    if header.problem is not None:
        raise bad_request(
            f"{where}: the {header.format} clip cannot be decoded: {header.problem}", param, "invalid_audio"
        )
    if header.seconds > limits.max_audio_seconds:
        raise bad_request(
            f"{where}: the audio clip plays {'more than ' if header.at_least else ''}{header.seconds:,.0f} s; at most "
            f"{limits.max_audio_seconds:,.0f} s per clip",
            param,
            "audio_too_long",
        )
    return Audio(header.format, data, header.seconds)


def audio_too_big(where: str, size: int, cap: int, param: str) -> ApiError:
    return ApiError(
        413,
        f"{where}: the audio clip is {size:,} bytes; at most {cap:,} bytes per audio clip",
        param=param,
        code="audio_too_large",
    )


# ## Formats, from their headers


def sniff(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) from an image's header; None when it is none of :data:`FORMATS`
    (a header cut short reads as its format with size 0 × 0, refused by the caller)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(data) < 24 or data[12:16] != b"IHDR":
            return "PNG", 0, 0
        width, height = struct.unpack(">II", data[16:24])
        return "PNG", width, height
    if data[:6] in (b"GIF87a", b"GIF89a"):
        if len(data) < 10:
            return "GIF", 0, 0
        width, height = struct.unpack("<HH", data[6:10])
        return "GIF", width, height
    if data.startswith(b"\xff\xd8\xff"):
        return ("JPEG", *_jpeg_size(data))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WebP", *_webp_size(data))
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return 0, 0
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return 0, 0


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return 0, 0


# ## The rendered prompt, cut at the markers


def split_prompt(prompt: str, marker: str, n_images: int) -> list[str]:
    """The prompt's text around the markers: ``n_images + 1`` pieces (one marker per image or clip).
    A chat template that dropped or repeated a message's content would misplace its media: that is a
    400, never a guess."""
    pieces = prompt.split(marker)
    if len(pieces) != n_images + 1:
        raise bad_request(
            f"the chat template placed {len(pieces) - 1} of the request's {n_images} image(s) and audio clip(s): it "
            "renders message content in a way media cannot follow (put each image or clip in a user message)",
            "messages",
        )
    return pieces
