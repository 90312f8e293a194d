"""Calibrating the traffic-level budget: a price of risk from a dev set of scored prompts.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from safetygame import game
from safetygame.errors import ConfigError, SafetygameError
from safetygame.policy import Policy, policy_from_dict, policy_yaml

__all__ = [
    "ScoredPrompts",
    "TuneResult",
    "read_scored",
    "traffic_notice",
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


def write_policy(policy: Policy, path: str | Path) -> Path:
    """Write ``policy`` as YAML to ``path`` (a file, or a folder for its ``policy.yml``):
    a temporary file renamed over the target, so a reader never sees half a policy."""
    p = Path(path)
    if p.is_dir():
        p = p / "policy.yml"
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    head = "# Written by `safetygame tune`; every field is documented in docs/policy.md.\n"
    try:
        tmp.write_text(head + policy_yaml(policy), encoding="utf-8")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p
