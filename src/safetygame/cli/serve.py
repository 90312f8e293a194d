"""``safetygame serve`` (the gateway), ``audit export``, ``hash-key`` and ``bench gateway``."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from safetygame.backends.base import Backend
from safetygame.cli import bench, main
from safetygame.cli._common import (
    F,
    clean_errors,
    fail,
    json_option,
    open_backend,
    print_json,
    to_jsonable,
)
from safetygame.errors import ConfigError
from safetygame.gateway.audit import DEFAULT_AUDIT_URL as DEFAULT_AUDIT
from safetygame.policy import load_policy
from safetygame.tune import traffic_notice


def workers_option(help: str) -> Callable[[F], F]:
    """``--workers N`` (gateway processes), shared by ``serve`` and ``bench gateway``."""
    return click.option(
        "--workers", type=click.IntRange(1, 64), default=1, show_default=True, help=help
    )


def _backend(
    upstream: str, model: str | None, api_key: str | None, concurrency: int, timeout: float
) -> Backend:
    """``--upstream embedded`` runs the packaged model with its default slots; a URL gets the
    gateway's concurrency and timeout (cli._common.open_backend builds both)."""
    if upstream == "embedded":
        return open_backend(model, None, api_key)
    return open_backend(model, upstream, api_key, parallel=concurrency, timeout=timeout)


@main.command()
@click.option(
    "--upstream",
    required=True,
    metavar="URL|embedded",
    help="OpenAI-compatible server URL, or 'embedded' for the packaged llama.cpp model.",
)
@click.option(
    "--policy",
    default="default",
    show_default=True,
    help="Policy file or shipped name (the default tenant's, and tenants that name none).",
)
@click.option(
    "--keys",
    "--tenants",
    "tenants_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="tenants.yml: per-tenant policy and API-key hashes (enables auth).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True, help="0 = a free port.")
