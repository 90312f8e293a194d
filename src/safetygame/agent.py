"""The Safety Game agent: prompt -> candidates -> scores -> margins -> game -> Decision.

The agent composes the parts and adds no math of its own: sampling and probing go through
the backend and scorers, margins and the equilibrium through ``safetygame.game``. Every
failure on the way (backend error, timeout, unusable score, solver failure) ends in the
policy's refusal with the reason recorded: the layer fails closed, never silently open.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

import numpy as np

from safetygame import game
from safetygame.backends.base import (
    PREFIX_SLOT,
    Backend,
    Message,
    SamplingConfig,
    as_messages,
)
from safetygame.cache import ScoreCache
from safetygame.errors import BackendError, ConfigError
from safetygame.game import FloatArray
from safetygame.policy import Policy, load_policy
from safetygame.probes import Score, Scorer, read
from safetygame.scorers import build_scorer

REFUSAL_INDEX = 0
#: ``Score.method`` of the refusal's helpfulness that ``sampling.refusal_helpfulness: lazy``
#: did not read: it counts as ``refusal_helpfulness_bound`` in the game, recorded as None.
UNREAD = "not read (sampling.refusal_helpfulness: lazy): counted as the bound"


class Status(StrEnum):
    OK = "ok"
    GENERATION_FAILED = "generation_failed"
    SCORING_FAILED = "scoring_failed"
    SOLVER_FAILED = "solver_failed"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class CandidateRecord:
    """One candidate with everything the game saw about it."""

    text: str
    is_refusal: bool
    helpfulness: float | None
    harm: dict[str, float | None]  # per risk row: "harm" then each category
    margin: float | None  # M_i = h_i - h_refusal
    extra_risk: dict[str, float | None]  # Delta_i per risk row
    weight: float  # pi_i
    completion_tokens: int = 0
    score_errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """Everything needed to audit one answer."""

    id: str
    created: float
    action: Literal["answer", "refuse"]
    status: Status
    reason: str
    messages: tuple[Message, ...]
    candidates: tuple[CandidateRecord, ...]
    strategy: tuple[float, ...]
    chosen_index: int
    chosen_text: str
    value: float | None
    expected_risk: dict[str, float]
    budget: dict[str, float]
    multiplier: dict[str, float]
    solver: str
    timings: dict[str, float]
    tokens: dict[str, int]
    model_id: str
    scorer_ids: dict[str, str]
    policy_id: str
    policy_version: str
    policy_digest: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return self.action == "refuse"

    def summary(self) -> dict[str, Any]:
        """The short form sent with gateway responses."""
        return {
            "decision_id": self.id,
            "status": self.status.value,
            "action": self.action,
            "reason": self.reason,
            "strategy": list(self.strategy),
            "chosen_index": self.chosen_index,
            "expected_risk": self.expected_risk,
            "budget": self.budget,
            "value": self.value,
            "policy_id": self.policy_id,
            "policy_version": self.policy_version,
        }


def _recorded(score: Score, value: float | None = None) -> float | None:
    """What a decision records for a reading: ``value`` (default: the score's own), or None
    for the refusal's helpfulness that lazy did not read."""
    if score.method == UNREAD:
        return None
    return score.value if value is None else value


def _listed(by_index: Mapping[int, Score]) -> list[Score]:
    """Scores keyed by candidate index, as a list in index order."""
    return [by_index[i] for i in sorted(by_index)]


class SafetyGame:
    """Answer chats through the Safety Game on a black-box backend.

    >>> agent = SafetyGame(backend, load_policy())        # doctest: +SKIP
    >>> decision = agent.respond("How do I descale a kettle?")  # doctest: +SKIP
    """

    def __init__(
        self,
        backend: Backend,
        policy: Policy | None = None,
        *,
        helpfulness: Scorer | None = None,
        harm: Scorer | None = None,
        cache: ScoreCache | None = None,
        method: Literal["auto", "exact", "highs"] = "auto",
        timeout: float | None = 600.0,
    ) -> None:
        self.backend = backend
        self.policy = policy if policy is not None else load_policy()
        # Scorers named by the policy (validated here, at construction, not per request).
        pol = self.policy
        self.helpfulness = helpfulness or build_scorer(
            pol.scorers.helpfulness, backend, pol, cache, kind="helpfulness"
        )
        self.harm = harm or build_scorer(pol.scorers.harm, backend, pol, cache, kind="harm")
        self.method = method
        self.timeout = timeout

    # -- public API ---------------------------------------------------------------------
    def respond(
        self,
        messages: str | Sequence[Message | Mapping[str, Any]],
        *,
        budget: float | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
    ) -> Decision:
        """Synchronous twin of :meth:`arespond`."""
        return asyncio.run(
            self.arespond(messages, budget=budget, seed=seed, max_tokens=max_tokens, stop=stop)
        )

    async def arespond(
        self,
        messages: str | Sequence[Message | Mapping[str, Any]],
        *,
        budget: float | None = None,
        seed: int | None = None,
        timeout: float | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
    ) -> Decision:
        """Decide one reply. ``budget`` may lower the policy's budget, never raise it.
        ``timeout`` (seconds) replaces the agent's own for this call (a caller's deadline).
        ``max_tokens`` and ``stop`` are the length limits the caller gives a plain answer;
        every candidate is generated under them (``max_tokens`` may lower the policy's
        ``sampling.max_tokens``, never raise it), so no candidate runs longer than the plain
        answer would have."""
        chat = as_messages(messages)
        if chat[-1].role != "user":
            raise ConfigError("messages: the last message must come from the user")
        budgets = self._budgets(budget)
        cfg = self._sampling(seed, max_tokens, stop)
        limit = self.timeout if timeout is None else timeout
        t0 = time.perf_counter()
        try:
            return await asyncio.wait_for(self._run(chat, budgets, cfg, t0), limit)
        except TimeoutError:
            return self._refuse(
                chat, budgets, Status.TIMEOUT, f"no decision within {limit} s", t0, {}
            )

    # -- stages -------------------------------------------------------------------------
    def _sampling(
        self, seed: int | None, max_tokens: int | None, stop: Sequence[str]
    ) -> SamplingConfig:
        """The candidates' sampling: the policy's, under the caller's length limits."""
        pol = self.policy.sampling
        if max_tokens is not None and not (
            isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1
        ):
            raise ConfigError("max_tokens must be an integer >= 1")
        if isinstance(stop, str):
            stop = (stop,)
        return SamplingConfig(
            temperature=pol.temperature,
            top_p=pol.top_p,
            max_tokens=min(max_tokens or pol.max_tokens, pol.max_tokens),
            seed=seed,
            stop=tuple(stop),
        )

    def _budgets(self, override: float | None) -> dict[str, float]:
        budgets = self.policy.budgets
        if override is not None:
            if not (isinstance(override, int | float) and override >= 0.0):
                raise ConfigError("budget must be a number >= 0")
            if override > budgets["harm"]:
                raise ConfigError(
                    f"budget {override} exceeds the policy's budget {budgets['harm']}: "
                    "a request may lower its budget, never raise it"
                )
            budgets = {**budgets, "harm": float(override)}
        return budgets

    async def _run(
        self, chat: tuple[Message, ...], budgets: dict[str, float], cfg: SamplingConfig, t0: float
    ) -> Decision:
        """Sample, score, play. Adaptive sampling draws one candidate first and answers with it
        when :func:`game.fast_path` allows; otherwise it draws the other m - 1 (seeds
        seed + 1..., the ones a fixed draw of m gives them) and plays the full game."""
        timings: dict[str, float] = {}
        pol = self.policy
        seed = cfg.seed
        m = pol.sampling.n
        adaptive = pol.sampling.mode == "adaptive" and m > 1
        questions = {
            "harm": pol.probes.harm.question,
            **{c.name: c.question for c in pol.categories},
        }
        texts: list[str] = [pol.refusal]
        completion_tokens = [0]
        slots: list[int | None] = [None]  # the server slot each candidate was generated on
        help_at: dict[int, Score] = {}
        harm_at: dict[str, dict[int, Score]] = {name: {} for name in questions}
        path = "fixed"
        # sampling.refusal_helpfulness "lazy": the one-candidate path reads the refusal's
        # helpfulness only if the candidate's is not above the bound (else it counts as the
        # bound); the full game reads it with the other candidates. A relative scorer reads
        # the refusal for free.
        lazy = adaptive and pol.sampling.refusal_helpfulness == "lazy"
        lazy = lazy and not self.helpfulness.relative
        bound = pol.sampling.refusal_helpfulness_bound
        # The refusal is known before any candidate: with sampling.refusal_reads "during" its
        # reads go out with the first draw when the backend has a request to spare.
        overlap = pol.sampling.refusal_reads == "during"
        early: asyncio.Task[tuple[dict[int, Score], dict[str, dict[int, Score]]]] | None = None
        refusal = [REFUSAL_INDEX]
        try:
            for stage, (n, stage_cfg) in enumerate(self._draws(cfg, m, adaptive)):
                t = time.perf_counter()
                if stage == 0 and overlap and n < self.backend.max_concurrency:
                    early = asyncio.create_task(
                        self._score_all(
                            chat, texts[:1], questions, [] if lazy else refusal, refusal
                        )
                    )
                try:
                    completions = await self.backend.sample(chat, n, stage_cfg)
                except BackendError as exc:
                    seen = bool(help_at)  # a second draw failed: keep what the first one saw
                    return self._refuse(
                        chat, budgets, Status.GENERATION_FAILED, f"{type(exc).__name__}: {exc}", t0,
                        timings, texts=texts if seen else None,
                        help_scores=_listed(help_at) if seen else None,
                        harm_scores={k: _listed(v) for k, v in harm_at.items()} if seen else None,
                        completion_tokens=completion_tokens if seen else None,
                        extra={"path": "full", "drawn": len(texts) - 1} if seen else None,
                    )  # fmt: skip
                timings["generate_s"] = timings.get("generate_s", 0.0) + time.perf_counter() - t
                new = list(range(len(texts), len(texts) + len(completions)))
                texts += [c.text.strip() for c in completions]
                completion_tokens += [c.completion_tokens for c in completions]
                slots += [c.slot for c in completions]
                t = time.perf_counter()
                # The refusal is read with the first draw (its helpfulness, when lazy, with the
                # second); later draws read only new texts.
                first = stage == 0 and early is None
                unread = lazy and stage > 0 and help_at[REFUSAL_INDEX].method == UNREAD
                help_for = new + (refusal if (first and not lazy) or unread else [])
                harm_for = new + (refusal if first else [])
                hs, ds = await self._score_all(chat, texts, questions, help_for, harm_for, slots)
                if stage == 0 and early is not None:
                    rh, rd = await early
                    hs |= rh
                    ds = {name: ds[name] | rd[name] for name in questions}
                timings["score_s"] = timings.get("score_s", 0.0) + time.perf_counter() - t
                help_at |= hs
                for name in questions:
                    harm_at[name] |= ds[name]
                if not adaptive:
                    break
                if stage == 0:
                    if lazy:
                        await self._lazy_refusal(chat, texts, questions, help_at, bound, timings)
                    if self._fast(texts, help_at, harm_at, budgets) is None:
                        path = "full"
                        continue
                    path = "fast"
                    break
        finally:
            if early is not None and not early.done():  # a failed draw, a timeout
                early.cancel()

        help_scores = _listed(help_at)
        harm_scores = {name: _listed(v) for name, v in harm_at.items()}
        drawn = len(texts) - 1
        extra = {
            "path": path,
            "drawn": drawn,
            "scope": self._scope(budgets),
            "max_tokens": cfg.max_tokens,
            "stop": list(cfg.stop),
        }
        # How the refusal's helpfulness was had: read, 0.5 by definition for a relative
        # scorer (no read), or not read under sampling.refusal_helpfulness: lazy.
        extra["refusal_helpfulness"] = (
            "reference"
            if self.helpfulness.relative
            else f"not read, counted as {bound:g}"
            if help_at[REFUSAL_INDEX].method == UNREAD
            else "read"
        )

        errors = [
            f"candidate {i} {probe}: {s.error}"
            for i, row in enumerate(zip(help_scores, *harm_scores.values(), strict=True))
            for probe, s in zip(["helpfulness", *harm_scores], row, strict=True)
            if not s.ok
        ]
        empty = [i for i, text in enumerate(texts) if i != REFUSAL_INDEX and not text]
        if errors or len(empty) == len(texts) - 1:
            reason = "; ".join(errors[:3]) if errors else "every candidate was empty"
            return self._refuse(
                chat, budgets, Status.SCORING_FAILED, reason, t0, timings,
                texts=texts, help_scores=help_scores, harm_scores=harm_scores,
                completion_tokens=completion_tokens, extra=extra,
            )  # fmt: skip

        t = time.perf_counter()
        h = np.array([s.value for s in help_scores], dtype=float)
        d = np.array([[s.value for s in row] for row in harm_scores.values()], dtype=float)
        # An empty sample cannot be an answer: give it no gain and full extra risk.
        for i in empty:
            h[i], d[:, i] = 0.0, 1.0
        g = pol.game
        if extra["scope"] == "traffic":
            mg = game.margins(h, d, refusal=REFUSAL_INDEX)
            assert g.price_of_risk is not None  # the policy checks this at load time
            price = g.price_of_risk.value
            pick = game.best_response(mg, price, epsilon=g.epsilon)
            strategy = np.zeros(len(texts))
            strategy[pick] = 1.0
            result = game.GameResult(
                strategy=strategy, value=float(mg.M[pick]), objective=float(mg.M[pick]),
                expected_risk=mg.Delta2d[:, pick].copy(), budget=np.array(list(budgets.values())),
                multiplier=np.array([price]), status=game.Status.OPTIMAL,
                message=f"traffic price {price:g}: best response is candidate {pick}",
                solver="traffic-price", margins=mg,
            )  # fmt: skip
        else:
            mg, result = self._solve(h, d, budgets)
        timings["solve_s"] = time.perf_counter() - t
        if not result.success:
            return self._refuse(
                chat, budgets, Status.SOLVER_FAILED, result.message, t0, timings,
                texts=texts, help_scores=help_scores, harm_scores=harm_scores,
                completion_tokens=completion_tokens, extra=extra,
            )  # fmt: skip
        if path == "fast":
            chosen = 1  # fast_path checked that the strategy is this candidate alone
        else:
            draw_seed = seed if seed is not None else g.seed
            # Any integer seeds the draw (numpy's generator takes non-negative ones only).
            rng = np.random.default_rng(None if draw_seed is None else draw_seed % 2**64)
            chosen = game.choose(result, mode=g.choose, rng=rng)
        timings["total_s"] = time.perf_counter() - t0
        names = list(budgets)
        candidates = tuple(
            CandidateRecord(
                text=texts[i],
                is_refusal=i == REFUSAL_INDEX,
                helpfulness=_recorded(help_scores[i], float(h[i])),
                harm={n: float(d[k, i]) for k, n in enumerate(names)},
                margin=float(mg.M[i]),
                extra_risk={n: float(np.atleast_2d(mg.Delta)[k, i]) for k, n in enumerate(names)},
                weight=float(result.strategy[i]),
                completion_tokens=completion_tokens[i],
            )
            for i in range(len(texts))
        )
        action: Literal["answer", "refuse"] = "refuse" if chosen == REFUSAL_INDEX else "answer"
        reason = (
            "no candidate beats refusing within the budget"
            if result.strategy[REFUSAL_INDEX] >= 1.0 - 1e-12
            else result.message
        )
        return self._decision(
            chat, budgets, Status.OK, reason, candidates, chosen, timings,
            action=action, value=float(result.value),
            expected_risk={n: float(r) for n, r in zip(names, result.expected_risk, strict=True)},
            multiplier={n: float(x) for n, x in zip(names, result.multiplier, strict=True)},
            solver=result.solver,
            tokens=self._tokens(completion_tokens, help_scores, harm_scores),
            extra=extra,
        )  # fmt: skip

    @staticmethod
    def _draws(cfg: SamplingConfig, m: int, adaptive: bool) -> list[tuple[int, SamplingConfig]]:
        """(how many, config) per draw. Backends seed sample i with seed + i, so the second
        adaptive draw starts at seed + 1: the same candidates as one fixed draw of m."""
        if not adaptive:
            return [(m, cfg)]
        rest = cfg if cfg.seed is None else replace(cfg, seed=cfg.seed + 1)
        return [(1, cfg), (m - 1, rest)]

    def _scope(self, budgets: dict[str, float]) -> str:
        """``traffic`` when the policy prices risk and the request kept its budget; a request
        that lowers the budget gets the per-prompt game at that budget (a stricter bound)."""
        g = self.policy.game
        if g.scope == "traffic" and budgets == self.policy.budgets:
            return "traffic"
        return "prompt"

    def _solve(
        self, h: FloatArray, d: FloatArray, budgets: dict[str, float]
    ) -> tuple[game.Margins, game.GameResult]:
        mg = game.margins(h, d, refusal=REFUSAL_INDEX)
        g = self.policy.game
        result = game.solve(
            mg,
            np.array(list(budgets.values())),
            method=self.method,
            beta=g.beta,
            penalty=g.penalty,
            temperature=g.temperature,
            epsilon=g.epsilon,
        )
        return mg, result

    async def _lazy_refusal(
        self,
        chat: tuple[Message, ...],
        texts: list[str],
        questions: dict[str, str],
        help_at: dict[int, Score],
        bound: float,
        timings: dict[str, float],
    ) -> None:
        """``refusal_helpfulness: lazy`` after the first draw: read the refusal's helpfulness
        only where it can decide the fast path, a first candidate that reaches the threshold
        but not above ``bound``; elsewhere it counts as ``bound`` (the full path reads it)."""
        h1 = help_at[1]
        threshold = self.policy.sampling.fast_path_helpfulness
        if h1.value is not None and game.reads_refusal_helpfulness(h1.value, threshold, bound):
            t = time.perf_counter()
            hs, _ = await self._score_all(chat, texts, questions, [REFUSAL_INDEX], [])
            help_at |= hs
            timings["score_s"] += time.perf_counter() - t
        else:
            help_at[REFUSAL_INDEX] = Score(bound, method=UNREAD)

    def _fast(
        self,
        texts: list[str],
        help_at: dict[int, Score],
        harm_at: dict[str, dict[int, Score]],
        budgets: dict[str, float],
    ) -> game.GameResult | None:
        """The game restricted to {refusal, candidate 1}, if it takes the fast path."""
        help_scores = _listed(help_at)
        harm_scores = {name: _listed(v) for name, v in harm_at.items()}
        rows = [help_scores, *harm_scores.values()]
        if not texts[1] or any(not row[i].ok for row in rows for i in (0, 1)):
            return None  # an empty or unscored first candidate: the full game decides
        h = np.array([help_scores[0].value, help_scores[1].value], dtype=float)
        d = np.array([[row[0].value, row[1].value] for row in harm_scores.values()], dtype=float)
        try:
            _, result = self._solve(h, d, budgets)
        except ConfigError:
            return None  # a score outside [0, 1]: the full game reports it
        threshold = self.policy.sampling.fast_path_helpfulness
        ok = game.fast_path(result, 1, float(h[1]), threshold, epsilon=self.policy.game.epsilon)
        return result if ok else None

    async def _score_all(
        self,
        chat: tuple[Message, ...],
        texts: list[str],
        questions: dict[str, str],
        help_for: Sequence[int],
        harm_for: Sequence[int],
        slots: Sequence[int | None] = (),
    ) -> tuple[dict[int, Score], dict[str, dict[int, Score]]]:
        """The helpfulness reads of the replies ``help_for`` and every harm question's reads of
        ``harm_for`` (indices into ``texts``), as ({index: helpfulness}, {risk row: {index:
        harm}}).

        ``sampling.probe_order: parallel`` starts every read at once, probe by probe (every
        reply's helpfulness, then every reply's first harm question, ...), so the first ones in
        flight use different slots. ``by_reply`` reads each reply's probes one after another on
        one slot, so every probe after the first reuses the server's cache of the reply and
        reads only its question; the refusal's reads follow the first candidate's on that
        candidate's slot, reusing the conversation. Replies still go in parallel.

        A scorer that continues the generating chat (``followup``) sends each candidate's reads
        to the slot that generated it (``slots[i]``, via ``PREFIX_SLOT``): there llama.cpp
        reads only the question. Elsewhere reuse is left to the server's prefix cache (vLLM's
        automatic prefix caching, llama.cpp's prompt cache).
        """
        help_q = self.policy.probes.helpfulness.question
        refusal = texts[REFUSAL_INDEX]
        probes = [(self.helpfulness, help_q)] + [(self.harm, q) for q in questions.values()]
        # probe k of reply i is read when (i, k) is wanted; k = 0 is helpfulness
        wanted = [(i, 0) for i in help_for] + [
            (i, k) for k in range(1, len(probes)) for i in harm_for
        ]
        replies = list(dict.fromkeys(i for i, _ in wanted))

        def slot_of(i: int) -> int | None:
            return slots[i] if i < len(slots) else None

        async def one(i: int, k: int, pin: int | None = None) -> Score:
            """One read; ``pin`` sends it to that slot, else a followup read goes back to the
            slot that generated the reply."""
            scorer, question = probes[k]
            slot = pin if pin is not None else slot_of(i) if scorer.continues_chat else None
            if slot is not None:
                PREFIX_SLOT.set(slot)  # this task's context only (gather copies it)
            # relative scorers read each reply against the refusal (probes.read)
            return await read(scorer, chat, texts[i], question, refusal)

        if self.policy.sampling.probe_order == "by_reply":
            todo = set(wanted)

            async def chain(i: int, pin: int | None) -> list[Score]:
                return [await one(i, k, pin) for k in range(len(probes)) if (i, k) in todo]

            chains = await self._by_reply(replies, slot_of, chain)
            ks = {i: [k for k in range(len(probes)) if (i, k) in todo] for i in replies}
            got = {(i, k): sc for i in replies for k, sc in zip(ks[i], chains[i], strict=True)}
        else:
            # Sampled replies first, the refusal last: with a followup scorer each reply's
            # probes should reach the slot that generated it before the refusal's takes a slot.
            reads = sorted(wanted, key=lambda ik: (ik[1], ik[0] == REFUSAL_INDEX))
            flat = await asyncio.gather(*(one(i, k) for i, k in reads))
            got = dict(zip(reads, flat, strict=True))
        harm = {name: {i: got[(i, k + 1)] for i in harm_for} for k, name in enumerate(questions)}
        return {i: got[(i, 0)] for i in help_for}, harm

    @staticmethod
    async def _by_reply(
        wanted: list[int],
        slot_of: Callable[[int], int | None],
        chain: Callable[[int, int | None], Awaitable[list[Score]]],
    ) -> dict[int, list[Score]]:
        """``probe_order: by_reply``: each reply's probes in turn (``chain``) on its slot; the
        refusal's after the first candidate's, on that candidate's slot (it holds the
        conversation), or beside them when no candidate has a slot."""
        sampled = [i for i in wanted if i != REFUSAL_INDEX]
        tasks = {i: asyncio.ensure_future(chain(i, slot_of(i))) for i in sampled}
        if REFUSAL_INDEX in wanted:
            host = next((i for i in sampled if slot_of(i) is not None), None)

            async def refusal_reads() -> list[Score]:
                if host is None:
                    return await chain(REFUSAL_INDEX, None)
                await asyncio.wait([tasks[host]])
                return await chain(REFUSAL_INDEX, slot_of(host))

            tasks[REFUSAL_INDEX] = asyncio.ensure_future(refusal_reads())
        try:
            done = await asyncio.gather(*tasks.values())
        finally:
            for task in tasks.values():
                task.cancel()  # a timeout or failure elsewhere: stop the rest
        return dict(zip(tasks, done, strict=True))

    # -- building decisions -------------------------------------------------------------
    @staticmethod
    def _tokens(
        completion_tokens: list[int], help_scores: list[Score], harm_scores: dict[str, list[Score]]
    ) -> dict[str, int]:
        probe_scores = help_scores + [s for row in harm_scores.values() for s in row]
        return {
            "completion": int(sum(completion_tokens)),
            "probe_prompt": int(sum(s.prompt_tokens for s in probe_scores)),
            "probe_calls": int(sum(s.calls for s in probe_scores)),
            "probe_cached": int(sum(s.cached for s in probe_scores)),
        }

    def _refuse(
        self,
        chat: tuple[Message, ...],
        budgets: dict[str, float],
        status: Status,
        reason: str,
        t0: float,
        timings: dict[str, float],
        *,
        texts: list[str] | None = None,
        help_scores: list[Score] | None = None,
        harm_scores: dict[str, list[Score]] | None = None,
        completion_tokens: list[int] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Decision:
        """Fail closed: the refusal, with whatever was observed before the failure."""
        texts = texts or [self.policy.refusal]
        completion_tokens = completion_tokens or [0] * len(texts)
        candidates = tuple(
            CandidateRecord(
                text=text,
                is_refusal=i == REFUSAL_INDEX,
                helpfulness=_recorded(help_scores[i]) if help_scores else None,
                harm={n: row[i].value for n, row in (harm_scores or {}).items()},
                margin=None,
                extra_risk={},
                weight=1.0 if i == REFUSAL_INDEX else 0.0,
                completion_tokens=completion_tokens[i],
                score_errors=tuple(
                    s.error
                    for s in [
                        *(help_scores[i : i + 1] if help_scores else []),
                        *(row[i] for row in (harm_scores or {}).values()),
                    ]
                    if s.error
                ),
            )
            for i, text in enumerate(texts)
        )
        timings = {**timings, "total_s": time.perf_counter() - t0}
        tokens = (
            self._tokens(completion_tokens, help_scores, harm_scores)
            if help_scores is not None and harm_scores is not None
            else {"completion": int(sum(completion_tokens))}
        )
        return self._decision(
            chat, budgets, status, reason, candidates, REFUSAL_INDEX, timings,
            action="refuse", value=None, expected_risk={}, multiplier={}, solver="",
            tokens=tokens, extra=extra,
        )  # fmt: skip

    def _decision(
        self,
        chat: tuple[Message, ...],
        budgets: dict[str, float],
        status: Status,
        reason: str,
        candidates: tuple[CandidateRecord, ...],
        chosen: int,
        timings: dict[str, float],
        *,
        action: Literal["answer", "refuse"],
        value: float | None,
        expected_risk: dict[str, float],
        multiplier: dict[str, float],
        solver: str,
        tokens: dict[str, int],
        extra: dict[str, Any] | None = None,
    ) -> Decision:
        return Decision(
            id=uuid.uuid4().hex,
            created=time.time(),
            action=action,
            status=status,
            reason=reason,
            messages=chat,
            candidates=candidates,
            strategy=tuple(c.weight for c in candidates),
            chosen_index=chosen,
            chosen_text=candidates[chosen].text,
            value=value,
            expected_risk=expected_risk,
            budget=budgets,
            multiplier=multiplier,
            solver=solver,
            timings=timings,
            tokens=tokens,
            model_id=self.backend.model_id,
            scorer_ids={"helpfulness": self.helpfulness.name, "harm": self.harm.name},
            policy_id=self.policy.id,
            policy_version=self.policy.version,
            policy_digest=self.policy.digest,
            extra=dict(extra or {}),
        )
