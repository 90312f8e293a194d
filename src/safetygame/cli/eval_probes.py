"""``safetygame eval probes``: discrimination and calibration of each probe design."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from safetygame.cli._common import (
    backend_options,
    cache_option,
    clean_errors,
    export_reads_option,
    format_table,
    json_option,
    open_backend,
    policy_option,
    print_json,
    progress_option,
    run_cache,
    show_progress,
    to_jsonable,
)
from safetygame.cli.eval import eval_group
from safetygame.errors import ConfigError
from safetygame.policy import load_policy

if TYPE_CHECKING:
    from safetygame.cache import ScoreCache
    from safetygame.eval.probe_quality import EmbedFactory

DEFAULT_DESIGNS = "plain,self,refuses,pairwise,embed"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _f(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"


def render(report: dict[str, Any]) -> str:
    rows = []
    for r in report["results"]:
        t, d = r["test"], r["dev"]
        ci = "-" if t["auroc_low"] is None else f"[{_f(t['auroc_low'])}, {_f(t['auroc_high'])}]"
        rows.append(
            [
                r["source"],
                r["probe"],
                r["design"],
                str(t["n_items"]),
                _f(t["auroc"]),
                ci,
                _f(t["pairwise_acc"]),
                _f(t["ece"]),
                _f(r["calibrated_ece"]),
                _f(d["auroc"]),
                f"{r['calls_per_reply']:.2f}",
            ]
        )
    table = format_table(
        [
            "source",
            "probe",
            "design",
            "n test",
            "AUROC",
            "95% CI",
            "pair acc",
            "ECE",
            "ECE platt",
            "dev AUROC",
            "calls/reply",
        ],
        rows,
    )
    chosen = ", ".join(f"{k}: {v}" for k, v in report["chosen"].items()) or "-"
    lines = [
        f"model {report['model_id']}, seed {report['seed']}, dev fraction "
        f"{report['dev_fraction']}, limit {report['limit']}",
        table,
        f"chosen on dev (mean dev AUROC): {chosen}",
    ]
    for k, e in report["epsilon"].items():
        if e:
            lines.append(
                f"epsilon {k}: {e['epsilon']:.3f} (T={e['budget']}); true risk > T on test "
                f"{e['exceed_without']:.2f} without, {e['exceed_with']:.2f} with; "
                f"refusal mass {e['refusal_mass_without']:.2f} -> {e['refusal_mass_with']:.2f}"
            )
    lines += list(report["notes"])
    if report.get("model_calls") is not None:
        lines.append(f"model calls: {report['model_calls']} (0: every reading from the cache)")
    return "\n".join(lines)


@eval_group.command("probes")
@backend_options
@policy_option
@click.option(
    "--designs",
    default=DEFAULT_DESIGNS,
    show_default=True,
    help="Comma-separated probe designs (see docs/probes.md).",
)
@click.option(
    "--sources",
    default="hhh-harmless,truthfulqa,safetybench,xstest",
    show_default=True,
    help="Comma-separated labelled sources.",
)
@click.option(
    "--probe",
    "probes",
    type=click.Choice(["harm", "helpfulness", "both"]),
    default="both",
    show_default=True,
)
@click.option(
    "--limit",
    type=click.IntRange(min=2),
    default=None,
    help="Seeded sub-sample of N items per source.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dev-fraction", type=click.FloatRange(0.05, 0.95), default=0.4, show_default=True)
@click.option("--shots", type=click.IntRange(0, 16), default=4, show_default=True)
@cache_option
@export_reads_option
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Also save the JSON here."
)
@progress_option
@json_option
@clean_errors
def probes_command(
    model: str | None,
    upstream: str | None,
    api_key: str | None,
    policy_ref: str | None,
    designs: str,
    sources: str,
    probes: str,
    limit: int | None,
    seed: int,
    dev_fraction: float,
    shots: int,
    cache_path: Path | None,
    export_reads: Path | None,
    out: Path | None,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Probe quality per design and source: AUROC (95% CI), pairwise accuracy, ECE."""
    import json

    from safetygame.eval.probe_quality import check_request, evaluate_probes, make_embed_factory

    policy = load_policy(policy_ref)
    design_list = _csv(designs)
    source_list = _csv(sources)
    if not design_list:
        raise ConfigError("--designs must name at least one design")
    check_request(design_list, source_list, limit)  # fail fast, before a model loads
    probe_list: Any = ("harm", "helpfulness") if probes == "both" else (probes,)

    verbose = show_progress(progress, as_json)

    def say(msg: str) -> None:
        if verbose:
            click.echo(msg, err=True)

    async def run(cache: ScoreCache, embed: EmbedFactory | None) -> tuple[Any, int | None]:
        """The report, and the judge calls it took (0 when every reading was cached)."""
        async with open_backend(model, upstream, api_key) as backend:
            report = await evaluate_probes(
                backend,
                policy,
                cache,
                designs=design_list,
                sources=source_list,
                probes=probe_list,
                limit=limit,
                seed=seed,
                dev_fraction=dev_fraction,
                shots=shots,
                embed=embed,
                progress=say,
            )
            return report, None if backend.stats is None else backend.stats.calls

    t0 = time.perf_counter()
    with run_cache(cache_path, export_reads) as cache:
        embed = make_embed_factory(cache, seed, dev_fraction) if "embed" in design_list else None
        result, model_calls = asyncio.run(run(cache, embed))
    report = to_jsonable(result)
    report["seconds"] = time.perf_counter() - t0
    report["model_calls"] = model_calls
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    if as_json:
        print_json(report)
    else:
        click.echo(render(report))
