"""Audio clips for the audio tests, written with the standard library (no audio package needed).

wav(seconds, rate, ...)      a valid PCM WAV of a sine tone (the ``wave`` module)
mp3_frames(n, ...)           MPEG-1 Layer III frames: real headers, silent (zero) bodies
flac_header(rate, samples)   only ``fLaC`` and a STREAMINFO block claiming ``samples`` at ``rate`` Hz
"""

from __future__ import annotations

import io
import math
import struct
import wave


def wav(seconds: float = 1.0, rate: int = 16000, freq: float = 440.0, channels: int = 1, width: int = 2) -> bytes:
    """A PCM WAV of a ``freq`` Hz sine tone, ``seconds`` long, at ``rate`` Hz."""
    n = int(seconds * rate)
    peak = (1 << (8 * width - 1)) - 1
    frames = bytearray()
    for i in range(n):
        value = int(0.4 * peak * math.sin(2 * math.pi * freq * i / rate))
        sample = (value + 128).to_bytes(1, "little") if width == 1 else value.to_bytes(width, "little", signed=True)
        frames += sample * channels
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    return out.getvalue()


def wav_claiming(rate: int, data_bytes: int, held: int = 64) -> bytes:
    """A WAV header (PCM, mono, 16 bits) at ``rate`` Hz whose data chunk claims ``data_bytes``, with ``held`` bytes."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_bytes)
    return b"RIFF" + struct.pack("<I", len(body) + held) + body + b"\0" * held


def mp3_frames(n: int, kbps: int = 128) -> bytes:
    """``n`` MPEG-1 Layer III frames at 44.1 kHz (1,152 samples each), headers real, bodies zero."""
    index = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320).index(kbps)
    header = bytes((0xFF, 0xFB, index << 4, 0xC4))  # MPEG-1, layer III, no CRC; 44.1 kHz, no padding; mono
    length = 144 * kbps * 1000 // 44100
    return (header + b"\0" * (length - 4)) * n


def flac_header(rate: int, samples: int, channels: int = 1, bits: int = 16) -> bytes:
    """``fLaC`` and a last-block STREAMINFO saying ``samples`` at ``rate`` Hz (no audio frames)."""
    packed = rate << 44 | (channels - 1) << 41 | (bits - 1) << 36 | samples
    info = struct.pack(">HH", 4096, 4096) + b"\0" * 6 + packed.to_bytes(8, "big") + b"\0" * 16
    return b"fLaC" + bytes((0x80,)) + len(info).to_bytes(3, "big") + info
