"""``safetygame serve`` (the gateway), ``audit export``, ``hash-key`` and ``bench gateway``."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.util
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

import click
from pydantic import SecretStr

from safetygame.backends.base import Backend
from safetygame.cli import bench, main
from safetygame.cli._common import (
    F,
    clean_errors,
    fail,
    format_table,
    json_option,
    open_backend,
    print_json,
    to_jsonable,
)
from safetygame.errors import ConfigError
from safetygame.gateway.audit import DEFAULT_AUDIT_URL as DEFAULT_AUDIT
from safetygame.policy import load_policy
from safetygame.tune import traffic_notice

try:
    from safetygame.gateway.settings import ServeSettings
except ImportError:  # no gateway extra (pydantic-settings): `serve` prints the install hint
    ServeSettings = None  # type: ignore[assignment,misc]


def workers_option(help: str) -> Callable[[F], F]:
    """``--workers N`` (gateway processes), shared by ``serve`` and ``bench gateway``."""
    return click.option(
        "--workers", type=click.IntRange(1, 64), default=1, show_default=True, help=help
    )


def _backend(settings: ServeSettings, concurrency: int | None = None) -> Backend:
    """``--upstream embedded`` runs the packaged model with its default slots; a URL gets the
    gateway's concurrency and timeout (cli._common.open_backend builds both)."""
    if settings.upstream == "embedded":
        return open_backend(settings.model, None, settings.api_key)
    return open_backend(
        settings.model,
        settings.upstream,
        settings.api_key,
        parallel=concurrency or settings.upstream_concurrency,
        timeout=settings.timeout,
        transport=settings.upstream_transport,
    )


def _click_type(annotation: Any) -> Any:
    """The click parameter type of a ``ServeSettings`` field (None stripped from unions)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    if args and typing.get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return _click_type(args[0])
    if annotation is Path:
        return click.Path(dir_okay=False, path_type=Path)
    if annotation in (int, float, str):
        return annotation
    if annotation is SecretStr:
        return str
    raise TypeError(f"ServeSettings: no command-line type for {annotation!r}")


def settings_options(fn: F) -> F:
    """One click option per ``ServeSettings`` field (flags from ``ServeSettings.flags``).

    Every option defaults to None, meaning "not given": only given flags reach
    ``ServeSettings.load``, so the environment, the config file and then the model's defaults
    fill the rest."""
    if ServeSettings is None:
        return click.argument("ignored", nargs=-1, type=click.UNPROCESSED)(fn)
    for name, info in reversed(ServeSettings.model_fields.items()):
        env = ServeSettings.env_name(name)
        help_ = f"{info.description or ''} [env: {env}]".strip()
        if info.is_required():
            help_ += " [required]"
        elif info.default is not None:
            help_ += f" [default: {info.default}]"
        fn = click.option(
            *ServeSettings.flags(name),
            name,
            type=_click_type(info.annotation),
            default=None,
            metavar="URL|embedded" if name == "upstream" else None,
            help=help_,
        )(fn)
    return fn


@main.command(context_settings={"ignore_unknown_options": ServeSettings is None})
@settings_options
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="YAML file of settings (keys: the option names with underscores). Order: flags, "
    "then SAFETYGAME_* env, then this file, then defaults.",
)
@click.option("--fd", type=int, default=None, hidden=True, help="Listening socket (workers).")
@click.option(
    "--settings-stdin",
    is_flag=True,
    hidden=True,
    help="Read the supervisor's validated settings (JSON) from stdin (workers).",
)
@json_option
@clean_errors
def serve(
    config_file: Path | None,
    fd: int | None,
    settings_stdin: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Serve the OpenAI-compatible gateway. Prints its URL on the first stdout line.

    Settings come from flags, then SAFETYGAME_* environment variables, then --config FILE,
    then the defaults (the first that gives a value wins)."""
    if ServeSettings is None or importlib.util.find_spec("starlette") is None:
        fail("the gateway needs its extra: pip install 'safetygame[gateway]'")
    given = {k: v for k, v in flags.items() if v is not None}
    if settings_stdin:
        if given or config_file is not None:
            raise ConfigError("--settings-stdin takes no other settings")
        settings = ServeSettings.from_worker_json(sys.stdin.read())
    else:
        settings = ServeSettings.load(given, config_file)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with contextlib.suppress(ConfigError):  # the gateway itself reports a bad policy
        notice = traffic_notice(load_policy(settings.policy))
        if notice:
            click.echo(notice, err=True)  # stderr: stdout's first line is the URL

    def ready(url: str, worker_pids: list[int] | None = None) -> None:
        if as_json:
            info = {"url": url, "pid": os.getpid(), "audit": settings.audit_url.split("://")[0]}
            if worker_pids is not None:
                info["workers"] = worker_pids
            click.echo(json.dumps(info))
        else:
            click.echo(url)
        sys.stdout.flush()

    if settings.workers > 1 and not settings_stdin:
        serve_workers(settings, ready)
    else:
        serve_one(settings, fd, ready)


