"""``safetygame eval BENCHMARK``, ``safetygame eval report`` and ``safetygame bench scoring``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import click

from safetygame.cli import bench, main
from safetygame.cli._common import (
    backend_options,
    cache_option,
    clean_errors,
    format_table,
    json_option,
    open_backend,
    parallel_option,
    policy_option,
    print_json,
    progress_option,
    show_progress,
)
from safetygame.policy import load_policy

if TYPE_CHECKING:
    from safetygame.eval.scoring import RunTally

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
) -> None:
    from safetygame.cache import ScoreCache
    from safetygame.eval.harness import (
        MC_BENCHMARKS,
        EvalConfig,
        EvalLog,
        run_mc,
        write_eval_log,
    )
    from safetygame.eval.refusal import Mode, run_open
    from safetygame.eval.scoring import CachingBackend, RunTally

    policy = load_policy(policy_ref)
    cfg = EvalConfig(benchmark=benchmark, seed=seed, limit=limit)
    out_dir = out or Path("results") / benchmark
    cache = ScoreCache(cache_path) if cache_path else ScoreCache()
    kind: Literal["mc", "open"] = "mc" if benchmark in MC_BENCHMARKS else "open"
    config: dict[str, Any] = {
        "benchmark": benchmark,
        "seed": seed,
        "limit": limit,
        "dev_fraction": cfg.dev_fraction,
        "budgets": list(cfg.budgets),
        "policy": policy.ref,
        "upstream": upstream,
        "cache": str(cache.path) if cache.path else None,
        "refusal_mode": refusal_mode if kind == "open" else None,
    }

    tally = RunTally()
    stopped_by: list[signal.Signals] = [signal.SIGINT]

    async def run() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], str, int]:
        _stop_on_sigterm(stopped_by)
        async with open_backend(model, upstream, api_key, parallel) as inner:
            backend = CachingBackend(inner, cache)
            config["model_id"] = backend.model_id
            write_eval_log(EvalLog(benchmark, kind, "started", config), out_dir)
            bar = show_progress(progress, as_json)
            try:
                if kind == "mc":
                    res = await run_mc(backend, policy, cfg, cache, progress=bar, tally=tally)
                else:
                    res = await run_open(
                        backend,
                        policy,
                        cfg,
                        cache,
                        mode=cast(Mode, refusal_mode),
                        progress=bar,
                        tally=tally,
                    )
            except asyncio.CancelledError:
                # Say what finished before the backend closes: closing an embedded llama.cpp
                # server with abandoned requests has hung (its destructor holds the GIL).
                record_stop()
                alarm.append(_arm_exit_alarm(CLOSE_GRACE_S))
                raise
            return (*res, backend.model_id, backend.model_calls)

    t0 = time.perf_counter()
    recorded: list[str] = []
    alarm: list[_SavedAlarm | None] = []

    def record_stop() -> None:
        if recorded:
            return
        msg = interrupted_message(benchmark, stopped_by[0], tally)
        stats = {
            "seconds": time.perf_counter() - t0,
            "finished": len(tally.finished),
            "total": tally.total,
            "prefix": tally.prefix,
        }
        write_eval_log(
            EvalLog(benchmark, kind, "cancelled", config, stats=stats, error=msg), out_dir
        )
        click.echo(msg, err=True)
        recorded.append(msg)

    try:
        summary, curves, records, model_id, calls = asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        for saved in alarm:  # closed in time
            _disarm_exit_alarm(saved)
        record_stop()
        raise SystemExit(128 + stopped_by[0]) from None
    except Exception as exc:
        write_eval_log(
            EvalLog(benchmark, kind, "error", config, error=f"{type(exc).__name__}: {exc}"),
            out_dir,
        )
        raise
    stats = {
        "seconds": time.perf_counter() - t0,
        "model_calls": calls,
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
    }
    results = {
        "benchmark": benchmark,
        "kind": kind,
        **summary,
        "model_id": model_id,
        "policy": policy.ref,
        "stats": stats,
    }
    path = write_eval_log(
        EvalLog(benchmark, kind, "success", config, results, curves, records, stats), out_dir
    )
    results["log"] = str(path)
    if as_json:
        print_json(results)
    else:
        click.echo(render_results(results))


CLOSE_GRACE_S = 60
_SavedAlarm = tuple[Any, int]  # the SIGALRM handler and alarm seconds left before arming


def _arm_exit_alarm(seconds: int) -> _SavedAlarm | None:
    """End the process by SIGALRM's default action if it is still alive in ``seconds``.

    A stopped run has written its log by then; a Python-level timeout cannot help when the
    hang is inside native code that holds the GIL, but the kernel's alarm can.
    """
    if not hasattr(signal, "alarm"):
        return None
    try:
        handler = signal.signal(signal.SIGALRM, signal.SIG_DFL)
    except ValueError:  # not on the main thread
        return None
    return handler, signal.alarm(seconds)


def _disarm_exit_alarm(saved: _SavedAlarm | None) -> None:
    """Undo :func:`_arm_exit_alarm`, restoring whatever alarm was set before (a test runner's)."""
    if saved is None:
        return
    handler, left = saved
    signal.alarm(0)
    signal.signal(signal.SIGALRM, handler)
    if left:
        signal.alarm(left)


def _stop_on_sigterm(stopped_by: list[signal.Signals]) -> None:
    """Let SIGTERM (``timeout``, a scheduler) stop the run as Ctrl-C does: the main task is
    cancelled, so the log says what finished instead of being left at ``started``."""
    task = asyncio.current_task()
    if task is None:
        return

    def stop() -> None:
        stopped_by[0] = signal.SIGTERM
        task.cancel()

    # Not possible off the main thread or on Windows: SIGTERM then keeps its default.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)


def interrupted_message(benchmark: str, sig: signal.Signals, tally: RunTally) -> str:
    """What a stopped run finished, and how to resume it or report what it has."""
    head = f"{benchmark}: stopped by {sig.name}"
    if not tally.total:
        return f"{head} before any item started"
    msg = (
        f"{head} after {len(tally.finished)} of {tally.total} items, whose readings are "
        "cached; the same command resumes"
    )
    # HarmBench's --limit N draws val and test apart, so its prefix is not a --limit sample.
    if benchmark != "harmbench" and 2 <= tally.prefix < tally.total:
        msg += (
            f". The first {tally.prefix} in the seeded draw order are all done: "
            f"--limit {tally.prefix} (same seed) reports that nested sample from the cache"
        )
    return msg


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
        help=f"Where to save the EvalLog [default: results/{name}/].",
    )
    @cache_option
    @click.option(
        "--refusal-mode",
        type=click.Choice(["either", "both", "pattern", "probe"]),
        default="pattern",
        show_default=True,
        help="How the refusal detector combines patterns and probe (open-ended).",
    )
    @parallel_option
    @progress_option
    @json_option
    @clean_errors
    def command(**kwargs: Any) -> None:
        _run_benchmark(name, **kwargs)

    command.__doc__ = f"Evaluate on {name} (see docs/evaluation.md)."
    return command


for _name in BENCHMARK_NAMES:
    eval_group.command(_name)(_benchmark_command(_name))


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
