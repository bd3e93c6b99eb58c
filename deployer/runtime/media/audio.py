"""Audio clips in requests: what the bytes are and how long they play, read from their headers.

Pure (no llama.cpp). libmtmd's helper decodes WAV, MP3 and FLAC (miniaudio, in
``mtmd_helper_bitmap_init_from_buf``) into the encoder's mono float samples, and allocates the whole
decoded clip at once, sized from the header. A few kilobytes can claim hours: a WAV whose header says
1 Hz, a FLAC of digital silence (a few bytes per block of thousands of samples), a WAV whose data
chunk claims 4 GB. A failed allocation in C++ ends the server, so the length is read here first,
before anything decodes the clip, and capped (``images.audio_from_bytes``):

- WAV: the ``fmt `` chunk (sample rate, bytes per frame) and the ``data`` chunk's size, which must
  lie inside the file (a truncated WAV is refused: libmtmd would pad it with silence);
- FLAC: STREAMINFO's sample rate and total samples (a stream that does not say is refused);
- MP3: the MPEG frame headers, walked (each says its bitrate, sample rate and samples), as the
  decoder walks them, resynchronising after garbage; the walk stops once past the cap. Every step
  either counts a frame (8 ms at least) or searches for the next header in C, so the walk is
  bounded by the cap, not by the bytes.

    Audio                  one clip of a request: its bytes, format, length and hash (the cache key)
    AUDIO_FORMATS          what the helper decodes: WAV, MP3, FLAC
    sniff_audio(data)      the format and length from the header (:class:`AudioHeader`), or None
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

AUDIO_FORMATS = ("WAV", "MP3", "FLAC")
# WAV codecs miniaudio decodes whose length follows from the data chunk's size: PCM, IEEE float, A-law, µ-law
_WAV_CODECS = {1: "PCM", 3: "IEEE float", 6: "A-law", 7: "µ-law"}
_WAV_EXTENSIBLE = 0xFFFE  # WAVE_FORMAT_EXTENSIBLE: the codec is the sub-format GUID's first two bytes
_WAV_MAX_CHUNKS = 64  # before the data chunk (real files have a handful: fmt, fact, LIST, bext, JUNK)


@dataclass(frozen=True)
class Audio:
    """One audio clip of a request: its bytes (for libmtmd), its format and length, and its hash."""

    format: str  # one of AUDIO_FORMATS
    data: bytes
    seconds: float  # from the header (MP3: the frames walked)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class AudioHeader:
    """What a clip's header says: its format and length, or why it cannot be decoded."""

    format: str
    seconds: float = 0.0
    problem: str | None = None  # "truncated: ...": the clip is refused, naming it
    at_least: bool = False  # an MP3 walk stopped early: the clip plays longer than ``seconds``


