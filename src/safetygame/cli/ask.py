"""``safetygame ask``: one prompt through the Safety Game, and ``policy show``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from safetygame.agent import Decision, SafetyGame
from safetygame.cli import main
from safetygame.cli._common import (
    backend_options,
    clean_errors,
    format_table,
    json_option,
    open_backend,
    policy_option,
    print_json,
)
from safetygame.policy import load_policy, policy_yaml
from safetygame.tune import traffic_notice


def render_decision(decision: Decision) -> str:
    rows = []
    for i, c in enumerate(decision.candidates):
        risk = ", ".join(f"{v:+.3f}" for v in c.extra_risk.values()) or "-"
        preview = c.text.replace("\n", " ")
        rows.append(
            [
                f"{i}{'*' if i == decision.chosen_index else ''}",
                "refusal" if c.is_refusal else "answer",
                "-" if c.margin is None else f"{c.margin:+.3f}",
                risk,
                f"{c.weight:.3f}",
                preview[:60] + ("..." if len(preview) > 60 else ""),
            ]
        )
    table = format_table(["#", "kind", "M", "Delta", "pi", "text"], rows)
    budget = ", ".join(f"{k}={v:g}" for k, v in decision.budget.items())
    risk = ", ".join(f"{k}={v:.3f}" for k, v in decision.expected_risk.items()) or "-"
    timing = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in decision.timings.items())
    return (
        f"{decision.chosen_text}\n\n{table}\n"
        f"status {decision.status.value} ({decision.reason}); budget {budget}; "
        f"expected extra risk {risk}\n"
        f"model {decision.model_id}; "
        f"policy {decision.policy_id}@{decision.policy_version}; {timing}"
    )


@main.command()
@click.argument("prompt")
@backend_options
@policy_option
@click.option("--budget", type=float, default=None, help="Lower the policy's budget T.")
@click.option("--seed", type=int, default=None, help="Seed for sampling and choosing.")
@json_option
@clean_errors
def ask(
    prompt: str,
    model: str | None,
    upstream: str | None,
    api_key: str | None,
    policy_ref: str | None,
    budget: float | None,
    seed: int | None,
    as_json: bool,
) -> None:
    """Answer PROMPT through the Safety Game and show the candidates it weighed."""
    policy = load_policy(policy_ref)
    notice = traffic_notice(policy)
    if notice:
        click.echo(notice, err=True)

    async def run() -> Decision:
        async with open_backend(model, upstream, api_key) as backend:
            return await SafetyGame(backend, policy).arespond(prompt, budget=budget, seed=seed)

    decision = asyncio.run(run())
    if as_json:
        print_json(decision)
    else:
        click.echo(render_decision(decision))


@main.group()
def policy() -> None:
    """Inspect and validate policies."""


@policy.command("show")
@click.argument("ref", required=False)
@json_option
@clean_errors
def policy_show(ref: str | None, as_json: bool) -> None:
    """Print the effective policy REF (a shipped name or a file; default: the default)."""
    p = load_policy(Path(ref) if ref and Path(ref).exists() else ref)
    if as_json:
        print_json({"ref": p.ref, "digest": p.digest, **p.model_dump(mode="json")})
    else:
        click.echo(f"# {p.ref}\n{policy_yaml(p)}", nl=False)
