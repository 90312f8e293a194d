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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import numpy as np

from safetygame import game
from safetygame.backends.base import Backend, Message, SamplingConfig, as_messages
from safetygame.cache import ScoreCache
from safetygame.errors import BackendError, ConfigError
from safetygame.policy import Policy, load_policy
from safetygame.probes import Score, Scorer
from safetygame.scorers import build_scorer

REFUSAL_INDEX = 0


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
    ) -> Decision:
        """Synchronous twin of :meth:`arespond`."""
        return asyncio.run(self.arespond(messages, budget=budget, seed=seed))

    async def arespond(
        self,
        messages: str | Sequence[Message | Mapping[str, Any]],
        *,
        budget: float | None = None,
        seed: int | None = None,
        timeout: float | None = None,
    ) -> Decision:
        """Decide one reply. ``budget`` may lower the policy's budget, never raise it.
        ``timeout`` (seconds) replaces the agent's own for this call (a caller's deadline)."""
        chat = as_messages(messages)
        if chat[-1].role != "user":
            raise ConfigError("messages: the last message must come from the user")
        budgets = self._budgets(budget)
        limit = self.timeout if timeout is None else timeout
        t0 = time.perf_counter()
        try:
            return await asyncio.wait_for(self._run(chat, budgets, seed, t0), limit)
        except TimeoutError:
            return self._refuse(
                chat, budgets, Status.TIMEOUT, f"no decision within {limit} s", t0, {}
            )

    # -- stages -------------------------------------------------------------------------
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
        self, chat: tuple[Message, ...], budgets: dict[str, float], seed: int | None, t0: float
    ) -> Decision:
        timings: dict[str, float] = {}
        pol = self.policy
        cfg = SamplingConfig(
            temperature=pol.sampling.temperature,
            top_p=pol.sampling.top_p,
            max_tokens=pol.sampling.max_tokens,
            seed=seed,
        )
        t = time.perf_counter()
        try:
            completions = await self.backend.sample(chat, pol.sampling.n, cfg)
        except BackendError as exc:
            return self._refuse(
                chat, budgets, Status.GENERATION_FAILED, f"{type(exc).__name__}: {exc}", t0, timings
            )
        timings["generate_s"] = time.perf_counter() - t
        texts = [pol.refusal] + [c.text.strip() for c in completions]
        completion_tokens = [0] + [c.completion_tokens for c in completions]

        t = time.perf_counter()
        questions = {
            "harm": pol.probes.harm.question,
            **{c.name: c.question for c in pol.categories},
        }
        help_scores, harm_scores = await self._score_all(chat, texts, questions)
        timings["score_s"] = time.perf_counter() - t

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
                completion_tokens=completion_tokens,
            )  # fmt: skip

        t = time.perf_counter()
        h = np.array([s.value for s in help_scores], dtype=float)
        d = np.array([[s.value for s in row] for row in harm_scores.values()], dtype=float)
        # An empty sample cannot be an answer: give it no gain and full extra risk.
        for i in empty:
            h[i], d[:, i] = 0.0, 1.0
        mg = game.margins(h, d, refusal=REFUSAL_INDEX)
        g = pol.game
        result = game.solve(
            mg,
            np.array(list(budgets.values())),
            method=self.method,
            beta=g.beta,
            penalty=g.penalty,
            temperature=g.temperature,
            epsilon=g.epsilon,
        )
        timings["solve_s"] = time.perf_counter() - t
        if not result.success:
            return self._refuse(
                chat, budgets, Status.SOLVER_FAILED, result.message, t0, timings,
                texts=texts, help_scores=help_scores, harm_scores=harm_scores,
                completion_tokens=completion_tokens,
            )  # fmt: skip
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
                helpfulness=float(h[i]),
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
        )  # fmt: skip

    async def _score_all(
        self, chat: tuple[Message, ...], texts: list[str], questions: dict[str, str]
    ) -> tuple[list[Score], dict[str, list[Score]]]:
        """Candidates concurrently; each candidate's probes one after another.

        A candidate's probe prompts share everything up to the question, so asking them in
        turn lets a llama.cpp-style server reuse the cached prefix for all but the first.
        """
        help_q = self.policy.probes.helpfulness.question
        refusal = texts[REFUSAL_INDEX]

        async def read(scorer: Scorer, text: str, question: str, is_refusal: bool) -> Score:
            # A relative scorer reads each reply against the refusal; the refusal against
            # itself is an even match, so its margin is 0 by construction.
            if not scorer.relative:
                return await scorer.score(chat, text, question)
            if is_refusal:
                return Score(0.5, method="reference")
            return await scorer.score_against(chat, text, refusal, question)

        async def one(i: int) -> list[Score]:
            is_ref = i == REFUSAL_INDEX
            out = [await read(self.helpfulness, texts[i], help_q, is_ref)]
            for question in questions.values():
                out.append(await read(self.harm, texts[i], question, is_ref))
            return out

        # Sampled replies first, the refusal last: with a followup scorer each reply's probes
        # should reach the slot that generated it before the refusal's probe takes a slot.
        order = [i for i in range(len(texts)) if i != REFUSAL_INDEX] + [REFUSAL_INDEX]
        started = await asyncio.gather(*(one(i) for i in order))
        rows = [started[order.index(i)] for i in range(len(texts))]
        harm = {name: [row[k + 1] for row in rows] for k, name in enumerate(questions)}
        return [row[0] for row in rows], harm

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
    ) -> Decision:
        """Fail closed: the refusal, with whatever was observed before the failure."""
        texts = texts or [self.policy.refusal]
        completion_tokens = completion_tokens or [0] * len(texts)
        candidates = tuple(
            CandidateRecord(
                text=text,
                is_refusal=i == REFUSAL_INDEX,
                helpfulness=help_scores[i].value if help_scores else None,
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
            tokens=tokens,
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
        )