def serve_workers(settings: ServeSettings, ready: Callable[[str, list[int]], None]) -> None:
    """``--workers N``: check the settings once, then start N workers that read them (as
    JSON, secrets included) from stdin."""
    from safetygame.gateway.app import create_app
    from safetygame.gateway.workers import run_workers, worker_command

    if settings.upstream == "embedded":
        raise ConfigError(
            "--workers > 1 needs a URL upstream (one model for all workers): serve the "
            "model with `python -m safetygame.backends.llamacpp` and pass its URL"
        )
    checked = _backend(settings, 1)
    try:
        create_app(checked, settings.gateway())  # a bad policy or tenants file fails here, once
    finally:
        asyncio.run(checked.aclose())
    run_workers(
        worker_command(),
        settings.host,
        settings.port,
        settings.workers,
        ready,
        stdin=settings.worker_json(),
    )


def serve_one(settings: ServeSettings, fd: int | None, ready: Callable[[str], None]) -> None:
    """One gateway process (a worker when ``fd`` is its supervisor's listening socket)."""
    from safetygame.gateway.app import create_app
    from safetygame.gateway.server import run as run_loop
    from safetygame.gateway.server import serve_app

    backend = _backend(settings)
    sock = None
    if fd is not None:
        from safetygame.gateway.workers import worker_socket

        sock = worker_socket(fd)

    async def run() -> bool:
        try:
            app = create_app(backend, settings.gateway())  # validates policy and tenants first
            return await serve_app(
                app,
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level,
                on_ready=ready,
                sock=sock,
            )
        finally:
            await backend.aclose()

    if not run_loop(run()):
        fail("the gateway did not start (see the log above)", 1)


@main.group()
def audit() -> None:
    """The gateway's audit log."""


