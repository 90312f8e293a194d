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


# A prompt whose answer runs past any small max_tokens, so every stream decodes in full.
LONG_PROMPT = "Write a long, detailed essay on the history of bridges, at least 600 words."


async def decode_throughput(
    backend: Backend, streams: int, max_tokens: int = 128, seed: int = 0
) -> float:
    """Completion tokens per second, summed over ``streams`` answers sampled at once."""
    cfg = SamplingConfig(max_tokens=max_tokens, seed=seed)  # default temperature and top_p
    t = time.perf_counter()
    out = await backend.sample([Message("user", LONG_PROMPT)], streams, cfg)
    return sum(c.completion_tokens for c in out) / (time.perf_counter() - t)


async def run_latency(
    backend: Backend,
    policy: Policy,
    n_prompts: int = 4,
    seed: int = 0,
    progress: bool = True,
    decode_tokens: int = 128,
) -> dict[str, Any]:
    """Median wall time of one plain answer vs one full decision (fresh scores, no cache hits).

    Also measures the backend's decode rate with one stream and with m streams at once: a
    decision generates m candidates, so ``m * rate_1 / rate_m`` is a floor on the ratio
    (before any probe) when candidates are as long as the plain answer."""
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
    m = policy.sampling.n
    rate_1 = await decode_throughput(backend, 1, decode_tokens, seed)
    rate_m = await decode_throughput(backend, m, decode_tokens, seed)
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
        # how well the backend runs m streams at once (tokens/s summed over streams)
        "decode_tok_s_1": rate_1,
        "decode_tok_s_m": rate_m,
        "ratio_floor": m * rate_1 / rate_m,
    }


def _median_stage(stages: list[dict[str, float]], key: str) -> float | None:
    """Median of one stage over the decisions that reached it (a fail-safe refusal may
    stop before it); None if none did."""
    times = [t[key] for t in stages if key in t]
    return statistics.median(times) if times else None
