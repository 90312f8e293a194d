"""``safetygame bench latency``: model-backed benchmarks."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from safetygame.cli import bench
from safetygame.cli._common import (
    backend_options,
    clean_errors,
    json_option,
    open_backend,
    policy_option,
    print_json,
)
from safetygame.policy import load_policy


@bench.command("latency")
@backend_options
@policy_option
@click.option("--prompts", "n_prompts", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--decode-tokens",
    type=click.IntRange(1, 4096),
    default=128,
    show_default=True,
    help="Tokens per stream in the decode-rate measurement (1 vs m streams at once).",
)
@json_option
@clean_errors
def latency(
    model: str | None,
    upstream: str | None,
    api_key: str | None,
    policy_ref: str | None,
    n_prompts: int,
    seed: int,
    decode_tokens: int,
    as_json: bool,
) -> None:
    """Median time of one plain answer vs a full Safety Game decision, and their ratio."""
    from safetygame.bench.latency import run_latency

    policy = load_policy(policy_ref)

    async def run() -> dict[str, Any]:
        async with open_backend(model, upstream, api_key) as backend:
            return await run_latency(backend, policy, n_prompts, seed, not as_json, decode_tokens)

    out = asyncio.run(run())
    if as_json:
        print_json(out)
    else:
        click.echo(
            f"model {out['model_id']}, {out['prompts']} prompts, m = {out['candidates']}, "
            f"max_tokens = {out['max_tokens']}\n"
            f"plain answer   {out['plain_s']:.2f} s (median)\n"
            f"safety game    {out['safetygame_s']:.2f} s (median)\n"
            f"ratio          {out['ratio']:.2f}\n"
            f"decode rate    {out['decode_tok_s_1']:.1f} tok/s with 1 stream, "
            f"{out['decode_tok_s_m']:.1f} tok/s with {out['candidates']} at once\n"
            f"ratio floor    {out['ratio_floor']:.2f} (m x rate_1 / rate_m: generation alone)"
        )


@bench.command("injection")
@backend_options
@policy_option
@json_option
@clean_errors
def injection(
    model: str | None,
    upstream: str | None,
    api_key: str | None,
    policy_ref: str | None,
    as_json: bool,
) -> None:
    """How much an injection addressed to the judge lowers harmful answers' harm scores."""
    from safetygame.bench.injection import run_injection

    policy = load_policy(policy_ref)

    async def run() -> dict[str, Any]:
        async with open_backend(model, upstream, api_key) as backend:
            return await run_injection(backend, policy)

    out = asyncio.run(run())
    if as_json:
        print_json(out)
        return
    click.echo(f"model {out['model_id']}: harm P(yes) of {out['n_answers']} harmful answers")
    click.echo(f"  clean      mean {out['mean_harm_clean']:.3f}")
    for r in out["injections"]:
        inj = r["injection"].replace("\n", " ")
        click.echo(
            f"  + {inj[:50]!r}: mean drop {r['mean_drop']:+.3f}, max drop {r['max_drop']:+.3f}"
        )
