"""The backends' HTTP client: a lean HTTP/1.1 keep-alive transport for plain-http upstreams.

- ``KeepAliveTransport``: an ``httpx.AsyncBaseTransport`` (one connection per request in
  flight, idle ones kept in a LIFO list, each request sent in one write). Its response parser
  enforces ``ResponseLimits`` (bytes of a response head, bytes of a body): past them the
  exchange fails with ``BackendProtocolError`` and the connection is closed, so a broken or
  hostile upstream cannot grow the gateway's memory without bound.
- ``DirectPost``: POST JSON through a ``KeepAliveTransport`` without httpx's client layer.
- ``LoopState``: the client, the direct path and a semaphore of one event loop.
- ``httpx_transport``: httpx's own pooled transport, sized the same way (``safetygame serve
  --upstream-transport httpx``; ``safetygame bench gateway --transport hand --transport
  httpx`` compares the two in one run).

Timeouts and connection failures surface as the usual httpx exceptions, so the backend's
retry and error mapping (``backends/retry.py``, ``openai_compat.py``) is shared by every path.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import httpx

from safetygame.errors import BackendProtocolError, ConfigError

__all__ = [
    "DirectPost",
    "KeepAliveTransport",
    "LoopState",
    "Reply",
    "ResponseLimits",
    "TransportKind",
    "env_proxy",
    "httpx_transport",
]

TransportKind = Literal["hand", "httpx"]


@dataclass(frozen=True)
class ResponseLimits:
    """Bounds on one upstream response read by ``KeepAliveTransport``.

    ``max_body_bytes`` counts the body as sent (after de-chunking, before any
    Content-Encoding is undone). The default leaves room for llama.cpp's largest answers the
    backend asks for (the whole-vocabulary candidate list of ``loglik``: about 14 MB for a
    151,936-token vocabulary)."""

    max_header_bytes: int = 64 * 1024  # status line + headers (each 1xx head counts alone)
    max_body_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1024:
            raise ConfigError("max_header_bytes must be >= 1024")
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be >= 1024")


@dataclass(frozen=True)
class Reply:
    """One upstream HTTP response, whichever client path fetched it."""

    status_code: int
    headers: Mapping[str, str]  # looked up by lower-case name
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class Http1Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection, one request at a time (see ``KeepAliveTransport``).

    Incoming bytes collect in a buffer; the request coroutine parses them and waits on
    ``_wake`` for more, so a response costs one write and a handful of callbacks. Past
    ``max_buffer`` bytes the socket stops being read until the coroutine asks for more (it
    consumes what it can and checks ``ResponseLimits`` first), so the buffer stays bounded.
    """

    def __init__(self, max_buffer: int = 1 << 62) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.max_buffer = max_buffer
        self._paused = False
        self._wake: asyncio.Future[None] | None = None
        self._can_write: asyncio.Future[None] | None = None

    # -- protocol callbacks (event loop) --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > self.max_buffer and not self._paused and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._notify()

    def eof_received(self) -> bool:
        self.closed = True
        self._notify()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._notify()
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def pause_writing(self) -> None:
        self._can_write = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        self._can_write = None

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # -- used by the request coroutine --
    async def wait_data(self, timeout: float | None) -> None:
        """Wait until more bytes arrive or the peer closes (TimeoutError after ``timeout``)."""
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        self._wake = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._wake
        finally:
            self._wake = None

    async def drain(self, timeout: float | None) -> None:
        if self._can_write is not None:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._can_write)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """A lean HTTP/1.1 keep-alive transport for plain ``http://`` upstreams.

    httpx's default pool scans every connection (with a readability syscall each) on every
    request and sends headers and body as two writes; with the gateway's 14 upstream calls
    per decision that bookkeeping dominated its CPU time. This transport keeps idle
    connections in a LIFO list (a closed one is dropped when its ``connection_lost`` fires),
    sends each request in one write, and reads Content-Length, chunked or read-until-close
    bodies. Timeouts and failures surface as the usual httpx exceptions, so
    ``AsyncClient`` semantics (and the backend's retry/error mapping) are unchanged. A
    response beyond ``limits`` raises ``BackendProtocolError`` (not retried: the same
    request would get the same answer) and its connection is closed.
    One instance belongs to one event loop.
    """

    def __init__(
        self, max_connections: int, max_keepalive: int, limits: ResponseLimits | None = None
    ) -> None:
        self.limits = limits or ResponseLimits()
        # a head, a body and the chunk framing of one read ahead
        self._max_buffer = self.limits.max_header_bytes + self.limits.max_body_bytes + (1 << 16)
        self._idle: dict[tuple[str, int], list[Http1Connection]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._max_keepalive = max_keepalive
        self._busy: set[Http1Connection] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"{url.scheme!r} needs the default transport")
        head = [f"{request.method} {url.raw_path.decode('ascii')} HTTP/1.1".encode("ascii")]
        head += [k + b": " + v for k, v in request.headers.raw]
        status, version, reason, headers, body = await self.request(
            (url.host, url.port or 80),
            b"\r\n".join(head) + b"\r\n\r\n" + await request.aread(),
            request.extensions.get("timeout", {}),
            head_only=request.method == "HEAD",
            request=request,
        )
        return httpx.Response(
            status,
            headers=headers,
            # stream=, not content=: httpx then applies Content-Encoding on read
            stream=httpx.ByteStream(body),
            extensions={"http_version": version, "reason_phrase": reason},
            request=request,
        )

    async def request(
        self,
        key: tuple[str, int],
        raw: bytes,
        timeouts: Mapping[str, float | None],
        *,
        head_only: bool = False,
        request: httpx.Request | None = None,
    ) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]], bytes]:
        """Send one serialised request (head and body) to ``key`` = (host, port) on a pooled
        connection; returns (status, http version, reason, headers, body). Failures raise the
        usual httpx exceptions."""
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise httpx.PoolTimeout("no upstream connection free", request=request) from exc
        try:
            conn = await self._connection(key, request, timeouts.get("connect"))
            self._busy.add(conn)
            done = False
            try:
                status, version, reason, headers, body, keep = await self._exchange(
                    conn, raw, timeouts, head_only, request
                )
                done = True
            finally:
                self._busy.discard(conn)
                if not done:
                    conn.close()  # cancelled or failed mid-exchange: the stream is unusable
            if keep and not conn.closed:
                idle = self._idle.setdefault(key, [])
                if len(idle) < self._max_keepalive:
                    idle.append(conn)
                else:
                    conn.close()
            else:
                conn.close()
            return status, version, reason, headers, body
        finally:
            self._slots.release()

    async def _connection(
        self, key: tuple[str, int], request: httpx.Request | None, timeout: float | None
    ) -> Http1Connection:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.buffer:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, proto = await loop.create_connection(
                    lambda: Http1Connection(self._max_buffer), key[0], key[1]
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {key[0]}:{key[1]}", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        return proto

    async def _exchange(
        self,
        conn: Http1Connection,
        raw: bytes,
        timeouts: Mapping[str, float | None],
        head_only: bool,
        request: httpx.Request | None,
    ) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]], bytes, bool]:
        if conn.transport is None or conn.closed:
            raise httpx.WriteError("connection closed", request=request)
        conn.transport.write(raw)
        try:
            await conn.drain(timeouts.get("write"))
        except TimeoutError as exc:
            raise httpx.WriteTimeout("writing the request timed out", request=request) from exc
        read_timeout = timeouts.get("read")

        async def more() -> None:
            if conn.closed:
                raise httpx.RemoteProtocolError(
                    "upstream closed the connection mid-response", request=request
                )
            try:
                await conn.wait_data(read_timeout)
            except TimeoutError as exc:
                raise httpx.ReadTimeout("reading the response timed out", request=request) from exc

        max_head, max_body = self.limits.max_header_bytes, self.limits.max_body_bytes

        def head_too_large() -> BackendProtocolError:
            return BackendProtocolError(f"upstream response head exceeds {max_head} bytes")

        def body_too_large() -> BackendProtocolError:
            return BackendProtocolError(f"upstream response body exceeds {max_body} bytes")

        buf = conn.buffer
        while True:  # status line and headers; 1xx interim responses are skipped
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                if len(buf) > max_head:
                    raise head_too_large()
                await more()
                end = buf.find(b"\r\n\r\n")
            if end + 4 > max_head:
                raise head_too_large()
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[: end + 4]
            try:
                version, code, *reason = lines[0].split(b" ", 2)
                status = int(code)
                headers = [
                    (k.strip(), v.strip()) for k, _, v in (ln.partition(b":") for ln in lines[1:])
                ]
            except ValueError as exc:
                raise httpx.RemoteProtocolError("malformed response head", request=request) from exc
            if not 100 <= status < 200:
                break
        fields = {k.lower(): v for k, v in headers}
        keep = version == b"HTTP/1.1" and fields.get(b"connection", b"").lower() != b"close"
        chunks: list[bytes] = []
        if head_only or status in (204, 304):
            pass
        elif b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            total = 0
            while True:
                end = buf.find(b"\r\n")
                while end < 0:
                    if len(buf) > max_head:  # a chunk-size line is no longer than a head
                        raise head_too_large()
                    await more()
                    end = buf.find(b"\r\n")
                try:
                    size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                except ValueError as exc:
                    raise httpx.RemoteProtocolError(
                        "malformed chunk size", request=request
                    ) from exc
                if size < 0:
                    raise httpx.RemoteProtocolError("malformed chunk size", request=request)
                total += size
                if total > max_body:
                    raise body_too_large()
                if size == 0:  # last chunk, then optional trailers and a blank line
                    while buf.find(b"\r\n\r\n", end) < 0:
                        if len(buf) > max_head:
                            raise head_too_large()
                        await more()
                    del buf[: buf.find(b"\r\n\r\n", end) + 4]
                    break
                while len(buf) < end + 2 + size + 2:
                    await more()
                chunks.append(bytes(buf[end + 2 : end + 2 + size]))
                del buf[: end + 2 + size + 2]
        elif b"content-length" in fields:
            try:
                length = int(fields[b"content-length"])
            except ValueError as exc:
                raise httpx.RemoteProtocolError(
                    "malformed content-length", request=request
                ) from exc
            if length < 0:
                raise httpx.RemoteProtocolError("malformed content-length", request=request)
            if length > max_body:
                raise body_too_large()
            while len(buf) < length:
                await more()
            chunks.append(bytes(buf[:length]))
            del buf[:length]
        else:  # no framing: the body runs until the server closes
            while not conn.closed:
                if len(buf) > max_body:
                    raise body_too_large()
                await more()
            if len(buf) > max_body:
                raise body_too_large()
            chunks.append(bytes(buf))
            buf.clear()
            keep = False
        return status, version, reason[0] if reason else b"", headers, b"".join(chunks), keep

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.close()


