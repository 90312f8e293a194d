"""Latency of a full Safety Game decision against one plain answer, on the same backend."""

from __future__ import annotations

import statistics
import time
from typing import Any

from tqdm import tqdm

from safetygame.agent import SafetyGame
from safetygame.backends.base import Backend, Message, SamplingConfig
from safetygame.cache import ScoreCache
from safetygame.policy import Policy

# A fixed, mixed prompt set: everyday, technical and borderline requests.
PROMPTS: tuple[str, ...] = (
    "How do I remove limescale from a kettle?",
    "Write a Python function that checks whether a string is a palindrome.",
    "What household chemicals should never be mixed, and why?",
    "Explain what a mutex is in two sentences.",
    "How can I pick a lock if I'm locked out of my own house?",
    "Give me three tips for a job interview.",
    "What is the maximum safe dose of paracetamol for an adult?",
    "Summarise the causes of the French Revolution in three bullet points.",
)


async def run_latency(
    backend: Backend, policy: Policy, n_prompts: int = 4, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Median wall time of one plain answer vs one full decision (fresh scores, no cache hits)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_prompts)]
    cfg = SamplingConfig(
        temperature=policy.sampling.temperature,
        top_p=policy.sampling.top_p,
        max_tokens=policy.sampling.max_tokens,
    )
    # An in-memory cache, so every decision pays for all its probes.
    agent = SafetyGame(backend, policy, cache=ScoreCache(None))
    plain: list[float] = []
    full: list[float] = []
    tokens_plain: list[int] = []
    tokens_full: list[int] = []
    stages: list[dict[str, float]] = []
    for i, prompt in enumerate(tqdm(prompts, desc="latency", disable=not progress)):
        chat = [Message("user", prompt)]
        t = time.perf_counter()
        out = await backend.sample(chat, 1, cfg.merge(seed=seed + i))
        plain.append(time.perf_counter() - t)
        tokens_plain.append(out[0].completion_tokens)
        t = time.perf_counter()
        decision = await agent.arespond(chat, seed=seed + i)
        full.append(time.perf_counter() - t)
        tokens_full.append(decision.tokens.get("completion", 0))
        stages.append(decision.timings)
    plain_s = statistics.median(plain)
    full_s = statistics.median(full)
    return {
        "model_id": backend.model_id,
        "prompts": n_prompts,
        "candidates": policy.sampling.n,
        "max_tokens": policy.sampling.max_tokens,
        "plain_s": plain_s,
        "safetygame_s": full_s,
        "ratio": full_s / plain_s,
        "plain_runs_s": plain,
        "safetygame_runs_s": full,
        "plain_completion_tokens": tokens_plain,
        "safetygame_completion_tokens": tokens_full,
        # where a decision's time goes: generating the candidates vs probing them
        "generate_s": _median_stage(stages, "generate_s"),
        "score_s": _median_stage(stages, "score_s"),
        "stage_runs_s": stages,
    }


def _median_stage(stages: list[dict[str, float]], key: str) -> float | None:
    """Median of one stage over the decisions that reached it (a fail-safe refusal may
    stop before it); None if none did."""
    times = [t[key] for t in stages if key in t]
    return statistics.median(times) if times else None
