"""The scoring pass: the one expensive step of an evaluation, done once and cached.

For every multiple-choice item and option it records the generator's log-likelihood of the
option, the helpfulness probe and the harm probe (plus the same for the policy's refusal), all
through the content-hash cache: an interrupted run resumes where it stopped, and every method
and budget is then computed from these numbers without touching the model.

Throughput (``safetygame bench scoring`` measures it). Each item is scored as two *streams*,
each one request at a time: the log-likelihoods of its replies, and its probes (per reply the
helpfulness probe, then the harm probe). Requests of one stream share long prefixes (the
question; or the judge system prompt, the question and, for the two probes of one reply,
everything but the final question), so each request lands on the llama.cpp slot that holds
the previous one's prompt (``cache_prompt``) and only the new tail is evaluated. Several items
run at once, enough streams to keep every parallel slot busy (continuous batching). Running an
item's replies all at once instead would send the same prefix to several slots, each of which
would evaluate it again.

:class:`CachingBackend` adds the same content-hash caching to sampling, so open-ended runs
(which sample candidates) are resumable too and a repeated run makes no model call.
:class:`CacheOnlyBackend` is no model at all: under it a run reads the cache alone
(``safetygame eval ... --cache-only``), and any reading the cache lacks fails.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tqdm import tqdm

from safetygame.backends.base import (
    Backend,
    Completion,
    HiddenStates,
    LogLik,
    Message,
    SamplingConfig,
    TokenChoice,
    YesNo,
)
from safetygame.cache import ScoreCache, content_key
from safetygame.errors import BackendError, ConfigError
from safetygame.eval.datasets import MCItem
from safetygame.policy import Policy
from safetygame.probes import GeneratorLikelihood, Score, Scorer, read
from safetygame.scorers import build_scorer

__all__ = [
    "CacheOnlyBackend",
    "CachingBackend",
    "ItemScores",
    "RunTally",
    "ScoringPass",
    "gather_in_order",
    "item_chat",
]

R = TypeVar("R")


@dataclass(frozen=True)
class ItemScores:
    """Raw readings for one item: per option its log-likelihood; per option and then the
    refusal (last) the two probes. No method uses the refusal's log-likelihood, so it is
    not computed."""

    item_id: str
    loglik: tuple[float, ...]  # summed log-probability of each option
    n_tokens: tuple[int, ...]
    helpfulness: tuple[float, ...]  # options, then the refusal
    harm: tuple[float, ...]  # options, then the refusal
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def n_options(self) -> int:
        """Options of the item (the refusal excluded)."""
        return len(self.loglik)


def item_chat(item: MCItem) -> tuple[Message, ...]:
    return (Message("user", item.question),)


class ScoringPass:
    """Score options with one generator and two scorers (by default the ones the policy's
    ``scorers:`` names, as a decision would use them).

    ``concurrency`` bounds the requests in flight (default: the backend's parallel slots);
    each item in flight uses two, so ``concurrency // 2`` items are scored at once.
    """

    def __init__(
        self,
        backend: Backend,
        policy: Policy,
        cache: ScoreCache | None,
        *,
        helpfulness: Scorer | None = None,
        harm: Scorer | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.policy = policy
        self.loglik = GeneratorLikelihood(backend, cache)
        sc = policy.scorers
        self.helpfulness = helpfulness or build_scorer(
            sc.helpfulness, backend, policy, cache, kind="helpfulness"
        )
        self.harm = harm or build_scorer(sc.harm, backend, policy, cache, kind="harm")
        self.concurrency = max(1, concurrency or backend.max_concurrency)

    def texts(self, item: MCItem) -> list[str]:
        """The replies probed for an item: its options, then the policy's refusal."""
        return [*item.options, self.policy.refusal]

    def n_readings(self, item: MCItem) -> int:
        """Model readings of an item: a log-likelihood per option, two probes per text."""
        return len(item.options) + 2 * len(self.texts(item))

    async def _logliks(self, chat: Sequence[Message], texts: Sequence[str]) -> list[Any]:
        out: list[LogLik | BaseException] = []
        for text in texts:
            try:
                out.append(await self.loglik.score(chat, text))
            except Exception as exc:  # recorded per item; the other readings still run
                out.append(exc)
        return out

    async def _probes(
        self, chat: Sequence[Message], texts: Sequence[str]
    ) -> list[tuple[Score, Score]]:
        out = []
        probes, refusal = self.policy.probes, self.policy.refusal
        for text in texts:  # relative scorers read each option against the refusal
            h = await read(self.helpfulness, chat, text, probes.helpfulness.question, refusal)
            d = await read(self.harm, chat, text, probes.harm.question, refusal)
            out.append((h, d))
        return out

    async def score_item(self, item: MCItem) -> ItemScores:
        """Two streams per item, each one request at a time (see the module docstring)."""
        chat = item_chat(item)
        texts = self.texts(item)
        lls, probes = await asyncio.gather(
            self._logliks(chat, item.options), self._probes(chat, texts)
        )
        return _assemble(item.id, lls, probes)

    async def score_item_sequential(self, item: MCItem) -> ItemScores:
        """The same readings in the same order, one request at a time (the benchmark's
        baseline)."""
        chat = item_chat(item)
        texts = self.texts(item)
        lls = await self._logliks(chat, item.options)
        probes = await self._probes(chat, texts)
        return _assemble(item.id, lls, probes)

    async def run(
        self,
        items: Sequence[MCItem],
        progress: bool = True,
        order: Sequence[int] | None = None,
        tally: RunTally | None = None,
    ) -> list[ItemScores]:
        """Score all items concurrently (bounded), results in input order.

        ``order`` (indices into ``items``) is the order in which items start, e.g.
        :func:`~safetygame.eval.datasets.sample_order`, so that an interrupted run has
        completed a smaller nested sample; ``tally`` says which one.
        """
        sem = asyncio.Semaphore(max(1, self.concurrency // 2))  # two streams per item
        # miniters=1: after a burst of cached items, tqdm would otherwise redraw only rarely
        bar = tqdm(total=len(items), desc="scoring", unit="item", miniters=1, disable=not progress)

        async def one(item: MCItem) -> ItemScores:
            async with sem:
                out = await self.score_item(item)
            bar.update(1)
            return out

        try:
            return await gather_in_order([one(it) for it in items], order, tally)
        finally:
            bar.close()

    async def run_sequential(
        self, items: Sequence[MCItem], progress: bool = False
    ) -> list[ItemScores]:
        out = []
        for item in tqdm(items, desc="scoring (sequential)", unit="item", disable=not progress):
            out.append(await self.score_item_sequential(item))
        return out


@dataclass
class RunTally:
    """Which items of a run have finished, kept up to date while it runs.

    Read it after an interruption: :attr:`prefix` is how many items, counted in the order
    they were started, finished one after another. In the seeded draw order that is the
    largest nested sample (``--limit prefix``) the cache can now serve whole.
    """

    order: list[int] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)

    @property
    def total(self) -> int:
        return len(self.order)

    @property
    def prefix(self) -> int:
        for k, i in enumerate(self.order):
            if i not in self.finished:
                return k
        return len(self.order)


async def gather_in_order(
    coros: Sequence[Coroutine[Any, Any, R]],
    order: Sequence[int] | None = None,
    tally: RunTally | None = None,
    complete: Callable[[R], bool] | None = None,
) -> list[R]:
    """``asyncio.gather`` whose tasks are created (and so queue on a semaphore) in ``order``;
    results come back in the input order. ``tally`` records each task that succeeds with a
    result that is ``complete`` (any result, if None)."""
    order = list(range(len(coros))) if order is None else list(order)
    if sorted(order) != list(range(len(coros))):
        raise ValueError("order must be a permutation of the coroutines' indices")
    tasks = {i: asyncio.ensure_future(coros[i]) for i in order}
    if tally is not None:
        tally.order, tally.finished = order, set()
        for i, task in tasks.items():
            task.add_done_callback(functools.partial(_tally, tally, i, complete))
    return list(await asyncio.gather(*(tasks[i] for i in range(len(coros)))))


def _tally(
    tally: RunTally, i: int, complete: Callable[[Any], bool] | None, task: asyncio.Future[Any]
) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    if complete is None or complete(task.result()):
        tally.finished.add(i)


def _assemble(
    item_id: str,
    lls: Sequence[LogLik | BaseException],
    probes: Sequence[tuple[Score, Score]],
) -> ItemScores:
    """``lls`` per option; ``probes`` per option, then the refusal's."""
    if len(probes) != len(lls) + 1:
        raise ValueError(f"{len(lls)} log-likelihoods need {len(lls) + 1} probe pairs")
    errors = [
        f"loglik[{i}]: {type(ll).__name__}: {ll}"
        for i, ll in enumerate(lls)
        if isinstance(ll, BaseException)
    ]
    for i, (h, d) in enumerate(probes):
        errors += [
            f"{name}[{i}]: {s.error}" for name, s in (("helpfulness", h), ("harm", d)) if not s.ok
        ]
    return ItemScores(
        item_id=item_id,
        loglik=tuple(float("nan") if isinstance(ll, BaseException) else ll.logprob for ll in lls),
        n_tokens=tuple(0 if isinstance(ll, BaseException) else ll.n_tokens for ll in lls),
        helpfulness=tuple(_value(h) for h, _ in probes),
        harm=tuple(_value(d) for _, d in probes),
        errors=tuple(errors),
    )


def _value(s: Score) -> float:
    return float("nan") if s.value is None else s.value


class CachingBackend(Backend):
    """A backend whose samples are cached by content hash (probes are cached by the scorers).

    Only seeded sampling requests are cached: an unseeded request asks for fresh randomness.
    ``model_calls`` counts requests that reached the wrapped backend.
    """

    def __init__(self, inner: Backend, cache: ScoreCache) -> None:
        self.inner = inner
        self.cache = cache
        self.model_id = inner.model_id
        self.max_concurrency = inner.max_concurrency
        self.stats = inner.stats
        self.model_calls = 0

    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        if config.seed is None:
            self.model_calls += n
            return await self.inner.sample(messages, n, config)
        payload = [
            [m.to_dict() for m in messages],
            n,
            [config.temperature, config.top_p, config.max_tokens, config.seed],
        ]
        if config.stop:  # keys without stop sequences stay those of the committed caches
            payload.append(list(config.stop))
        key = content_key("sample", self.model_id, payload)
        hit = self.cache.get(key)
        if hit is not None:
            return [Completion(**c) for c in hit]
        self.model_calls += n
        out = await self.inner.sample(messages, n, config)
        self.cache.put(
            key,
            "sample",
            [
                {
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                }
                for c in out
            ],
        )
        return out

    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        self.model_calls += 1
        return await self.inner.yes_no(messages)

    async def loglik(self, messages: Sequence[Message], continuation: str) -> LogLik:
        self.model_calls += 1
        return await self.inner.loglik(messages, continuation)

    # Learned heads and guard models read these (cached by their scorers, like the probes).
    async def hidden(self, messages: Sequence[Message]) -> HiddenStates:
        self.model_calls += 1
        return await self.inner.hidden(messages)

    async def complete_logprobs(
        self, prompt: str, max_tokens: int = 1, top_logprobs: int = 20
    ) -> list[TokenChoice]:
        self.model_calls += 1
        return await self.inner.complete_logprobs(prompt, max_tokens, top_logprobs)

    async def aclose(self) -> None:
        await self.inner.aclose()


class CacheOnlyBackend(Backend):
    """No model: every request fails with :class:`BackendError`. Wrapped in
    :class:`CachingBackend` (and read by the scorers through their cache) it makes a run
    report from the cache alone, without loading a model; each request that reaches it is a
    cache miss, counted in ``CachingBackend.model_calls`` and failed like an outage.

    ``model_id`` must be the id the cached readings were made with (cache keys hold it):
    :meth:`for_model` gives a packaged model's without loading or hashing its file.
    """

    def __init__(self, model_id: str, max_concurrency: int = 8) -> None:
        self.model_id = model_id
        self.max_concurrency = max_concurrency

    @classmethod
    def for_model(cls, name: str) -> CacheOnlyBackend:
        from safetygame.models import REGISTRY

        if name not in REGISTRY:
            known = ", ".join(sorted(REGISTRY))
            raise ConfigError(
                f"--cache-only needs a packaged model name ({known}), not {name!r}: "
                "its cache keys hold the model id"
            )
        return cls(f"{name}@{REGISTRY[name].sha256[:12]}")

    def _miss(self, what: str) -> BackendError:
        return BackendError(f"{what} is not in the cache, and this run makes no model call")

    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        raise self._miss("a sample")

    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        raise self._miss("a yes/no reading")

    async def loglik(self, messages: Sequence[Message], continuation: str) -> LogLik:
        raise self._miss("a log-likelihood")

    async def hidden(self, messages: Sequence[Message]) -> HiddenStates:
        raise self._miss("a hidden-state reading")

    async def complete_logprobs(
        self, prompt: str, max_tokens: int = 1, top_logprobs: int = 20
    ) -> list[TokenChoice]:
        raise self._miss("a guard model's reading")
