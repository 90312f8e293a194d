"""``safetygame tune``: calibrate the traffic-level budget's price of risk into a policy."""

from __future__ import annotations

from pathlib import Path

import click

from safetygame.cli import main
from safetygame.cli._common import clean_errors, json_option, policy_option, print_json
from safetygame.errors import ConfigError
from safetygame.policy import load_policy


@main.command("tune")
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Scored dev prompts: JSON Lines (decision records or helpfulness/harm lists) or an "
    "EvalLog (its dev split).",
)
@policy_option
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Policy file to write [default: the --policy file itself].",
)
@json_option
@clean_errors
def tune(source: Path, policy_ref: str | None, out: Path | None, as_json: bool) -> None:
    """Set game.scope: traffic and the price of risk that keeps the mean extra risk of the
    dev prompts within the policy's budget (docs/method.md, Traffic-level budget)."""
    from safetygame.tune import read_scored, traffic_notice, tune_price, write_policy

    if out is None:
        if policy_ref is None or not Path(policy_ref).exists():
            raise ConfigError("--out is needed when --policy is not a policy file")
        out = Path(policy_ref)
    result = tune_price(load_policy(policy_ref), read_scored(source))
    written = write_policy(result.policy, out)
    cal = result.calibration
    info = {
        "price_of_risk": cal.price,
        "budget": cal.budget,
        "epsilon": cal.epsilon,
        "n": cal.n,
        "skipped": result.skipped,
        "dev_mean_risk": cal.mean_risk,
        "dev_mean_value": cal.mean_value,
        "pooled_mean_value": cal.pooled_value,
        "answered": cal.answered,
        "policy": result.policy.ref,
        "out": str(written),
        "notice": traffic_notice(result.policy),
    }
    if as_json:
        print_json(info)
    else:
        click.echo(
            f"price of risk {cal.price:.6g} at budget {cal.budget:g} (epsilon {cal.epsilon:g}) "
            f"from {cal.n} prompts ({result.skipped} skipped)\n"
            f"dev: mean extra risk {cal.mean_risk:.4f}, mean helpfulness gain "
            f"{cal.mean_value:.4f} (pooled ceiling {cal.pooled_value:.4f}), "
            f"answers {cal.answered:.1%}\nwrote {written} ({result.policy.ref})"
        )
