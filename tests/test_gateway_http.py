"""Connection limits (``safetygame.gateway.http``) against a real uvicorn server on
127.0.0.1, with raw sockets, for both of uvicorn's HTTP/1.1 parsers. Every test is bounded
in time (socket timeouts of a few seconds) and in connections."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from safetygame.errors import ConfigError
from safetygame.gateway.http import HttpLimits
from safetygame.gateway.server import serve_in_thread

LIMITS = HttpLimits(
    max_header_bytes=4096, max_header_count=20, header_timeout=0.5, keepalive_timeout=0.5
)
PARSERS = ["httptools", "h11"]


async def echo(request: Request) -> Response:
    body = await request.body()
    return PlainTextResponse(f"{request.method} {len(body)} {len(request.headers)}")


@pytest.fixture(params=PARSERS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    app = Starlette(routes=[Route("/", echo, methods=["GET", "POST"])])
    with serve_in_thread(app, limits=LIMITS, parser=request.param) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


def connect(addr: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(addr, timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (socket.timeout if it never does)."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


_PENDING: dict[int, bytes] = {}  # bytes read past a response, per socket (pipelining)


def one_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body (the connection stays open). Bytes of a
    following response that arrived in the same read are kept for the next call: on a loaded
    machine two pipelined responses often arrive together."""
    buf = _PENDING.pop(sock.fileno(), b"")
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    if len(body) > length:
        _PENDING[sock.fileno()] = body[length:]
    return head + b"\r\n\r\n" + body[:length]


def test_limits_are_validated() -> None:
    assert HttpLimits() == HttpLimits(16_384, 100, 10.0, 5.0)  # the documented defaults
    for bad in (
        {"max_header_bytes": 10},
        {"max_header_count": 0},
        {"header_timeout": 0},
        {"keepalive_timeout": float("inf")},
    ):
        with pytest.raises(ConfigError):
            HttpLimits(**bad)  # type: ignore[arg-type]


def test_normal_requests_pass_and_bodies_are_not_head_bytes(server: tuple[str, int]) -> None:
    body = b"x" * 50_000  # far above max_header_bytes, sent with the head in one write
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert one_response(sock).endswith(b"POST 50000 2")
        # Kept alive: a second request on the same connection, then two pipelined ones.
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n\r\n")
        assert one_response(sock).endswith(b"GET 0 2")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 2)
        time.sleep(0.2)  # both responses are then waiting: read them from one buffer
        assert one_response(sock).endswith(b"GET 0 1")
        assert one_response(sock).endswith(b"GET 0 1")


def test_oversized_head_is_431_before_it_ends(server: tuple[str, int]) -> None:
    # One huge header that never ends: answered as soon as the limit is passed.
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 60_000)
        assert read_until_closed(sock).startswith(b"HTTP/1.1 431 ")
    # Several headers, each under the limit, together over it.
    with connect(server) as sock:
        head = b"".join(b"X-%d: %s\r\n" % (i, b"b" * 1000) for i in range(8))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n" + head + b"\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 431 ")


def test_too_many_headers_is_431(server: tuple[str, int]) -> None:
    with connect(server) as sock:
        head = b"".join(b"X-%d: 1\r\n" % i for i in range(LIMITS.max_header_count + 5))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n" + head + b"\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 431 ")
    with connect(server) as sock:  # at the limit: served
        head = b"".join(b"X-%d: 1\r\n" % i for i in range(LIMITS.max_header_count - 1))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n" + head + b"\r\n")
        assert one_response(sock).startswith(b"HTTP/1.1 200 ")


def test_heads_that_never_finish_are_closed_after_header_timeout(
    server: tuple[str, int],
) -> None:
    t0 = time.monotonic()
    silent = [connect(server) for _ in range(10)]  # connect and send nothing
    partial = [connect(server) for _ in range(10)]  # a head that never ends
    for sock in partial:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    trickle = connect(server)  # one byte at a time, well inside any per-read timeout
    trickle.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
    closed_at = None
    try:
        for _ in range(40):
            trickle.sendall(b"a")
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        closed_at = time.monotonic() - t0
    try:
        for sock in silent:
            assert read_until_closed(sock) == b""  # closed, nothing said
        for sock in partial:
            assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
        if closed_at is None:  # the peer may still be draining our bytes
            assert read_until_closed(trickle).startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in [*silent, *partial, trickle]:
            sock.close()
    assert time.monotonic() - t0 < 4.0  # header_timeout is 0.5 s


def test_idle_keepalive_connection_is_closed(server: tuple[str, int]) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert one_response(sock).startswith(b"HTTP/1.1 200 ")
        t = time.monotonic()
        assert read_until_closed(sock) == b""
        assert time.monotonic() - t < 3.0  # keepalive_timeout is 0.5 s (uvicorn's default 5)


def test_gateway_serves_with_the_limits_of_its_settings(tmp_path: Path) -> None:
    from safetygame.backends.openai_compat import OpenAICompatBackend
    from safetygame.gateway.app import GatewaySettings, create_app

    backend = OpenAICompatBackend("http://127.0.0.1:9/v1", max_retries=0)  # never called
    settings = GatewaySettings(audit_url=f"sqlite:///{tmp_path / 'a.db'}", http=LIMITS)
    with serve_in_thread(create_app(backend, settings)) as url:
        host, port = url.removeprefix("http://").split(":")
        with connect((host, int(port))) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 60_000)
            assert read_until_closed(sock).startswith(b"HTTP/1.1 431 ")
