"""Remote image URLs, when a manifest turns them on (``[server] remote_images = true``).

Fetching whatever URL a client names, from inside the server, is a server-side request forgery risk:
``http://169.254.169.254/`` is a cloud's metadata service, ``http://10.0.0.5/admin`` a neighbour on
the private network. So the fetch is off by default and, when on, guarded:

- the host is resolved first and **every** address it resolves to is checked (:func:`refused_address`):
  private, loopback, link-local, multicast, reserved and unspecified addresses are refused, IPv4
  mapped in IPv6 included;
- the connection goes to the checked address itself (with the name kept for TLS and ``Host``), so a
  second lookup (DNS rebinding) cannot swap in another address;
- redirects are not followed (their target would need the same checks; send the final URL);
- one timeout covers the lookup, the connection and the whole body, and the body stops at the
  image byte cap (a 413).

    inline_remote_images(body, shape, limits)   the body with each remote image fetched into base64
    fetch_image(url, ...)                        (content type, bytes) of one URL, or a 4xx
    refused_address(ip)                          why an address is refused ("loopback", ...), or None
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

from deployer.runtime.errors import ApiError, bad_request
from deployer.runtime.media.images import MESSAGES, MediaLimits, Shape, map_image_parts, too_big

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_HEAD_CAP = 16 * 1024  # the status line and headers
_URL_SAFE = "/?&=%:@!$'()*+,;~-._"  # kept as they are in the request line; anything else (spaces) escaped


def refused_address(ip: Address) -> str | None:
    """Why the server must not connect to ``ip`` (a word for the error), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for word, test in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if test:
            return word
    return None if ip.is_global else "non-public"


async def inline_remote_images(body: Any, shape: Shape, limits: MediaLimits, **fetch: Any) -> Any:
    """``body`` with each remote image part replaced by the same image inline (base64), fetched here.

    Called only when remote images are on and the model has a projector; everything else about the
    parts (limits, formats) is checked afterwards by ``media.take_request_images`` as for inline images.
    """
    wanted: dict[str, str] = {}  # where → url

    def note(part: dict[str, Any], where: str) -> dict[str, Any]:
        url = _remote_url(part, shape)
        if url is not None:
            if len(wanted) >= limits.max_images:  # never more fetches than images a request may carry
                raise bad_request(f"{where}: too many images: at most {limits.max_images} images per request",
                                  shape.field, "too_many_images")  # fmt: skip
            wanted[where] = url
        return part

    map_image_parts(body, shape, note)
    got = {}
    for where, url in wanted.items():  # one at a time: a request's fetches never pile up
        got[where] = await fetch_image(
            url, where=where, param=shape.field, timeout_s=limits.fetch_timeout_s, max_bytes=limits.max_bytes,
            **fetch,
        )  # fmt: skip
    if not got:
        return body
    return map_image_parts(body, shape, lambda part, where: _inline(part, shape, *got[where]) if where in got else part)


def _remote_url(part: dict[str, Any], shape: Shape) -> str | None:
    if shape is MESSAGES:
        source = part.get("source")
        url = source.get("url") if isinstance(source, dict) and source.get("type") == "url" else None
    else:
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None


def _inline(part: dict[str, Any], shape: Shape, mime: str, data: bytes) -> dict[str, Any]:
    encoded = base64.b64encode(data).decode()
    if shape is MESSAGES:
        return {**part, "source": {"type": "base64", "media_type": mime, "data": encoded}}
    url = f"data:{mime or 'application/octet-stream'};base64,{encoded}"
    return {**part, "image_url": {"url": url} if isinstance(part.get("image_url"), dict) else url}


async def fetch_image(
    url: str,
    *,
    where: str,
    param: str,
    timeout_s: float,
    max_bytes: int,
    refuse: Callable[[Address], str | None] = refused_address,
) -> tuple[str, bytes]:
    """(content type, body) of ``url``: every resolved address checked, the checked one connected to.

    ``refuse`` is the address filter (tests pass one that lets 127.0.0.1 through for a local server).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad_request(f"{where}: the image URL must be http(s)://host/...", param)
    if parts.username or parts.password:
        raise bad_request(f"{where}: an image URL with credentials in it is refused", param)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise bad_request(f"{where}: the image URL's port is not a number", param) from None
    try:
        return await asyncio.wait_for(_get(parts, port, where, param, max_bytes, refuse), timeout=timeout_s)
    except TimeoutError:
        raise _failed(where, param, f"no answer within {timeout_s:g} s") from None
    except asyncio.LimitOverrunError:
        raise _failed(where, param, f"its headers are longer than {_HEAD_CAP:,} bytes") from None
    except (OSError, EOFError, ValueError) as error:  # refused, reset, TLS, cut short, not HTTP
        raise _failed(where, param, str(error) or type(error).__name__) from None


async def _get(
    parts: Any, port: int, where: str, param: str, max_bytes: int, refuse: Callable[[Address], str | None]
) -> tuple[str, bytes]:
    host = parts.hostname
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise _failed(where, param, f"the host {host!r} does not resolve") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise _failed(where, param, f"the host {host!r} has no address")
    for ip in addresses:  # every one: a name that resolves to a public and a private address is refused
        why = refuse(ip)
        if why is not None:
            raise bad_request(
                f"{where}: the image URL's host {host!r} resolves to {ip}, a {why} address: remote images are "
                "fetched from public addresses only",
                param,
                "remote_image_refused",
            )
    context = ssl.create_default_context() if parts.scheme == "https" else None
    reader, writer = await asyncio.open_connection(
        str(addresses[0]), port, ssl=context, server_hostname=host if context else None, limit=_HEAD_CAP
    )
    try:
        target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=_URL_SAFE)
        # HTTP/1.0: the body ends when the connection does (no chunked encoding to parse)
        request = f"GET {target} HTTP/1.0\r\nHost: {parts.netloc}\r\nAccept: image/*\r\nUser-Agent: gguf-deploy\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = status_line.split(" ", 2)
        status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines if line)}
        if status != 200:
            moved = ""
            if 300 <= status < 400:
                moved = f" (a redirect to {headers.get('location')!r}: redirects are not followed)"
            raise _failed(where, param, f"the server answered {status}{moved}")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise too_big(where, int(declared), max_bytes, param)
        body = bytearray()
        while chunk := await reader.read(65536):
            body += chunk
            if len(body) > max_bytes:
                raise too_big(where, len(body), max_bytes, param)
        return headers.get("content-type", "").split(";")[0], bytes(body)
    finally:
        writer.close()


def _failed(where: str, param: str, why: str) -> ApiError:
    return bad_request(f"{where}: the image URL could not be fetched: {why}", param, "remote_image_failed")
