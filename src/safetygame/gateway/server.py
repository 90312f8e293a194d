"""Running the app under uvicorn: one helper shared by ``safetygame serve`` and the bench."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from starlette.applications import Starlette

from safetygame.gateway.http import HttpLimits, Parser, uvicorn_config

T = TypeVar("T")


def app_limits(app: Starlette) -> HttpLimits:
    """The connection limits in the settings of a gateway app (defaults for other apps)."""
    gateway = getattr(app.state, "gateway", None)
    limits = getattr(getattr(gateway, "settings", None), "http", None)
    return limits if isinstance(limits, HttpLimits) else HttpLimits()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed (the gateway extra installs it).

    The gateway is CPU-bound on its event loop (about 14 upstream HTTP calls per decision);
    uvloop cut its CPU per decision by about 9% in ``safetygame bench gateway`` (A/B on the
    project's 2-core machine), and uvicorn picks the httptools parser by itself. Without
    uvloop the standard loop runs the same code.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def serve_app(
    app: Starlette,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    on_ready: Callable[[str], None] | None = None,
    sock: socket.socket | None = None,
    limits: HttpLimits | None = None,
) -> bool:
    """Serve until stopped (SIGINT/SIGTERM). ``on_ready(url)`` runs once the socket is bound
    (``port=0`` picks a free one). ``sock``: accept on this listening socket instead of
    binding ``host:port`` (the workers of ``safetygame serve --workers N`` share one).
    ``limits``: connection limits (default: the app's ``GatewaySettings.http``).
    Returns False if the server failed to start."""
    import uvicorn

    config = uvicorn_config(
        app,
        limits or app_limits(app),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=None if sock is None else [sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if not server.started:
        await task
        return False
    bound = (sock or server.servers[0].sockets[0]).getsockname()
    if on_ready is not None:
        on_ready(f"http://{bound[0]}:{bound[1]}")
    await task
    return True


@contextlib.contextmanager
def serve_in_thread(
    app: Starlette,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: HttpLimits | None = None,
    parser: Parser = "auto",
) -> Iterator[str]:
    """Serve ``app`` with uvicorn on its own event loop in a thread; yields the base URL.

    For tests and notebooks; a production server runs ``safetygame serve``. ``limits``:
    connection limits (default: the app's); ``parser``: uvicorn's HTTP parser.
    """
    import uvicorn

    config = uvicorn_config(
        app,
        limits or app_limits(app),
        parser,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gateway-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
