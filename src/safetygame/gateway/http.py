"""HTTP/1.1 connection limits the gateway adds to uvicorn: header size, header count, the
time to receive a request's headers, and the idle keep-alive time.

uvicorn (0.54) bounds only some of these, and differently per parser:

- ``h11``: ``h11_max_incomplete_event_size`` (16 KiB by default) bounds a request head that
  is still incomplete (a complete one that arrives in one read may be larger); no
  header-count limit; no deadline for the head.
- ``httptools`` (picked when installed, as the gateway extra does): no bound on the head at
  all (a client sent 8 headers of 50 MB and the process grew by 430 MB), no header-count
  limit, no deadline for the head.
- Both: ``timeout_keep_alive`` closes a connection idle *after* a response; a connection
  that never completes its first request head is never timed out.

``http_protocol(limits)`` returns a subclass of uvicorn's protocol class that adds the
missing limits: bytes of a request head are fed to the parser only up to
``max_header_bytes`` (431 and close past it), more than ``max_header_count`` headers is 431,
and a head not complete ``header_timeout`` seconds after the connection opened (or after the
first byte of a later request on a kept-alive connection) is 408 and close.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from safetygame.errors import ConfigError

Parser = Literal["auto", "h11", "httptools"]


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection limits (documented in docs/gateway.md, "Connection limits")."""

    max_header_bytes: int = 16_384  # request line + headers of one request
    max_header_count: int = 100
    header_timeout: float = 10.0  # seconds to receive a request's full head
    keepalive_timeout: float = 5.0  # seconds a connection may idle between requests

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1024:
            raise ConfigError("max_header_bytes must be >= 1024")
        if self.max_header_count < 8:
            raise ConfigError("max_header_count must be >= 8")
        if not 0 < self.header_timeout < float("inf"):
            raise ConfigError("header_timeout must be a finite number > 0")
        if not 0 < self.keepalive_timeout < float("inf"):
            raise ConfigError("keepalive_timeout must be a finite number > 0")


_CLOSE = b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"


def _status(code: int, phrase: str) -> bytes:
    body = phrase.encode("ascii")
    return (
        f"HTTP/1.1 {code} {phrase}\r\n".encode("ascii")
        + _CLOSE
        + f"content-length: {len(body)}\r\n\r\n".encode("ascii")
        + body
    )


TOO_LARGE = _status(431, "Request Header Fields Too Large")
TIMED_OUT = _status(408, "Request Timeout")


class _HeadGuard:
    """The state shared by both protocol subclasses: one deadline timer, one rejection."""

    limits: HttpLimits
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    _head_timer: asyncio.TimerHandle | None
    _head_started: bool
    _rejected: bool

    def _guard_init(self) -> None:
        self._head_timer = None
        self._head_started = False  # a byte of the current request head has arrived
        self._rejected = False

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        self._reject(TIMED_OUT if self._head_started else b"")

    def _busy(self) -> bool:
        """A response of an earlier request on this connection is still being sent."""
        cycle = getattr(self, "cycle", None)
        return cycle is not None and not cycle.response_complete

    def _reject(self, response: bytes) -> None:
        """Answer ``response`` (unless a response is in progress) and close."""
        self._disarm()
        if self._rejected:
            return
        self._rejected = True
        if self.transport.is_closing():
            return
        if response and not self._busy():
            self.transport.write(response)
        self.transport.close()


def http_protocol(limits: HttpLimits, parser: Parser = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol class (httptools when installed) with ``limits`` added.

    Pass it as ``uvicorn.Config(http=...)`` together with
    ``timeout_keep_alive=limits.keepalive_timeout``."""
    if parser == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:
            parser = "h11"
        else:
            parser = "httptools"
    if parser == "httptools":
        return _httptools_protocol(limits)
    return _h11_protocol(limits)


def _httptools_protocol(limits: HttpLimits) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(_HeadGuard, HttpToolsProtocol):
        """httptools accumulates a header in memory until its end: feed it a head only up to
        ``max_header_bytes``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.limits = limits
            self._guard_init()
            self._in_head = True  # the next bytes belong to a request head
            self._head_bytes = 0
            self._header_count = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._in_head or len(data) <= self.limits.max_header_bytes - self._head_bytes:
                # the common case, without copies: a body, or a head within the limit
                if self._in_head:
                    self._head_bytes += len(data)
                if not self._rejected:
                    super().data_received(data)
                return
            view = memoryview(data)
            while view and not self._rejected:
                if not self._in_head:
                    super().data_received(bytes(view))
                    return
                room = self.limits.max_header_bytes - self._head_bytes
                if room <= 0:
                    self._reject(TOO_LARGE)
                    return
                piece, view = view[:room], view[room:]
                self._head_bytes += len(piece)
                super().data_received(bytes(piece))
                if self.transport.is_closing():
                    return

        # parser callbacks
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_started = True, True
            self._header_count = 0  # (bytes are counted from the end of the last request)
            self._arm()

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            if self._header_count <= self.limits.max_header_count:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            self._in_head, self._head_started = False, False
            if self._header_count > self.limits.max_header_count:
                self._reject(TOO_LARGE)
                return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._rejected:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._rejected:
                super().on_message_complete()
                self._in_head, self._head_bytes = True, 0  # a pipelined request may follow

    return GuardedHttpToolsProtocol


def _h11_protocol(limits: HttpLimits) -> type[asyncio.Protocol]:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(_HeadGuard, H11Protocol):
        """h11 bounds an incomplete head itself (``max_incomplete_event_size``, set from
        ``max_header_bytes`` by ``uvicorn_config``); this adds the size of a complete head,
        the count and the deadline."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.limits = limits
            self._guard_init()
            self._error_hint = 400
            next_event = self.conn.next_event

            def guarded_next_event() -> Any:
                try:
                    event = next_event()
                except h11.RemoteProtocolError as exc:
                    self._error_hint = exc.error_status_hint  # 431: head too large
                    raise
                if isinstance(event, h11.Request):
                    self._disarm()
                    self._head_started = False
                    # h11 bounds only a head that is still incomplete; a whole one that
                    # arrived in one read is measured here.
                    size = len(event.method) + len(event.target) + 12
                    size += sum(len(k) + len(v) + 4 for k, v in event.headers.raw_items())
                    if (
                        len(event.headers) > self.limits.max_header_count
                        or size > self.limits.max_header_bytes
                    ):
                        self._error_hint = 431
                        raise h11.RemoteProtocolError("head too large", error_status_hint=431)
                return event

            self.conn.next_event = guarded_next_event  # type: ignore[method-assign]

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._rejected:
                return
            if self.conn.their_state is h11.IDLE and data:
                self._head_started = True
                self._arm()  # the head of a new request has begun
            super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            # h11 marks an oversized head (and the count check above) with status hint 431.
            if self._error_hint == 431:
                self._reject(TOO_LARGE)
                return
            super().send_400_response(msg)

    return GuardedH11Protocol


def uvicorn_config(app: Any, limits: HttpLimits, parser: Parser = "auto", **kwargs: Any) -> Any:
    """A ``uvicorn.Config`` for ``app`` with ``limits`` applied (kwargs pass through)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        http=http_protocol(limits, parser),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        **kwargs,
    )
    # uvicorn annotates it as int but uses it as a float delay (loop.call_later)
    config.timeout_keep_alive = limits.keepalive_timeout  # type: ignore[assignment]
    return config
