"""Images in: the tiny projector (tests/ggufgen.py) through real libmtmd, and the API end to end."""

from __future__ import annotations

import numpy as np
import pytest

from deployer.runtime import RuntimeConfig
from deployer.runtime.media.images import Image, sniff
from tests import ggufgen
from tests.images import png

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n{{ message['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
IMAGE_TOKENS = 16  # TINY_GEMMA3_MMPROJ: 112 px in 14 px patches, 8 × 8, pooled 2 × 2


@pytest.fixture(scope="module")
def vision_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision")
    model = ggufgen.write_gguf(folder / "tiny-gemma3.gguf", ggufgen.TINY_GEMMA3, chat_template=GEMMA_TEMPLATE)
    projector = ggufgen.write_projector(folder / "mmproj-tiny-gemma3.gguf", ggufgen.TINY_GEMMA3_MMPROJ)
    return model, projector


def _image(data: bytes) -> Image:
    fmt, width, height = sniff(data)
    return Image(fmt, data, width, height)


@pytest.mark.model
def test_libmtmd_loads_the_tiny_projector_and_encodes_an_image(vision_files):
    from deployer.runtime.llama import Model

    model_file, projector_file = vision_files
    config = RuntimeConfig(model_name="t", model_path=str(model_file), n_ctx=512, parallel=2, n_threads=2,
                           mmproj_path=str(projector_file))  # fmt: skip
    model = Model(config)
    try:
        projector = model.projector
        assert projector.vision and not projector.audio and not projector.mrope
        text_only = model.tokenize("<start_of_turn>user\nDescribe this: and that", add_special=True)
        prompt = projector.tokenize(
            ["<start_of_turn>user\nDescribe this: ", " and that"], [_image(png(40, 30))], add_bos=True
        )
        try:
            assert prompt.media_tokens == IMAGE_TOKENS
            [(start, end)] = prompt.spans
            assert end - start == IMAGE_TOKENS and set(prompt.tokens[start:end]) == {prompt.tokens[start]}
            assert prompt.tokens[start] < 0  # a placeholder, never a vocabulary id
            assert all(t >= 0 for t in prompt.tokens[:start] + prompt.tokens[end:])
            # Gemma 3's projector wraps the image in <start_of_image> ... <end_of_image> text
            assert len(prompt.tokens) > len(text_only) + IMAGE_TOKENS
            model.decode([(1, prompt.tokens[:start], 0, False)])
            projector.evaluate(model.ctx, prompt.chunk_at[start], start, 1, model.n_batch, False)
            rows = model.decode([(1, prompt.tokens[end:], end, True)])
            assert np.isfinite(model.logits(rows[0])).all()
        finally:
            prompt.free()
    finally:
        model.close()


# ## The API end to end: the openai client, a real server, real libmtmd


@pytest.fixture(scope="module")
def vision_server(vision_files, tmp_path_factory):
    from tests.serving import launch

    model_file, projector_file = vision_files
    config = RuntimeConfig(
        model_name="tiny-vision", model_path=str(model_file), n_ctx=1024, n_batch=32, n_ubatch=32, parallel=2,
        concurrency=4, n_threads=2, mmproj_path=str(projector_file), max_images=2, max_image_bytes=64 * 1024,
        max_image_pixels=4096 * 4096, max_body_bytes=1024 * 1024,
    )  # fmt: skip
    server = launch(config, tmp_path_factory.mktemp("vision-server"))
    yield server
    server.stop()


def _ask(image: bytes | None, text: str = "What is in this picture?", mime: str = "image/png") -> list[dict]:
    from tests.images import data_url

    content: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image, mime)}})
    return [{"role": "user", "content": content}]


