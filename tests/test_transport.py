"""The backends' HTTP client (backends/transport.py) and retry classification
(backends/retry.py): issue 21, item 12."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from safetygame.backends.openai_compat import OpenAICompatBackend
from safetygame.backends.retry import RetryPolicy, StatusClass, classify_status
from safetygame.backends.transport import KeepAliveTransport, ResponseLimits
from safetygame.errors import BackendProtocolError, ConfigError

LIMITS = ResponseLimits(max_header_bytes=4096, max_body_bytes=100_000)
OK_BODY = b'{"ok": true}'


class Server:
    """A real loopback HTTP/1.1 server answering every request with ``respond()`` bytes
    (counts requests and connections)."""

    def __init__(self, respond: Callable[[], bytes]) -> None:
        self.respond = respond
        self.requests = 0
        self.connections = 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer.connections += 1
                sock: socket.socket = self.request
                buf = b""
                with contextlib.suppress(OSError):
                    while True:
                        while b"\r\n\r\n" not in buf:
                            data = sock.recv(65536)
                            if not data:
                                return
                            buf += data
                        head, _, buf = buf.partition(b"\r\n\r\n")
                        length = 0
                        for line in head.split(b"\r\n")[1:]:
                            k, _, v = line.partition(b":")
                            if k.strip().lower() == b"content-length":
                                length = int(v)
                        while len(buf) < length:
                            buf += sock.recv(65536)
                        buf = buf[length:]
                        outer.requests += 1
                        reply = outer.respond()
                        sock.sendall(reply)
                        if b"content-length" not in reply.split(b"\r\n\r\n")[0].lower() and (
                            b"chunked" not in reply.split(b"\r\n\r\n")[0].lower()
                        ):
                            sock.shutdown(socket.SHUT_WR)  # a body that runs until close
                            return

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @contextlib.contextmanager
    def running(self) -> Iterator[Server]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


def response(body: bytes, *, extra_headers: bytes = b"", framing: str = "length") -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + extra_headers
    if framing == "length":
        return head + b"content-length: %d\r\n\r\n" % len(body) + body
    if framing == "chunked":
        step = 8192
        chunks = b"".join(
            b"%x\r\n" % len(body[i : i + step]) + body[i : i + step] + b"\r\n"
            for i in range(0, len(body), step)
        )
        return head + b"transfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    return head + b"connection: close\r\n\r\n" + body  # read until close


async def get(server: Server, transport: KeepAliveTransport) -> httpx.Response:
    async with httpx.AsyncClient(transport=transport, base_url=server.url, timeout=10) as client:
        return await client.post("/x", json={"q": 1})


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_responses_within_the_limits_pass(framing: str) -> None:
    body = b'{"pad": "' + b"x" * (LIMITS.max_body_bytes - 20) + b'"}'
    headers = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 50) for i in range(40))  # ~2.4 kB
    with Server(lambda: response(body, extra_headers=headers, framing=framing)).running() as srv:
        r = await get(srv, KeepAliveTransport(4, 4, LIMITS))
        assert r.status_code == 200 and r.content == body


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_an_oversized_body_is_a_protocol_error(framing: str) -> None:
    body = b"x" * (LIMITS.max_body_bytes + 1)
    server = Server(lambda: response(body, framing=framing))
    with server.running(), pytest.raises(BackendProtocolError, match="body exceeds 100000"):
        await get(server, KeepAliveTransport(4, 4, LIMITS))


@pytest.mark.parametrize("size", [5000, 2_000_000])
async def test_an_oversized_head_is_a_protocol_error(size: int) -> None:
    huge = b"x-big: " + b"v" * size + b"\r\n"
    server = Server(lambda: response(OK_BODY, extra_headers=huge))
    with server.running(), pytest.raises(BackendProtocolError, match="head exceeds 4096 bytes"):
        await get(server, KeepAliveTransport(4, 4, LIMITS))


async def test_an_endless_head_fails_without_buffering_it() -> None:
    """A server that streams header bytes forever: the read stops at the limit."""
    endless = b"HTTP/1.1 200 OK\r\n" + b"x-a: b\r\n" * 200_000  # 1.6 MB, no blank line
    with Server(lambda: endless).running() as srv:
        transport = KeepAliveTransport(4, 4, LIMITS)
        with pytest.raises(BackendProtocolError, match="head exceeds"):
            await get(srv, transport)


async def test_the_backend_maps_oversized_replies_and_does_not_retry() -> None:
    """Through OpenAICompatBackend: the default limits, one request (no retry), the URL named,
    and the connection is not reused."""
    limits = ResponseLimits()
    big = b"x" * (limits.max_body_bytes + 1)
    replies = iter([response(big), response(b'{"prompt": "p"}')])
    with Server(lambda: next(replies)).running() as srv:
        backend = OpenAICompatBackend(srv.url, retry=RetryPolicy(max_retries=3, backoff_base=0))
        try:
            with pytest.raises(BackendProtocolError, match=f"{srv.url}/apply-template: .*body"):
                await backend._post("/apply-template", {"messages": []})
            assert srv.requests == 1 and backend.stats.errors == 1
            assert await backend._post("/apply-template", {}) == {"prompt": "p"}
            assert srv.connections == 2  # the failed connection was closed, not pooled
        finally:
            await backend.aclose()


def test_response_limits_are_validated() -> None:
    assert ResponseLimits() == ResponseLimits(65_536, 67_108_864)
    for bad in ({"max_header_bytes": 10}, {"max_body_bytes": 0}):
        with pytest.raises(ConfigError):
            ResponseLimits(**bad)  # type: ignore[arg-type]


# -- retry classification: a pure function over (status, headers) ---------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, "ok"),
        (204, "ok"),
        (302, "ok"),
        (429, "rate_limited"),
        (408, "retry"),
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
        (504, "retry"),
        (404, "unsupported"),
        (405, "unsupported"),
        (501, "unsupported"),
        (400, "rejected"),
        (413, "rejected"),
        (422, "rejected"),
        (401, "error"),
        (403, "error"),
        (409, "error"),
        (505, "error"),
    ],
)
def test_classify_status(status: int, kind: str) -> None:
    verdict = classify_status(status, {})
    assert verdict == StatusClass(kind)  # type: ignore[arg-type]
    assert verdict.retryable == (kind in ("rate_limited", "retry"))


def test_classify_status_reads_retry_after_only_when_retrying() -> None:
    assert classify_status(429, {"retry-after": "7"}) == StatusClass("rate_limited", 7.0)
    assert classify_status(503, {"retry-after": "0.5"}).retry_after == 0.5
    date = "Wed, 21 Oct 2015 07:28:12 GMT"  # 12 s after ``now``
    now = 1445412480.0
    assert classify_status(503, {"retry-after": date}, now=now).retry_after == 12.0
    assert classify_status(503, {"retry-after": "soon"}).retry_after is None
    assert classify_status(400, {"retry-after": "7"}) == StatusClass("rejected")
    assert classify_status(200, {"retry-after": "7"}) == StatusClass("ok")
    # httpx's case-insensitive headers work as well as the lower-case dict
    assert classify_status(429, httpx.Headers({"Retry-After": "3"})).retry_after == 3.0


def test_bench_gateway_compares_transports_in_one_run() -> None:
    """``bench gateway --transport hand --transport httpx``: both gateways answer every
    request through their own upstream client, in one invocation."""
    import json

    from click.testing import CliRunner

    from safetygame.cli import main

    res = CliRunner().invoke(
        main,
        ["bench", "gateway", "--requests", "20", "--concurrency", "4", "--latency-ms", "1",
         "--transport", "hand", "--transport", "httpx", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["transport"] == "hand" and set(out["by_transport"]) == {"hand", "httpx"}
    for kind, run in out["by_transport"].items():
        assert run["transport"] == kind and run["statuses"] == {"200": 20}
        assert run["upstream_http_per_request"] >= run["upstream_rounds"]


async def test_the_httpx_transport_serves_the_backend() -> None:
    from safetygame.backends.transport import httpx_transport

    with Server(lambda: response(b'{"prompt": "p"}')).running() as srv:
        backend = OpenAICompatBackend(srv.url, transport=httpx_transport(4))
        try:
            assert await backend._post("/apply-template", {}) == {"prompt": "p"}
            assert backend._loop_state().direct is None  # httpx's client path, not DirectPost
        finally:
            await backend.aclose()
