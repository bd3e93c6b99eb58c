"""Remote image URLs (``[server] remote_images = true``): the address filter as a pure function, and
the fetch against a real local HTTP server (loopback refused; let through only by a test's filter)."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import socket
import threading
from collections.abc import Iterator

import pytest

from deployer.runtime.errors import ApiError
from deployer.runtime.media.fetch import fetch_image, inline_remote_images, refused_address
from deployer.runtime.media.images import CHAT, MESSAGES, RESPONSES, MediaLimits, take_request_images
from tests.images import png

IMAGE = png(12, 9, seed=1)
LIMITS = MediaLimits(projector=True, max_images=2, max_bytes=4096, max_pixels=10**6, remote=True, fetch_timeout_s=5)


def _let_through(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    return None  # the test's own server is on loopback


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4 mapped in IPv6
        ("10.1.2.3", "private"),
        ("172.16.0.9", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),  # a cloud's metadata service
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_refused_addresses(address, why):
    assert refused_address(ipaddress.ip_address(address)) == why


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/")
            self.end_headers()
            return
        body = {"/image.png": IMAGE, "/big.png": b"\x89PNG" + b"\0" * 10_000}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.path != "/big.png":  # the big one does not declare its size: the cap is counted as it arrives
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def local_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _fetch(url: str, **options):
    settings = {"where": "messages[0].content[1]", "param": "messages", "timeout_s": 5, "max_bytes": 4096}
    return asyncio.run(fetch_image(url, **{**settings, **options}))


def test_loopback_is_refused_before_connecting(local_server):
    port = local_server.rsplit(":", 1)[1]
    for url in (f"{local_server}/image.png", f"http://localhost:{port}/image.png"):
        with pytest.raises(ApiError, match=r"resolves to (127\.0\.0\.1|::1), a loopback address") as caught:
            _fetch(url)
        assert caught.value.status == 400 and caught.value.code == "remote_image_refused"


def test_a_public_image_is_fetched_whole(local_server):
    assert _fetch(f"{local_server}/image.png", refuse=_let_through) == ("image/png", IMAGE)
    with pytest.raises(ApiError, match="the server answered 404"):  # a space is escaped, never a broken request
        _fetch(f"{local_server}/image.png HTTP/1.0\r\nX-Injected: 1", refuse=_let_through)


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/big.png", 413, "at most 4,096 bytes per image"),
        ("/moved", 400, "redirects are not followed"),
        ("/missing.png", 400, "the server answered 404"),
    ],
)
def test_caps_redirects_and_errors(local_server, path, status, message):
    with pytest.raises(ApiError, match=message) as caught:
        _fetch(f"{local_server}{path}", refuse=_let_through)
    assert caught.value.status == status and caught.value.param == "messages"


def test_a_silent_server_times_out():
    with socket.socket() as silent:  # accepts (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(ApiError, match=r"no answer within 0.5 s"):
            _fetch(f"http://127.0.0.1:{port}/x.png", refuse=_let_through, timeout_s=0.5)


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/a.png", "http://user:pw@example.com/a.png", "http://example.com:notaport/a.png"],
)
def test_malformed_urls_are_400(url):
    with pytest.raises(ApiError) as caught:
        _fetch(url)
    assert caught.value.status == 400 and "messages[0].content[1]" in caught.value.message


def test_every_protocols_remote_image_is_inlined_then_checked_as_any_image(local_server):
    url = f"{local_server}/image.png"
    bodies = {
        CHAT: {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]},
        RESPONSES: {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": url}]}]},
        MESSAGES: {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": url}}]}]},
    }  # fmt: skip
    for shape, body in bodies.items():
        inlined = asyncio.run(inline_remote_images(body, shape, LIMITS, refuse=_let_through))
        _, _, images = take_request_images(inlined, LIMITS, shape)
        assert [(i.format, i.width, i.height, i.data) for i in images] == [("PNG", 12, 9, IMAGE)], shape
        with pytest.raises(ApiError, match="a loopback address"):
            asyncio.run(inline_remote_images(body, shape, LIMITS))


def test_no_more_fetches_than_images_a_request_may_carry(local_server):
    part = {"type": "image_url", "image_url": {"url": f"{local_server}/image.png"}}
    body = {"messages": [{"role": "user", "content": [part, part, part]}]}
    with pytest.raises(ApiError, match=r"content\[2\]: too many images: at most 2"):
        asyncio.run(inline_remote_images(body, CHAT, LIMITS, refuse=_let_through))


def test_the_manifest_switch_is_off_by_default_and_needs_a_projector():
    from deployer.runtime.config import runtime_config
    from tests.plans import loaded_manifest

    assert runtime_config(loaded_manifest(mmproj="mmproj-f16.gguf"), "m.gguf").remote_images is False
    switched = loaded_manifest(mmproj="mmproj-f16.gguf", server={"remote_images": True})
    assert runtime_config(switched, "m.gguf").remote_images is True
    with pytest.raises(Exception, match="remote_images fetches image URLs for a vision model: it needs mmproj"):
        loaded_manifest(server={"remote_images": True})