@pytest.mark.model
def test_an_image_part_counts_its_image_tokens_in_the_prompt(vision_server):
    client = vision_server.client()
    text_only = client.chat.completions.create(model="tiny-vision", messages=_ask(None), max_tokens=3)
    with_image = client.chat.completions.create(model="tiny-vision", messages=_ask(png(64, 48)), max_tokens=3)
    grown = with_image.usage.prompt_tokens - text_only.usage.prompt_tokens
    # the image's tokens, Gemma 3's <start_of_image>/<end_of_image> text around them (spelled out in
    # pieces of a few bytes by the tiny vocabulary, which has no such tokens), and the "\n" joining parts
    assert IMAGE_TOKENS + 2 < grown <= IMAGE_TOKENS + 64, grown
    assert with_image.usage.completion_tokens == 3 and with_image.choices[0].finish_reason == "length"


@pytest.mark.model
def test_streaming_with_an_image(vision_server):
    client = vision_server.client()
    stream = client.chat.completions.create(
        model="tiny-vision", messages=_ask(png(30, 90, seed=3)), max_tokens=4, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens > IMAGE_TOKENS
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)


@pytest.mark.model
def test_image_requests_batch_beside_text_requests(vision_server):
    from concurrent.futures import ThreadPoolExecutor

    client = vision_server.client()

    def ask(i: int) -> tuple[int, int]:
        image = png(50 + i, 40, seed=i) if i % 2 == 0 else None
        answer = client.chat.completions.create(model="tiny-vision", messages=_ask(image), max_tokens=8)
        return answer.usage.prompt_tokens, answer.usage.completion_tokens

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, range(4)))
    assert all(completion == 8 for _, completion in results)
    assert results[0][0] - results[1][0] > IMAGE_TOKENS  # the image requests carried their images


@pytest.fixture(scope="module")
def whole_chunk_vision_server(vision_files, tmp_path_factory):
    """The default n_batch (512): these prompts never fill a chunk, so only the image's edges are
    units the cache may resume at; the tiny Gemma 3's sliding window (512) is below n_ctx, so its
    windowed layers resume only from a context checkpoint taken at such an edge."""
    from tests.serving import launch

    model_file, projector_file = vision_files
    config = RuntimeConfig(
        model_name="tiny-vision", model_path=str(model_file), n_ctx=1024, parallel=1, n_threads=2,
        mmproj_path=str(projector_file), max_body_bytes=1024 * 1024,
    )  # fmt: skip
    server = launch(config, tmp_path_factory.mktemp("vision-server-512"))
    yield server
    server.stop()


@pytest.mark.model
@pytest.mark.parametrize("server_name", ["vision_server", "whole_chunk_vision_server"])
def test_a_second_turn_about_the_same_image_reuses_its_cache(server_name, request):
    vision_server = request.getfixturevalue(server_name)
    client = vision_server.client()
    image = png(64, 64, seed=42)
    first_turn = _ask(image, "Look at this screenshot of a settings page with many options on it.")
    first = client.chat.completions.create(model="tiny-vision", messages=first_turn, max_tokens=2, temperature=0)
    second_turn = [*first_turn, {"role": "assistant", "content": first.choices[0].message.content or "ok"},
                   {"role": "user", "content": "And the button at the top?"}]  # fmt: skip
    second = client.chat.completions.create(model="tiny-vision", messages=second_turn, max_tokens=2, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the first turn's text and its image (16 positions, one unit) came from the slot's cache
    assert cached > IMAGE_TOKENS, (cached, first.usage)
    if server_name == "vision_server":  # chunks of 32: everything but the first turn's last partial chunk
        assert cached >= first.usage.prompt_tokens - 32, (cached, first.usage)
    other = client.chat.completions.create(
        model="tiny-vision", messages=_ask(png(64, 64, seed=43), "Look at this screenshot of a settings page with "
        "many options on it."), max_tokens=1)  # fmt: skip
    # another image at the same place: its cache ends where the image starts
    assert other.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - IMAGE_TOKENS


BAD_IMAGES = {
    "truncated PNG": (png(64, 64)[:200], "image/png", 400, "could not be decoded as PNG"),
    "wrong magic": (b"GIF00a" + b"\0" * 64, "image/gif", 400, "not an image"),
    "zero bytes": (b"", "image/png", 400, "the image is empty (0 bytes)"),
    "SVG": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "image/svg+xml", 400, "SVG"),
    "huge dimensions": (None, "image/png", 400, "at most 16,777,216 pixels per image"),
    "over the byte cap": (png(200, 200), "image/png", 413, "at most 65,536 bytes per image"),
}


