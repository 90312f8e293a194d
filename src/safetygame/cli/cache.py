"""``safetygame cache``: what the score cache holds, and moving it between machines."""

from __future__ import annotations

from pathlib import Path

import click

from safetygame.cache import ScoreCache
from safetygame.cli import main
from safetygame.cli._common import cache_option, clean_errors, json_option, print_json


def _open_cache(cache_path: Path | None, must_exist: bool) -> ScoreCache:
    if must_exist and cache_path is not None and not cache_path.is_file():
        raise click.UsageError(f"no score cache at {cache_path}")
    return ScoreCache("default" if cache_path is None else cache_path)


@main.group()
def cache() -> None:
    """The score cache: entries per kind, export and import (JSON Lines, .gz to compress)."""


@cache.command("info")
@cache_option
@json_option
@clean_errors
def info_cmd(cache_path: Path | None, as_json: bool) -> None:
    """Where the cache is and how many entries of each kind it holds."""
    c = _open_cache(cache_path, must_exist=True)
    try:
        kinds = c.kinds()
    finally:
        c.close()
    if as_json:
        print_json({"path": c.path, "entries": sum(kinds.values()), "kinds": kinds})
        return
    click.echo(f"{c.path}: {sum(kinds.values())} entries")
    for kind, n in sorted(kinds.items()):
        click.echo(f"  {kind}: {n}")


@cache.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kind", "kinds", multiple=True, help="Only entries of this kind (repeatable).")
@cache_option
@json_option
@clean_errors
def export_cmd(file: Path, kinds: tuple[str, ...], cache_path: Path | None, as_json: bool) -> None:
    """Write the cache's entries to FILE (JSON Lines; gzip if FILE ends in .gz)."""
    c = _open_cache(cache_path, must_exist=True)
    try:
        n = c.export_jsonl(file, kinds or None)
    finally:
        c.close()
    out = {"file": file, "exported": n}
    print_json(out) if as_json else click.echo(f"exported {n} entries to {file}")


@cache.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--replace", is_flag=True, help="Overwrite entries already here [default: keep them]."
)
@cache_option
@json_option
@clean_errors
def import_cmd(file: Path, replace: bool, cache_path: Path | None, as_json: bool) -> None:
    """Add the entries of an export to the cache, all or nothing."""
    c = _open_cache(cache_path, must_exist=False)
    try:
        out = {"file": file, **c.import_jsonl(file, replace=replace)}
    finally:
        c.close()
    if as_json:
        print_json(out)
    else:
        click.echo(f"{file}: read {out['read']}, added {out['added']}, kept {out['kept']}")
