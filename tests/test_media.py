"""Images without a model: the scheduler's image units, and images taken out of requests and checked."""

from __future__ import annotations

import base64
import struct
from dataclasses import replace

import pytest

from deployer.runtime.engine.scheduler import Scheduler, Sequence
from deployer.runtime.errors import ApiError
from deployer.runtime.media.audio import sniff_audio
from deployer.runtime.media.images import (
    MESSAGES,
    RESPONSES,
    MediaLimits,
    image_from_bytes,
    sniff,
    split_prompt,
    take_request_images,
)
from tests.audio import flac_header, mp3_frames, wav, wav_claiming
from tests.images import data_url, png, png_header
from tests.test_scheduler import drain, run_step

IMG = -5  # a placeholder id: one image's positions


def _prompt(text_before: int, image: int, text_after: int) -> tuple[list[int], tuple[tuple[int, int], ...]]:
    tokens = list(range(1, text_before + 1)) + [IMG] * image + list(range(100, 100 + text_after))
    return tokens, ((text_before, text_before + image),)


# ## The scheduler: an image is one unit of work


def test_an_image_is_decoded_whole_and_alone_while_streams_keep_decoding():
    scheduler = Scheduler(parallel=2, n_ctx=512, n_batch=8)
    scheduler.add([Sequence("text", 0, [1, 2, 3], 20)])
    run_step(scheduler)  # the text request is generating now
    prompt, spans = _prompt(5, 20, 3)
    scheduler.add([Sequence("image", 0, prompt, 4, spans=spans)])
    scheduler.admit()
    steps = []
    for _ in range(4):
        steps.append(run_step(scheduler))
    # step 1: the 5 text tokens before the image, alone (no partial-chunk sharing), and the text stream's token
    assert ("image", 0, 5, False) in steps[0] and ("text", 0, 1, True) in steps[0]
    # step 2: the whole image (20 positions, more than n_batch) as one unit, the stream still decoding
    assert ("image", 0, 20, False) in steps[1] and ("text", 0, 1, True) in steps[1]
    # step 3: the text after it, then sampling
    assert ("image", 0, 3, True) in steps[2]
    drain(scheduler)


def test_an_image_waits_for_a_step_whose_prompt_budget_is_whole():
    scheduler = Scheduler(parallel=2, n_ctx=512, n_batch=8)
    scheduler.add([Sequence("a", 0, list(range(1, 6)), 2)])
    prompt, spans = _prompt(0, 12, 2)
    scheduler.add([Sequence("b", 0, prompt, 2, spans=spans)])
    first = run_step(scheduler)
    assert ("a", 0, 5, True) in first and all(owner != "b" for owner, *_ in first)
    assert ("b", 0, 12, False) in run_step(scheduler)


def test_a_second_turn_reuses_the_image_and_text_before_it():
    scheduler = Scheduler(parallel=1, n_ctx=512, n_batch=8)
    prompt, spans = _prompt(5, 20, 11)
    scheduler.add([Sequence("turn1", 0, prompt, 1, spans=spans)])
    drain(scheduler)
    # unit edges: 5 (image start), 25 (its end), 32 (a multiple of n_batch); 36 was cut by the prompt's end
    assert scheduler.slots[0].edges == [5, 25, 32]
    second = [*prompt, 200, 201, 202]
    scheduler.add([Sequence("turn2", 0, second, 1, spans=spans)])
    [admission] = scheduler.admit()
    assert admission.keep == 32
    other_image = [1, 2, 3, 4, 5] + [IMG - 1] * 20 + prompt[25:]
    assert scheduler.reusable(scheduler.slots[0], other_image, spans) == 5  # up to where the images differ
    assert scheduler.reusable(scheduler.slots[0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == 0  # text only: whole chunks


# ## Requests: images taken out, checked, named

LIMITS = MediaLimits(projector=True, max_images=2, max_bytes=4096, max_pixels=1000 * 1000)


def _body(*parts):
    return {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, *parts]}]}