@pytest.mark.model
@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_4xx_and_the_server_stays_up(vision_server, case):
    from tests.images import png_header

    data, mime, status, message = BAD_IMAGES[case]
    if data is None:
        data = png_header(40_000, 40_000)  # 1.6 G pixels claimed in 33 bytes
    with vision_server.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "tiny-vision", "messages": _ask(data, mime=mime)})
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert message in error["message"] and error["param"] == "messages"
        assert http.get("/health").status_code == 200
    ok = vision_server.client().chat.completions.create(model="tiny-vision", messages=_ask(png(20, 20)), max_tokens=1)
    assert ok.usage.completion_tokens == 1


@pytest.mark.model
def test_limits_and_remote_urls_are_named(vision_server):
    from tests.images import data_url

    image = {"type": "image_url", "image_url": {"url": data_url(png(10, 10))}}
    three = [{"role": "user", "content": [{"type": "text", "text": "compare"}, image, image, image]}]
    remote = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}]}
    ]
    with vision_server.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "tiny-vision", "messages": three})
        assert answer.status_code == 400 and "at most 2 images per request" in answer.json()["error"]["message"]
        answer = http.post("/v1/chat/completions", json={"model": "tiny-vision", "messages": remote})
        assert answer.status_code == 400 and "remote image URLs are not fetched" in answer.json()["error"]["message"]


@pytest.mark.model
def test_an_image_sent_to_a_text_only_model_is_a_400(tiny_llama_file, start_server):
    server = start_server(RuntimeConfig(model_name="tiny", model_path=str(tiny_llama_file), n_ctx=512, n_threads=2))
    import anthropic
    import openai

    with pytest.raises(openai.BadRequestError, match="this model has no vision projector"):
        server.client().chat.completions.create(model="tiny", messages=_ask(png(8, 8)), max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="this model has no vision projector") as caught:
        server.client().responses.create(model="tiny", input=_input(png(8, 8)), max_output_tokens=1)
    assert caught.value.body["param"] == "input" and "input[0].content[1]" in caught.value.body["message"]
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(anthropic.BadRequestError, match="this model has no vision projector") as refused:
        claude.messages.create(model="tiny", max_tokens=1, messages=_blocks(png(8, 8)))
    assert refused.value.body["error"]["type"] == "invalid_request_error"


@pytest.mark.model
def test_audio_to_a_vision_only_projector_is_a_400_naming_the_part(vision_server):
    import base64

    from tests.audio import wav

    clip = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav(0.1)).decode(), "format": "wav"}}
    content = [{"type": "text", "text": "hear this"}, clip]
    with vision_server.http() as http:
        for route, field, extra in (("/v1/chat/completions", "messages", {"max_tokens": 1}),
                                    ("/v1/responses", "input", {"max_output_tokens": 1})):  # fmt: skip
            body = {"model": "tiny-vision", field: [{"role": "user", "content": content}], **extra}
            answer = http.post(route, json=body)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["param"] == field and error["code"] == "unsupported_content_type"
            assert error["message"] == (
                f"{field}[0].content[1]: this model's projector has no audio encoder: it takes no audio (it reads images)"
            )


@pytest.mark.model
def test_n_choices_share_the_image_prompt(vision_server):
    answer = vision_server.client().chat.completions.create(
        model="tiny-vision", messages=_ask(png(33, 33, seed=9)), max_tokens=3, n=2
    )
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.usage.completion_tokens == 6 and answer.usage.prompt_tokens > IMAGE_TOKENS


# ## The agent protocols: Responses input_image parts and Anthropic image blocks, the same path


def _input(image: bytes | None, text: str = "What is in this picture?") -> list[dict]:
    from tests.images import data_url

    content: list[dict] = [{"type": "input_text", "text": text}]
    if image is not None:
        content.append({"type": "input_image", "image_url": data_url(image), "detail": "auto"})
    return [{"role": "user", "content": content}]


