"""Throughput of the scoring pass: batched/concurrent against one request at a time.

Both modes produce the same readings (per reply: log-likelihood, helpfulness probe, harm
probe) on the same backend, each with a fresh in-memory cache, so every reading is a model
call. llama.cpp also keeps earlier prompts in RAM (its prompt cache), so the two modes get
*disjoint* halves of one seeded HHH sample (alternating items), and neither can profit from
prompts the other one sent. The sequential mode runs first.
"""

from __future__ import annotations

import time
from typing import Any

from safetygame.backends.base import Backend
from safetygame.cache import ScoreCache
from safetygame.errors import ConfigError
from safetygame.eval import datasets
from safetygame.eval.datasets import MCItem
from safetygame.eval.scoring import ScoringPass
from safetygame.policy import Policy


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
    n_seq = sum(len(seq.texts(it)) for it in seq_items) * seq.readings_per_text
    t = time.perf_counter()
    seq_scores = await seq.run_sequential(seq_items, progress=progress)
    seq_s = time.perf_counter() - t

    batched = ScoringPass(backend, policy, ScoreCache(None), concurrency=concurrency)
    n_batch = sum(len(batched.texts(it)) for it in batch_items) * batched.readings_per_text
    t = time.perf_counter()
    batch_scores = await batched.run(batch_items, progress=progress)
    batch_s = time.perf_counter() - t

    errors = sum(len(s.errors) for s in (*seq_scores, *batch_scores))
    seq_rate = n_seq / seq_s
    batch_rate = n_batch / batch_s
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
        "errors": errors,
    }
