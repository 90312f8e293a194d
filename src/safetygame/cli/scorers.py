"""``safetygame scorers``: list the scorer designs, fit learned heads, measure them on test."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from safetygame.cache import ScoreCache
from safetygame.cli import main
from safetygame.cli._common import (
    backend_options,
    cache_option,
    clean_errors,
    fail,
    format_table,
    json_option,
    open_backend,
    policy_option,
    print_json,
    progress_option,
    show_progress,
    to_jsonable,
)
from safetygame.errors import ConfigError
from safetygame.policy import load_policy

if TYPE_CHECKING:
    from safetygame.heads import Head

QUALITY_FILE = "quality.json"

# What each design costs per reply scored, in judge calls (docs/probes.md measures them).
COSTS: dict[str, str] = {
    "self": "1 yes/no call",
    "plain": "1 yes/no call",
    "followup": "1 yes/no call (cached prefix)",
    "brief": "1 yes/no call (cached prefix, the policy's question only)",
    "rule": "1 yes/no call",
    "comply": "1 yes/no call",
    "safe": "1 yes/no call",
    "refuses": "1 yes/no call",
    "both": "2 yes/no calls",
    "para3": "3 yes/no calls",
    "embed": "1 MiniLM pass (no judge call)",
    "pairwise-refusal": "2 yes/no calls (both orders vs the refusal)",
    "contrast": "2 forced log-likelihood reads of the reply (one per persona)",
    "llama-guard-3": "1 guard call (first-token log-probabilities)",
    "shieldgemma": "4 guard calls (one per harm policy, the maximum)",
    "granite-guardian": "1 guard call (Yes/No log-probabilities)",
    "wildguard": "1 guard call (log-probabilities of the response line)",
}


@main.group()
def scorers() -> None:
    """Scorer designs and learned heads."""


def _head_cost(head: Head) -> str:
    """A head's cost per reply: what its feature model reads (the judge's hidden states, or
    a MiniLM pass with no judge call), plus the refusal's read for a relative head."""
    from safetygame.features import EMBED_MODEL_ID

    if head.features.model_id == EMBED_MODEL_ID:
        one = "1 MiniLM pass (no judge call)"
    else:
        one = "1 hidden-state read (no decoding)"
    return f"{one} (+1 for the refusal, once per prompt)" if head.relative else one


