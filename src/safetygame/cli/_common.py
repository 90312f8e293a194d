"""Helpers shared by the CLI commands: JSON output and clean failure."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click

from safetygame._json import to_jsonable
from safetygame.backends.base import Backend
from safetygame.errors import BackendError, ConfigError, ModelNotInstalledError, SafetygameError

if TYPE_CHECKING:
    from safetygame.cache import ScoreCache

F = TypeVar("F", bound=Callable[..., Any])

json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
policy_option = click.option(
    "--policy", "policy_ref", default=None, help="Policy name or YAML file."
)
parallel_option = click.option(
    "--parallel",
    type=click.IntRange(1, 64),
    default=None,
    help="Requests in flight: the embedded model's llama.cpp slots [default: 4], or the "
    "upstream client's limit [default: 8].",
)
cache_option = click.option(
    "--cache",
    "cache_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Score cache file [default: the user cache].",
)
export_reads_option = click.option(
    "--export-reads",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="After the run, write every cache entry it read or made to FILE (JSON Lines, "
    ".gz to compress): an export that replays the run with 0 model calls "
    "(safetygame cache import FILE, then the same command).",
)


@contextmanager
def run_cache(cache_path: Path | None, export_reads: Path | None) -> Iterator[ScoreCache]:
    """The score cache of one run (``--cache``); with ``--export-reads``, it tracks what the
    run reads and writes that to the file when the run ends, also after a stop or a failure
    (what it read resumes it elsewhere)."""
    from safetygame.cache import ScoreCache

    if export_reads is not None:  # a folder that cannot be made fails here, not after the run
        export_reads.parent.mkdir(parents=True, exist_ok=True)
    cache = ScoreCache(cache_path or "default", track=export_reads is not None)
    try:
        yield cache
    finally:
        if export_reads is not None and cache.used is not None:
            n = cache.export_jsonl(export_reads, keys=cache.used)
            click.echo(f"exported the {n} cache entries this run read to {export_reads}", err=True)


#: The refusal detector's modes (``safetygame.eval.refusal.Mode``; a test keeps them equal).
REFUSAL_MODES = ("either", "both", "pattern", "probe")


def refusal_mode_option(help_text: str) -> Callable[[F], F]:
    """``--refusal-mode``: how the refusal detector combines patterns and probe."""
    return click.option(
        "--refusal-mode",
        type=click.Choice(REFUSAL_MODES),
        default="pattern",
        show_default=True,
        help=help_text,
    )


progress_option = click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress on stderr [default: on; with --json, only when stderr is a terminal].",
)


def show_progress(progress: bool | None, as_json: bool) -> bool:
    """Resolve --progress: JSON goes to stdout, so progress on stderr never corrupts it."""
    if progress is not None:
        return progress
    return not as_json or sys.stderr.isatty()


def print_json(obj: Any) -> None:
    click.echo(json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False))


def fail(message: str, code: int = 2) -> None:
    """Exit with a one-line message on stderr and no traceback."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def clean_errors(fn: F) -> F:
    """Map library errors to a one-line message: 2 for bad input, 1 for backend/model trouble."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc), 2)
        except (ModelNotInstalledError, BackendError) as exc:
            fail(str(exc), 1)
        except SafetygameError as exc:
            fail(str(exc), 1)
        except (OSError, json.JSONDecodeError) as exc:
            fail(str(exc), 2)

    return wrapper  # type: ignore[return-value]


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*headers), line.format(*("-" * w for w in widths))]
    out += [line.format(*map(str, r)) for r in rows]
    return "\n".join(s.rstrip() for s in out)


def backend_options(fn: F) -> F:
    """--model / --upstream / --api-key, shared by every command that talks to a model."""
    fn = click.option(
        "--api-key", envvar="SAFETYGAME_UPSTREAM_API_KEY", default=None, help="Upstream API key."
    )(fn)
    fn = click.option(
        "--upstream",
        default=None,
        metavar="URL",
        help="OpenAI-compatible server URL (e.g. http://127.0.0.1:8080/v1) to use instead.",
    )(fn)
    fn = click.option(
        "--model",
        default=None,
        help="Packaged model name or GGUF path (embedded), or the upstream's model name.",
    )(fn)
    return fn


def open_backend(
    model: str | None,
    upstream: str | None,
    api_key: str | None = None,
    parallel: int | None = None,
    threads: int | None = None,
    timeout: float | None = None,
    transport: Literal["hand", "httpx"] = "hand",
) -> Backend:
    """The embedded llama.cpp model by default, or an OpenAI-compatible upstream.

    ``parallel``: requests in flight (the embedded model's llama.cpp slots; the upstream
    client's concurrency limit); ``threads``: CPU threads of the embedded model; ``timeout``:
    seconds per upstream request; ``transport``: the upstream's HTTP client, the hand-written
    keep-alive transport (plain-http URLs) or httpx's pool (backends/transport.py). None
    keeps each backend's default."""
    if upstream:
        from safetygame.backends.openai_compat import (
            DEFAULT_MAX_CONCURRENCY,
            DEFAULT_TIMEOUT,
            OpenAICompatBackend,
        )
        from safetygame.backends.transport import httpx_transport

        concurrency = parallel or DEFAULT_MAX_CONCURRENCY
        return OpenAICompatBackend(
            upstream,
            model=model,
            api_key=api_key,
            max_concurrency=concurrency,
            timeout=timeout if timeout is not None else DEFAULT_TIMEOUT,
            transport=httpx_transport(concurrency) if transport == "httpx" else None,
        )
    from safetygame.backends.llamacpp import (
        DEFAULT_MODEL,
        DEFAULT_SLOTS,
        DEFAULT_THREADS,
        EmbeddedLlamaBackend,
    )

    return EmbeddedLlamaBackend(
        model or DEFAULT_MODEL,
        n_parallel=parallel or DEFAULT_SLOTS,
        threads=threads or DEFAULT_THREADS,
    )
