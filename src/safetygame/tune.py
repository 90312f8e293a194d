"""Tuning a policy on dev data, written through one policy writer (:func:`write_policy`).

Two things are tuned, each by its own ``safetygame tune`` mode:

- **the budget** (``safetygame tune FILE``, :func:`tune_budget_from_data`): T (and beta for an
  accuracy study) on the dev split of a user's labelled file (:mod:`safetygame.eval.custom`),
  with the same split, scores and tuning rule as the benchmark harness
  (:func:`safetygame.eval.stats.choose_budget`: the policy's budget is kept unless the dev
  evidence separates the dev-best candidate from it). Readings go through the score cache;
  the game is re-solved per candidate budget from them, with no further model call;
- **the traffic-level price of risk** (``safetygame tune --from SCORED``, :func:`tune_price`),
  described below.

``game.scope: traffic`` trades the per-prompt bound for a bound on the *mean* extra risk over
the traffic the price was calibrated on (docs/method.md, "Traffic-level budget"). This module
reads the calibration prompts' scores, computes the price (:func:`safetygame.game.calibrate_price`)
and writes it into a policy file; ``safetygame tune`` is its command-line client.

Calibration input (:func:`read_scored`), one of:

- JSON Lines, one prompt a line, either ``{"helpfulness": [h_s, h_1, ...], "harm": [d_s, d_1,
  ...]}`` (the refusal first), or a decision record as ``safetygame ask --json`` prints it and
  the gateway's audit keeps it (``status``, ``candidates[]`` with ``is_refusal``,
  ``helpfulness`` and ``harm``: a number or ``{"harm": x}``); decisions whose status is not
  ``ok`` are skipped and counted;
- an EvalLog (``evallog.json`` of ``safetygame eval xstest|harmbench|advbench``, which
  ``--cache-only`` builds from the score cache): its ``dev`` items with a decision.

An empty candidate text scores helpfulness 0 and harm 1, as the agent scores it.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from safetygame import game
from safetygame.errors import BackendError, ConfigError, SafetygameError
from safetygame.policy import Policy, policy_from_dict, policy_yaml

if TYPE_CHECKING:  # `ask` and `serve` import this module: the eval stack loads on use only
    from safetygame.backends.base import Backend
    from safetygame.cache import ScoreCache
    from safetygame.eval.custom import CustomData
    from safetygame.eval.harness import EvalConfig
    from safetygame.eval.refusal import Mode
    from safetygame.eval.stats import BudgetChoice

__all__ = [
    "BudgetTuning",
    "ScoredPrompts",
    "TuneResult",
    "budget_notes",
    "check_budget_tunable",
    "read_scored",
    "traffic_notice",
    "tune_budget_from_data",
    "tune_price",
    "write_policy",
]


@dataclass(frozen=True)
class ScoredPrompts:
    """Per prompt the scores of its candidates, the refusal first."""

    helpfulness: tuple[tuple[float, ...], ...]
    harm: tuple[tuple[float, ...], ...]
    source: str
    skipped: int = 0

    @property
    def n(self) -> int:
        return len(self.helpfulness)


@dataclass(frozen=True)
class TuneResult:
    calibration: game.PriceCalibration
    policy: Policy  # the tuned policy (scope traffic, price_of_risk set)
    skipped: int


def traffic_notice(policy: Policy) -> str | None:
    """The one-line notice ``ask`` and ``serve`` print when the traffic budget is on."""
    p = policy.game.price_of_risk
    if policy.game.scope != "traffic" or p is None:
        return None
    return (
        f"note: game.scope is traffic (price of risk {p.value:.4g}, calibrated on {p.n} "
        f"prompts): the mean extra risk over traffic like the calibration set is <= "
        f"{p.budget:g}; a single answer may exceed it"
    )


def _prob(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise ConfigError(f"{where} must be a number in [0, 1] (got {x!r})")
    if not 0.0 <= x <= 1.0:
        raise ConfigError(f"{where} must be in [0, 1] (got {x!r})")
    return float(x)


def _from_candidates(cands: Any, where: str) -> tuple[list[float], list[float]]:
    """Scores from decision-shaped candidates, the refusal moved first."""
    if not isinstance(cands, list) or len(cands) < 2:
        raise ConfigError(f"{where}.candidates must be a list of the refusal and >= 1 answer")
    refusals = [i for i, c in enumerate(cands) if isinstance(c, dict) and c.get("is_refusal")]
    if len(refusals) != 1:
        raise ConfigError(f"{where}.candidates must hold exactly one is_refusal candidate")
    order = refusals + [i for i in range(len(cands)) if i != refusals[0]]
    h, d = [], []
    for i in order:
        c, at = cands[i], f"{where}.candidates[{i}]"
        if not isinstance(c, dict):
            raise ConfigError(f"{at} must be an object")
        harm = c.get("harm")
        if isinstance(harm, dict):
            harm, at_d = harm.get("harm"), f"{at}.harm.harm"
        else:
            at_d = f"{at}.harm"
        if i != refusals[0] and c.get("text") == "":
            h.append(0.0)
            d.append(1.0)
            continue
        h.append(_prob(c.get("helpfulness"), f"{at}.helpfulness"))
        d.append(_prob(harm, at_d))
    return h, d


def _from_line(obj: Any, where: str) -> tuple[list[float], list[float]] | None:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    if obj.get("status", "ok") != "ok":
        return None  # a failed decision: no scores to calibrate on
    if "candidates" in obj:
        return _from_candidates(obj["candidates"], where)
    if "helpfulness" not in obj or "harm" not in obj:
        raise ConfigError(f'{where}: expected "helpfulness" and "harm" lists, or "candidates"')
    h, d = obj["helpfulness"], obj["harm"]
    for name, v in (("helpfulness", h), ("harm", d)):
        if not isinstance(v, list) or len(v) < 2:
            raise ConfigError(f"{where}.{name} must be a list: the refusal, then >= 1 answer")
    if len(h) != len(d):
        raise ConfigError(f"{where}: helpfulness has {len(h)} entries but harm has {len(d)}")
    return (
        [_prob(x, f"{where}.helpfulness[{i}]") for i, x in enumerate(h)],
        [_prob(x, f"{where}.harm[{i}]") for i, x in enumerate(d)],
    )


def read_scored(path: str | Path) -> ScoredPrompts:
    """Calibration scores from a JSONL file (``.gz`` too) or an EvalLog's dev split.

    Malformed input raises :class:`ConfigError` naming the file, line and field."""
    p = Path(path)
    try:
        opener = gzip.open if p.name.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read calibration file {p}: {exc}") from exc
    rows: list[tuple[list[float], list[float]]] = []
    skipped = 0
    source = str(p)
    log = None
    if text.lstrip().startswith("{") and "\n{" not in text.strip():
        try:
            log = json.loads(text)
        except json.JSONDecodeError:
            log = None
    if isinstance(log, dict) and "items" in log and "version" in log:
        bench = (log.get("config") or {}).get("benchmark", "?")
        source = f"{p} (EvalLog {bench}, dev split)"
        for k, item in enumerate(log["items"] or []):
            if not isinstance(item, dict) or item.get("split") != "dev":
                continue
            if item.get("status") != "ok" or "candidates" not in item:
                skipped += 1
                continue
            rows.append(_from_candidates(item["candidates"], f"{p}: items[{k}]"))
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{p}:{i}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: not JSON ({exc.msg})") from None
            row = _from_line(obj, where)
            if row is None:
                skipped += 1
            else:
                rows.append(row)
    if not rows:
        raise ConfigError(f"{p}: no scored prompt to calibrate on ({skipped} skipped)")
    return ScoredPrompts(
        tuple(tuple(h) for h, _ in rows), tuple(tuple(d) for _, d in rows), source, skipped
    )


def tune_price(policy: Policy, scored: ScoredPrompts) -> TuneResult:
    """Calibrate the price of risk at the policy's budget and epsilon; returns the policy with
    ``game.scope: traffic`` and ``game.price_of_risk`` set (validated). A failed calibration
    (numerical trouble) raises :class:`SafetygameError`."""
    n, m = scored.n, max(len(h) for h in scored.helpfulness)
    H, D = np.zeros((n, m)), np.zeros((n, m))
    mask = np.zeros((n, m), dtype=bool)
    for i, (h, d) in enumerate(zip(scored.helpfulness, scored.harm, strict=True)):
        k = len(h)
        H[i, :k], D[i, :k], mask[i, :k] = h, d, True
    M = np.where(mask, H - H[:, :1], 0.0)
    Delta = np.where(mask, D - D[:, :1], 0.0)
    g = policy.game
    cal = game.calibrate_price(M, Delta, g.budget, mask, refusal=0, epsilon=g.epsilon)
    if not cal.success:
        raise SafetygameError(f"calibration failed: {cal.message}")
    data = policy.model_dump(mode="json")
    data["game"]["scope"] = "traffic"
    data["game"]["price_of_risk"] = {
        "value": cal.price,
        "budget": g.budget,
        "epsilon": g.epsilon,
        "n": cal.n,
        "source": scored.source,
    }
    return TuneResult(cal, policy_from_dict(data, "<tuned>"), scored.skipped)


def write_policy(policy: Policy, path: str | Path, notes: Sequence[str] = ()) -> Path:
    """Write ``policy`` as YAML to ``path`` (a file, or a folder for its ``policy.yml``):
    a temporary file renamed over the target, so a reader never sees half a policy.
    ``notes`` become comment lines under the header (e.g. the dev metrics of a tuning)."""
    p = Path(path)
    if p.is_dir():
        p = p / "policy.yml"
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    head = "# Written by `safetygame tune`; every field is documented in docs/policy.md.\n"
    head += "".join(f"# {line}\n" if line else "#\n" for n in notes for line in n.splitlines())
    try:
        tmp.write_text(head + policy_yaml(policy), encoding="utf-8")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


# --------------------------------------------------------------------------- the budget


@dataclass(frozen=True)
class BudgetTuning:
    """The policy with its dev-tuned budget, the rule's decision and the dev metrics.

    ``metrics`` is what the written policy's comment and ``--json`` report: the study
    (``kind``), the dev items, the score (``behaviour`` or ``accuracy``) of the chosen
    budget, of the policy's current one and of the dev-best, and for the refusal study the
    refusal rate on unsafe and over-refusal on safe dev prompts of the game at each of
    those budgets and of the plain model.
    """

    policy: Policy
    choice: BudgetChoice
    kind: Literal["mc", "open"]
    metrics: dict[str, Any]


def check_budget_tunable(policy: Policy) -> None:
    if policy.game.scope == "traffic":
        raise ConfigError(
            "game.scope is traffic: its price of risk was calibrated for the current budget. "
            "Tune the budget on a policy with scope: prompt, then run `safetygame tune --from` "
            "to calibrate the price again"
        )


def _tuned_policy(policy: Policy, choice: BudgetChoice, tune_beta: bool) -> Policy:
    if not tune_beta:
        return policy.with_budget(choice.budget)
    if choice.beta is None:  # the soft cap's smoothing has no soft cap left to smooth
        return policy.with_game(budget=choice.budget, beta=None, temperature=None)
    return policy.with_game(budget=choice.budget, beta=choice.beta)


async def tune_budget_from_data(
    backend: Backend,
    policy: Policy,
    data: CustomData,
    cfg: EvalConfig,
    cache: ScoreCache | None,
    *,
    refusal_mode: Mode = "pattern",
    progress: bool = False,
) -> BudgetTuning:
    """Tune the policy's budget on the dev split of ``data`` (the split ``eval custom``
    uses with the same seed and limit); only the dev items are read from the model.

    Refusal study: T of the Safety Game by the behaviour score, the game played as the
    harness plays it (hard budget; the policy's beta is left as it is). Accuracy study: T and
    beta of ``safety-game`` by expected accuracy over the harness's grids. Both go through
    :func:`safetygame.eval.stats.choose_budget` from the policy's current (T, beta).
    """
    from safetygame.eval import datasets
    from safetygame.eval.harness import (
        TUNED_METHODS,
        current_candidate,
        sample_and_split,
        score_table,
    )
    from safetygame.eval.scoring import ScoringPass
    from safetygame.eval.stats import tune_budget

    check_budget_tunable(policy)
    if data.kind == "mc":
        dev_mc = list(sample_and_split(data.mc_items, cfg).dev)
        scores = await ScoringPass(backend, policy, cache).run(
            dev_mc, progress=progress, order=datasets.sample_order(dev_mc, cfg.seed)
        )
        table, failed = score_table(dev_mc, scores)
        choice = tune_budget(
            table,
            "safety-game",
            cfg.budgets,
            current=current_candidate(policy.game, "safety-game"),
            betas=TUNED_METHODS["safety-game"],
            n_resamples=cfg.n_resamples,
            confidence=cfg.confidence,
            seed=cfg.seed,
        )
        metrics = _common_metrics(data, cfg, choice, "accuracy", len(failed))
        return BudgetTuning(_tuned_policy(policy, choice, True), choice, "mc", metrics)
    return await _tune_open(backend, policy, data, cfg, cache, refusal_mode, progress)


async def _tune_open(
    backend: Backend,
    policy: Policy,
    data: CustomData,
    cfg: EvalConfig,
    cache: ScoreCache | None,
    refusal_mode: Mode,
    progress: bool,
) -> BudgetTuning:
    from safetygame.agent import Status
    from safetygame.eval.harness import sample_and_split
    from safetygame.eval.refusal import (
        GAME,
        decide_prompts,
        decision_table,
        dev_rates,
        refusal_columns,
        tune_open,
    )

    dev = list(sample_and_split(data.prompt_items, cfg).dev)
    decisions, readings, _ = await decide_prompts(
        backend, policy, dev, cfg, cache, mode=refusal_mode, progress=progress
    )
    ok = [i for i, d in enumerate(decisions) if d.status == Status.OK]
    if not ok:
        first = decisions[0]
        raise BackendError(
            f"{data.path}: no dev prompt got a decision; the first failed with "
            f"{first.status.value}: {first.reason}"
        )
    table = decision_table([decisions[i] for i in ok])
    refused = refusal_columns([readings[i] for i in ok], table.n_options)
    labels = [dev[i].label for i in ok]
    eps = policy.game.epsilon
    choice = tune_open(table, refused, labels, cfg, current=policy.game.budget, epsilon=eps)[GAME]
    metrics = _common_metrics(data, cfg, choice, "behaviour", len(dev) - len(ok))
    metrics["n_safe"] = sum(1 for lab in labels if lab == "safe")
    metrics["n_unsafe"] = len(labels) - metrics["n_safe"]
    metrics["rates"] = {
        "plain": dev_rates(table, refused, labels, None, eps),
        "chosen": dev_rates(table, refused, labels, choice.budget, eps),
        "current": dev_rates(table, refused, labels, choice.current[0], eps),
        "best": dev_rates(table, refused, labels, choice.best[0], eps),
    }
    return BudgetTuning(_tuned_policy(policy, choice, False), choice, "open", metrics)


def _common_metrics(
    data: CustomData, cfg: EvalConfig, choice: BudgetChoice, score: str, n_failed: int
) -> dict[str, Any]:
    return {
        "file": str(data.path),
        "sha256": data.sha256,
        "kind": data.kind,
        "seed": cfg.seed,
        "limit": cfg.limit,
        "dev_fraction": cfg.dev_fraction,
        "n_dev": choice.n,
        "n_failed": n_failed,
        "score": score,
        **choice.summary(),
    }


def _opt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _t(budget: float, beta: float | None) -> str:
    return f"T = {budget:g}" + ("" if beta is None else f", beta = {beta:g}")


def budget_notes(result: BudgetTuning) -> list[str]:
    """The comment a tuned policy file carries: the decision and the dev metrics, in words
    and as one JSON line (``dev metrics: {...}``) a script can read back."""
    c, m = result.choice, result.metrics
    study = "refusal study" if result.kind == "open" else "accuracy study"
    verdict = "adopted the dev-best" if c.adopted else "kept the policy's budget"
    lines = [
        f"Budget tuned on the dev split of {m['file']} (sha256 {m['sha256'][:12]}, {study}, "
        f"{c.n} dev item(s), seed {m['seed']})",
        "Rule (docs/evaluation.md, Tuning rule): keep the policy's budget unless the paired "
        "bootstrap interval of the dev-best minus it is above 0",
        f"Decision: {verdict}, {_t(c.budget, c.beta)} ({c.reason})",
        f"dev {m['score']} at {_t(c.budget, c.beta)}: {c.score:.3f} "
        f"[{c.score_ci[0]:.3f}, {c.score_ci[1]:.3f}]; T picked on dev resamples: "
        f"[{c.budget_ci[0]:g}, {c.budget_ci[1]:g}]",
        f"dev-best {_t(*c.best)}: {c.best_score:.3f}; policy's {_t(*c.current)}: "
        f"{c.current_score:.3f}",
    ]
    if "rates" in m:

        def rate(r: dict[str, Any]) -> str:
            return (
                f"refusal (unsafe) {_opt(r['refusal_rate'])}, "
                f"over-refusal (safe) {_opt(r['over_refusal'])}"
            )

        lines += [
            f"dev game at chosen T: {rate(m['rates']['chosen'])}",
            f"dev game at dev-best T: {rate(m['rates']['best'])}",
            f"dev plain model: {rate(m['rates']['plain'])}",
        ]
    lines.append("dev metrics: " + json.dumps(m, sort_keys=True, default=str))
    return lines
