"""Running one benchmark: the run's lifecycle, kept out of the CLI.

:func:`run_benchmark` writes an :class:`~safetygame.eval.harness.EvalLog` whose status goes
``started`` -> ``success``, ``error`` (the exception is re-raised) or ``cancelled``. A run is
cancelled by Ctrl-C (SIGINT) or SIGTERM (``timeout``, a scheduler): the main task is
cancelled, the log says what finished and how to resume, and the result says which signal
stopped it. Closing the backend after a stop is guarded by a kernel alarm, since a hang in
native code that holds the GIL cannot be timed out from Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from safetygame.backends.base import Backend
from safetygame.cache import ScoreCache
from safetygame.eval.custom import CustomData, describe
from safetygame.eval.harness import (
    MC_BENCHMARKS,
    EvalConfig,
    EvalLog,
    run_mc,
    sample_and_split,
    write_eval_log,
)
from safetygame.eval.refusal import Mode, run_open
from safetygame.eval.scoring import CachingBackend, RunTally
from safetygame.policy import Policy

__all__ = ["CLOSE_GRACE_S", "BenchmarkRun", "interrupted_message", "run_benchmark"]

#: Seconds a stopped run may take to close its backend before the kernel ends the process.
CLOSE_GRACE_S = 60

_SavedAlarm = tuple[Any, int]  # the SIGALRM handler and alarm seconds left before arming


@dataclass(frozen=True)
class BenchmarkRun:
    """How a run ended (errors are raised, not returned).

    ``success``: ``results`` is what ``--json`` prints. ``cancelled``: ``stopped_by`` is the
    signal and ``message`` what finished and how to resume. ``log`` is the EvalLog written.
    """

    status: Literal["success", "cancelled"]
    log: Path
    results: dict[str, Any] = field(default_factory=dict)
    stopped_by: signal.Signals | None = None
    message: str | None = None


def run_benchmark(
    benchmark: str,
    open_backend: Callable[[], Backend],
    policy: Policy,
    cache: ScoreCache,
    out_dir: Path,
    *,
    seed: int = 0,
    limit: int | None = None,
    refusal_mode: Mode = "pattern",
    upstream: str | None = None,
    progress: bool = False,
    on_stop: Callable[[str], None] | None = None,
    data: CustomData | None = None,
) -> BenchmarkRun:
    """Evaluate ``policy`` on ``benchmark`` and save the EvalLog under ``out_dir``.

    ``data`` is a user's validated file (``eval custom``): its items replace the benchmark's,
    its kind picks the study, and ``benchmark`` names the run (``data.name``).

    ``open_backend`` makes the (unopened) backend inside the run's event loop; its readings
    go through ``cache``. ``upstream`` is only recorded in the log's config. ``on_stop``
    receives the stop message as soon as the run is stopped, before the backend closes.
    Runs its own event loop, like ``asyncio.run``.
    """
    return _Run(
        benchmark,
        open_backend,
        policy,
        cache,
        out_dir,
        seed,
        limit,
        refusal_mode,
        upstream,
        progress,
        on_stop,
        data,
    ).execute()


class _Run:
    """One run's state: what stopped it, whether the stop is recorded, the armed alarm."""

    def __init__(
        self,
        benchmark: str,
        open_backend: Callable[[], Backend],
        policy: Policy,
        cache: ScoreCache,
        out_dir: Path,
        seed: int,
        limit: int | None,
        refusal_mode: Mode,
        upstream: str | None,
        progress: bool,
        on_stop: Callable[[str], None] | None,
        data: CustomData | None = None,
    ) -> None:
        self.benchmark = benchmark
        self.open_backend = open_backend
        self.policy = policy
        self.cache = cache
        self.out_dir = out_dir
        self.refusal_mode = refusal_mode
        self.progress = progress
        self.on_stop = on_stop
        self.cfg = EvalConfig(benchmark=benchmark, seed=seed, limit=limit)
        self.data = data
        self.kind: Literal["mc", "open"] = (
            data.kind if data is not None else "mc" if benchmark in MC_BENCHMARKS else "open"
        )
        self.config: dict[str, Any] = {
            "benchmark": benchmark,
            "seed": seed,
            "limit": limit,
            "dev_fraction": self.cfg.dev_fraction,
            "budgets": list(self.cfg.budgets),
            "policy": policy.ref,
            "upstream": upstream,
            "cache": str(cache.path) if cache.path else None,
            "refusal_mode": refusal_mode if self.kind == "open" else None,
        }
        if data is not None:
            self.config["data"] = describe(data)
        self.tally = RunTally()
        self.stopped_by = signal.SIGINT  # asyncio.run turns Ctrl-C into a cancellation
        self.stop: tuple[str, Path] | None = None  # the recorded stop: message, log
        self.alarm_armed = False
        self.saved_alarm: _SavedAlarm | None = None
        self.t0 = time.perf_counter()

    def execute(self) -> BenchmarkRun:
        try:
            summary, curves, records, model_id, calls = asyncio.run(self._run())
        except (KeyboardInterrupt, asyncio.CancelledError):
            if self.alarm_armed:  # the backend closed in time
                _disarm_exit_alarm(self.saved_alarm)
            message, path = self._record_stop()
            return BenchmarkRun("cancelled", path, stopped_by=self.stopped_by, message=message)
        except Exception as exc:
            write_eval_log(
                EvalLog(
                    self.benchmark,
                    self.kind,
                    "error",
                    self.config,
                    error=f"{type(exc).__name__}: {exc}",
                ),
                self.out_dir,
            )
            raise
        stats = {
            "seconds": time.perf_counter() - self.t0,
            "model_calls": calls,
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
        }
        results = {
            "benchmark": self.benchmark,
            "kind": self.kind,
            **summary,
            "model_id": model_id,
            "policy": self.policy.ref,
            "stats": stats,
        }
        path = write_eval_log(
            EvalLog(
                self.benchmark, self.kind, "success", self.config, results, curves, records, stats
            ),
            self.out_dir,
        )
        return BenchmarkRun("success", path, results)

    async def _run(self) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], str, int]:
        self._stop_on_sigterm()
        async with self.open_backend() as inner:
            backend = CachingBackend(inner, self.cache)
            self.config["model_id"] = backend.model_id
            write_eval_log(EvalLog(self.benchmark, self.kind, "started", self.config), self.out_dir)
            try:
                if self.kind == "mc":
                    res = await run_mc(
                        backend,
                        self.policy,
                        self.cfg,
                        self.cache,
                        progress=self.progress,
                        tally=self.tally,
                        items=None if self.data is None else self.data.mc_items,
                    )
                else:
                    split = (
                        None
                        if self.data is None
                        else sample_and_split(self.data.prompt_items, self.cfg)
                    )
                    res = await run_open(
                        backend,
                        self.policy,
                        self.cfg,
                        self.cache,
                        mode=self.refusal_mode,
                        progress=self.progress,
                        tally=self.tally,
                        prompts=None if split is None else (split.dev, split.test),
                    )
            except asyncio.CancelledError:
                # Say what finished before the backend closes: closing an embedded llama.cpp
                # server with abandoned requests has hung (its destructor holds the GIL).
                self._record_stop()
                self.saved_alarm = _arm_exit_alarm(CLOSE_GRACE_S)
                self.alarm_armed = True
                raise
            return (*res, backend.model_id, backend.model_calls)

    def _record_stop(self) -> tuple[str, Path]:
        """Write the ``cancelled`` log and tell ``on_stop``, once."""
        if self.stop is None:
            msg = interrupted_message(self.benchmark, self.stopped_by, self.tally)
            stats = {
                "seconds": time.perf_counter() - self.t0,
                "finished": len(self.tally.finished),
                "total": self.tally.total,
                "prefix": self.tally.prefix,
            }
            path = write_eval_log(
                EvalLog(
                    self.benchmark, self.kind, "cancelled", self.config, stats=stats, error=msg
                ),
                self.out_dir,
            )
            if self.on_stop is not None:
                self.on_stop(msg)
            self.stop = (msg, path)
        return self.stop

    def _stop_on_sigterm(self) -> None:
        """Let SIGTERM stop the run as Ctrl-C does: the main task is cancelled, so the log
        says what finished instead of being left at ``started``."""
        task = asyncio.current_task()
        if task is None:
            return

        def stop() -> None:
            self.stopped_by = signal.SIGTERM
            task.cancel()

        # Not possible off the main thread or on Windows: SIGTERM then keeps its default.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)


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