def _image(data: bytes, mime: str = "image/png"):
    return {"type": "image_url", "image_url": {"url": data_url(data, mime)}}


def test_images_become_markers_where_they_stood():
    body, marker, images = take_request_images(_body(_image(png(8, 6)), {"type": "text", "text": "and"}), LIMITS)
    content = body["messages"][0]["content"]
    assert [p["text"] for p in content] == ["see", marker, "and"]
    assert [(i.format, i.width, i.height) for i in images] == [("PNG", 8, 6)]
    assert split_prompt(f"<u>see\n{marker}\nand", marker, 1) == ["<u>see\n", "\nand"]
    with pytest.raises(ApiError, match="placed 0 of the request's 1 image"):
        split_prompt("<u>see", marker, 1)


def test_markers_are_random_per_request():
    assert take_request_images(_body(), LIMITS)[1] != take_request_images(_body(), LIMITS)[1]


@pytest.mark.parametrize(
    ("part", "status", "message"),
    [
        (_image(png(8, 8)), 400, "this model has no vision projector"),
    ],
)
def test_a_text_only_model_refuses_images(part, status, message):
    with pytest.raises(ApiError, match=message) as caught:
        take_request_images(_body(part), MediaLimits(False, 2, 4096, 10**6))
    assert caught.value.status == status