@click.option(
    "--model",
    default=None,
    help="Upstream model name (URL) or packaged model / GGUF path (embedded).",
)
@click.option(
    "--served-model",
    default="safetygame",
    show_default=True,
    help="The model id clients send and /v1/models lists.",
)
@click.option(
    "--audit",
    "audit_url",
    envvar="SAFETYGAME_AUDIT_URL",
    default=DEFAULT_AUDIT,
    show_default=True,
    help="sqlite:///PATH or postgresql://... (env SAFETYGAME_AUDIT_URL).",
)
@click.option(
    "--api-key",
    envvar="SAFETYGAME_UPSTREAM_API_KEY",
    default=None,
    help="Key for the upstream (env SAFETYGAME_UPSTREAM_API_KEY).",
)
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Request deadline in seconds (body, decision, audit write; docs/gateway.md).",
)
@click.option(
    "--upstream-concurrency",
    type=int,
    default=16,
    show_default=True,
    help="Upstream calls in flight at once (URL upstreams).",
)
@click.option("--max-body-bytes", type=int, default=1_000_000, show_default=True)
@click.option(
    "--reload-interval",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds between checks of the policy and tenants files.",
)
@click.option(
    "--max-header-bytes",
    type=int,
    default=16_384,
    show_default=True,
    help="Bytes of one request's line and headers (431 past it).",
)
@click.option(
    "--max-headers",
    "max_header_count",
    type=int,
    default=100,
    show_default=True,
    help="Headers in one request (431 past it).",
)
@click.option(
    "--header-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to receive a request's headers (408 and close past it).",
)
@click.option(
    "--keepalive-timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds an idle keep-alive connection stays open.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@workers_option("Gateway processes sharing the port (URL upstreams; see docs/gateway.md).")
@click.option("--fd", type=int, default=None, hidden=True, help="Listening socket (workers).")
@json_option
@clean_errors
def serve(
    upstream: str,
    policy: str,
    tenants_file: Path | None,
    host: str,
    port: int,
    model: str | None,
    served_model: str,
    audit_url: str,
    api_key: str | None,
    timeout: float,
    upstream_concurrency: int,
    max_body_bytes: int,
    reload_interval: float,
    max_header_bytes: int,
    max_header_count: int,
    header_timeout: float,
    keepalive_timeout: float,
    log_level: str,
    workers: int,
    fd: int | None,
    as_json: bool,
) -> None:
    """Serve the OpenAI-compatible gateway. Prints its URL on the first stdout line."""
    try:
        from safetygame.gateway.app import GatewaySettings, create_app
        from safetygame.gateway.http import HttpLimits
        from safetygame.gateway.server import run as run_loop
        from safetygame.gateway.server import serve_app
    except ImportError:
        fail("the gateway needs its extra: pip install 'safetygame[gateway]'")
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = GatewaySettings(
        policy=policy,
        tenants_file=tenants_file,
        audit_url=audit_url,
        model_name=served_model,
        max_body_bytes=max_body_bytes,
        decision_timeout=timeout,
        reload_interval=reload_interval,
        http=HttpLimits(
            max_header_bytes=max_header_bytes,
            max_header_count=max_header_count,
            header_timeout=header_timeout,
            keepalive_timeout=keepalive_timeout,
        ),
    )
    if upstream_concurrency < 1:
        raise ConfigError("--upstream-concurrency must be >= 1")
    with contextlib.suppress(ConfigError):  # the gateway itself reports a bad policy
        notice = traffic_notice(load_policy(policy))
        if notice:
            click.echo(notice, err=True)  # stderr: stdout's first line is the URL

    def ready(url: str, worker_pids: list[int] | None = None) -> None:
        if as_json:
            info = {"url": url, "pid": os.getpid(), "audit": audit_url.split("://")[0]}
            if worker_pids is not None:
                info["workers"] = worker_pids
            click.echo(json.dumps(info))
        else:
            click.echo(url)
        sys.stdout.flush()

    if workers > 1:
        from safetygame.gateway.workers import run_workers, worker_command

        if upstream == "embedded":
            raise ConfigError(
                "--workers > 1 needs a URL upstream (one model for all workers): serve the "
                "model with `python -m safetygame.backends.llamacpp` and pass its URL"
            )
        checked = _backend(upstream, model, api_key, 1, timeout)
        try:
            create_app(checked, settings)  # a bad policy or tenants file fails here, once
        finally:
            asyncio.run(checked.aclose())
        args = [
            "--upstream", upstream, "--policy", policy, "--served-model", served_model,
            "--audit", audit_url, "--timeout", str(timeout),
            "--upstream-concurrency", str(upstream_concurrency),
            "--max-body-bytes", str(max_body_bytes), "--reload-interval", str(reload_interval),
            "--max-header-bytes", str(max_header_bytes),
            "--max-headers", str(max_header_count),
            "--header-timeout", str(header_timeout),
            "--keepalive-timeout", str(keepalive_timeout),
            "--log-level", log_level,
            *(["--tenants", str(tenants_file)] if tenants_file else []),
            *(["--model", model] if model else []),
        ]  # fmt: skip
        if api_key:  # to the workers, not on their command lines
            os.environ["SAFETYGAME_UPSTREAM_API_KEY"] = api_key
        run_workers(worker_command(args), host, port, workers, ready)
        return

    backend = _backend(upstream, model, api_key, upstream_concurrency, timeout)
    sock = None
    if fd is not None:
        from safetygame.gateway.workers import worker_socket

        sock = worker_socket(fd)

    async def run() -> bool:
        try:
            app = create_app(backend, settings)  # validates policy and tenants before binding
            return await serve_app(
                app, host=host, port=port, log_level=log_level, on_ready=ready, sock=sock
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
@workers_option("Gateway processes (safetygame serve --workers).")
@json_option
@clean_errors
def bench_gateway(
    requests: int,
    concurrency: int,
    latency_ms: float,
    upstream_concurrency: int,
    workers: int,
    as_json: bool,
) -> None:
    """The gateway's own overhead against a fixed-latency loopback upstream (p50/p99 ms)."""
    from safetygame.bench.gateway import run_gateway_bench

    if requests < 1 or concurrency < 1 or latency_ms < 0:
        raise ConfigError("--requests and --concurrency must be >= 1, --latency-ms >= 0")
    result = run_gateway_bench(
        requests=requests,
        concurrency=concurrency,
        latency=latency_ms / 1000,
        upstream_concurrency=upstream_concurrency,
        workers=workers,
    )
    if as_json:
        print_json(result)
        return
    r = to_jsonable(result)
    click.echo(
        f"gateway overhead at concurrency {r['concurrency']} ({r['ok']}/{r['requests']} ok, "
        f"{r['throughput_rps']:.0f} req/s, upstream {r['upstream_latency_ms']:.0f} ms x "
        f"{r['upstream_rounds']} rounds, {r['upstream_http_per_request']:.1f} upstream "
        f"requests each, {r['workers']} worker(s))\n"
        f"  outside upstream waits: p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
        f"(targets 5 / 20)\n"
        f"  same without the audit commit wait: p50 {r['no_audit_p50_ms']:.2f} ms  "
        f"p99 {r['no_audit_p99_ms']:.2f} ms (audit commit p50 {r['audit_p50_ms']:.2f} ms)\n"
        f"  vs ideal critical path: p50 {r['vs_ideal_p50_ms']:.2f} ms  "
        f"p99 {r['vs_ideal_p99_ms']:.2f} ms\n"
        f"  client latency:         p50 {r['client_p50_ms']:.1f} ms  "
        f"p99 {r['client_p99_ms']:.1f} ms"
    )
