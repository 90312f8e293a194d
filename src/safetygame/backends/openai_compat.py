"""A backend for any OpenAI-compatible chat server (vLLM, llama.cpp server, OpenAI, ...).

- ``sample``: m candidates in one request with ``n = m`` where the server honours ``n``
  (vLLM, OpenAI), else m concurrent requests with distinct seeds (seed+i). Which route an
  upstream takes is decided on its first draw of m > 1 and cached (``sample_via``): a
  llama.cpp server (``GET /props`` names its slots) draws each candidate in its own request
  on a pinned slot (``id_slot``: seed mod slots, else round robin), so a ``followup`` probe
  can go back to the slot that holds the candidate's prefix (``PREFIX_SLOT``) and each
  candidate's usage is its own
  (llama.cpp takes ``n`` only up to its slot count and reports one choice's usage; the price
  of pinning: under concurrent decisions a request may wait for its slot while another slot
  is idle, which llama.cpp's own slot choice would have used); any other
  server is sent ``n = m`` once: m choices make it an ``n`` upstream; fewer, or a 4xx about
  the field (its ``param`` is "n", or its message names n or choices), make it an ``each``
  upstream (the choices that came are kept, the rest drawn one by one). Any other 4xx (a
  prompt past the context...) is raised and the route stays untested: the next draw asks
  again. An ``n`` server reports only the total completion tokens, so each choice is given a
  share of it in proportion to its length in characters (``base.apportion``). A seed makes
  a request reproducible on an otherwise idle server; requests that run concurrently share
  llama.cpp batches (and
  prompt-cache states), whose float results differ slightly, so a near-tie can sample
  differently (seen on Qwen2.5 1.5B at temperature 1).
- ``stream``: one reply streamed (SSE), timed to its first content token.
- ``yes_no``: one request, ``max_tokens=1``, temperature 0, top-20 log-probabilities, pooled
  over Yes/No variants (``method="logprobs"``). If the server gives no log-probabilities, or
  neither Yes nor No is among the top 20, it falls back to sampling ``yes_no_samples`` = k
  short replies at temperature 1 and counting them (``method="sampled"``). That costs k calls
  and its resolution is 1/k (k=8: P(yes) in steps of 0.125), so prefer a server with logprobs.
- ``loglik``: exact log-likelihood on llama.cpp servers via a token-level grammar that forces
  the continuation's tokens (``/apply-template``, ``/tokenize``, ``/completion``). A token
  whose piece is not whole UTF-8 (a character split over tokens, common for Chinese) cannot
  be forced (llama.cpp: "Unexpected empty grammar stack") and gets no entry in
  ``completion_probabilities``; its log-probability is read from the top candidates at its
  position instead (1,000 first, the whole vocabulary if it is not among them: ~12 s and
  14 MB for Qwen2.5's 151,936 tokens). On other servers (vLLM) the chat is rendered as token
  ids by the server (``/tokenize`` with ``messages``), the continuation's ids appended, and
  ``/v1/completions`` asked for the prompt tokens' log-probabilities: vLLM's
  ``prompt_logprobs``, else OpenAI's ``echo`` with ``logprobs``. Which path an upstream takes
  is detected on first use and cached; a server with none raises BackendUnsupported naming
  the missing features.
- ``complete_logprobs``: a greedy raw completion of a caller-rendered prompt with the top
  log-probabilities per position (``/v1/completions`` with ``logprobs``, else llama.cpp's
  ``/completion`` with ``n_probs``), for guard models; detected and cached the same way.
- ``hidden``: the chat rendered by the server's own chat template (llama.cpp's
  ``/apply-template``; a plain ``role: content`` rendering where the server has none), sent to
  ``/v1/embeddings`` of ``embeddings_url`` (default: this server). The server decides the
  pooling (llama.cpp ``--embeddings --pooling last|mean``, vLLM's pooler), so the caller
  states it as ``embeddings_pooling``; a server without the endpoint raises
  BackendUnsupported naming the URL.

Transport errors are retried with exponential backoff and full jitter (429, 5xx, connect
errors; ``Retry-After`` is honoured), then mapped to the BackendError tree with ``from exc``.
Which statuses are retried is ``backends/retry.py``'s ``classify_status``; the HTTP client
(a lean keep-alive transport for plain-http upstreams, with response size limits) is
``backends/transport.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import httpx
import numpy as np

from safetygame.backends.base import (
    PREFIX_SLOT,
    Backend,
    BackendStats,
    Completion,
    HiddenStates,
    LogLik,
    Message,
    Pooling,
    SamplingConfig,
    StreamedCompletion,
    TokenChoice,
    YesNo,
    apportion,
    yes_no_from_top_logprobs,
)
from safetygame.backends.retry import (
    RETRY_STATUS,
    RetryPolicy,
    classify_status,
    parse_retry_after,
)
from safetygame.backends.transport import (
    DirectPost,
    KeepAliveTransport,
    LoopState,
    Reply,
    env_proxy,
)
from safetygame.errors import (
    BackendError,
    BackendProtocolError,
    BackendRateLimited,
    BackendTimeout,
    BackendUnsupported,
    ConfigError,
)

__all__ = ["RETRY_STATUS", "OpenAICompatBackend", "RetryPolicy", "parse_retry_after"]

# A /completion prompt: text, or text followed by token ids (llama.cpp mixed prompts).
Prompt = str | list[str | int]

DEFAULT_MAX_CONCURRENCY = 8  # requests in flight per backend
DEFAULT_TIMEOUT = 120.0  # seconds per request
TOP_LOGPROBS = 20


def _upstream_message(resp: Reply) -> str:
    try:
        body = resp.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message", err) if isinstance(err, dict) else err
        text = str(msg)
    except ValueError:
        text = resp.text
    return text[:300]


def _get(obj: Any, *path: str | int) -> Any:
    """obj[path[0]][path[1]]... or BackendProtocolError naming the missing field."""
    cur = obj
    for i, key in enumerate(path):
        try:
            cur = cur[key]
        except (KeyError, IndexError, TypeError) as exc:
            where = ".".join(str(p) for p in path[: i + 1])
            raise BackendProtocolError(f"upstream response lacks {where}") from exc
    return cur


class OpenAICompatBackend(Backend):
    """A model behind an OpenAI-compatible HTTP API.

    ``base_url`` may be the server root (``http://host:port``) or its ``/v1`` prefix.
    ``model_id`` defaults to ``model`` or the URL; set it to something stable for caches.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = 5.0,
        max_retries: int = 3,
        retry: RetryPolicy | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        yes_no_samples: int = 8,
        model_id: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        seed: int | None = None,
        embeddings_url: str | None = None,
        embeddings_pooling: Pooling = "last",
        slots: int | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not (math.isfinite(timeout) and timeout > 0 and connect_timeout > 0):
            raise ConfigError("timeout and connect_timeout must be finite and > 0")
        if max_concurrency < 1:
            raise ConfigError("max_concurrency must be >= 1")
        if yes_no_samples < 1:
            raise ConfigError("yes_no_samples must be >= 1")
        if slots is not None and slots < 0:
            raise ConfigError("slots must be >= 0 (0 = never pin a llama.cpp slot)")
        if api_key is not None and any(c in api_key for c in "\r\n\0"):
            raise ConfigError("api_key must not contain line breaks or NUL")
        root = base_url.rstrip("/")
        self.root_url = root[: -len("/v1")] if root.endswith("/v1") else root
        self.model = model
        self.model_id = model_id or model or self.root_url
        self.max_concurrency = max_concurrency
        self.yes_no_samples = yes_no_samples
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self.stats: BackendStats = BackendStats()
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport
        self._rng = random.Random(seed)
        self._state: LoopState | None = None
        self._closed = False
        if embeddings_pooling not in ("last", "mean"):
            raise ConfigError("embeddings_pooling must be 'last' or 'mean'")
        self.embeddings_pooling: Pooling = embeddings_pooling
        self._embedder: OpenAICompatBackend | None = None
        if embeddings_url is not None and embeddings_url.rstrip("/") != base_url.rstrip("/"):
            self._embedder = OpenAICompatBackend(
                embeddings_url,
                model,
                api_key,
                timeout=timeout,
                connect_timeout=connect_timeout,
                max_retries=max_retries,
                max_concurrency=max_concurrency,
                model_id=self.model_id,
            )
        self._templates: bool | None = None  # does the server render chats (/apply-template)?
        #: llama.cpp slots that candidates are pinned to (``id_slot``, see ``_pin``); None until
        #: ``GET /props`` was asked, 0 = no pinning (not llama.cpp, or the caller said so)
        self.slots = slots
        self._next_slot = 0
        #: how m > 1 candidates are drawn: "n" (one request), "each" (m requests); None until
        #: the first such draw tells (module docstring)
        self.sample_via: Literal["n", "each"] | None = "each" if slots else None

    # -- transport -------------------------------------------------------------------------

    def _loop_state(self) -> LoopState:
        if self._closed:
            raise BackendError("backend is closed")
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop or self._state.loop.is_closed():
            transport = self._transport
            direct = None
            if transport is None and self.root_url.startswith("http://") and not env_proxy():
                transport = KeepAliveTransport(self.max_concurrency, self.max_concurrency)
                direct = DirectPost(transport, self.root_url, self._headers, self._timeout)
            client = httpx.AsyncClient(
                base_url=self.root_url,
                headers=self._headers,
                timeout=self._timeout,
                transport=transport,
                limits=httpx.Limits(
                    max_connections=self.max_concurrency,
                    max_keepalive_connections=self.max_concurrency,
                ),
            )
            self._state = LoopState(client, self.max_concurrency, direct)
        return self._state

    async def _post(self, path: str, payload: Mapping[str, Any]) -> Any:
        """POST JSON with bounded retries; returns the decoded body or raises a BackendError."""
        state = self._loop_state()
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                async with state.semaphore:
                    self.stats.calls += 1
                    resp = await state.post(path, payload)
            except BackendProtocolError as exc:  # e.g. a response past the transport's limits
                self.stats.errors += 1
                raise BackendProtocolError(f"{self.root_url}{path}: {exc}") from exc
            except httpx.TimeoutException as exc:
                failure: BackendError = BackendTimeout(f"{self.root_url}{path} timed out")
                cause: BaseException = exc
            except httpx.TransportError as exc:
                failure = BackendError(f"cannot reach {self.root_url}{path}: {exc}")
                cause = exc
            else:
                verdict = classify_status(resp.status_code, resp.headers)
                if verdict.kind == "ok":
                    try:
                        return resp.json()
                    except ValueError as exc:
                        self.stats.errors += 1
                        raise BackendProtocolError(
                            f"{self.root_url}{path} answered with invalid JSON"
                        ) from exc
                msg = (
                    f"{self.root_url}{path} answered {resp.status_code}: {_upstream_message(resp)}"
                )
                request = httpx.Request("POST", f"{self.root_url}{path}")
                cause = httpx.HTTPStatusError(
                    msg,
                    request=request,
                    response=httpx.Response(
                        resp.status_code,
                        headers=dict(resp.headers),
                        content=resp.content,
                        request=request,
                    ),
                )
                if not verdict.retryable:
                    self.stats.errors += 1
                    if verdict.kind == "unsupported":
                        raise BackendUnsupported(msg) from cause
                    if verdict.kind == "rejected":
                        # the request itself was refused (e.g. prompt longer than the context)
                        raise ConfigError(f"request rejected by the model server: {msg}") from cause
                    raise BackendError(msg) from cause
                failure = (
                    BackendRateLimited(msg) if verdict.kind == "rate_limited" else BackendError(msg)
                )
                retry_after = verdict.retry_after
            if attempt >= self.retry.max_retries:
                self.stats.errors += 1
                raise failure from cause
            await asyncio.sleep(self.retry.delay(attempt, retry_after, self._rng))
            attempt += 1

    async def _chat(self, messages: Sequence[Message], **params: Any) -> dict[str, Any]:
        if not messages:
            raise ConfigError("messages must not be empty")
        payload: dict[str, Any] = {"messages": [m.to_dict() for m in messages], **params}
        if self.model is not None:
            payload["model"] = self.model
        body = await self._post("/v1/chat/completions", payload)
        if not isinstance(body, dict):
            raise BackendProtocolError("chat completion is not a JSON object")
        self.stats.prompt_tokens += _count(body, "usage", "prompt_tokens")
        self.stats.cached_prompt_tokens += _count(
            body, "usage", "prompt_tokens_details", "cached_tokens"
        )
        self.stats.completion_tokens += _count(body, "usage", "completion_tokens")
        return body

    # -- the three abilities ---------------------------------------------------------------

    @staticmethod
    def _sampling(config: SamplingConfig, seed: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_tokens": config.max_tokens,
        }
        if config.stop:
            params["stop"] = list(config.stop)
        if seed is not None:
            params["seed"] = seed
        return params

    async def _one_sample(
        self,
        messages: Sequence[Message],
        config: SamplingConfig,
        seed: int | None,
        slot: int | None = None,
    ) -> Completion:
        params = self._sampling(config, seed)
        if slot is not None:  # llama.cpp: this slot keeps the candidate's prefix for its probes
            params.update(id_slot=slot, cache_prompt=True)
        body = await self._chat(messages, **params)
        (text,) = _choice_texts(body, 1)
        return Completion(
            text=text,
            finish_reason=str(body["choices"][0].get("finish_reason") or "stop"),
            prompt_tokens=_count(body, "usage", "prompt_tokens"),
            completion_tokens=_count(body, "usage", "completion_tokens"),
            slot=slot,
        )

    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        if n < 1:
            raise ConfigError("n must be >= 1")
        first: list[Completion] = []
        # The route is asked for on the first draw of m > 1 (a lone candidate before it, e.g.
        # an adaptive first draw, goes unpinned; the slots are known from then on).
        if n > 1 and await self._draw_route() != "each":
            first = await self._sample_n(messages, n, config)
            if len(first) >= n:
                return first[:n]
        # One request per candidate: seeds seed+i (after those of the choices already drawn).
        todo = range(len(first), n)
        seeds = [None if config.seed is None else config.seed + i for i in todo]
        rest = await asyncio.gather(
            *(self._one_sample(messages, config, s, self._pin(s)) for s in seeds)
        )
        return first + list(rest)

    def _pin(self, seed: int | None) -> int | None:
        """The llama.cpp slot of a candidate (None when slots are not pinned). A seeded
        candidate goes to slot seed mod slots: the same request always lands on the same slot
        (its cached prefix, hence its numerics and its seeded sample, are reproducible), and a
        decision's candidates, seeded seed + i, also across an adaptive decision's two draws,
        land on different slots. Unseeded ones go round robin."""
        if not self.slots:
            return None
        if seed is not None:
            return seed % self.slots
        slot = self._next_slot % self.slots
        self._next_slot += 1
        return slot

    async def _draw_route(self) -> Literal["n", "each"] | None:
        """ "each" for a llama.cpp server (its slot count read once from ``GET /props``), else
        what an earlier ``n`` request showed; None while untested."""
        if self.sample_via is None and self.slots is None:
            self.slots = await self._llamacpp_slots()
            if self.slots:
                self.sample_via = "each"
        return self.sample_via

    async def _llamacpp_slots(self) -> int:
        """``total_slots`` from llama.cpp's ``GET /props``; 0 for any other server (the
        endpoint missing, failing or without the field)."""
        state = self._loop_state()
        try:
            async with state.semaphore:
                resp = await state.client.get(state.url("/props"))
            body = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return 0
        slots = body.get("total_slots") if isinstance(body, dict) else None
        return slots if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0 else 0

    async def _sample_n(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        """n candidates in one request (``n``); on an untested upstream this is the test: n
        choices make it an "n" upstream, fewer or a 4xx about ``n`` an "each" one (then fewer
        or no choices come back, and the caller draws the rest one by one). Any other 4xx is
        the request's fault, not the route's: raised, the route left untested."""
        params = self._sampling(config, config.seed)
        try:
            body = await self._chat(messages, n=n, **params)
        except (ConfigError, BackendUnsupported) as exc:
            if self.sample_via == "n" or not _about_n(exc):
                raise  # the request itself is at fault (e.g. longer than the context)
            self.sample_via = "each"
            return []
        choices = _get(body, "choices")
        if not isinstance(choices, list) or not choices:
            raise BackendProtocolError("upstream response has no choices")
        texts = _choice_texts(body, len(choices))
        if self.sample_via is None:
            self.sample_via = "n" if len(choices) >= n else "each"
        tokens = apportion(_count(body, "usage", "completion_tokens"), [len(t) for t in texts])
        prompt_tokens = _count(body, "usage", "prompt_tokens")
        return [
            Completion(
                text=text,
                finish_reason=str(
                    (c.get("finish_reason") if isinstance(c, dict) else None) or "stop"
                ),
                prompt_tokens=prompt_tokens,
                completion_tokens=k,
            )
            for text, c, k in zip(texts, choices, tokens, strict=True)
        ]

    async def stream(
        self, messages: Sequence[Message], config: SamplingConfig
    ) -> StreamedCompletion:
        """One reply streamed over SSE, timed from the request to the first content delta.

        Read with a plain httpx client (the keep-alive transport buffers whole bodies)."""
        if not messages:
            raise ConfigError("messages must not be empty")
        payload: dict[str, Any] = {
            "messages": [m.to_dict() for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            **self._sampling(config, config.seed),
        }
        if self.model is not None:
            payload["model"] = self.model
        parts: list[str] = []
        first: float | None = None
        usage: dict[str, Any] = {}
        finish = "stop"
        chunks = 0
        t0 = time.perf_counter()
        try:
            async with (
                httpx.AsyncClient(
                    base_url=self.root_url,
                    headers=self._headers,
                    timeout=self._timeout,
                    transport=self._transport,
                ) as client,
                client.stream("POST", "/v1/chat/completions", json=payload) as resp,
            ):
                if resp.status_code != 200:
                    await resp.aread()
                    self.stats.errors += 1
                    raise BackendError(
                        f"{self.root_url}/v1/chat/completions (stream) answered "
                        f"{resp.status_code}: {resp.text[:300]}"
                    )
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # comments (keep-alives), event names, blank separators
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    try:
                        body = json.loads(data)
                    except ValueError as exc:
                        raise BackendProtocolError("stream chunk is not JSON") from exc
                    if isinstance(body, dict) and isinstance(body.get("usage"), dict):
                        usage = body["usage"]
                    for choice in (body.get("choices") or []) if isinstance(body, dict) else []:
                        delta = choice.get("delta") if isinstance(choice, dict) else None
                        piece = delta.get("content") if isinstance(delta, dict) else None
                        if isinstance(piece, str) and piece:
                            if first is None:
                                first = time.perf_counter() - t0
                            parts.append(piece)
                            chunks += 1
                        if isinstance(choice, dict) and choice.get("finish_reason"):
                            finish = str(choice["finish_reason"])
        except httpx.TimeoutException as exc:
            self.stats.errors += 1
            raise BackendTimeout(f"{self.root_url}/v1/chat/completions (stream) timed out") from exc
        except httpx.TransportError as exc:
            self.stats.errors += 1
            raise BackendError(f"cannot reach {self.root_url}/v1/chat/completions: {exc}") from exc
        total = time.perf_counter() - t0
        self.stats.calls += 1
        self._count_usage({"usage": usage})
        completion_tokens = _count({"usage": usage}, "usage", "completion_tokens") or chunks
        return StreamedCompletion(
            Completion(
                text="".join(parts),
                finish_reason=finish,
                prompt_tokens=_count({"usage": usage}, "usage", "prompt_tokens"),
                completion_tokens=completion_tokens,
            ),
            first_token_s=first,
            total_s=total,
        )

    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        params: dict[str, Any] = {}
        slot = PREFIX_SLOT.get()
        if slot is not None and self.slots:  # a followup probe: back to the candidate's slot
            params.update(id_slot=slot % self.slots, cache_prompt=True)
        try:
            body = await self._chat(
                messages,
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=TOP_LOGPROBS,
                **params,
            )
        except (ConfigError, BackendUnsupported):
            # some servers refuse the logprobs fields outright; a request that is bad for
            # other reasons (too long) fails again in the fallback and raises there
            return await self._yes_no_sampled(messages, first_calls=1)
        prompt_tokens = _count(body, "usage", "prompt_tokens")
        top = _top_logprobs(body)
        if top is not None:
            reading = yes_no_from_top_logprobs(top)
            if reading is not None:
                p_yes, mass = reading
                return YesNo(p_yes, "logprobs", mass, calls=1, prompt_tokens=prompt_tokens)
        return await self._yes_no_sampled(messages, first_calls=1)

    async def _yes_no_sampled(self, messages: Sequence[Message], first_calls: int) -> YesNo:
        k = self.yes_no_samples
        config = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=3, seed=None)
        replies = await asyncio.gather(
            *(self._one_sample(messages, config, None) for _ in range(k))
        )
        yes = no = 0
        for r in replies:
            words = r.text.strip().split()
            first = words[0].strip(".,!:;\"'*").lower() if words else ""
            yes += first == "yes"
            no += first == "no"
        if yes + no == 0:
            raise BackendProtocolError(
                f"the model answered neither Yes nor No in its log-probabilities or in {k} samples"
            )
        return YesNo(
            p_yes=yes / (yes + no),
            method="sampled",
            mass=(yes + no) / k,
            calls=first_calls + k,
            prompt_tokens=sum(r.prompt_tokens for r in replies),
        )

    async def loglik(self, messages: Sequence[Message], continuation: str) -> LogLik:
        """log P(continuation | chat) via llama.cpp's token grammar (llama.cpp servers only).

        If the last message is from the assistant, the continuation extends that partial reply
        (prefill); otherwise it is the start of a new assistant turn.
        """
        if not continuation:
            raise ConfigError("continuation must not be empty")
        if not messages:
            raise ConfigError("messages must not be empty")
        if await self._loglik_route() != "grammar":
            return await self._loglik_scored(messages, continuation)
        try:
            templated, tokenized = await asyncio.gather(
                self._post("/apply-template", {"messages": [m.to_dict() for m in messages]}),
                # parse_special=False: the continuation is plain text, never control tokens
                self._post(
                    "/tokenize",
                    {"content": continuation, "parse_special": False, "with_pieces": True},
                ),
            )
        except BackendUnsupported as exc:
            raise BackendUnsupported(
                f"loglik needs a llama.cpp server (/apply-template, /tokenize): {exc}"
            ) from exc
        prompt = _get(templated, "prompt")
        tokens = _get(tokenized, "tokens")
        if not isinstance(prompt, str) or not isinstance(tokens, list):
            raise BackendProtocolError("/apply-template or /tokenize returned an unexpected shape")
        raw = [t.get("id") if isinstance(t, dict) else t for t in tokens]
        if not raw or not all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
            raise BackendProtocolError("/tokenize returned no token ids")
        ids = cast(list[int], raw)
        # A piece given as a list of bytes is not whole UTF-8 (older servers send no pieces).
        split = [isinstance(t, dict) and isinstance(t.get("piece"), list) for t in tokens]
        total, i = 0.0, 0
        while i < len(ids):
            # the chat, then the continuation's tokens so far (the same prefix: cached)
            head: Prompt = [prompt, *ids[:i]] if i else prompt
            if split[i]:
                total += await self._candidate_logprob(head, ids[i], i)
                i += 1
                continue
            j = next((k for k in range(i, len(ids)) if split[k]), len(ids))
            total += await self._forced_logprob(head, ids[i:j], i)
            i = j
        return LogLik(logprob=total, n_tokens=len(ids))

    async def _forced_logprob(self, prompt: Prompt, ids: list[int], at: int) -> float:
        """Summed log-probability of whole-UTF-8 tokens, forced by a token grammar."""
        body = await self._post(
            "/completion",
            {
                "prompt": prompt,
                "n_predict": len(ids),
                "n_probs": 1,
                "temperature": 0,
                "grammar": "root ::= " + " ".join(f"<[{t}]>" for t in ids),
                "cache_prompt": True,
            },
        )
        probs = _get(body, "completion_probabilities")
        if not isinstance(probs, list) or len(probs) != len(ids):
            raise BackendProtocolError(
                f"/completion returned {len(probs) if isinstance(probs, list) else 'no'} "
                f"token probabilities for {len(ids)} forced tokens"
            )
        self._count_completion(body, len(ids))
        return sum(
            _logprob_of(got, want, f"forced token {at + k}")
            for k, (want, got) in enumerate(zip(ids, probs, strict=True))
        )

    async def _candidate_logprob(self, prompt: Prompt, want: int, at: int) -> float:
        """log P(token | prompt) from the top candidates at the next position.

        For tokens a grammar cannot force. The reply is held to one printable ASCII character
        so that its entry, whose candidates are the model's distribution before sampling, is
        reported.
        """
        for n_probs in _CANDIDATES:
            body = await self._post(
                "/completion",
                {
                    "prompt": prompt,
                    "n_predict": 1,
                    "n_probs": n_probs,
                    "temperature": 0,
                    "grammar": "root ::= [ -~]",
                    "cache_prompt": True,
                },
            )
            top = _get(body, "completion_probabilities", 0, "top_logprobs")
            if not isinstance(top, list):
                raise BackendProtocolError("/completion returned no candidate log-probabilities")
            self._count_completion(body, 1)
            hit = next((c for c in top if isinstance(c, dict) and c.get("id") == want), None)
            if hit is not None:
                return _logprob_of(hit, want, f"token {at}")
            if len(top) < n_probs:  # the server listed its whole vocabulary
                break
        raise BackendProtocolError(f"token {at} (id {want}) is not among the model's candidates")

    async def render(self, messages: Sequence[Message]) -> str:
        """The chat as the model reads it before replying: the server's own chat template
        where it has one (llama.cpp's ``/apply-template``, detected once), else ``role:
        content`` lines."""
        if not messages:
            raise ConfigError("messages must not be empty")
        if self._templates is not False:
            try:
                body = await self._post(
                    "/apply-template", {"messages": [m.to_dict() for m in messages]}
                )
            except BackendUnsupported:
                self._templates = False
            else:
                prompt = _get(body, "prompt")
                if not isinstance(prompt, str):
                    raise BackendProtocolError("/apply-template returned no prompt")
                self._templates = True
                return prompt
        return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"

    async def hidden(self, messages: Sequence[Message]) -> HiddenStates:
        target = self._embedder or self
        text = await self.render(messages)
        payload: dict[str, Any] = {"input": text, "encoding_format": "float"}
        if self.model is not None:
            payload["model"] = self.model
        try:
            body = await target._post("/v1/embeddings", payload)
        except BackendUnsupported as exc:
            raise BackendUnsupported(
                f"{target.root_url}/v1/embeddings is not served ({exc}); start the server with "
                "embeddings on (llama.cpp: --embeddings --pooling last) or pass embeddings_url"
            ) from exc
        vec = _get(body, "data", 0, "embedding")
        if not isinstance(vec, list) or not vec:
            raise BackendProtocolError(f"{target.root_url}/v1/embeddings returned no vector")
        try:
            arr = np.asarray(vec, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise BackendProtocolError("/v1/embeddings returned a non-numeric vector") from exc
        if arr.ndim != 1 or not np.all(np.isfinite(arr)):
            raise BackendProtocolError(
                "/v1/embeddings returned a non-finite or nested vector (a server started with "
                "--pooling none gives per-token states: use last or mean)"
            )
        n_tokens = _count(body, "usage", "prompt_tokens")
        self.stats.prompt_tokens += n_tokens
        return HiddenStates({self.embeddings_pooling: arr.astype(np.float32)}, n_tokens)

    async def token_states(self, text: str) -> np.ndarray:
        """Per-token final hidden states of ``text``, (n_tokens, dim), from llama.cpp's native
        ``/embeddings`` on a server started with embeddings on and pooling ``none``."""
        body = await self._post("/embeddings", {"content": text})
        rows = _get(body, 0, "embedding")
        try:
            arr = np.asarray(rows, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise BackendProtocolError("/embeddings returned ragged or non-numeric rows") from exc
        if arr.ndim != 2 or arr.shape[0] == 0 or not np.all(np.isfinite(arr)):
            raise BackendProtocolError(
                "/embeddings did not return finite per-token states (is pooling 'none'?)"
            )
        self.stats.prompt_tokens += arr.shape[0]
        return arr

    # -- raw completions and scored prompts (guard models; loglik beyond llama.cpp) --------

    #: How this upstream serves a raw completion with top log-probabilities: "v1" (OpenAI
    #: /v1/completions with ``logprobs``), "llamacpp" (/completion with ``n_probs``) or "none".
    #: Detected on first use and kept for the backend's life (one backend = one upstream).
    _raw_via: str | None = None
    #: How this upstream scores given tokens for ``loglik``: "grammar" (llama.cpp's token
    #: grammar, the original path), "prompt_logprobs" (vLLM) or "echo" (OpenAI completions
    #: ``echo`` + ``logprobs``); "scored" until the first scoring request tells which of the
    #: last two; "none" when it has neither. Detected on first use, then cached.
    _loglik_via: str | None = None

    async def complete_logprobs(
        self, prompt: str, max_tokens: int = 1, top_logprobs: int = TOP_LOGPROBS
    ) -> list[TokenChoice]:
        """Greedy raw completion of a prompt the caller rendered (no chat template applied),
        with the top log-probabilities at each generated position.

        Tries OpenAI's ``/v1/completions`` with ``logprobs`` (vLLM: the legacy ``tokens`` /
        ``top_logprobs`` shape; llama.cpp: the ``content`` shape), then llama.cpp's native
        ``/completion`` with ``n_probs``; what worked is remembered. A server with neither
        raises BackendUnsupported naming both.
        """
        if not prompt:
            raise ConfigError("prompt must not be empty")
        if max_tokens < 1 or top_logprobs < 1:
            raise ConfigError("max_tokens and top_logprobs must be >= 1")
        if self._raw_via in (None, "v1"):
            payload: dict[str, Any] = {
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "logprobs": top_logprobs,
            }
            if self.model is not None:
                payload["model"] = self.model
            try:
                body = await self._post("/v1/completions", payload)
            except BackendUnsupported:
                if self._raw_via == "v1":
                    raise
            else:
                self._count_usage(body)
                positions = _completion_positions(body)
                if positions is not None:
                    self._raw_via = "v1"
                    return positions
                if self._raw_via == "v1":
                    raise BackendProtocolError("/v1/completions returned no log-probabilities")
        if self._raw_via in (None, "llamacpp"):
            native = {
                "prompt": prompt,
                "n_predict": max_tokens,
                "n_probs": top_logprobs,
                "temperature": 0,
                "cache_prompt": True,
            }
            try:
                body = await self._post("/completion", native)
            except BackendUnsupported:
                if self._raw_via == "llamacpp":
                    raise
            else:
                positions = _native_positions(body)
                if positions is not None:
                    self._raw_via = "llamacpp"
                    self._count_completion(body, len(positions))
                    return positions
                if self._raw_via == "llamacpp":
                    raise BackendProtocolError("/completion returned no token probabilities")
        self._raw_via = "none"
        raise BackendUnsupported(
            f"{self.root_url} gives no raw completion with top log-probabilities: it serves "
            "neither /v1/completions with `logprobs` nor llama.cpp's /completion with `n_probs`"
        )

    def _count_usage(self, body: Any) -> None:
        self.stats.prompt_tokens += _count(body, "usage", "prompt_tokens")
        self.stats.cached_prompt_tokens += _count(
            body, "usage", "prompt_tokens_details", "cached_tokens"
        )
        self.stats.completion_tokens += _count(body, "usage", "completion_tokens")

    async def _renders_chats(self) -> bool:
        """Does the server render chats itself (llama.cpp's ``/apply-template``)? Known from
        an earlier :meth:`render`, else probed once; a server that refuses the probe (400)
        does not."""
        if self._templates is None:
            try:
                await self.render([Message("user", "ping")])
            except ConfigError:  # not llama.cpp's endpoint
                self._templates = False
        return bool(self._templates)

    async def _loglik_route(self) -> str:
        """ "grammar" on a llama.cpp server (it renders chats: /apply-template), else
        "scored" (or what an earlier scoring request found). Decided once, then cached."""
        if self._loglik_via is None:
            self._loglik_via = "grammar" if await self._renders_chats() else "scored"
        return self._loglik_via

    async def _loglik_scored(self, messages: Sequence[Message], continuation: str) -> LogLik:
        """log P(continuation | chat) on a server that scores prompt tokens (vLLM).

        The chat is rendered into token ids by the server's own template (vLLM's ``/tokenize``
        with ``messages``; a last assistant message is continued, not closed), the
        continuation tokenised alone, and the concatenation sent to ``/v1/completions``,
        which reports each prompt token's log-probability: vLLM's ``prompt_logprobs``
        extension first, else OpenAI's ``echo`` with ``logprobs``.
        """
        missing = (
            "loglik needs llama.cpp's token grammar (/apply-template), or a server that "
            "renders chats as token ids (vLLM /tokenize) and reports prompt log-probabilities "
            "(`prompt_logprobs` or `echo` with `logprobs` on /v1/completions)"
        )
        if self._loglik_via == "none":
            raise BackendUnsupported(f"{missing}; {self.root_url} has neither")
        prefill = messages[-1].role == "assistant"
        chat: dict[str, Any] = {
            "messages": [m.to_dict() for m in messages],
            "add_generation_prompt": not prefill,
            "continue_final_message": prefill,
        }
        text: dict[str, Any] = {"prompt": continuation, "add_special_tokens": False}
        if self.model is not None:
            chat["model"] = text["model"] = self.model
        try:
            head_body, cont_body = await asyncio.gather(
                self._post("/tokenize", chat), self._post("/tokenize", text)
            )
        except (BackendUnsupported, ConfigError) as exc:
            raise BackendUnsupported(f"{missing}: {exc}") from exc
        head, cont = _token_ids(head_body), _token_ids(cont_body)
        ids = head + cont
        modes = (
            [self._loglik_via]
            if self._loglik_via in ("prompt_logprobs", "echo")
            else ["prompt_logprobs", "echo"]
        )
        refused: list[str] = []
        for mode in modes:
            try:
                lps = await self._prompt_logprobs(ids, mode)
            except ConfigError as exc:  # a server that validates strictly refuses the field
                refused.append(f"{mode}: {exc}")
                continue
            if lps is None:
                continue
            self._loglik_via = mode
            return LogLik(logprob=sum(lps[len(head) :]), n_tokens=len(cont))
        if not refused:
            self._loglik_via = "none"
        detail = f" ({'; '.join(refused)})" if refused else ""
        raise BackendUnsupported(
            f"{missing}; {self.root_url} answered without prompt log-probabilities to either "
            f"`prompt_logprobs` or `echo`{detail}"
        )

    async def _prompt_logprobs(self, ids: list[int], mode: str) -> list[float] | None:
        """log P(ids[i] | ids[:i]) for i >= 1 (index 0 holds 0.0), or None when the answer
        carries no prompt log-probabilities (the server lacks ``mode``)."""
        payload: dict[str, Any] = {"prompt": ids, "max_tokens": 1, "temperature": 0}
        if mode == "prompt_logprobs":
            payload["prompt_logprobs"] = 1
        else:
            payload["echo"] = True
            payload["logprobs"] = 1
        if self.model is not None:
            payload["model"] = self.model
        body = await self._post("/v1/completions", payload)
        self._count_usage(body)
        choice = _get(body, "choices", 0)
        if not isinstance(choice, dict):
            raise BackendProtocolError("/v1/completions returned a malformed choice")
        out = [0.0]
        if mode == "prompt_logprobs":
            entries = choice.get("prompt_logprobs")
            if not isinstance(entries, list) or len(entries) != len(ids):
                return None
            for i in range(1, len(ids)):
                entry = entries[i]
                hit = entry.get(str(ids[i])) if isinstance(entry, dict) else None
                lp = hit.get("logprob") if isinstance(hit, dict) else None
                out.append(_checked_logprob(lp, f"prompt token {i} (id {ids[i]})"))
            return out
        logprobs = choice.get("logprobs")
        values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
        if not isinstance(values, list) or len(values) < len(ids):
            return None  # no echo: only the generated token was scored
        for i in range(1, len(ids)):
            out.append(_checked_logprob(values[i], f"echoed prompt token {i}"))
        return out

    def _count_completion(self, body: Any, n_tokens: int) -> None:
        self.stats.prompt_tokens += _count(body, "tokens_evaluated")
        self.stats.cached_prompt_tokens += _count(body, "timings", "cache_n")
        self.stats.completion_tokens += n_tokens  # forced or read: one decode step each

    async def aclose(self) -> None:
        self._closed = True
        if self._embedder is not None:
            await self._embedder.aclose()
        state, self._state = self._state, None
        if state is not None and not state.loop.is_closed():
            # a client from another (finished) loop may refuse; its sockets are gone anyway
            with contextlib.suppress(RuntimeError):
                await state.client.aclose()


# Candidates asked for when reading one token's log-probability: a few first, then as many
# as the server has (llama.cpp caps n_probs at its vocabulary).
_CANDIDATES = (1000, 1 << 20)


def _logprob_of(entry: Any, want: int, what: str) -> float:
    """The log-probability in a /completion probability entry for token id ``want``."""
    if not isinstance(entry, dict) or entry.get("id") != want:
        raise BackendProtocolError(f"/completion did not follow the {what}")
    lp = entry.get("logprob")
    if not isinstance(lp, int | float) or math.isnan(lp) or lp > 1e-6:
        raise BackendProtocolError(f"/completion gave an invalid logprob for the {what}")
    return float(lp)


def _choice_texts(body: Any, n: int) -> list[str]:
    """The message texts of the first ``n`` choices (null content is an empty reply)."""
    out = []
    for i in range(n):
        text = _get(body, "choices", i, "message", "content")
        if text is None:
            text = ""  # some servers send null content for an empty reply
        if not isinstance(text, str):
            raise BackendProtocolError(f"choices[{i}].message.content is not a string")
        out.append(text)
    return out


# An upstream's words for "no n here": the parameter, llama.cpp's n_cmpl, or choices.
_N_WORDS = re.compile(r"(?<![\w.])(?:n|n_cmpl)(?![\w.])|\bchoices?\b", re.IGNORECASE)


def _about_n(exc: BaseException) -> bool:
    """Whether a refused ``n`` request was refused for its ``n``: the OpenAI error
    envelope's ``param`` is "n" (in ``error`` or beside it), or its message names n or
    choices."""
    cause = exc.__cause__
    if not isinstance(cause, httpx.HTTPStatusError):
        return False
    try:
        body = cause.response.json()
    except ValueError:
        return bool(_N_WORDS.search(cause.response.text[:300]))
    err = body.get("error", body) if isinstance(body, dict) else body
    for where in (err, body):
        if isinstance(where, dict) and where.get("param") == "n":
            return True
    message = err.get("message", err) if isinstance(err, dict) else err
    return bool(_N_WORDS.search(str(message)[:300]))


def _count(obj: Any, *path: str) -> int:
    """A usage count at ``path`` in a server's JSON; absent or malformed counts as 0 (usage
    is informational, never a reason to fail a reply)."""
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(obj, bool) or not isinstance(obj, int | float) or not math.isfinite(obj):
        return 0
    return max(int(obj), 0)


def _logaddexp(a: float, b: float) -> float:
    hi = max(a, b)
    return hi + math.log(math.exp(a - hi) + math.exp(b - hi))


def _top_logprobs(body: Mapping[str, Any]) -> dict[str, float] | None:
    """token -> logprob of the first generated token, or None when the server sent none."""
    try:
        first = body["choices"][0]["logprobs"]["content"][0]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(first, dict):
        return None
    entries = list(first.get("top_logprobs") or [])
    entries.append(first)  # the chosen token, in case it is missing from the top list
    table: dict[str, float] = {}
    seen: set[tuple[Any, Any]] = set()
    for e in entries:
        if not isinstance(e, dict):
            continue
        token, lp, tid = e.get("token"), e.get("logprob"), e.get("id")
        if not isinstance(token, str) or not isinstance(lp, int | float):
            continue
        if math.isnan(lp) or lp > 1e-6:  # NaN, +inf, > 0: the same rule as ``_logprob_of``
            raise BackendProtocolError("the upstream gave an invalid top logprob (NaN or > 0)")
        if (token, tid) in seen:
            continue
        seen.add((token, tid))
        # two ids with the same text (rare): pool their probabilities
        table[token] = _logaddexp(table[token], float(lp)) if token in table else float(lp)
    return table or None


def _checked_logprob(lp: Any, what: str) -> float:
    """A log-probability from an upstream: a number, not NaN, not above 0."""
    if isinstance(lp, bool) or not isinstance(lp, int | float) or math.isnan(lp) or lp > 1e-6:
        raise BackendProtocolError(f"the upstream gave no valid log-probability for the {what}")
    return float(lp)


def _token_ids(body: Any) -> list[int]:
    """The ``tokens`` of a /tokenize answer as plain ids (vLLM: ints; llama.cpp: ints or
    {id, piece} objects)."""
    tokens = _get(body, "tokens")
    raw = (
        [t.get("id") if isinstance(t, dict) else t for t in tokens]
        if isinstance(tokens, list)
        else []
    )
    if not raw or not all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
        raise BackendProtocolError("/tokenize returned no token ids")
    return cast(list[int], raw)


def _top_table(entries: Sequence[tuple[Any, Any]], what: str) -> dict[str, float]:
    """token -> logprob from (token, logprob) pairs; two ids with one text are pooled."""
    table: dict[str, float] = {}
    for token, lp in entries:
        if not isinstance(token, str):
            continue
        value = _checked_logprob(lp, what)
        table[token] = _logaddexp(table[token], value) if token in table else value
    return table


def _completion_positions(body: Any) -> list[TokenChoice] | None:
    """The generated positions of a /v1/completions answer, or None without logprobs.

    Two shapes: OpenAI's legacy ``logprobs`` = {tokens, token_logprobs, top_logprobs: [
    {token: logprob}]} (vLLM ``CompletionLogProbs``), and the chat-style ``logprobs.content``
    = [{token, logprob, top_logprobs: [{token, logprob}]}] that llama.cpp sends.
    """
    try:
        logprobs = body["choices"][0]["logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(logprobs, dict):
        return None
    out: list[TokenChoice] = []
    content = logprobs.get("content")
    if isinstance(content, list) and content:
        for k, e in enumerate(content):
            if not isinstance(e, dict) or not isinstance(e.get("token"), str):
                raise BackendProtocolError(f"logprobs.content[{k}] is not a token entry")
            what = f"generated token {k}"
            lp = _checked_logprob(e.get("logprob"), what)
            alts = e.get("top_logprobs") or []
            top = _top_table(
                [(a.get("token"), a.get("logprob")) for a in alts if isinstance(a, dict)], what
            )
            top.setdefault(e["token"], lp)
            out.append(TokenChoice(e["token"], lp, top))
        return out
    tokens, values, tops = (
        logprobs.get("tokens"),
        logprobs.get("token_logprobs"),
        logprobs.get("top_logprobs"),
    )
    if not (isinstance(tokens, list) and tokens and isinstance(values, list)):
        return None
    if len(values) != len(tokens) or (isinstance(tops, list) and len(tops) != len(tokens)):
        raise BackendProtocolError("/v1/completions logprobs lists differ in length")
    for k, token in enumerate(tokens):
        if not isinstance(token, str):
            raise BackendProtocolError(f"logprobs.tokens[{k}] is not a string")
        what = f"generated token {k}"
        lp = _checked_logprob(values[k], what)
        alts = tops[k] if isinstance(tops, list) and isinstance(tops[k], dict) else {}
        top = _top_table(list(alts.items()), what)
        top.setdefault(token, lp)
        out.append(TokenChoice(token, lp, top))
    return out


def _native_positions(body: Any) -> list[TokenChoice] | None:
    """The positions of a llama.cpp /completion answer with ``n_probs`` (current shape:
    {token, logprob, top_logprobs}; older servers: {content, probs: [{tok_str, prob}]})."""
    probs = body.get("completion_probabilities") if isinstance(body, dict) else None
    if not isinstance(probs, list) or not probs:
        return None
    out: list[TokenChoice] = []
    for k, e in enumerate(probs):
        if not isinstance(e, dict):
            raise BackendProtocolError(f"completion_probabilities[{k}] is not an object")
        what = f"generated token {k}"
        alts: list[tuple[Any, Any]]
        if "top_logprobs" in e:
            token = e.get("token")
            lp = _checked_logprob(e.get("logprob"), what)
            alts = [
                (a.get("token"), a.get("logprob"))
                for a in e["top_logprobs"] or []
                if isinstance(a, dict)
            ]
        else:  # probabilities, not log-probabilities
            token = e.get("content")
            pairs = [
                (a.get("tok_str"), a.get("prob"))
                for a in e.get("probs") or []
                if isinstance(a, dict)
            ]
            alts = [
                (t, math.log(p) if isinstance(p, int | float) and p > 0 else float("-inf"))
                for t, p in pairs
            ]
            lp = next((float(v) for t, v in alts if t == token), float("-inf"))
        if not isinstance(token, str):
            raise BackendProtocolError(f"completion_probabilities[{k}] names no token")
        top = _top_table(alts, what)
        top.setdefault(token, lp)
        out.append(TokenChoice(token, lp, top))
    return out