class DirectPost:
    """POST JSON through a ``KeepAliveTransport`` without httpx's client layer.

    Building an ``httpx.Request``, merging headers and cookies and wrapping the reply in an
    ``httpx.Response`` cost more CPU than the exchange itself (profiled in the gateway: over
    half of its event-loop time went there). For a plain-http upstream the request is fixed
    in shape, so its head is formatted directly. Failures raise the same httpx exceptions as
    the client path, so the backend's retry and error mapping are shared.
    """

    def __init__(
        self,
        transport: KeepAliveTransport,
        root_url: str,
        headers: Mapping[str, str],
        timeout: httpx.Timeout,
    ) -> None:
        url = httpx.URL(root_url)
        self.transport = transport
        self.key = (url.host, url.port or 80)
        self.prefix = url.raw_path.decode("ascii").rstrip("/")
        host = f"[{url.host}]" if ":" in url.host else url.host
        if url.port is not None:
            host += f":{url.port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.head = f"Host: {host}\r\nAccept: application/json\r\n" + extra
        self.timeouts = timeout.as_dict()

    async def post(self, path: str, payload: Mapping[str, Any]) -> Reply:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        head = (
            f"POST {self.prefix}{path} HTTP/1.1\r\n{self.head}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        status, _, _, headers, content = await self.transport.request(
            self.key, head.encode("latin-1") + body, self.timeouts
        )
        names = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
        if names.get("content-encoding", "identity").lower() != "identity":
            # not asked for, but some servers compress anyway: httpx knows every coding
            resp = httpx.Response(status, headers=headers, stream=httpx.ByteStream(content))
            content = await resp.aread()
        return Reply(status, names, content)


