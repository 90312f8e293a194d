"""``safetygame tune``: write dev-tuned values into a policy file.

Two modes, one writer (:func:`safetygame.tune.write_policy`):

- ``safetygame tune FILE``: the budget T (and beta for an accuracy study) on the dev split of
  a labelled JSONL/CSV file (docs/evaluation.md, "Your own data"), kept unless the dev
  evidence separates the candidates ("Tuning rule"); needs a model;
- ``safetygame tune --from SCORED``: the traffic-level price of risk from scores already
  read (docs/method.md, "Traffic-level budget"); no model.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import click

from safetygame.cli import main
from safetygame.cli._common import (
    backend_options,
    cache_option,
    clean_errors,
    json_option,
    open_backend,
    parallel_option,
    policy_option,
    print_json,
    progress_option,
    refusal_mode_option,
    show_progress,
)
from safetygame.errors import ConfigError
from safetygame.policy import load_policy


@main.command("tune")
@click.argument(
    "data_file",
    metavar="[FILE]",
    required=False,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Instead of FILE: scored dev prompts (JSON Lines of decision records or "
    "helpfulness/harm lists, or an EvalLog's dev split) to calibrate the traffic-level price "
    "of risk.",
)
@policy_option
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Policy file to write [default: the --policy file itself].",
)
@backend_options
@parallel_option
@cache_option
@click.option("--seed", type=int, default=0, show_default=True, help="FILE: the split's seed.")
@click.option(
    "--limit",
    type=click.IntRange(min=2),
    default=None,
    help="FILE: seeded sub-sample of N items (dev + test), as in `eval custom`.",
)
@refusal_mode_option("FILE (refusal study): how the refusal detector combines patterns and probe.")
@progress_option
@json_option
@clean_errors
def tune(
    data_file: Path | None,
    source: Path | None,
    policy_ref: str | None,
    out: Path | None,
    model: str | None,
    upstream: str | None,
    api_key: str | None,
    parallel: int | None,
    cache_path: Path | None,
    seed: int,
    limit: int | None,
    refusal_mode: str,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Tune a policy on dev data and write it (atomically).

    FILE: labelled prompts (safe/unsafe) or multiple-choice items, JSONL or CSV: the
    budget T (and beta for multiple choice) on FILE's dev split, with the dev metrics in a
    comment; the policy's budget is kept unless the dev evidence separates the candidates
    (docs/evaluation.md, Tuning rule). --from SCORED: set game.scope: traffic and the price
    of risk that keeps the mean extra risk of the dev prompts within the policy's budget
    (docs/method.md, Traffic-level budget).
    """
    if (data_file is None) == (source is None):
        raise ConfigError(
            "give either FILE (labelled prompts: tune the budget) or --from SCORED "
            "(scored prompts: calibrate the traffic price of risk)"
        )
    if out is None:
        if policy_ref is None or not Path(policy_ref).exists():
            raise ConfigError("--out is needed when --policy is not a policy file")
        out = Path(policy_ref)
    if source is not None:
        if model or upstream:
            raise ConfigError("--from reads scores already made: drop --model/--upstream")
        _tune_price(source, policy_ref, out, as_json)
        return
    assert data_file is not None
    _tune_budget(
        data_file, policy_ref, out, model, upstream, api_key, parallel, cache_path, seed,
        limit, refusal_mode, show_progress(progress, as_json), as_json,
    )  # fmt: skip


def _tune_budget(
    data_file: Path,
    policy_ref: str | None,
    out: Path,
    model: str | None,
    upstream: str | None,
    api_key: str | None,
    parallel: int | None,
    cache_path: Path | None,
    seed: int,
    limit: int | None,
    refusal_mode: str,
    progress: bool,
    as_json: bool,
) -> None:
    from safetygame.cache import ScoreCache
    from safetygame.eval.custom import load_custom
    from safetygame.eval.harness import EvalConfig
    from safetygame.eval.refusal import Mode
    from safetygame.eval.scoring import CachingBackend
    from safetygame.tune import (
        BudgetTuning,
        budget_notes,
        check_budget_tunable,
        tune_budget_from_data,
        write_policy,
    )

    # Everything that can be wrong with the input fails here, before a model loads.
    data = load_custom(data_file)
    policy = load_policy(policy_ref)
    check_budget_tunable(policy)
    cfg = EvalConfig(benchmark=data.name, seed=seed, limit=limit)
    cache = ScoreCache(cache_path) if cache_path else ScoreCache()

    async def run() -> BudgetTuning:
        async with open_backend(model, upstream, api_key, parallel) as inner:
            backend = CachingBackend(inner, cache)  # samples and readings, by content hash
            return await tune_budget_from_data(
                backend,
                policy,
                data,
                cfg,
                cache,
                refusal_mode=cast(Mode, refusal_mode),
                progress=progress,
            )

    result = asyncio.run(run())
    written = write_policy(result.policy, out, budget_notes(result))
    c = result.choice
    info: dict[str, Any] = {
        **result.metrics,
        "policy": result.policy.ref,
        "out": str(written),
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
    }
    if as_json:
        print_json(info)
    else:
        click.echo("\n".join(budget_notes(result)[:-1]))
        click.echo(f"wrote {written} ({result.policy.ref}); T = {c.budget:g}")


def _tune_price(source: Path, policy_ref: str | None, out: Path, as_json: bool) -> None:
    from safetygame.tune import read_scored, traffic_notice, tune_price, write_policy

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
