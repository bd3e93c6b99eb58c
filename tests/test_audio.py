"""Audio in: the tiny Whisper-style projector (tests/ggufgen.py, qwen2a) through real libmtmd, and the API end to end."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from deployer.runtime import RuntimeConfig
from deployer.runtime.media.audio import Audio, sniff_audio
from tests import ggufgen
from tests.audio import mp3_frames, wav, wav_claiming

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# qwen2a: libmtmd pads every clip with 30 s of silence and encodes 3,000 mel frames (30 s) at a time,
# 1,500 positions after the stride-2 convolution, 750 after the average pool: a clip of up to 30 s is 750 tokens
CLIP_TOKENS = 750


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    model = ggufgen.write_gguf(folder / "tiny-qwen2.gguf", ggufgen.TINY_QWEN2, chat_template=CHATML)
    projector = ggufgen.write_audio_projector(folder / "mmproj-tiny-qwen2-audio.gguf", ggufgen.TINY_QWEN2_AUDIO_MMPROJ)
    return model, projector


def _clip(data: bytes) -> Audio:
    header = sniff_audio(data)
    assert header is not None and header.problem is None
    return Audio(header.format, data, header.seconds)


@pytest.mark.model
def test_libmtmd_loads_the_tiny_audio_projector_and_encodes_a_clip(audio_files):
    from deployer.runtime.errors import ApiError
    from deployer.runtime.llama import Model

    model_file, projector_file = audio_files
    config = RuntimeConfig(model_name="t", model_path=str(model_file), n_ctx=2048, parallel=2, n_threads=2,
                           mmproj_path=str(projector_file))  # fmt: skip
    model = Model(config)
    try:
        projector = model.projector
        assert projector.audio and not projector.vision and not projector.mrope
        pieces = ["<|im_start|>user\nListen: ", " and answer"]
        prompt = projector.tokenize(pieces, [_clip(wav(1.0))], add_bos=True)
        try:
            assert prompt.media_tokens == CLIP_TOKENS
            [(start, end)] = prompt.spans
            assert end - start == CLIP_TOKENS and set(prompt.tokens[start:end]) == {prompt.tokens[start]}
            assert prompt.tokens[start] < 0  # a placeholder, never a vocabulary id
            assert all(t >= 0 for t in prompt.tokens[:start] + prompt.tokens[end:])
            model.decode([(1, prompt.tokens[:start], 0, False)])
            model.evaluate_image(prompt.chunk_at[start], start, 1, False)
            rows = model.decode([(1, prompt.tokens[end:], end, True)])
            assert np.isfinite(model.logits(rows[0])).all()
        finally:
            prompt.free()
        # a clip longer than 30 s is two chunks, two runs: each its own placeholder, both of the one clip
        long = projector.tokenize(pieces, [_clip(wav(31.0, rate=8000))], add_bos=True)
        try:
            assert long.media_tokens == 2 * CLIP_TOKENS and len(long.spans) == 2
            (a, b), (c, _) = long.spans
            assert b == c and long.tokens[a] != long.tokens[c]
        finally:
            long.free()
        # one sample passes the header check; libmtmd would assert (and end the process) on it
        with pytest.raises(ApiError, match="audio clip 1 of the request holds no samples"):
            projector.tokenize(pieces, [_clip(wav(1 / 16000))], add_bos=True)
    finally:
        model.close()


# ## The API end to end: the openai client, a real server, real libmtmd


@pytest.fixture(scope="module")
def audio_server(audio_files, tmp_path_factory):
    from tests.serving import launch

    model_file, projector_file = audio_files
    config = RuntimeConfig(
        model_name="tiny-audio", model_path=str(model_file), n_ctx=2048, n_batch=256, n_ubatch=256, parallel=2,
        concurrency=4, n_threads=2, mmproj_path=str(projector_file), max_audio_clips=2, max_audio_bytes=96 * 1024,
        max_audio_seconds=20.0, max_body_bytes=1024 * 1024,
    )  # fmt: skip
    server = launch(config, tmp_path_factory.mktemp("audio-server"))
    yield server
    server.stop()


def _part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def _ask(clip: bytes | None, text: str = "What is this sound?", fmt: str = "wav") -> list[dict]:
    content: list[dict] = [{"type": "text", "text": text}]
    if clip is not None:
        content.append(_part(clip, fmt))
    return [{"role": "user", "content": content}]


@pytest.mark.model
def test_an_audio_part_counts_its_tokens_in_the_prompt(audio_server):
    client = audio_server.client()
    text_only = client.chat.completions.create(model="tiny-audio", messages=_ask(None), max_tokens=3)
    with_clip = client.chat.completions.create(model="tiny-audio", messages=_ask(wav(1.0)), max_tokens=3)
    grown = with_clip.usage.prompt_tokens - text_only.usage.prompt_tokens
    # the clip's tokens, Qwen2-Audio's <|audio_bos|>/<|audio_eos|> text around them (spelled out in
    # pieces of a few bytes by the tiny vocabulary, which has no such tokens), and the "\n" joining parts
    assert CLIP_TOKENS + 2 < grown <= CLIP_TOKENS + 64, grown
    assert with_clip.usage.completion_tokens == 3 and with_clip.choices[0].finish_reason == "length"
    # an MP3 (silent frames, decoded by miniaudio) takes the same path
    mp3 = client.chat.completions.create(model="tiny-audio", messages=_ask(mp3_frames(40), fmt="mp3"), max_tokens=1)
    assert mp3.usage.prompt_tokens == with_clip.usage.prompt_tokens


@pytest.mark.model
def test_streaming_with_an_audio_clip(audio_server):
    stream = audio_server.client().chat.completions.create(
        model="tiny-audio", messages=_ask(wav(0.5, freq=660.0)), max_tokens=4, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens > CLIP_TOKENS
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)


@pytest.mark.model
def test_a_second_turn_about_the_same_clip_reuses_its_cache(audio_server):
    client = audio_server.client()
    clip, words = wav(0.75, freq=523.0), "Listen to this recording of a doorbell ringing twice in a quiet hallway."
    first_turn = _ask(clip, words)
    first = client.chat.completions.create(model="tiny-audio", messages=first_turn, max_tokens=2, temperature=0)
    second_turn = [*first_turn, {"role": "assistant", "content": first.choices[0].message.content or "ok"},
                   {"role": "user", "content": "How many times?"}]  # fmt: skip
    second = client.chat.completions.create(model="tiny-audio", messages=second_turn, max_tokens=2, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the first turn's text and its clip (750 positions, one unit) came from the slot's cache: all of it
    # up to the clip's end (after it, <|audio_eos|>, spelled out, and the turn's end: a partial chunk)
    assert cached >= first.usage.prompt_tokens - 64 and cached > CLIP_TOKENS, (cached, first.usage)
    other = client.chat.completions.create(
        model="tiny-audio", messages=_ask(wav(0.75, freq=524.0), words), max_tokens=1, temperature=0
    )
    # another clip at the same place: its cache ends where the clip starts
    assert other.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - CLIP_TOKENS


@pytest.mark.model
def test_responses_input_audio_through_the_openai_sdk(audio_server):
    client = audio_server.client()

    def turn(clip: bytes | None) -> list[dict]:
        content: list[dict] = [{"type": "input_text", "text": "What is this sound?"}]
        return [{"role": "user", "content": content + ([_part(clip)] if clip else [])}]

    text_only = client.responses.create(model="tiny-audio", input=turn(None), max_output_tokens=2)
    first = client.responses.create(model="tiny-audio", input=turn(wav(0.5, freq=330.0)), max_output_tokens=2)
    assert CLIP_TOKENS + 2 < first.usage.input_tokens - text_only.usage.input_tokens <= CLIP_TOKENS + 64
    # the next turn carries the clip of the stored one: its prompt holds it again, read from the slot's cache
    second = client.responses.create(
        model="tiny-audio", previous_response_id=first.id, input="And how loud?", max_output_tokens=2
    )
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > CLIP_TOKENS, second.usage


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_AUDIO = {
    "truncated WAV": (_part(wav(1.0)[:9000]), 400, "truncated: its data chunk says 32,000 bytes"),
    "wrong magic": (_part(b"OggS" + bytes(200)), 400, "not audio (declared wav)"),
    "zero bytes": (_part(b""), 400, "the audio clip is empty (0 bytes)"),
    "huge": (_part(wav(4.0)), 413, "at most 98,304 bytes per audio clip"),
    "hours claimed": (_part(wav_claiming(16000, 16000 * 2 * 3600)), 400, "truncated"),
    "one hertz": (_part(wav_claiming(1, 64)), 400, "plays 32 s; at most 20 s per clip"),
    "one sample": (_part(wav(1 / 16000)), 400, "audio clip 1 of the request holds no samples"),
    "undecodable MP3": (_part(b"ID3\3\0\0\0\0\0\0" + bytes(500), "mp3"), 400, "it holds no MPEG audio frame"),
    "too many clips": (None, 400, "too many audio clips: at most 2 audio clips per request"),
    "an image to an audio model": (
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(b"\x89PNG\r\n\x1a\n")}},
        400,
        "this model's projector has no vision encoder: it takes no images",
    ),
}


@pytest.mark.model
@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_bad_audio_is_4xx_and_the_server_stays_up(audio_server, case):
    part, status, message = BAD_AUDIO[case]
    parts = [part] if part is not None else [_part(wav(0.1))] * 3
    body = {"model": "tiny-audio", "max_tokens": 1, "messages": [{"role": "user", "content": parts}]}
    with audio_server.http() as http:
        answer = http.post("/v1/chat/completions", json=body)
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert message in error["message"] and error["param"] == "messages", error
        assert http.get("/health").status_code == 200
    ok = audio_server.client().chat.completions.create(model="tiny-audio", messages=_ask(None), max_tokens=1)
    assert ok.usage.completion_tokens == 1  # the model thread too


@pytest.mark.model
def test_the_messages_api_refuses_audio_by_name(audio_server):
    import anthropic

    claude = anthropic.Anthropic(base_url=audio_server.url, api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(anthropic.BadRequestError, match="the Messages API has no audio blocks") as refused:
        claude.messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": [_part(wav(0.1))]}])
    assert refused.value.body["error"]["type"] == "invalid_request_error"