def parse_since(value: str | None) -> float | None:
    """Epoch seconds, or an ISO 8601 date/time (naive = UTC)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--since: {value!r} is neither epoch seconds nor an ISO 8601 time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


@audit.command("export")
@click.option("--since", default=None, help="Epoch seconds or ISO 8601 (UTC when no zone).")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "json"]), default="jsonl", show_default=True
)
@click.option(
    "--db",
    "url",
    envvar="SAFETYGAME_AUDIT_URL",
    default=DEFAULT_AUDIT,
    show_default=True,
    help="sqlite:///PATH or postgresql://... (env SAFETYGAME_AUDIT_URL).",
)
@json_option
@clean_errors
def export(since: str | None, fmt: str, url: str, as_json: bool) -> None:
    """Print audit records, oldest first (one JSON object per line, or --json: one array)."""
    from safetygame.gateway.audit import export_records

    records = export_records(url, parse_since(since))
    if as_json or fmt == "json":
        print_json(list(records))
        return
    for rec in records:
        click.echo(json.dumps(rec, ensure_ascii=False))


@main.command("hash-key")
@click.argument("key", required=False)
@json_option
@clean_errors
def hash_key_cmd(key: str | None, as_json: bool) -> None:
    """Hash an API key for tenants.yml (a new random key when none is given). Keys shorter
    than 32 characters are refused."""
    from safetygame.gateway.auth import check_key, hash_key, new_key

    key = new_key() if key is None else check_key(key)
    if as_json:
        print_json({"key": key, "hash": hash_key(key)})
    else:
        click.echo(f"key:  {key}\nhash: {hash_key(key)}")


@bench.command("gateway")
@click.option("--requests", type=int, default=2000, show_default=True)
@click.option("--concurrency", type=int, default=32, show_default=True)
@click.option(
    "--latency-ms",
    type=float,
    default=50.0,
    show_default=True,
    help="Fixed latency of the loopback upstream.",
)
@click.option(
    "--upstream-concurrency",
    type=int,
    default=256,
    show_default=True,
    help="Upstream calls the gateway keeps in flight (>= 5 x concurrency, or it is the cap).",
)
@click.option(
    "--transport",
    "transports",
    type=click.Choice(["hand", "httpx"]),
    multiple=True,
    help="The gateway's upstream HTTP client (serve --upstream-transport); repeat it to "
    "compare them side by side in one run (default: hand).",
)
@workers_option("Gateway processes (safetygame serve --workers).")
@json_option
@clean_errors
def bench_gateway(
    requests: int,
    concurrency: int,
    latency_ms: float,
    upstream_concurrency: int,
    transports: tuple[Literal["hand", "httpx"], ...],
    workers: int,
    as_json: bool,
) -> None:
    """The gateway's own overhead against a fixed-latency loopback upstream (p50/p99 ms).

    With several --transport values the runs go one after another in this process, each
    with its own upstream and gateway, and a comparison table follows. --json prints the
    first run's result with ``by_transport`` holding every run."""
    from safetygame.bench.gateway import run_gateway_bench

    if requests < 1 or concurrency < 1 or latency_ms < 0:
        raise ConfigError("--requests and --concurrency must be >= 1, --latency-ms >= 0")
    kinds = list(dict.fromkeys(transports)) or ["hand"]
    results = {
        kind: run_gateway_bench(
            requests=requests,
            concurrency=concurrency,
            latency=latency_ms / 1000,
            upstream_concurrency=upstream_concurrency,
            workers=workers,
            transport=kind,
        )
        for kind in kinds
    }
    runs = {kind: to_jsonable(result) for kind, result in results.items()}
    if as_json:
        print_json({**runs[kinds[0]], "by_transport": runs})
        return
    for r in runs.values():
        click.echo(
            f"gateway overhead at concurrency {r['concurrency']} ({r['ok']}/{r['requests']} ok, "
            f"{r['throughput_rps']:.0f} req/s, upstream {r['upstream_latency_ms']:.0f} ms x "
            f"{r['upstream_rounds']} rounds, {r['upstream_http_per_request']:.1f} upstream "
            f"requests each, {r['workers']} worker(s), transport {r['transport']})\n"
            f"  outside upstream waits: p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
            f"(targets 5 / 20)\n"
            f"  same without the audit commit wait: p50 {r['no_audit_p50_ms']:.2f} ms  "
            f"p99 {r['no_audit_p99_ms']:.2f} ms (audit commit p50 {r['audit_p50_ms']:.2f} ms)\n"
            f"  vs ideal critical path: p50 {r['vs_ideal_p50_ms']:.2f} ms  "
            f"p99 {r['vs_ideal_p99_ms']:.2f} ms\n"
            f"  client latency:         p50 {r['client_p50_ms']:.1f} ms  "
            f"p99 {r['client_p99_ms']:.1f} ms"
        )
    if len(runs) > 1:
        rows = [
            ["overhead p50 ms", "p50_ms", "{:.2f}"],
            ["overhead p99 ms", "p99_ms", "{:.2f}"],
            ["no-audit p50 ms", "no_audit_p50_ms", "{:.2f}"],
            ["vs ideal p50 ms", "vs_ideal_p50_ms", "{:.2f}"],
            ["vs ideal p99 ms", "vs_ideal_p99_ms", "{:.2f}"],
            ["gateway CPU ms/request", "gateway_cpu_ms_per_request", "{:.2f}"],
            ["throughput req/s", "throughput_rps", "{:.0f}"],
        ]
        click.echo(
            "\nside by side (one run each, in this order; one run on a busy machine is noise):\n"
            + format_table(
                ["", *runs],
                [[label, *(fmt.format(r[key]) for r in runs.values())] for label, key, fmt in rows],
            )
        )