@pytest.mark.parametrize(
    ("parts", "status", "message"),
    [
        ([_image(png(4, 4))] * 3, 400, r"messages\[0\].content\[3\]: too many images: at most 2 images per request"),
        ([_image(png(60, 60))], 413, "at most 4,096 bytes per image"),
        ([_image(png_header(2000, 1000))], 400, "2000 × 1000 = 2,000,000 pixels; at most 1,000,000"),
        ([_image(b"")], 400, "the image is empty"),
        ([_image(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")], 400, "an SVG drawing"),
        ([_image(b"\x89PNG\r\n\x1a\n")], 400, "the PNG image says it is 0 × 0 pixels"),
        ([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], 400, "remote image URLs"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], 400, "not valid base64"),
        ([{"type": "image_url", "image_url": "nope"}], 400, "must be a base64 data: URL"),
        (
            [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
            400,
            "projector has no audio encoder",
        ),
    ],
)
def test_bad_images_are_4xx_naming_the_part_and_the_limit(parts, status, message):
    with pytest.raises(ApiError, match=message) as caught:
        take_request_images(_body(*parts), LIMITS)
    assert caught.value.status == status and caught.value.param == "messages"


def _jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + b"\1\1\0\0\1\0\1\0\0"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\1\x11\0"
    return b"\xff\xd8" + app0 + sof + b"\xff\xd9"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (png(7, 3), ("PNG", 7, 3)),
        (b"GIF89a" + struct.pack("<HH", 320, 200) + b"\0" * 8, ("GIF", 320, 200)),
        (_jpeg(640, 480), ("JPEG", 640, 480)),
        (
            b"RIFF\0\0\0\0WEBPVP8X" + b"\0" * 8 + (99).to_bytes(3, "little") + (49).to_bytes(3, "little"),
            ("WebP", 100, 50),
        ),
        (b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0\x2f" + ((9) | (4 << 14)).to_bytes(4, "little"), ("WebP", 10, 5)),
        (b"BM\0\0", None),
    ],
)
def test_formats_and_sizes_are_read_from_headers(data, expected):
    assert sniff(data) == expected


def test_other_protocols_hand_in_mime_and_bytes():
    image = image_from_bytes("image/png", png(5, 5), "input[0].content[1]", LIMITS)
    assert (image.format, image.width) == ("PNG", 5) and len(image.digest) == 64


# ## The other protocols: Responses input_image parts, Anthropic image blocks


def _responses(*parts):
    return {"input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "see"}, *parts]}]}


def _anthropic(*blocks):
    return {"messages": [{"role": "user", "content": [*blocks, {"type": "text", "text": "see"}]}]}


def _block(data: bytes, mime: str = "image/png"):
    return {"type": "image", "source": {"type": "base64", "media_type": mime, "data": base64.b64encode(data).decode()}}


def test_responses_and_anthropic_images_become_markers_in_their_own_part_types():
    body, marker, images = take_request_images(_responses({"type": "input_image", "image_url": data_url(png(3, 2))}),
                                               LIMITS, RESPONSES)  # fmt: skip
    assert body["input"][0]["content"][1] == {"type": "input_text", "text": marker}
    assert [(i.format, i.width, i.height) for i in images] == [("PNG", 3, 2)]
    body, marker, images = take_request_images(_anthropic(_block(png(4, 5))), LIMITS, MESSAGES)
    assert body["messages"][0]["content"][0] == {"type": "text", "text": marker}
    assert [(i.width, i.height) for i in images] == [(4, 5)]
    text_only = _responses()
    assert take_request_images(text_only, LIMITS, RESPONSES)[0] is text_only
    assert take_request_images({"input": "just text"}, LIMITS, RESPONSES)[2] == []


def test_a_continued_conversation_keeps_its_marker_and_counts_its_images():
    part = {"type": "input_image", "image_url": data_url(png(3, 3))}
    earlier = image_from_bytes("image/png", png(2, 2), "x", LIMITS)
    body, marker, images = take_request_images(_responses(part), LIMITS, RESPONSES, marker="<m>", carried=(earlier,))
    assert marker == "<m>" and body["input"][0]["content"][1]["text"] == "<m>" and len(images) == 1
    with pytest.raises(ApiError, match=r"at most 2 images per request \(2 of them in the earlier turns\)"):
        take_request_images(_responses(part), LIMITS, RESPONSES, marker="<m>", carried=(earlier, earlier))


@pytest.mark.parametrize(
    ("shape", "body", "status", "message"),
    [
        (RESPONSES, _responses({"type": "input_image", "file_id": "file-1"}), 400, r"input\[0\].content\[1\].file_id"),
        (RESPONSES, _responses({"type": "input_image", "image_url": {"url": "x"}}), 400, "must be a data: URL string"),
        (RESPONSES, _responses({"type": "input_image", "image_url": "https://a/b.png"}), 400, "remote image URLs"),
        (RESPONSES, _responses({"type": "input_image", "image_url": data_url(png(60, 60))}), 413, "at most 4,096"),
        (MESSAGES, _anthropic({"type": "image", "source": {"type": "url", "url": "https://a/b.png"}}), 400,
         r"messages\[0\].content\[0\].source: remote image URLs"),
        (MESSAGES, _anthropic({"type": "image", "source": {"type": "file", "file_id": "f"}}), 400, "'file'"),
        (MESSAGES, _anthropic({"type": "image", "source": "nope"}), 400, "source must be"),
        (MESSAGES, _anthropic({"type": "image", "source": {"type": "base64", "data": "@@"}}), 400, "not valid base64"),
        (MESSAGES, _anthropic(_block(b"<svg/>", "image/svg+xml")), 400, "an SVG drawing"),
        (MESSAGES, _anthropic(_block(png(60, 60))), 413, "at most 4,096 bytes"),
    ],
)  # fmt: skip
def test_other_protocols_bad_images_name_the_part_and_their_field(shape, body, status, message):
    with pytest.raises(ApiError, match=message) as caught:
        take_request_images(body, LIMITS, shape)
    assert caught.value.status == status and caught.value.param == shape.field


def test_other_protocols_to_a_text_only_model():
    for shape, body in (
        (RESPONSES, _responses({"type": "input_image", "file_id": "f"})),
        (MESSAGES, _anthropic(_block(b""))),
    ):
        with pytest.raises(ApiError, match="this model has no vision projector") as caught:
            take_request_images(body, MediaLimits(False, 2, 4096, 10**6), shape)
        assert caught.value.status == 400 and caught.value.param == shape.field


def test_the_store_keeps_a_conversations_images_and_marker():
    from deployer.runtime.protocols.store import NO_MEDIA, ResponseStore

    image = image_from_bytes("image/png", png(5, 5), "x", LIMITS)
    store = ResponseStore(max_items=1)
    store.put({"id": "resp_1"}, [{"role": "user", "content": "<m>"}], media=("<m>", (image,)))
    assert store.media("resp_1") == ("<m>", (image,)) and store.bytes > len(image.data)
    assert store.media("resp_unknown") == NO_MEDIA and store.media(["not", "an", "id"]) == NO_MEDIA
    store.put({"id": "resp_2"}, [])  # resp_1 is dropped (max_items=1), and its images with it
    assert store.media("resp_1") == NO_MEDIA and store.media("resp_2") == NO_MEDIA


def test_images_in_an_anthropic_tool_result_are_taken_too():
    result = {
        "type": "tool_result",
        "tool_use_id": "t1",
        "content": [{"type": "text", "text": "shot:"}, _block(png(6, 4))],
    }
    body = {"messages": [{"role": "user", "content": [result]}]}
    taken, marker, images = take_request_images(body, LIMITS, MESSAGES)
    assert taken["messages"][0]["content"][0]["content"][1] == {"type": "text", "text": marker}
    assert [(i.width, i.height) for i in images] == [(6, 4)] and body["messages"][0]["content"][0] is result
    result["content"][1] = _block(b"")
    with pytest.raises(ApiError, match=r"messages\[0\].content\[0\].content\[1\]: the image is empty"):
        take_request_images(body, LIMITS, MESSAGES)


def test_images_in_a_responses_function_call_output_are_taken_too():
    output = [{"type": "input_text", "text": "shot:"}, {"type": "input_image", "image_url": data_url(png(7, 3))}]
    body = {"input": [{"type": "function_call_output", "call_id": "c1", "output": output}]}
    taken, marker, images = take_request_images(body, LIMITS, RESPONSES)
    assert taken["input"][0]["output"][1] == {"type": "input_text", "text": marker} and len(images) == 1
    output[1] = {"type": "input_image", "file_id": "file-1"}
    with pytest.raises(ApiError, match=r"input\[0\].output\[1\].file_id"):
        take_request_images(body, LIMITS, RESPONSES)


# ## Audio: input_audio parts (Chat Completions and Responses), checked before libmtmd sees them

AUDIO_LIMITS = MediaLimits(
    projector=True, max_images=2, max_bytes=4096, max_pixels=10**6, audio=True, max_clips=2,
    max_audio_bytes=64 * 1024, max_audio_seconds=10,
)  # fmt: skip


def _clip(data: bytes, fmt: str | None = "wav") -> dict:
    body = {"data": base64.b64encode(data).decode()} | ({"format": fmt} if fmt else {})
    return {"type": "input_audio", "input_audio": body}


def test_audio_parts_become_markers_in_order_with_images():
    parts = (_clip(wav(0.5)), {"type": "text", "text": "and"}, _image(png(4, 4)), _clip(mp3_frames(20), "mp3"))
    body, marker, media = take_request_images(_body(*parts), AUDIO_LIMITS)
    assert [p["text"] for p in body["messages"][0]["content"]] == ["see", marker, "and", marker, marker]
    assert [type(item).__name__ for item in media] == ["Audio", "Image", "Audio"]
    assert (media[0].format, media[0].seconds) == ("WAV", 0.5) and media[2].format == "MP3"
    assert media[0].digest != media[2].digest and len(media[0].digest) == 64
    # Responses' input_audio part has the same shape (openai.types.responses.ResponseInputAudio)
    taken, marker, media = take_request_images(_responses(_clip(wav(0.25))), AUDIO_LIMITS, RESPONSES)
    assert taken["input"][0]["content"][1] == {"type": "input_text", "text": marker}
    assert [(m.format, m.seconds) for m in media] == [("WAV", 0.25)]


@pytest.mark.parametrize(
    ("limits", "part", "message"),
    [
        (MediaLimits(False, 2, 4096, 10**6), _clip(wav(0.1)), "this model has no audio projector: it reads text only"),
        (LIMITS, _clip(wav(0.1)), "this model's projector has no audio encoder: it takes no audio"),
        (replace(AUDIO_LIMITS, vision=False), _image(png(4, 4)), "projector has no vision encoder: it takes no images"),
    ],
)
def test_audio_to_a_model_without_an_audio_encoder_is_a_400(limits, part, message):
    with pytest.raises(ApiError, match=message) as caught:
        take_request_images(_body(part), limits)
    assert caught.value.status == 400 and caught.value.param == "messages"
    assert caught.value.message.startswith("messages[0].content[1]: ")


def test_the_messages_api_has_no_audio_blocks():
    with pytest.raises(ApiError, match=r"messages\[0\].content\[0\]: the Messages API has no audio blocks"):
        take_request_images(_anthropic(_clip(wav(0.1))), AUDIO_LIMITS, MESSAGES)


BAD_CLIPS = {
    "zero bytes": (_clip(b""), 400, "the audio clip is empty (0 bytes)"),
    "wrong magic": (_clip(b"OggS" + bytes(60)), 400, "not audio (declared wav): audio clips must be WAV, MP3, FLAC"),
    "truncated WAV": (_clip(wav(1.0)[:9000]), 400, "the WAV clip cannot be decoded: truncated: its data chunk says 32,000"),
    "WAV header cut": (_clip(wav(1.0)[:30]), 400, "its fmt chunk is cut short"),
    "WAV without samples": (_clip(wav(0)), 400, "it holds no samples"),
    "WAV claiming 1 Hz": (_clip(wav_claiming(1, 1000, held=1000)), 400, "plays 500 s; at most 10 s per clip"),
    "WAV claiming hours": (_clip(wav_claiming(16000, 16000 * 2 * 7200, held=16000 * 2 * 7200)), 413, "at most 65,536 bytes"),
    "long WAV": (_clip(wav_claiming(100, 100 * 2 * 120, held=100 * 2 * 120)), 400, "plays 120 s; at most 10 s per clip"),
    "FLAC of hours": (_clip(flac_header(8000, 8000 * 3600 * 5), "flac"), 400, "plays 18,000 s; at most 10 s"),
    "streamed FLAC": (_clip(flac_header(16000, 0), "flac"), 400, "does not say how many samples"),
    "MP3 without frames": (_clip(b"ID3\3\0\0\0\0\0\0" + bytes(40), "mp3"), 400, "it holds no MPEG audio frame"),
    "long MP3": (_clip(mp3_frames(500, kbps=32), "mp3"), 400, "plays more than 10 s; at most 10 s per clip"),
    "over the byte cap": (_clip(wav(3.0)), 413, "bytes; at most 65,536 bytes per audio clip"),
    "declared ogg": (_clip(wav(0.1), "ogg"), 400, "input_audio.format 'ogg' is not one this server reads"),
    "not base64": ({"type": "input_audio", "input_audio": {"data": "@@@@", "format": "wav"}}, 400, "not valid base64"),
    "a data URL": ({"type": "input_audio", "input_audio": {"data": "data:audio/wav;base64,UklGRg=="}}, 400, "not a data: URL"),
    "no object": ({"type": "input_audio", "input_audio": "UklGRg=="}, 400, "input_audio must be an object"),
    "no data": ({"type": "input_audio", "input_audio": {"format": "wav"}}, 400, "input_audio.data must be"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CLIPS))
def test_bad_audio_is_4xx_naming_the_part_and_the_limit(case):
    part, status, message = BAD_CLIPS[case]
    with pytest.raises(ApiError) as caught:
        take_request_images(_body(part), AUDIO_LIMITS)
    assert caught.value.status == status and caught.value.param == "messages"
    assert message in caught.value.message and caught.value.message.startswith("messages[0].content[1]")


def test_clips_per_request_are_counted_apart_from_images_and_across_turns():
    clip, image = _clip(wav(0.1)), _image(png(3, 3))
    _, _, media = take_request_images(_body(clip, image, clip, image), AUDIO_LIMITS)  # 2 of each: both at their cap
    assert [type(item).__name__ for item in media] == ["Audio", "Image", "Audio", "Image"]
    with pytest.raises(
        ApiError, match=r"content\[4\]: too many audio clips: at most 2 audio clips per request"
    ) as caught:
        take_request_images(_body(clip, image, clip, clip), AUDIO_LIMITS)
    assert caught.value.code == "too_many_audio_clips"
    with pytest.raises(ApiError, match=r"at most 2 audio clips per request \(1 of them in the earlier turns\)"):
        take_request_images(_responses(clip, clip), AUDIO_LIMITS, RESPONSES, marker="<m>", carried=(media[0],))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (wav(0.5), ("WAV", 0.5, None)),
        (wav(0.25, rate=44100, channels=2), ("WAV", 0.25, None)),
        (wav(0.5, rate=8000, width=1), ("WAV", 0.5, None)),
        (mp3_frames(100), ("MP3", 100 * 1152 / 44100, None)),
        (b"ID3\4\0\0\0\0\0\x05tags!" + mp3_frames(10), ("MP3", 10 * 1152 / 44100, None)),
        (mp3_frames(3) + b"\xff\0garbage" + mp3_frames(2), ("MP3", 5 * 1152 / 44100, None)),  # resynchronised
        (flac_header(48000, 48000 * 3), ("FLAC", 3.0, None)),
        (flac_header(16000, 0)[:20], ("FLAC", 0.0, "truncated: its STREAMINFO block is cut short")),
        (wav_claiming(16000, 0xFFFFFFFF), ("WAV", 0.0, "truncated: its data chunk says 4,294,967,295 bytes, the file holds 64")),
        (b"RIFF\0\0\0\0WAVEdata\4\0\0\0abcd", ("WAV", 0.0, "its data chunk comes before any fmt chunk")),
        (png(4, 4), None),
        (b"OggS", None),
    ],
)  # fmt: skip
def test_audio_formats_and_lengths_are_read_from_headers(data, expected):
    header = sniff_audio(data)
    got = None if header is None else (header.format, pytest.approx(header.seconds), header.problem)
    assert got == (None if expected is None else (expected[0], pytest.approx(expected[1]), expected[2]))


def test_an_mp3_walk_stops_once_past_the_cap():
    header = sniff_audio(mp3_frames(5000, kbps=32), stop_after_s=1.0)
    assert header is not None and 1.0 < header.seconds < 1.1 and header.at_least  # no further than needed
    whole = sniff_audio(mp3_frames(30, kbps=32), stop_after_s=1.0)
    assert whole is not None and whole.seconds == pytest.approx(30 * 1152 / 44100) and not whole.at_least


def test_the_store_counts_audio_clips_in_its_bytes():
    from deployer.runtime.protocols.store import ResponseStore

    _, _, [clip] = take_request_images(_body(_clip(wav(0.2))), AUDIO_LIMITS)
    store = ResponseStore()
    store.put({"id": "resp_a"}, [], media=("<m>", (clip,)))
    assert store.media("resp_a") == ("<m>", (clip,)) and store.bytes > len(clip.data)


def test_limits_of_read_the_loaded_projector():
    from types import SimpleNamespace

    from deployer.runtime import RuntimeConfig
    from deployer.runtime.media.images import limits_of

    config = RuntimeConfig(model_name="m", model_path="m.gguf", n_ctx=64, mmproj_path="mmproj.gguf",
                           max_audio_clips=3, max_audio_bytes=1000, max_audio_seconds=5.0)  # fmt: skip
    audio_only = limits_of(config, SimpleNamespace(vision=False, audio=True))
    assert (audio_only.vision, audio_only.audio, audio_only.max_clips) == (False, True, 3)
    assert (audio_only.max_audio_bytes, audio_only.max_audio_seconds) == (1000, 5.0)
    assert limits_of(config, SimpleNamespace(vision=True, audio=False)).audio is False
    text_only = limits_of(replace(config, mmproj_path=None), None)
    assert (text_only.projector, text_only.vision, text_only.audio) == (False, False, False)
