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
@click.option(
    "--mix",
    is_flag=True,
    help="Run the committed prompt mix (80% TruthfulQA/HHH-helpful questions, 20% XSTest "
    "unsafe prompts; safetygame/bench/latency_mix.json) and report per path (fast / full).",
)
@click.option(
    "--limit",
    type=click.IntRange(1, None),
    default=None,
    help="With --mix: run only the first N prompts of the mix (it keeps its proportions).",
)
@click.option(
    "--baseline-policy",
    "baseline_ref",
    default=None,
    help="With --mix: also decide every prompt under this policy, in the same run (e.g. the "
    "same policy with sampling.mode: fixed), for a before/after comparison.",
)
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
    mix: bool,
    limit: int | None,
    baseline_ref: str | None,
    seed: int,
    decode_tokens: int,
    as_json: bool,
) -> None:
    """Time of a plain answer vs a Safety Game decision on the same prompt, run back to back
    (plain, decision, plain, decision...), with both times to first token."""
    from safetygame.bench.latency import run_latency, run_latency_mix
    from safetygame.bench.mix import load_mix

    if (limit is not None or baseline_ref is not None) and not mix:
        raise click.UsageError("--limit and --baseline-policy apply to --mix")
    policy = load_policy(policy_ref)
    baseline = load_policy(baseline_ref) if baseline_ref is not None else None
    prompts = load_mix(limit=limit) if mix else []  # data problems surface before the model loads

    async def run() -> dict[str, Any]:
        async with open_backend(model, upstream, api_key) as backend:
            if mix:
                return await run_latency_mix(
                    backend, policy, prompts, seed, not as_json, baseline=baseline
                )
            return await run_latency(backend, policy, n_prompts, seed, not as_json, decode_tokens)

    out = asyncio.run(run())
    if as_json:
        print_json(out)
    elif mix:
        _echo_mix(out)
    else:
        lengths = out["lengths"]
        click.echo(
            f"model {out['model_id']}, {out['prompts']} prompts, m = {out['candidates']}, "
            f"max_tokens = {out['max_tokens']} (plain answer and candidates alike)\n"
            f"plain answer   {out['plain_s']:.2f} s (median), first token "
            f"{_s(out['plain_ttft_s'])}, {lengths['plain_tokens_median']} tokens\n"
            f"safety game    {out['safetygame_s']:.2f} s (median), first token "
            f"{_s(out['safetygame_ttft_s'])}, {lengths['candidate_tokens_median']} tokens "
            "per candidate\n"
            f"ratio          {out['ratio']:.2f}\n"
            f"decode rate    {out['decode_tok_s_1']:.1f} tok/s with 1 stream, "
            f"{out['decode_tok_s_m']:.1f} tok/s with {out['candidates']} at once\n"
            f"ratio floor    {out['ratio_floor']:.2f} (m x rate_1 / rate_m: generation alone)"
        )


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _echo_mix(out: dict[str, Any]) -> None:
    mix = ", ".join(f"{n} {k}" for k, n in out["mix"].items())
    click.echo(f"model {out['model_id']}, {out['prompts']} prompts ({mix})")
    for arm in [out, out.get("baseline")]:
        if arm is None:
            continue
        click.echo(
            f"{arm['policy']} (sampling {arm['sampling_mode']}, m = {arm['candidates']}, "
            f"refusal read {arm['refusal_reads']} the first draw, probes {arm['probe_order']}, "
            f"refusal helpfulness {arm['refusal_helpfulness']})"
        )
        click.echo("  path   share  ratio median  ratio p90  first token: plain  decision")
        for name, g in [*arm["by_path"].items(), ("all", arm["all"])]:
            click.echo(
                f"  {name:<6} {g['share']:>5.0%}  {g['ratio_median']:>12.2f}  "
                f"{g['ratio_p90']:>9.2f}  {_s(g['plain_ttft_s_median']):>18}  "
                f"{_s(g['safetygame_ttft_s_median']):>8}"
            )
        refusals = ", ".join(
            f"{kind} {g['plain_refusals']}/{g['prompts']} plain, {g['refusals']}/{g['prompts']} "
            "decided"
            for kind, g in arm["by_kind"].items()
        )
        click.echo(f"  answers that refuse (patterns): {refusals}")


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
