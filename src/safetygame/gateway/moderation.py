"""Moderation verdicts for ``POST /v1/moderations``: the policy's harm scorer on bare texts.

Each input text is judged on its own (an empty conversation: the text under review is the
whole of it) by the tenant's harm scorer, the object the chat path uses, once per risk row
of the policy: ``harm`` (the policy's harm question) and each rule category (its question).

The rule, per row ``c`` with budget ``T_c`` (``policy.budgets``)::

    extra_c = s_c(text) - s_c(refusal)          # the game's extra risk over refusing
    category_scores[c] = clip(extra_c, 0, 1)
    categories[c] = extra_c > T_c               # flagged
    flagged = any(categories.values())

``s_c(refusal)`` is the scorer's reading of the policy's refusal text on the same question,
read once per request. A relative scorer (``scorer.relative``) reads the text against the
refusal directly, ``s_c(text) = P(text more harmful than the refusal)``, and the refusal
against itself is 0.5, so ``extra_c = s_c(text) - 0.5``. A text is flagged exactly when the
Safety Game could not serve it with certainty under the policy: alone against the refusal,
the game gives it weight at most ``T_c / extra_c < 1``.

Failing closed: a row that cannot be scored (scorer error, no reading of the refusal) is
flagged with score 1.0, and the verdict's status says why (``scoring_failed``); a verdict
that is not reached in time flags every input (``timeout``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from safetygame.policy import Policy
from safetygame.probes import Score, Scorer

ModerationStatus = Literal["ok", "scoring_failed", "timeout"]


@dataclass(frozen=True)
class ModerationResult:
    """The verdict on one input. ``raw``: the scorer's reading of the text per row (None
    where it failed); ``errors``: why a row could not be scored."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    raw: dict[str, float | None]
    errors: tuple[str, ...]


@dataclass(frozen=True)
class Moderation:
    """Every input's verdict plus what they were measured against."""

    status: ModerationStatus
    results: tuple[ModerationResult, ...]
    budget: dict[str, float]
    reference: dict[str, float | None]  # the refusal's reading per row (0.5 when relative)
    scorer: str
    relative: bool
    elapsed_s: float

    @property
    def flagged(self) -> bool:
        return any(r.flagged for r in self.results)


def questions(policy: Policy) -> dict[str, str]:
    """The question per risk row: ``harm`` first, then each category (as the agent asks)."""
    return {"harm": policy.probes.harm.question, **{c.name: c.question for c in policy.categories}}


def _verdict(
    scores: dict[str, Score],
    reference: dict[str, float | None],
    budget: dict[str, float],
) -> ModerationResult:
    categories: dict[str, bool] = {}
    category_scores: dict[str, float] = {}
    errors: list[str] = []
    for row, s in scores.items():
        ref = reference[row]
        if s.value is None or ref is None:
            errors.append(f"{row}: {s.error or 'no reading of the refusal'}")
            categories[row], category_scores[row] = True, 1.0  # fail closed
            continue
        extra = float(s.value) - ref
        categories[row] = extra > budget[row]
        category_scores[row] = min(max(extra, 0.0), 1.0)
    return ModerationResult(
        flagged=any(categories.values()),
        categories=categories,
        category_scores=category_scores,
        raw={row: s.value for row, s in scores.items()},
        errors=tuple(errors),
    )


async def moderate(
    scorer: Scorer, policy: Policy, texts: Sequence[str], *, timeout: float
) -> Moderation:
    """Score ``texts`` with ``scorer`` under ``policy`` (see the module docstring)."""
    t0 = time.perf_counter()
    rows = questions(policy)
    budget = policy.budgets
    relative = bool(scorer.relative)

    async def read(text: str) -> dict[str, Score]:
        # A text's rows one after another: they share the prompt up to the question, which a
        # llama.cpp-style server reuses from its cache (as the agent orders its probes).
        out = {}
        for row, question in rows.items():
            if relative:
                out[row] = await scorer.score_against((), text, policy.refusal, question)
            else:
                out[row] = await scorer.score((), text, question)
        return out

    async def everything() -> tuple[list[dict[str, Score]], dict[str, float | None]]:
        if relative:
            readings = list(await asyncio.gather(*(read(t) for t in texts)))
            return readings, dict.fromkeys(rows, 0.5)
        *readings, ref = await asyncio.gather(*(read(t) for t in texts), read(policy.refusal))
        return list(readings), {row: s.value for row, s in ref.items()}

    try:
        readings, reference = await asyncio.wait_for(everything(), timeout)
    except TimeoutError:
        failed = ModerationResult(
            flagged=True,
            categories=dict.fromkeys(rows, True),
            category_scores=dict.fromkeys(rows, 1.0),
            raw=dict.fromkeys(rows),
            errors=(f"no verdict within {timeout} s",),
        )
        return Moderation(
            "timeout", (failed,) * len(texts), budget, dict.fromkeys(rows),
            scorer.name, relative, time.perf_counter() - t0,
        )  # fmt: skip
    results = tuple(_verdict(r, reference, budget) for r in readings)
    status: ModerationStatus = "scoring_failed" if any(r.errors for r in results) else "ok"
    return Moderation(
        status, results, budget, reference, scorer.name, relative, time.perf_counter() - t0
    )
