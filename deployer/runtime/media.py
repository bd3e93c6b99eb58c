"""Images in requests: found in the messages, decoded from ``data:`` URLs, checked against the limits.

Pure (no llama.cpp): runs on the event loop before anything reaches the model thread.

    MediaLimits                     images per request, bytes and pixels per image (RuntimeConfig's)
    take_images(messages, ...)      Chat Completions messages → the same messages with every image part
                                    replaced by a text part holding a per-request marker, and the images
    image_from_bytes(mime, data)    a (mime, bytes) part of any protocol → :class:`Image` (sniffed, checked)
    image_part(image, marker)       what :func:`take_images` puts where an image stood; for other protocols

The marker is random per request, so no text a user sends can pose as an image. After the chat
template has rendered the prompt, :func:`split_prompt` cuts it at the markers: the text between them
is tokenized as text, each marker becomes the image's chunk (libmtmd, deployer.runtime.vision).

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
from dataclasses import dataclass
from typing import Any

from deployer.runtime.protocol import ApiError, bad_request

FORMATS = ("PNG", "JPEG", "WebP", "GIF")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.IGNORECASE)
IMAGE_PART_TYPES = ("image_url", "input_image", "image")


@dataclass(frozen=True)
class MediaLimits:
    projector: bool  # the model has a vision projector
    max_images: int
    max_bytes: int
    max_pixels: int


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


def limits_of(config: Any) -> MediaLimits:
    """The limits of a RuntimeConfig."""
    return MediaLimits(
        projector=config.mmproj_path is not None,
        max_images=config.max_images,
        max_bytes=config.max_image_bytes,
        max_pixels=config.max_image_pixels,
    )


def new_marker() -> str:
    """A marker no user text contains: random per request."""
    return f"<__image_{secrets.token_hex(8)}__>"


def take_request_images(body: Any, limits: MediaLimits) -> tuple[Any, str, list[Image]]:
    """A Chat Completions body with its images taken out (see :func:`take_images`), its marker, the images."""
    marker = new_marker()
    if not isinstance(body, dict):
        return body, marker, []
    messages, images = take_images(body.get("messages"), limits, marker)
    return ({**body, "messages": messages} if images else body), marker, images


def take_images(messages: Any, limits: MediaLimits, marker: str) -> tuple[Any, list[Image]]:
    """The messages with each image part replaced by ``{"type": "text", "text": marker}``, and the images.

    Messages that are not lists of parts are left for the protocol's own checks (which name them).
    Raises :class:`ApiError` (4xx) for an image the model cannot take, naming the part.
    """
    if not isinstance(messages, list):
        return messages, []
    images: list[Image] = []
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "input_audio":
                raise bad_request(
                    f"messages[{i}].content[{j}]: audio input is not supported by this server yet", "messages"
                )
            if not (isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES):
                parts.append(part)
                continue
            where = f"messages[{i}].content[{j}]"
            if not limits.projector:
                raise bad_request(
                    f"{where}: this model has no vision projector: it reads text only "
                    '(a manifest names one with mmproj = "mmproj-...gguf")',
                    "messages",
                    "unsupported_content_type",
                )
            if len(images) >= limits.max_images:
                raise bad_request(
                    f"{where}: too many images: at most {limits.max_images} images per request", "messages",
                    "too_many_images",
                )  # fmt: skip
            images.append(_image_of(part, where, limits))
            parts.append(image_part(marker))
        out.append({**message, "content": parts})
    return out, images


def image_part(marker: str) -> dict[str, str]:
    """The text part that stands where an image stood, until the prompt is split at it."""
    return {"type": "text", "text": marker}


def _image_of(part: dict[str, Any], where: str, limits: MediaLimits) -> Image:
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise bad_request(f'{where}.image_url must be {{"url": "data:image/png;base64,..."}}', "messages")
    if url.startswith(("http://", "https://")):
        raise bad_request(
            f"{where}: remote image URLs are not fetched by this server (fetching arbitrary URLs from it would "
            "be a server-side request forgery risk): send the image inline as a data: URL "
            "(data:image/png;base64,...)",
            "messages",
            "remote_image_url",
        )
    match = _DATA_URL.match(url)
    if match is None:
        raise bad_request(f"{where}: the image URL must be a base64 data: URL (data:image/png;base64,...)", "messages")
    encoded = url[match.end() :]
    if len(encoded) * 3 // 4 > limits.max_bytes + 3:
        raise _too_big(where, len(encoded) * 3 // 4, limits.max_bytes)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the image's data: URL is not valid base64", "messages") from None
    return image_from_bytes(match["mime"] or "", data, where, limits)


def image_from_bytes(mime: str, data: bytes, where: str, limits: MediaLimits) -> Image:
    """An image from its bytes, whichever protocol carried them (Chat ``image_url``, Responses
    ``input_image``, Anthropic ``image``): the format sniffed, the size checked. ``mime`` is only
    used to name an unsupported declared type (SVG)."""
    if not limits.projector:
        raise bad_request(f"{where}: this model has no vision projector: it reads text only", "messages")
    if not data:
        raise bad_request(f"{where}: the image is empty (0 bytes)", "messages", "invalid_image")
    if len(data) > limits.max_bytes:
        raise _too_big(where, len(data), limits.max_bytes)
    sniffed = sniff(data)
    if sniffed is None:
        declared = f" ({mime})" if mime else ""
        kind = "an SVG drawing" if b"<svg" in data[:1024].lower() or "svg" in mime.lower() else "not an image"
        raise bad_request(
            f"{where}: {kind}{declared}: images must be {', '.join(FORMATS)}", "messages", "invalid_image"
        )
    fmt, width, height = sniffed
    if width <= 0 or height <= 0:
        raise bad_request(f"{where}: the {fmt} image says it is {width} × {height} pixels", "messages", "invalid_image")
    if width * height > limits.max_pixels:
        raise bad_request(
            f"{where}: the image is {width} × {height} = {width * height:,} pixels; at most {limits.max_pixels:,} "
            "pixels per image",
            "messages",
            "image_too_large",
        )
    return Image(fmt, data, width, height)


def _too_big(where: str, size: int, cap: int) -> ApiError:
    return ApiError(
        413,
        f"{where}: the image is {size:,} bytes; at most {cap:,} bytes per image",
        param="messages",
        code="image_too_large",
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
    """The prompt's text around the markers: ``n_images + 1`` pieces. A chat template that dropped
    or repeated a message's content would misplace its images: that is a 400, never a guess."""
    pieces = prompt.split(marker)
    if len(pieces) != n_images + 1:
        raise bad_request(
            f"the chat template placed {len(pieces) - 1} of the request's {n_images} image(s): it renders message "
            "content in a way images cannot follow (put each image in a user message)",
            "messages",
        )
    return pieces