def _blocks(image: bytes | None, text: str = "What is in this picture?", mime: str = "image/png") -> list[dict]:
    import base64

    content: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        source = {"type": "base64", "media_type": mime, "data": base64.b64encode(image).decode()}
        content.insert(0, {"type": "image", "source": source})
    return [{"role": "user", "content": content}]


def _claude(server):
    import anthropic

    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.model
def test_responses_input_image_through_the_openai_sdk(vision_server):
    client = vision_server.client()
    text_only = client.responses.create(model="tiny-vision", input=_input(None), max_output_tokens=3)
    image = png(48, 64, seed=5)
    first = client.responses.create(model="tiny-vision", input=_input(image), max_output_tokens=3, temperature=0)
    assert IMAGE_TOKENS + 2 < first.usage.input_tokens - text_only.usage.input_tokens <= IMAGE_TOKENS + 64
    assert first.usage.output_tokens == 3 and first.status == "incomplete"
    # the next turn carries the image of the stored one: its prompt holds it again, read from the slot's cache
    second = client.responses.create(
        model="tiny-vision", previous_response_id=first.id, input="And the colours?", max_output_tokens=2
    )
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > IMAGE_TOKENS, second.usage
    streamed = client.responses.create(model="tiny-vision", input=_input(image), max_output_tokens=2, stream=True)
    ended = [event.response for event in streamed if event.type in ("response.completed", "response.incomplete")]
    assert ended[0].usage.input_tokens == first.usage.input_tokens  # cut by max_output_tokens: incomplete


@pytest.mark.model
def test_anthropic_image_block_through_the_anthropic_sdk(vision_server):
    claude = _claude(vision_server)
    text_only = claude.messages.create(model="claude-sonnet-4-5", max_tokens=3, messages=_blocks(None))
    blocks = _blocks(png(40, 56, seed=6))
    message = claude.messages.create(model="claude-sonnet-4-5", max_tokens=3, messages=blocks)
    seen = message.usage.input_tokens + message.usage.cache_read_input_tokens
    grown = seen - text_only.usage.input_tokens - text_only.usage.cache_read_input_tokens
    assert IMAGE_TOKENS + 2 < grown <= IMAGE_TOKENS + 64, grown
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3
    counted = claude.messages.count_tokens(model="claude-sonnet-4-5", messages=blocks)
    assert counted.input_tokens == seen  # count_tokens counts the image's tokens as the model sees them
    with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=2, messages=blocks) as stream:
        final = stream.get_final_message()
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == seen


