"""llama.cpp in-process: the embedded backend and a standalone server.

``EmbeddedLlamaBackend`` loads a GGUF with ``xllamacpp`` (the ``llama`` extra), which runs
llama.cpp's own HTTP server on a random loopback port, and talks to it through
``OpenAICompatBackend``: embedded and remote models share one code path.

Context: llama.cpp splits its total context evenly over ``n_parallel`` slots. Here ``n_ctx``
is the context *per slot* (one request); the server is given ``n_ctx * n_parallel``.

Memory: the model, the KV cache (``n_ctx * n_parallel`` tokens), and prompt states that
llama.cpp keeps in RAM after they leave a slot, up to ``cache_ram_mib`` (llama.cpp's default,
8,192 MiB, when None; 0 turns it off). A long evaluation with the default model and 16 slots
of 4,096 grows to about 12.5 GB resident for that reason; bound it on a small machine.

Hidden states (``hidden``, the features of learned scorers): llama.cpp computes per-token
states only in a context started with embeddings on, so the backend starts a second server
on the same file the first time they are asked for (one slot, pooling ``none``), and pools
the last token and the mean itself: both poolings from one pass. The weights are mmapped
from the same file, so the second server costs its own KV cache and compute buffers, not a
second copy of the model (measured in docs/probes.md).

Standalone server (for tests, or to serve a packaged model to other programs)::

    python -m safetygame.backends.llamacpp --model smollm2-135m --port 8080

prints its base URL on the first line of stdout and serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any, Literal

from safetygame.backends.base import (
    Backend,
    Completion,
    HiddenStates,
    LogLik,
    Message,
    SamplingConfig,
    StreamedCompletion,
    YesNo,
    pool_hidden,
)
from safetygame.backends.openai_compat import OpenAICompatBackend
from safetygame.errors import ConfigError, ModelNotInstalledError
from safetygame.models import DEFAULT_MODEL, ModelFile, resolve_model

__all__ = ["EmbeddedLlamaBackend", "LlamaServer", "main"]

INSTALL_HINT = "pip install 'safetygame[llama]'"
MIN_SLOT_CTX = 512
DEFAULT_SLOTS = 4  # parallel requests (llama.cpp slots)
DEFAULT_THREADS = 2
_POOLING = {
    "none": "LLAMA_POOLING_TYPE_NONE",
    "last": "LLAMA_POOLING_TYPE_LAST",
    "mean": "LLAMA_POOLING_TYPE_MEAN",
}


class LlamaServer:
    """A llama.cpp HTTP server inside this process, serving one model file."""

    def __init__(
        self,
        model_file: ModelFile,
        *,
        n_parallel: int = DEFAULT_SLOTS,
        n_ctx: int = 4096,
        threads: int = DEFAULT_THREADS,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
        poll: int = 50,
        cache_ram_mib: int | None = None,
        embeddings: bool = False,
        pooling: Literal["none", "last", "mean"] = "none",
    ) -> None:
        if n_parallel < 1:
            raise ConfigError("n_parallel must be >= 1")
        if n_ctx < MIN_SLOT_CTX:
            raise ConfigError(f"n_ctx (per slot) must be >= {MIN_SLOT_CTX}")
        if threads < 1:
            raise ConfigError("threads must be >= 1")
        if not 0 <= poll <= 100:
            raise ConfigError("poll must be in [0, 100]")
        if not 0 <= port <= 65535:
            raise ConfigError("port must be in [0, 65535]")
        if cache_ram_mib is not None and cache_ram_mib < 0:
            raise ConfigError("cache_ram_mib must be >= 0 (0 = no prompt cache in RAM)")
        try:
            import xllamacpp
        except ImportError as exc:
            raise ModelNotInstalledError(
                f"the embedded llama.cpp runtime is not installed; install it with: {INSTALL_HINT}"
            ) from exc
        p = xllamacpp.CommonParams()
        p.model.path = str(model_file.path)
        p.n_ctx = n_ctx * n_parallel  # llama.cpp gives each slot n_ctx / n_parallel
        p.n_parallel = n_parallel
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        # poll: how long idle worker threads spin before sleeping (llama.cpp default 50).
        # An A/B of 0 vs 50 on a loaded 2-core box was lost in noise; 0 may help when
        # other processes compete for the cores.
        p.cpuparams.poll = poll
        p.cpuparams_batch.poll = poll
        if cache_ram_mib is not None:
            p.cache_ram_mib = cache_ram_mib
        if pooling not in _POOLING:
            raise ConfigError(f"pooling must be one of {sorted(_POOLING)}, not {pooling!r}")
        if embeddings:
            # pooling none: per-token states, pooled by the caller (/embeddings); last or
            # mean: pooled by llama.cpp (/v1/embeddings). A whole prompt must fit one ubatch.
            p.embedding = True
            p.pooling_type = getattr(xllamacpp.llama_pooling_type, _POOLING[pooling])
            p.n_batch = p.n_ubatch = n_ctx * n_parallel
        p.warmup = False
        p.hostnames = [host]
        p.port = port
        p.verbosity = 3 if verbose else -1  # llama.cpp is very chatty on stderr otherwise
        self.model_file = model_file
        self.n_parallel = n_parallel
        self.n_ctx = n_ctx
        self._server: Any = xllamacpp.Server(p)
        self.address: str = str(self._server.listening_address)

    def close(self, timeout: float = 60.0) -> None:
        """Stop the server. xllamacpp stops it when the object is freed, which waits for its
        HTTP threads; a stuck client connection must not hang the caller, so the release
        runs in a daemon thread that is given ``timeout`` seconds. That guard fails if the
        destructor holds the GIL while it waits, which has been seen after a run was stopped
        with requests in flight; the eval CLI then relies on an exit alarm instead."""
        server, self._server = self._server, None
        if server is None:
            return

        def release(srv: list[Any]) -> None:
            srv.clear()
            gc.collect()

        holder = [server]
        del server
        t = threading.Thread(target=release, args=(holder,), daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            warnings.warn(
                f"llama.cpp server at {self.address} did not stop within {timeout} s",
                RuntimeWarning,
                stacklevel=2,
            )


class EmbeddedLlamaBackend(Backend):
    """A packaged (or local GGUF) model run by llama.cpp in this process.

    Construction loads the model (seconds for the 1.5B default) and starts the server.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        n_parallel: int = DEFAULT_SLOTS,
        n_ctx: int = 4096,
        threads: int = DEFAULT_THREADS,
        yes_no_samples: int = 8,
        timeout: float = 300.0,
        verify: bool = False,
        verbose: bool = False,
        cache_ram_mib: int | None = None,
        hidden_ctx: int = 2048,
    ) -> None:
        if hidden_ctx < MIN_SLOT_CTX:
            raise ConfigError(f"hidden_ctx must be >= {MIN_SLOT_CTX}")
        self.model_file = resolve_model(model, verify=verify)
        self.server = LlamaServer(
            self.model_file,
            n_parallel=n_parallel,
            n_ctx=n_ctx,
            threads=threads,
            verbose=verbose,
            cache_ram_mib=cache_ram_mib,
        )
        self.model_id = self.model_file.model_id
        self.max_concurrency = n_parallel
        # A queue of requests beyond n_parallel would wait inside llama.cpp anyway; limiting
        # here keeps the HTTP timeouts honest (they then measure work, not queueing).
        self.client = OpenAICompatBackend(
            self.server.address,
            model_id=self.model_id,
            timeout=timeout,
            max_concurrency=n_parallel,
            yes_no_samples=yes_no_samples,
            slots=n_parallel,  # one request per candidate, pinned: followup probes reuse it
        )
        self.stats = self.client.stats
        self._threads = threads
        self._timeout = timeout
        self._hidden_ctx = hidden_ctx
        self._embed_server: LlamaServer | None = None
        self._embed_client: OpenAICompatBackend | None = None
        self._embed_lock = asyncio.Lock()

    async def _embedder(self) -> OpenAICompatBackend:
        async with self._embed_lock:
            if self._embed_client is None:
                server = await asyncio.to_thread(
                    LlamaServer,
                    self.model_file,
                    n_parallel=1,
                    n_ctx=self._hidden_ctx,
                    threads=self._threads,
                    embeddings=True,
                )
                self._embed_server = server
                self._embed_client = OpenAICompatBackend(
                    server.address, model_id=self.model_id, timeout=self._timeout,
                    max_concurrency=1,
                )  # fmt: skip
            return self._embed_client

    async def hidden(self, messages: Sequence[Message]) -> HiddenStates:
        text = await self.client.render(messages)
        states = await (await self._embedder()).token_states(text)
        return HiddenStates(pool_hidden(states), n_tokens=int(states.shape[0]))

    @property
    def address(self) -> str:
        return self.server.address

    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        return await self.client.sample(messages, n, config)

    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        return await self.client.yes_no(messages)

    async def loglik(self, messages: Sequence[Message], continuation: str) -> LogLik:
        return await self.client.loglik(messages, continuation)

    async def stream(
        self, messages: Sequence[Message], config: SamplingConfig
    ) -> StreamedCompletion:
        return await self.client.stream(messages, config)

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._embed_client is not None:
            await self._embed_client.aclose()
        if self._embed_server is not None:
            self._embed_server.close()
        self.server.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m safetygame.backends.llamacpp",
        description="Serve a packaged model (or a GGUF path) with llama.cpp's HTTP server.",
    )
    ap.add_argument("--model", default=DEFAULT_MODEL, help="registry name or path to a .gguf")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = a free port")
    ap.add_argument("--n-parallel", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=4096, help="context per slot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--cache-ram",
        type=int,
        default=None,
        metavar="MIB",
        help="prompt states kept in RAM (llama.cpp default 8192; 0 = off)",
    )
    ap.add_argument(
        "--embeddings",
        action="store_true",
        help="serve hidden states too (/v1/embeddings), for learned scorers",
    )
    ap.add_argument("--pooling", choices=["last", "mean", "none"], default="last")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    try:
        server = LlamaServer(
            resolve_model(args.model),
            n_parallel=args.n_parallel,
            n_ctx=args.ctx,
            threads=args.threads,
            host=args.host,
            port=args.port,
            verbose=args.verbose,
            cache_ram_mib=args.cache_ram,
            embeddings=args.embeddings,
            pooling=args.pooling,
        )
    except (ConfigError, ModelNotInstalledError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(server.address, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
