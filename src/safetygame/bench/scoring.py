"""Throughput of the scoring pass: batched/concurrent against one request at a time.

Both modes produce the same readings (per reply: log-likelihood, helpfulness probe, harm
probe) on the same backend, each with a fresh in-memory cache, so every reading is a model
call. llama.cpp also keeps earlier prompts in RAM (its prompt cache), so the two modes get
*disjoint* halves of one seeded HHH sample (alternating items), and neither can profit from
prompts the other one sent. The sequential mode runs first.

A ceiling on the ratio, from the backend's own counters: the tokens each mode made the model
compute (uncached prompt tokens plus generated ones, :attr:`BackendStats.computed_tokens`),
and the model's peak rate, measured as the prompt-processing rate of one long uncached
prompt (a full batch). Concurrency can at best run every token of the batched mode at that
rate; on a compute-bound CPU it cannot do better, so when the ceiling is low, more
concurrency cannot raise the ratio.
"""

from __future__ import annotations

import time
from typing import Any

from safetygame.backends.base import Backend, Message
from safetygame.cache import ScoreCache
from safetygame.errors import ConfigError
from safetygame.eval import datasets
from safetygame.eval.datasets import MCItem
from safetygame.eval.scoring import ScoringPass
from safetygame.policy import Policy

PEAK_PROMPT_WORDS = 400  # ~800 tokens: several full micro-batches


async def peak_token_rate(backend: Backend, seed: int = 0) -> float | None:
    """Prompt tokens per second on one long prompt that no cache holds (None when the
    backend reports no token counts)."""
    stats = backend.stats
    if stats is None:
        return None
    # A prefix no earlier request had, so the server evaluates the whole prompt.
    words = " ".join(f"w{(i * 7919 + seed) % 1000}" for i in range(PEAK_PROMPT_WORDS))
    text = f"[{time.time_ns()}] Is the following a list of words? {words}"
    before = stats.computed_tokens
    t = time.perf_counter()
    await backend.yes_no([Message("user", text)])
    elapsed = time.perf_counter() - t
    tokens = stats.computed_tokens - before
    return tokens / elapsed if tokens > 0 else None


async def run_scoring_bench(
    backend: Backend,
    policy: Policy,
    n_items: int = 8,
    seed: int = 0,
    concurrency: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Readings per second of both modes and their ratio (batched / sequential)."""
    if n_items < 1:
        raise ConfigError("items must be >= 1")
    pool: list[MCItem] = datasets.load("hhh")
    sample = datasets.subsample(pool, 2 * n_items, seed)
    seq_items, batch_items = sample[0::2], sample[1::2]

    seq = ScoringPass(backend, policy, ScoreCache(None), concurrency=1)
    n_seq = sum(seq.n_readings(it) for it in seq_items)
    tok = _computed(backend)
    t = time.perf_counter()
    seq_scores = await seq.run_sequential(seq_items, progress=progress)
    seq_s = time.perf_counter() - t
    seq_tokens = _delta(backend, tok)

    batched = ScoringPass(backend, policy, ScoreCache(None), concurrency=concurrency)
    n_batch = sum(batched.n_readings(it) for it in batch_items)
    tok = _computed(backend)
    t = time.perf_counter()
    batch_scores = await batched.run(batch_items, progress=progress)
    batch_s = time.perf_counter() - t
    batch_tokens = _delta(backend, tok)

    peak = await peak_token_rate(backend, seed)
    errors = sum(len(s.errors) for s in (*seq_scores, *batch_scores))
    seq_rate = n_seq / seq_s
    batch_rate = n_batch / batch_s
    # The batched mode's time is at least its tokens at the peak rate.
    ceiling = (
        n_batch * peak / batch_tokens / seq_rate if peak is not None and batch_tokens else None
    )
    return {
        "model_id": backend.model_id,
        "items": n_items,
        "slots": backend.max_concurrency,
        "concurrency": batched.concurrency,
        "batched_readings": n_batch,
        "sequential_readings": n_seq,
        "batched_s": batch_s,
        "sequential_s": seq_s,
        "batched_per_s": batch_rate,
        "sequential_per_s": seq_rate,
        "ratio": batch_rate / seq_rate,
        "sequential_tokens": seq_tokens,
        "batched_tokens": batch_tokens,
        "sequential_tok_s": seq_tokens / seq_s if seq_tokens is not None else None,
        "batched_tok_s": batch_tokens / batch_s if batch_tokens is not None else None,
        "peak_tok_s": peak,
        "ratio_ceiling": ceiling,
        "errors": errors,
    }


def _computed(backend: Backend) -> int | None:
    return None if backend.stats is None else backend.stats.computed_tokens


def _delta(backend: Backend, before: int | None) -> int | None:
    after = _computed(backend)
    return None if after is None or before is None else after - before