SVG_URL = "data:image/svg+xml;base64,PHN2ZyB4bWxucz0iaHR0cDovL3d3dy53My5vcmcvMjAwMC9zdmciLz4="
AGENT_BAD_IMAGES = {
    "responses file_id": (
        "/v1/responses",
        {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-abc"}]}]},
        400,
        "input[0].content[0].file_id: files uploaded to OpenAI cannot be read",
    ),
    "responses remote URL": (
        "/v1/responses",
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://10.0.0.1/a.png"}]}]},
        400,
        "remote image URLs are not fetched",
    ),
    "responses SVG": (
        "/v1/responses",
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": SVG_URL}]}]},
        400,
        "an SVG drawing",
    ),
    "responses over the byte cap": ("/v1/responses", {"input": _input(png(200, 200))}, 413, "at most 65,536 bytes"),
    "messages URL source": (
        "/v1/messages",
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/"}}]}]},
        400,
        "messages[0].content[0].source: remote image URLs are not fetched",
    ),
    "messages file source": (
        "/v1/messages",
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
        400,
        "source.type 'file' is not supported",
    ),
    "messages truncated PNG": (
        "/v1/messages",
        {"messages": _blocks(png(64, 64)[:200])},
        400,
        "could not be decoded as PNG",
    ),
    "messages over the byte cap": ("/v1/messages", {"messages": _blocks(png(200, 200))}, 413, "at most 65,536 bytes"),
    "messages too many": ("/v1/messages", {"messages": _blocks(png(9, 9)) * 3}, 400, "at most 2 images per request"),
}


@pytest.mark.model
@pytest.mark.parametrize("case", sorted(AGENT_BAD_IMAGES))
def test_bad_images_are_4xx_in_each_protocols_shape(vision_server, case):
    route, body, status, message = AGENT_BAD_IMAGES[case]
    limit = {"max_output_tokens": 1} if route == "/v1/responses" else {"max_tokens": 1}
    with vision_server.http() as http:
        answer = http.post(route, json={"model": "tiny-vision", **body, **limit})
        assert answer.status_code == status, answer.text
        if route == "/v1/messages":  # Anthropic's shape
            error = answer.json()
            assert error["type"] == "error" and message in error["error"]["message"], error
            assert error["error"]["type"] == ("request_too_large" if status == 413 else "invalid_request_error")
        else:
            error = answer.json()["error"]
            assert message in error["message"] and error["param"] == "input", error
        assert http.get("/health").status_code == 200


@pytest.mark.model
def test_remote_images_on_still_refuse_loopback_in_every_protocol(vision_files, tmp_path):
    import http.server
    import threading

    from tests.serving import launch

    class Images(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            Images.asked += 1
            self.send_response(200)
            self.end_headers()
            self.wfile.write(png(16, 16))

        def log_message(self, *args: object) -> None:
            pass

    Images.asked = 0
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    model_file, projector_file = vision_files
    config = RuntimeConfig(model_name="tiny-vision", model_path=str(model_file), n_ctx=512, parallel=1, n_threads=2,
                           mmproj_path=str(projector_file), remote_images=True)  # fmt: skip
    server = launch(config, tmp_path)
    url = f"http://localhost:{images.server_address[1]}/x.png"
    requests = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]},
        "/v1/responses": {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": url}]}]},
        "/v1/messages": {"max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": url}}]}]},
    }  # fmt: skip
    try:
        with server.http() as http:
            for route, body in requests.items():
                answer = http.post(route, json={"model": "tiny-vision", **body})
                assert answer.status_code == 400, answer.text
                error = answer.json()["error"]
                assert "resolves to" in error["message"] and "a loopback address" in error["message"], error
                assert error.get("code", "remote_image_refused") == "remote_image_refused"
    finally:
        server.stop()
        images.shutdown()
    assert Images.asked == 0  # refused before any connection


@pytest.mark.model
def test_an_image_in_an_anthropic_tool_result_reaches_the_model(vision_server):
    import base64

    def turn(result: list[dict]) -> list[dict]:
        call = {"type": "tool_use", "id": "toolu_1", "name": "screenshot", "input": {}}
        return [{"role": "user", "content": "Take a screenshot."}, {"role": "assistant", "content": [call]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": result}]}]  # fmt: skip

    claude = _claude(vision_server)
    text = {"type": "text", "text": "the screen:"}
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png(32, 32, seed=8)).decode()}
    without = claude.messages.count_tokens(model="m", messages=turn([text]))
    with_image = claude.messages.count_tokens(model="m", messages=turn([text, {"type": "image", "source": source}]))
    assert IMAGE_TOKENS + 2 < with_image.input_tokens - without.input_tokens <= IMAGE_TOKENS + 64
    message = claude.messages.create(
        model="m", max_tokens=2, messages=turn([text, {"type": "image", "source": source}])
    )
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == with_image.input_tokens


@pytest.mark.model
def test_an_image_in_a_responses_function_call_output_reaches_the_model(vision_server):
    from tests.images import data_url

    def turn(output: list[dict]) -> list[dict]:
        return [{"role": "user", "content": "Take a screenshot."},
                {"type": "function_call", "call_id": "call_1", "name": "screenshot", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": output}]  # fmt: skip

    client = vision_server.client()
    text = {"type": "input_text", "text": "the screen:"}
    image = {"type": "input_image", "image_url": data_url(png(32, 24, seed=11))}
    without = client.responses.create(model="m", input=turn([text]), max_output_tokens=1, store=False)
    with_image = client.responses.create(model="m", input=turn([text, image]), max_output_tokens=1, store=False)
    assert IMAGE_TOKENS + 2 < with_image.usage.input_tokens - without.usage.input_tokens <= IMAGE_TOKENS + 64
