"""``safetygame eval BENCHMARK``, ``safetygame eval report`` and ``safetygame bench scoring``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import click

from safetygame.cli import bench, main
from safetygame.cli._common import (
    backend_options,
    cache_option,
    clean_errors,
    export_reads_option,
    format_table,
    json_option,
    open_backend,
    parallel_option,
    policy_option,
    print_json,
    progress_option,
    refusal_mode_option,
    run_cache,
    show_progress,
)
from safetygame.errors import ConfigError
from safetygame.policy import load_policy

BENCHMARK_NAMES = ("hhh", "truthfulqa", "safetybench", "xstest", "harmbench", "advbench")


@main.group("eval")
def eval_group() -> None:
    """Evaluate on public benchmarks (cached, resumable) and build reports."""


def _run_benchmark(
    benchmark: str,
    model: str | None,
    upstream: str | None,
    api_key: str | None,
    policy_ref: str | None,
    limit: int | None,
    seed: int,
    out: Path | None,
    cache_path: Path | None,
    refusal_mode: str,
    parallel: int | None,
    progress: bool | None,
    as_json: bool,
    cache_only: bool,
    export_reads: Path | None,
    data_file: Path | None = None,
) -> None:
    from safetygame.backends.base import Backend
    from safetygame.eval.custom import load_custom
    from safetygame.eval.refusal import Mode
    from safetygame.eval.runner import run_benchmark
    from safetygame.eval.scoring import CacheOnlyBackend
    from safetygame.models import DEFAULT_MODEL

    if cache_only and upstream:
        raise ConfigError("--cache-only reads the cache of a packaged model: drop --upstream")
    # The whole file is validated before any model loads or any log is written.
    data = None if data_file is None else load_custom(data_file)
    if data is not None:
        benchmark = data.name
    policy = load_policy(policy_ref)

    def backend() -> Backend:
        if cache_only:
            return CacheOnlyBackend.for_model(model or DEFAULT_MODEL)
        return open_backend(model, upstream, api_key, parallel)

    with run_cache(cache_path, export_reads) as cache:
        run = run_benchmark(
            benchmark,
            backend,
            policy,
            cache,
            out or Path("results") / benchmark.replace(":", "-"),
            seed=seed,
            limit=limit,
            refusal_mode=cast(Mode, refusal_mode),
            upstream=upstream,
            progress=show_progress(progress, as_json),
            on_stop=lambda message: click.echo(message, err=True),
            data=data,
        )
    if run.stopped_by is not None:
        raise SystemExit(128 + run.stopped_by)
    results = {**run.results, "log": str(run.log)}
    if as_json:
        print_json(results)
    else:
        click.echo(render_results(results))


def _ci(lo_hi: list[float] | None) -> str:
    return "-" if lo_hi is None else f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def render_results(r: dict[str, Any]) -> str:
    head = f"{r['benchmark']}: {r['n']} test items ({r['n_dev']} dev), model {r['model_id']}"
    if r["kind"] == "mc":
        rows = [
            [
                name,
                _num(m["acc"]),
                _ci(m["ci"]),
                _num(m["argmax_acc"]),
                _num(m["refusal_rate"]),
                "-" if m["budget"] is None else f"{m['budget']:g}",
            ]
            for name, m in r["methods"].items()
        ]
        table = format_table(["method", "acc", "95% CI", "argmax", "refusal", "T"], rows)
    else:
        rows = [
            [
                name,
                _num(m["refusal_rate"]),
                _ci(m["refusal_rate_ci"]),
                _num(m["over_refusal"]),
                _ci(m["over_refusal_ci"]),
                "-" if m["budget"] is None else f"{m['budget']:g}",
            ]
            for name, m in r["methods"].items()
        ]
        table = format_table(
            ["system", "refusal (harmful)", "95% CI", "over-refusal (safe)", "95% CI", "T"], rows
        )
    s = r["stats"]
    tail = (
        f"model calls {s['model_calls']}, cache hits {s['cache_hits']}, "
        f"{s['seconds']:.1f} s; log {r['log']}"
    )
    return f"{head}\n{table}\n{tail}"


def _benchmark_command(name: str) -> Callable[..., None]:
    default_out = "results/custom-<file stem>/" if name == "custom" else f"results/{name}/"

    @backend_options
    @policy_option
    @click.option(
        "--limit",
        type=click.IntRange(min=2),
        default=None,
        help="Seeded sub-sample of N items (dev + test).",
    )
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option(
        "--out",
        type=click.Path(path_type=Path),
        default=None,
        help=f"Where to save the EvalLog [default: {default_out}].",
    )
    @cache_option
    @refusal_mode_option("How the refusal detector combines patterns and probe (open-ended).")
    @parallel_option
    @click.option(
        "--cache-only",
        is_flag=True,
        help="Report from the score cache alone: load no model; a missing reading fails "
        "(counted in stats.model_calls).",
    )
    @export_reads_option
    @progress_option
    @json_option
    @clean_errors
    def command(**kwargs: Any) -> None:
        _run_benchmark(name, **kwargs)

    command.__doc__ = f"Evaluate on {name} (see docs/evaluation.md)."
    if name == "custom":
        file_type = click.Path(exists=True, dir_okay=False, path_type=Path)
        command = click.argument("data_file", metavar="FILE", type=file_type)(command)
        command.__doc__ = (
            "Evaluate on your own FILE: JSONL or CSV of prompts labelled safe/unsafe "
            "(refusal study) or of multiple-choice items (accuracy study). Same split, "
            "methods, intervals and report as the benchmarks; formats in docs/evaluation.md."
        )
    return command


for _name in BENCHMARK_NAMES:
    eval_group.command(_name)(_benchmark_command(_name))


eval_group.command("custom")(_benchmark_command("custom"))


@eval_group.command("report")
@click.option(
    "--results",
    "results_dir",
    type=click.Path(path_type=Path),
    default=Path("results"),
    show_default=True,
)
@json_option
@clean_errors
def report(results_dir: Path, as_json: bool) -> None:
    """Markdown table (method x benchmark) and PNG plots from the saved EvalLogs."""
    from safetygame.eval.report import write_report

    out = write_report(results_dir)
    if as_json:
        print_json(out)
    else:
        click.echo(out["markdown_text"])
        click.echo("\n".join(f"wrote {p}" for p in out["files"]))


@bench.command("scoring")
@backend_options
@policy_option
@click.option(
    "--items",
    "n_items",
    type=click.IntRange(1, 200),
    default=8,
    show_default=True,
    help="HHH items per mode.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=None,
    help="Replies scored at once [default: 2 x the backend's slots].",
)
@click.option("--seed", type=int, default=0, show_default=True)
@parallel_option
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=2,
    show_default=True,
    help="CPU threads of the embedded model (ignored with --upstream).",
)
@progress_option
@json_option
@clean_errors
def scoring(
    model: str | None,
    upstream: str | None,
    api_key: str | None,
    policy_ref: str | None,
    n_items: int,
    concurrency: int | None,
    seed: int,
    parallel: int | None,
    threads: int,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Probe scores per second: batched/concurrent scoring pass vs one request at a time."""
    from safetygame.bench.scoring import run_scoring_bench

    policy = load_policy(policy_ref)

    async def run() -> dict[str, Any]:
        async with open_backend(model, upstream, api_key, parallel, threads) as backend:
            return await run_scoring_bench(
                backend,
                policy,
                n_items,
                seed,
                concurrency,
                progress=show_progress(progress, as_json),
            )

    out = asyncio.run(run())
    if as_json:
        print_json(out)
    else:
        click.echo(
            f"model {out['model_id']}, {out['items']} HHH items per mode\n"
            f"sequential  {out['sequential_per_s']:.2f} readings/s "
            f"({out['sequential_readings']} in {out['sequential_s']:.1f} s)\n"
            f"batched     {out['batched_per_s']:.2f} readings/s "
            f"({out['batched_readings']} in {out['batched_s']:.1f} s, "
            f"concurrency {out['concurrency']})\n"
            f"ratio       {out['ratio']:.2f}"
            + (f"  ({threads} threads, {out['slots']} slots)" if not upstream else "")
        )
        if out["ratio_ceiling"] is not None:
            click.echo(
                f"tokens/s    sequential {out['sequential_tok_s']:.1f}, batched "
                f"{out['batched_tok_s']:.1f}, peak {out['peak_tok_s']:.1f} (one long prompt)\n"
                f"ceiling     {out['ratio_ceiling']:.2f} (every batched token at the peak rate)"
            )