def _f(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def _test_quality(q: dict[str, Any]) -> dict[str, Any]:
    """The two test columns of `scorers list`, from one scorer's entry in the quality report."""
    return {
        "hhh_harmless_pair_acc": q.get("hhh_harmless_test", {}).get("pair_acc"),
        "xstest_auroc": q.get("xstest_complying_vs_refusal", {}).get("auroc"),
    }


@scorers.command("list")
@json_option
@clean_errors
def list_cmd(as_json: bool) -> None:
    """Every design a policy can name, with its artefact, cost and measured quality."""
    from safetygame.heads import HEADS_DIR
    from safetygame.scorers import DESIGNS, HEAD_DESIGNS, shipped_heads

    quality: dict[str, Any] = {}
    designs: dict[str, Any] = {}
    ms: dict[str, Any] = {}
    qfile = HEADS_DIR / QUALITY_FILE
    if qfile.is_file():
        report = json.loads(qfile.read_text(encoding="utf-8"))
        quality, ms = report.get("heads", {}), report.get("ms_per_read", {})
        designs = report.get("designs", {})
    rows: list[dict[str, Any]] = []
    heads = shipped_heads()
    for name in sorted(DESIGNS):
        objective = HEAD_DESIGNS.get(name)
        arts = [h for h in heads if h.objective == objective] if objective else []
        if not arts:
            q = designs.get(name, {})
            rows.append(
                {
                    "design": name,
                    "artefact": None,
                    "cost": COSTS.get(name, "-"),
                    "ms_per_read": q.get("ms_per_read"),
                    **_test_quality(q),
                }
            )
            continue
        for h in arts:
            rows.append(
                {
                    "design": name,
                    "artefact": f"{h.name} ({h.features.model_id}, {h.features.pooling})",
                    "cost": _head_cost(h),
                    "ms_per_read": ms.get(h.features.model_id),
                    "dev": h.quality.get("dev", {}).get("dev_score"),
                    **_test_quality(quality.get(h.name, {})),
                }
            )
    if as_json:
        print_json({"designs": rows, "quality_file": str(qfile)})
        return
    click.echo(
        format_table(
            [
                "design",
                "artefact",
                "cost per reply",
                "ms/read",
                "dev",
                "HHH harmless pair acc",
                "XSTest AUROC",
            ],
            [
                [
                    r["design"],
                    r["artefact"] or "-",
                    r["cost"],
                    "-" if r.get("ms_per_read") is None else f"{r['ms_per_read']:.0f}",
                    _f(r.get("dev")),
                    _f(r.get("hhh_harmless_pair_acc")),
                    _f(r.get("xstest_auroc")),
                ]
                for r in rows
            ],
        )
    )
    click.echo("\nPrompt designs: quality per source in docs/probes.md (safetygame eval probes).")


@scorers.command("train")
@backend_options
@policy_option
@cache_option
@click.option(
    "--recipe",
    type=click.Choice(["default", "tiny"]),
    default="default",
    show_default=True,
    help="How many rows of each source to fit on (tiny: the CI-sized slice).",
)
@click.option(
    "--xstest-limit",
    type=click.IntRange(1),
    default=None,
    help="Use only the first N XSTest dev prompts.",
)
@click.option(
    "--size",
    "sizes",
    multiple=True,
    metavar="SOURCE=N",
    help="Override the recipe's rows of one source (hh_train, hh_dev, advbench, "
    "xstest_safe_candidates, moderation), e.g. --size hh_train=1756.",
)
@click.option(
    "--features",
    type=click.Choice(["judge", "minilm"]),
    default="judge",
    show_default=True,
    help="The judge model's own hidden states, or the independent MiniLM embeddings.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("results/heads"),
    show_default=True,
    help="Folder for the artefacts (the shipped ones live in src/safetygame/scorer_heads).",
)
@click.option(
    "--check",
    is_flag=True,
    help="Compare with the artefacts already in --out byte for byte; exit 1 if any differs.",
)
@progress_option
@json_option
@clean_errors
def train_cmd(
    model: str | None,
    upstream: str | None,
    api_key: str | None,
    policy_ref: str | None,
    cache_path: Path | None,
    recipe: str,
    xstest_limit: int | None,
    sizes: tuple[str, ...],
    features: str,
    out: Path,
    check: bool,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Fit the learned harm heads on the judge's hidden states (seeded; docs/probes.md)."""
    from safetygame.eval.head_data import Recipe
    from safetygame.eval.train_heads import train_heads

    rec = Recipe.tiny() if recipe == "tiny" else Recipe()
    overrides: dict[str, int] = {}
    for item in sizes:
        key, _, value = item.partition("=")
        if key not in Recipe.__dataclass_fields__ or key == "seed" or not value.isdigit():
            raise ConfigError(f"--size {item!r}: expected SOURCE=N with SOURCE a recipe field")
        overrides[key] = int(value)
    rec = dataclasses.replace(rec, **overrides)
    policy = load_policy(policy_ref)
    cache = ScoreCache(cache_path or "default")

    async def run() -> Any:
        backend = open_backend(model, upstream, api_key, parallel=1)
        try:
            return await train_heads(
                backend,
                policy,
                cache,
                rec,
                xstest_limit=xstest_limit,
                features=features,  # type: ignore[arg-type]
                progress=show_progress(progress, as_json),
            )
        finally:
            await backend.aclose()

    result = asyncio.run(run())
    written, differs = [], []
    for head in result.heads:
        path = out / f"{head.name}.json"
        if check:
            old = path.read_text(encoding="utf-8") if path.is_file() else None
            if old != head.to_json():
                differs.append(str(path))
            continue
        written.append(str(head.save(path)))
    summary = {
        "heads": [
            {
                "name": h.name,
                "objective": h.objective,
                "pooling": h.features.pooling,
                "ridge": h.ridge,
                "dev": h.quality.get("dev"),
            }
            for h in result.heads
        ],
        "rows": result.n_rows,
        "notes": result.notes,
        "grid": result.grid,
        "seconds": result.seconds,
        "written": written,
        "differs": differs if check else None,
    }
    if as_json:
        print_json(summary)
    else:
        for h in summary["heads"]:
            dev = h["dev"] or {}
            click.echo(
                f"{h['name']}: {h['objective']}, pooling {h['pooling']}, ridge {h['ridge']:g}, "
                f"dev score {_f(dev.get('dev_score'))} (hh-rlhf dev pair acc "
                f"{_f(dev.get('hh_dev_pair_acc'))}, cv {_f(dev.get('cv'))})"
            )
        click.echo(f"{result.n_rows} training replies; {result.seconds:.0f} s")
        for w in written:
            click.echo(f"wrote {w}")
    if check and differs:
        fail(f"differs from the artefact on disk: {', '.join(differs)}", 1)
    elif check and not as_json:
        click.echo("identical to the artefacts on disk")


@scorers.command("evaluate")
@backend_options
@policy_option
@cache_option
@click.option(
    "--head",
    "head_refs",
    multiple=True,
    help="Head name or artefact path [default: the shipped heads of the model].",
)
@click.option("--xstest-limit", type=click.IntRange(1), default=None)
@click.option(
    "--design",
    "designs",
    multiple=True,
    help="Also read yes/no designs (e.g. self) on the XSTest replies, for comparison.",
)
@click.option(
    "--timing",
    type=click.IntRange(0),
    default=8,
    show_default=True,
    help="XSTest replies each scorer reads again, one at a time past the cache: its ms/read.",
)
@click.option(
    "--save-quality",
    is_flag=True,
    help="Write the report next to the shipped heads (what `scorers list` shows).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the JSON report here.",
)
@progress_option
@json_option
@clean_errors
def evaluate_cmd(
    model: str | None,
    upstream: str | None,
    api_key: str | None,
    policy_ref: str | None,
    cache_path: Path | None,
    head_refs: tuple[str, ...],
    xstest_limit: int | None,
    designs: tuple[str, ...],
    timing: int,
    save_quality: bool,
    out: Path | None,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Measure heads once on the test sets: HHH harmless pairs, XSTest complying vs refusal."""
    from safetygame.eval.train_heads import evaluate_heads
    from safetygame.features import EMBED_MODEL_ID
    from safetygame.heads import HEADS_DIR, load_head
    from safetygame.scorers import shipped_heads

    policy = load_policy(policy_ref)
    cache = ScoreCache(cache_path or "default")

    named = [load_head(r) for r in head_refs]  # a bad artefact fails before the model loads

    async def run() -> dict[str, Any]:
        backend = open_backend(model, upstream, api_key, parallel=1)
        try:
            ours = (backend.model_id, EMBED_MODEL_ID)
            heads = named or [h for h in shipped_heads() if h.features.model_id in ours]
            if not heads:
                raise ConfigError(f"no shipped head for {backend.model_id}: pass --head")
            for h in heads:
                if h.features.model_id != EMBED_MODEL_ID:
                    h.check_model(backend.model_id)
            return await evaluate_heads(
                backend,
                heads,
                policy,
                cache,
                xstest_limit=xstest_limit,
                designs=designs,
                timing=timing,
                progress=show_progress(progress, as_json),
            )
        finally:
            await backend.aclose()

    report = asyncio.run(run())
    text = json.dumps(to_jsonable(report), indent=1, sort_keys=True) + "\n"
    for path in ([out] if out else []) + ([HEADS_DIR / QUALITY_FILE] if save_quality else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if as_json:
        print_json(report)
        return

    def ci(m: dict[str, Any] | None, key: str) -> str:
        if not m or m.get(key) is None:
            return "-"
        lo, hi = m.get(f"{key}_ci") or (None, None)
        return f"{_f(m[key])} [{_f(lo)}, {_f(hi)}]"

    def ms(r: dict[str, Any]) -> str:
        v = r.get("ms_per_read", report["ms_per_read"].get(r.get("features")))
        return "-" if v is None else f"{v:.0f}"

    rows = []
    for name, r in [*report["heads"].items(), *report["designs"].items()]:
        h = r.get("hhh_harmless_test")
        rows.append(
            [
                name,
                ms(r),
                ci(h, "pair_acc"),
                ci(h, "auroc"),
                _f((h or {}).get("ece_platt_dev")),
                ci(r.get("xstest_complying_vs_refusal"), "auroc"),
                ci(r.get("xstest_unsafe_vs_safe_compliance"), "auroc"),
            ]
        )
    click.echo(
        format_table(
            [
                "scorer",
                "ms/read",
                "HHH harmless pair acc",
                "HHH harmless AUROC",
                "ECE (Platt, dev)",
                "XSTest complying vs refusal",
                "XSTest unsafe vs safe compliance",
            ],
            rows,
        )
    )
    click.echo(
        f"{report['hhh_harmless']['test_items']} HHH harmless test items, "
        f"{report['xstest']['complying']} complying answers to "
        f"{report['xstest']['test_prompts']} XSTest test prompts, "
        f"{report['xstest']['safe_complying']} complying answers to safe ones; "
        f"{report['read_seconds']:.0f} s reading, {report['cache_misses']} cache misses"
    )
