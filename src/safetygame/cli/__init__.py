"""The ``safetygame`` command line: a thin client of the public API."""

from __future__ import annotations

import click

from safetygame import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="safetygame")
def main() -> None:
    """Safety Game: helpful answers within a risk budget, for any black-box LLM."""


@main.group()
def bench() -> None:
    """Benchmarks that print numbers."""


def _register() -> None:
    # Each command lives in its own module; importing registers it on `main` / `bench`.
    from safetygame.cli import (  # noqa: F401
        ask,
        bench_model,
        cache,
        data,
        eval_probes,
        models,
        scorers,
        serve,
        solve,
        tune,
    )
    from safetygame.cli import eval as _eval  # noqa: F401


_register()