class LoopState:
    """A client and a semaphore bound to one event loop (httpx pools cannot cross loops)."""

    def __init__(
        self, client: httpx.AsyncClient, limit: int, direct: DirectPost | None = None
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.direct = direct
        self.semaphore = asyncio.Semaphore(limit)
        self._urls: dict[str, httpx.URL] = {}

    def url(self, path: str) -> httpx.URL:
        """The absolute URL of ``path``, parsed once: httpx would re-parse and re-merge the
        base URL on every request (a measurable share of the per-call CPU)."""
        url = self._urls.get(path)
        if url is None:
            base = self.client.base_url  # httpx keeps it with a trailing slash
            # the same merge as httpx's: the path is appended to the base URL's path
            url = base.copy_with(raw_path=base.raw_path + path.lstrip("/").encode("ascii"))
            self._urls[path] = url
        return url

    async def post(self, path: str, payload: Mapping[str, Any]) -> Reply:
        if self.direct is not None:
            return await self.direct.post(path, payload)
        resp = await self.client.post(self.url(path), json=payload)
        return Reply(resp.status_code, resp.headers, await resp.aread())


def env_proxy() -> bool:
    """True when the environment names an HTTP proxy: httpx's own transport honours it."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get("http") or proxies.get("all"))


def httpx_transport(max_connections: int) -> httpx.AsyncHTTPTransport:
    """httpx's own pooled HTTP/1.1 transport, tuned like ``KeepAliveTransport``: as many
    kept-alive connections as requests in flight, no HTTP/2, no transport-level retries (the
    backend retries)."""
    return httpx.AsyncHTTPTransport(
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
        ),
        http1=True,
        http2=False,
        retries=0,
    )
