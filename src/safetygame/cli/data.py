"""``safetygame data pull|list``: the benchmarks' official files in the user cache."""

from __future__ import annotations

import click

from safetygame.cli import main
from safetygame.cli._common import (
    clean_errors,
    format_table,
    json_option,
    print_json,
    progress_option,
    show_progress,
)
from safetygame.eval.download import pull, status
from safetygame.eval.sources import MIRROR_ENV, SOURCES, pulled_root


@main.group()
def data() -> None:
    """Benchmark data: download the official releases (pinned sha256) and show what is here."""


_PULL_HELP = f"""Download benchmarks (default: all) into the user cache, checked by sha256.

Known: {", ".join(SOURCES)}. An interrupted download resumes; a file that fails its checksum
never replaces a good one. The loaders read $SAFETYGAME_DATA first, then these files, then
../shared/data."""


@data.command("pull", help=_PULL_HELP)
@click.argument("names", nargs=-1, metavar="[NAME ...|all]")
@click.option("--force", is_flag=True, help="Download again even if a verified copy is here.")
@click.option(
    "--mirror",
    envvar=MIRROR_ENV,
    default=None,
    metavar="URL",
    help=f"Fetch <URL>/<benchmark>/<file> from a copy of a data folder instead of the "
    f"upstream URLs [env: {MIRROR_ENV}].",
)
@progress_option
@json_option
@clean_errors
def pull_cmd(
    names: tuple[str, ...], force: bool, mirror: str | None, progress: bool | None, as_json: bool
) -> None:
    results = pull(
        names or ("all",), mirror=mirror, force=force, progress=show_progress(progress, as_json)
    )
    if as_json:
        print_json({"root": pulled_root(), "benchmarks": results})
        return
    for r in results:
        actions = [f.action for f in r.files]
        fetched = sum(f.fetched for f in r.files)
        summary = ", ".join(f"{actions.count(a)} {a}" for a in dict.fromkeys(actions))
        click.echo(f"{r.benchmark}: {summary} ({fetched / 1e3:.0f} kB fetched) -> {r.folder}")


@data.command("list")
@json_option
@clean_errors
def list_cmd(as_json: bool) -> None:
    """Each benchmark: its files in the user cache, and the folder the loaders read."""
    rows = status()
    if as_json:
        print_json({"root": pulled_root(), "benchmarks": rows})
        return
    click.echo(f"pull folder: {pulled_root()}")
    table = [
        [
            s.name,
            f"{s.pulled} ({s.files_ok}/{s.files})",
            f"{s.size / 1e3:.0f} kB",
            s.used_from,
            str(s.used or "-"),
        ]
        for s in rows
    ]
    click.echo(format_table(["benchmark", "pulled", "size", "read from", "folder"], table))
