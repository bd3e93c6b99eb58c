"""Images without a model: the scheduler's image units, and images taken out of requests and checked."""

from __future__ import annotations

import base64
import struct

import pytest

from deployer.runtime.engine.scheduler import Scheduler, Sequence
from deployer.runtime.errors import ApiError
from deployer.runtime.media.images import (
    MESSAGES,
    RESPONSES,
    MediaLimits,
    image_from_bytes,
    sniff,
    split_prompt,
    take_request_images,
)
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
        ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], 400, "audio input is not supported"),
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
    body, marker, images = take_request_images(_responses(part), LIMITS, RESPONSES, marker="<m>", carried=1)
    assert marker == "<m>" and body["input"][0]["content"][1]["text"] == "<m>" and len(images) == 1
    with pytest.raises(ApiError, match=r"at most 2 images per request \(2 of them in the earlier turns\)"):
        take_request_images(_responses(part), LIMITS, RESPONSES, marker="<m>", carried=2)


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