def sniff_audio(data: bytes, *, stop_after_s: float = float("inf")) -> AudioHeader | None:
    """The format and length of a WAV, MP3 or FLAC clip from its header; None when the bytes are none
    of them (the same magic libmtmd's helper tests). An MP3's frames are walked only until
    ``stop_after_s`` (its length then reads as just over it)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return _wav(data)
    if data[:4] == b"fLaC":
        return _flac(data, 0)
    if data[:3] == b"ID3":
        start = _after_id3(data)
        if data[start : start + 4] == b"fLaC":  # a FLAC with an ID3 tag in front
            return _flac(data, start)
        return _mp3(data, start, stop_after_s)
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:  # an MPEG frame's sync word
        return _mp3(data, 0, stop_after_s)
    return None


def _wav(data: bytes) -> AudioHeader:
    """RIFF chunks after ``RIFF <size> WAVE``: each an id, a little-endian size and its body (padded to even)."""
    fmt: tuple[int, int, int, int] | None = None  # codec, channels, sample rate, bytes per frame
    i, chunks = 12, 0
    while i + 8 <= len(data):
        chunks += 1
        if chunks > _WAV_MAX_CHUNKS:
            return AudioHeader("WAV", problem=f"it has more than {_WAV_MAX_CHUNKS} chunks before its data chunk")
        kind, size = data[i : i + 4], int.from_bytes(data[i + 4 : i + 8], "little")
        body = i + 8
        if kind == b"fmt ":
            if size < 16 or body + 16 > len(data):
                return AudioHeader("WAV", problem="its fmt chunk is cut short")
            codec, channels, rate, _, block_align, _ = struct.unpack("<HHIIHH", data[body : body + 16])
            if codec == _WAV_EXTENSIBLE and size >= 26 and body + 26 <= len(data):
                codec = int.from_bytes(data[body + 24 : body + 26], "little")
            fmt = (codec, channels, rate, block_align)
        elif kind == b"data":
            return _wav_data(fmt, size, len(data) - body)
        i = body + size + (size & 1)
    return AudioHeader("WAV", problem="truncated: it has no data chunk" if fmt else "it has no fmt and data chunks")


def _wav_data(fmt: tuple[int, int, int, int] | None, size: int, held: int) -> AudioHeader:
    if fmt is None:
        return AudioHeader("WAV", problem="its data chunk comes before any fmt chunk")
    codec, channels, rate, block_align = fmt
    if codec not in _WAV_CODECS:
        return AudioHeader("WAV", problem=f"its codec {codec:#06x} is not one of {', '.join(_WAV_CODECS.values())}")
    if not channels or not rate or not block_align:
        return AudioHeader(
            "WAV", problem=f"its fmt chunk says {channels} channels, {rate} Hz, {block_align} bytes a frame"
        )
    if size > held:
        return AudioHeader("WAV", problem=f"truncated: its data chunk says {size:,} bytes, the file holds {held:,}")
    if size < block_align:
        return AudioHeader("WAV", problem="it holds no samples")
    return AudioHeader("WAV", size // block_align / rate)


def _flac(data: bytes, start: int) -> AudioHeader:
    """STREAMINFO, the first metadata block after ``fLaC``: 20 bits of sample rate, 3 of channels,
    5 of bits per sample, 36 of total samples, from its 11th byte on."""
    info = start + 8
    if len(data) < info + 34:
        return AudioHeader("FLAC", problem="truncated: its STREAMINFO block is cut short")
    if data[start + 4] & 0x7F != 0:
        return AudioHeader("FLAC", problem="its first metadata block is not STREAMINFO")
    bits = int.from_bytes(data[info + 10 : info + 18], "big")
    rate, total = bits >> 44, bits & ((1 << 36) - 1)
    if not rate:
        return AudioHeader("FLAC", problem="its STREAMINFO says 0 Hz")
    if not total:
        return AudioHeader("FLAC", problem="its STREAMINFO does not say how many samples it holds (a streamed FLAC)")
    return AudioHeader("FLAC", total / rate)


def _after_id3(data: bytes) -> int:
    """Where an ID3v2 tag ends: ``ID3``, version (2 bytes), flags, a 28-bit "syncsafe" size (+ a footer)."""
    if len(data) < 10:
        return len(data)
    size = 0
    for byte in data[6:10]:
        size = size << 7 | byte & 0x7F
    return 10 + size + (10 if data[5] & 0x10 else 0)


# MPEG audio frame headers (ISO 11172-3, 13818-3, and the unofficial MPEG 2.5): kbit/s by version and layer
_BITRATES = {
    (1, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (1, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (1, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (2, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (2, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (2, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_RATES = {1: (44100, 48000, 32000), 2: (22050, 24000, 16000), 25: (11025, 12000, 8000)}
_VERSIONS = {3: 1, 2: 2, 0: 25}  # the header's two version bits (1 is reserved)


def _byte_class(values: list[int]) -> bytes:
    return b"[" + b"".join(re.escape(bytes((v,))) for v in values) + b"]"


# a frame header's first three bytes with no reserved value in them: where the walk resynchronises,
# found by the regex engine (a run of 0xFF bytes is no header, and is skipped in one search)
_FRAME_START = re.compile(
    b"\xff"
    + _byte_class([b for b in range(0xE0, 0x100) if b >> 3 & 3 != 1 and b >> 1 & 3 != 0])
    + _byte_class([b for b in range(256) if b >> 4 not in (0, 15) and b >> 2 & 3 != 3]),
    re.DOTALL,
)


def _mp3_frame(data: bytes, i: int) -> tuple[int, int, int] | None:
    """(bytes, samples, sample rate) of the MPEG audio frame whose header starts at ``i``; None when none does."""
    if i + 4 > len(data) or data[i] != 0xFF or data[i + 1] & 0xE0 != 0xE0:
        return None
    b1, b2 = data[i + 1], data[i + 2]
    version = _VERSIONS.get(b1 >> 3 & 3)
    layer = 4 - (b1 >> 1 & 3)  # bits 11 = layer I, 10 = II, 01 = III
    bitrate_index, rate_index, padding = b2 >> 4, b2 >> 2 & 3, b2 >> 1 & 1
    if version is None or layer == 4 or bitrate_index in (0, 15) or rate_index == 3:
        return None  # reserved values; bitrate 0 is "free format", whose frames do not say their length
    bitrate = _BITRATES[(min(version, 2), layer)][bitrate_index] * 1000
    rate = _RATES[version][rate_index]
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4, 384, rate
    samples = 1152 if layer == 2 or version == 1 else 576
    return samples // 8 * bitrate // rate + padding, samples, rate


def _mp3(data: bytes, start: int, stop_after_s: float) -> AudioHeader:
    seconds, frames, i = 0.0, 0, start
    while i < len(data) and seconds <= stop_after_s:
        frame = _mp3_frame(data, i)
        if frame is None:  # not a frame here: resynchronise at the next header, as the decoder does
            found = _FRAME_START.search(data, i + 1)
            if found is None:
                break
            i = found.start()
            continue
        length, samples, rate = frame
        seconds += samples / rate
        frames += 1
        i += length
    if not frames:
        return AudioHeader("MP3", problem="it holds no MPEG audio frame")
    return AudioHeader("MP3", seconds, at_least=seconds > stop_after_s and 0 <= i < len(data))
