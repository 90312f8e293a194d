"""``safetygame solve``: solve one game from a JSON file; ``safetygame bench solver``."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

import click
import numpy as np

from safetygame.cli import bench, main
from safetygame.cli._common import clean_errors, json_option, print_json, to_jsonable
from safetygame.errors import ConfigError
from safetygame.game import GameResult, margins, solve

FIELDS = {
    "helpfulness",
    "harm",
    "refusal",
    "budget",
    "beta",
    "epsilon",
    "penalty",
    "temperature",
    "method",
    "labels",
    "prompt",
}


def _bad(msg: str) -> ConfigError:
    return ConfigError(f"Invalid input: {msg}")


@dataclass(frozen=True)
class GameInput:
    """A parsed ``solve`` file: scores, one or several named budgets, solver options."""

    helpfulness: list[float]
    harm: list[list[float]]  # one row per category
    categories: list[str] | None  # None: the single-budget form
    budget: list[float]
    refusal: int
    labels: list[str]
    options: dict[str, Any]
    prompt: str | None = None


def _numbers(x: Any, name: str) -> list[float]:
    if not isinstance(x, list) or not x:
        raise _bad(f"{name} must be a non-empty list of numbers")
    for i, v in enumerate(x):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _bad(f"{name}[{i}] must be a number")
    return [float(v) for v in x]


def _number(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise _bad(f"{name} must be a number")
    return float(x)


def parse_game(doc: Any) -> GameInput:
    """Validate a ``solve`` document (already decoded JSON); errors name the field."""
    if not isinstance(doc, dict):
        raise _bad("the top level must be a JSON object")
    unknown = sorted(set(doc) - FIELDS)
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(FIELDS))})")
    for field in ("helpfulness", "harm", "budget"):
        if field not in doc:
            raise _bad(f"missing field {field!r}")
    h = _numbers(doc["helpfulness"], "helpfulness")
    harm, budget = doc["harm"], doc["budget"]
    categories: list[str] | None = None
    if isinstance(harm, dict):
        if not harm:
            raise _bad("harm must name at least one category")
        categories = list(harm)
        rows = [_numbers(harm[c], f"harm.{c}") for c in categories]
        if isinstance(budget, dict):
            extra = sorted(set(budget) - set(categories))
            if extra:
                raise _bad(f"budget.{extra[0]} has no matching harm category")
            for c in categories:
                if c not in budget:
                    raise _bad(f"budget.{c} is missing (one budget per harm category)")
            T = [_number(budget[c], f"budget.{c}") for c in categories]
        else:
            T = [_number(budget, "budget")] * len(categories)
    else:
        if isinstance(budget, dict):
            raise _bad("budget is per category but harm is a single list")
        rows = [_numbers(harm, "harm")]
        T = [_number(budget, "budget")]
    for c, row in zip(categories or ["harm"], rows, strict=True):
        if len(row) != len(h):
            name = "harm" if categories is None else f"harm.{c}"
            raise _bad(f"{name} has {len(row)} entries but helpfulness has {len(h)}")
    refusal = doc.get("refusal", 0)
    if isinstance(refusal, bool) or not isinstance(refusal, int):
        raise _bad("refusal must be an integer index")
    labels = doc.get("labels")
    if labels is None:
        labels = ["refusal" if i == refusal else f"answer {i}" for i in range(len(h))]
    elif not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
        raise _bad("labels must be a list of strings")
    elif len(labels) != len(h):
        raise _bad(f"labels has {len(labels)} entries but helpfulness has {len(h)}")
    options: dict[str, Any] = {}
    for key in ("beta", "temperature"):
        if doc.get(key) is not None:
            options[key] = _number(doc[key], key)
    for key in ("epsilon", "penalty"):
        if key in doc:
            options[key] = _number(doc[key], key)
    if "method" in doc:
        if doc["method"] not in ("auto", "exact", "highs"):
            raise _bad("method must be 'auto', 'exact' or 'highs'")
        options["method"] = doc["method"]
    prompt = doc.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise _bad("prompt must be a string")
    return GameInput(h, rows, categories, T, refusal, labels, options, prompt)


def solve_input(game: GameInput) -> GameResult:
    harm = np.array(game.harm) if game.categories is not None else np.array(game.harm[0])
    mg = margins(game.helpfulness, harm, game.refusal)
    return solve(mg, np.array(game.budget), **game.options)


def _read(file: str) -> Any:
    if file == "-":
        text = sys.stdin.read()
    else:
        with open(file, encoding="utf-8") as fh:
            text = fh.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc


def _fmt(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.4g}"


def render(game: GameInput, res: GameResult) -> str:
    names = game.categories or [""]
    multi = game.categories is not None
    D = res.margins.Delta2d
    width = max(5, *(len(s) for s in game.labels))
    head = [f"{'#':>3}", f"{'label':<{width}}", f"{'h':>7}"]
    for c in names:
        head.append(f"{'d' + (f'[{c}]' if multi else ''):>{max(7, len(c) + 3)}}")
    head.append(f"{'M':>8}")
    for c in names:
        head.append(f"{'Delta' + (f'[{c}]' if multi else ''):>{max(8, len(c) + 7)}}")
    head.append(f"{'pi':>7}")
    lines = [f"prompt: {game.prompt}", ""] if game.prompt else []
    lines.append("  ".join(head))
    for i, label in enumerate(game.labels):
        row = [f"{i:>3}", f"{label:<{width}}", f"{game.helpfulness[i]:>7.3f}"]
        for k, c in enumerate(names):
            row.append(f"{game.harm[k][i]:>{max(7, len(c) + 3)}.3f}")
        row.append(f"{res.margins.M[i]:>+8.3f}")
        for k, c in enumerate(names):
            row.append(f"{D[k, i]:>+{max(8, len(c) + 7)}.3f}")
        row.append(f"{res.strategy[i]:>7.3f}")
        lines.append("  ".join(row))
    tags = [f"expected risk [{c}]" if multi else "expected risk" for c in names]
    w = max(18, *(len(s) + 2 for s in tags))
    lines.append("")
    lines.append(f"{'value (pi.M)':<{w}}{res.value:.6g}")
    if res.objective != res.value:
        lines.append(f"{'objective':<{w}}{res.objective:.6g}")
    for k, tag in enumerate(tags):
        lines.append(
            f"{tag:<{w}}{_fmt(res.expected_risk[k])} (budget {_fmt(res.budget[k])}, "
            f"multiplier {_fmt(res.multiplier[k])})"
        )
    lines.append(f"{'status':<{w}}{int(res.status)} ({res.message})")
    lines.append(f"{'solver':<{w}}{res.solver}")
    return "\n".join(lines)


def result_json(game: GameInput, res: GameResult) -> dict[str, Any]:
    out = to_jsonable(res)
    out.update(
        success=res.success,
        support=list(res.support),
        refuses=res.refuses,
        labels=game.labels,
        categories=game.categories,
    )
    return dict(out)


@main.command("solve")
@click.argument("file", metavar="FILE|-")
@json_option
@clean_errors
def solve_cmd(file: str, as_json: bool) -> None:
    """Solve one Safety Game from a JSON file (or - for stdin).

    \b
    {"helpfulness": [...], "harm": [...], "refusal": 0, "budget": 0.2,
     "beta": null, "epsilon": 0.0}
    optional: "penalty", "temperature", "method" (auto|exact|highs), "labels",
    "prompt" (shown only).
    Several budgets: "harm": {"privacy": [...], "medical": [...]},
                     "budget": {"privacy": 0.1, "medical": 0.05}.
    """
    game = parse_game(_read(file))
    res = solve_input(game)
    if as_json:
        print_json(result_json(game, res))
    else:
        click.echo(render(game, res))
    if not res.success:
        sys.exit(1)


@bench.command("solver")
@click.option("--instances", type=click.IntRange(1), default=200, show_default=True)
@click.option("--batch-prompts", type=click.IntRange(1), default=100_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
@clean_errors
def bench_solver(instances: int, batch_prompts: int, seed: int, as_json: bool) -> None:
    """Exact hull solver vs HiGHS per prompt, and batched throughput (m = 8)."""
    from safetygame.bench.solver import run_solver_bench

    out = run_solver_bench(instances=instances, batch_prompts=batch_prompts, seed=seed)
    if as_json:
        print_json(out)
        return
    click.echo(f"{'m':>4}  {'exact us':>9}  {'HiGHS us':>9}  {'speed-up':>8}  {'max |dv|':>9}")
    for m, v in out["per_m"].items():
        click.echo(
            f"{m:>4}  {v['exact_median_us']:>9.1f}  {v['highs_median_us']:>9.1f}  "
            f"{v['speedup']:>7.0f}x  {v['max_abs_value_diff']:>9.2e}"
        )
    b = out["batch"]
    click.echo(
        f"batched: {out['batched_prompts_per_s']:,.0f} prompts/s median "
        f"(best {b['best_prompts_per_s']:,.0f}; m = {b['m']}, {b['prompts']:,} prompts)"
    )
    click.echo(
        f"speed-up vs HiGHS (smallest over m): {out['speedup_vs_highs']:.0f}x; "
        f"max |value difference|: {out['max_abs_value_diff']:.2e}"
    )
    click.echo(f"note: {out['config']['threads']}")
