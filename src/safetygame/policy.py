"""Policies as validated data: budgets, probe wording, refusal text and rule categories.

A policy is one YAML file (``policies/<id>/policy.yml``), validated on load with pydantic
(``extra="forbid"``); errors name the field. Nothing here does I/O beyond reading the file.
"""

from __future__ import annotations

import hashlib
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safetygame._yaml import load_yaml
from safetygame.errors import ConfigError

DEFAULT_POLICY_ID = "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _finite(v: float | None, name: str) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError(f"{name} must be finite")
    return v


class PriceOfRisk(_Strict):
    """A calibrated price of risk (``safetygame tune``) and what it was calibrated for."""

    value: float = Field(ge=0.0, description="lambda, helpfulness given up per unit of risk")
    budget: float = Field(ge=0.0, le=1.0, description="the mean budget T it was calibrated for")
    epsilon: float = Field(0.0, ge=0.0, le=0.5)
    n: int = Field(ge=1, description="calibration prompts")
    source: str = Field("", description="where the calibration prompts came from")

    @field_validator("value", "budget", "epsilon")
    @classmethod
    def _check_finite(cls, v: float, info: Any) -> float | None:
        return _finite(v, info.field_name)


class GameSettings(_Strict):
    budget: float = Field(0.1, ge=0.0, le=1.0, description="T, the extra-risk budget")
    beta: float | None = Field(None, ge=0.0)
    penalty: float = Field(1.0, ge=0.0)
    temperature: float | None = Field(None, gt=0.0)
    epsilon: float = Field(0.0, ge=0.0, le=0.5)
    choose: Literal["sample", "argmax"] = "sample"
    seed: int | None = None
    scope: Literal["prompt", "traffic"] = "prompt"
    price_of_risk: PriceOfRisk | None = None

    @field_validator("budget", "beta", "penalty", "temperature", "epsilon")
    @classmethod
    def _check_finite(cls, v: float | None, info: Any) -> float | None:
        return _finite(v, info.field_name)

    @model_validator(mode="after")
    def _soft_cap_needs_beta(self) -> GameSettings:
        if self.temperature is not None and self.beta is None:
            raise ValueError("temperature (the soft cap) needs a finite beta")
        if self.scope == "prompt":
            if self.price_of_risk is not None:
                raise ValueError("price_of_risk is used only with scope: traffic")
            return self
        p = self.price_of_risk
        if p is None:
            raise ValueError("scope: traffic needs a price_of_risk: run `safetygame tune`")
        if self.beta is not None:
            raise ValueError("scope: traffic is the hard budget's price: beta must be null")
        if p.budget != self.budget or p.epsilon != self.epsilon:
            raise ValueError(
                f"price_of_risk was calibrated for budget {p.budget:g}, epsilon {p.epsilon:g}, "
                f"but the policy has budget {self.budget:g}, epsilon {self.epsilon:g}: "
                "run `safetygame tune` again"
            )
        return self


class SamplingSettings(_Strict):
    n: int = Field(4, ge=1, le=64)
    mode: Literal["fixed", "adaptive"] = "fixed"
    fast_path_helpfulness: float = Field(0.5, ge=0.0, le=1.0)
    # "during": the refusal's readings go out while the first draw generates (when the backend
    # has a request to spare). Same readings, earlier: it pays where the server has idle
    # capacity; on a compute-bound CPU it slows the draw by more than it saves (README, Speed).
    refusal_reads: Literal["after", "during"] = "after"
    # "by_reply": each reply's probes one after another on one slot (the server's cache holds
    # the reply, so later probes read only their question), the refusal's after the first
    # candidate's on its slot. "parallel": every read at once.
    probe_order: Literal["parallel", "by_reply"] = "parallel"
    # "lazy" (adaptive only): the one-candidate path reads the refusal's helpfulness only when
    # the candidate's does not exceed refusal_helpfulness_bound, and otherwise counts it as
    # the bound; the full path reads it. One judge read less per such fast decision; the risk
    # bound is unchanged (it rests on harm margins alone, docs/method.md). Where the refusal
    # would read at most the bound, lazy decides exactly as read.
    refusal_helpfulness: Literal["read", "lazy"] = "read"
    refusal_helpfulness_bound: float = Field(0.0, ge=0.0, le=1.0)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, le=8192)

    @field_validator("fast_path_helpfulness", "refusal_helpfulness_bound")
    @classmethod
    def _check_finite(cls, v: float, info: Any) -> float | None:
        return _finite(v, info.field_name)


class ProbeQuestion(_Strict):
    question: str = Field(min_length=5)


class Category(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    question: str = Field(min_length=5)
    budget: float = Field(ge=0.0, le=1.0)


class Probes(_Strict):
    judge_system: str = Field(min_length=10)
    helpfulness: ProbeQuestion
    harm: ProbeQuestion


class Scorers(_Strict):
    helpfulness: str = "self"
    harm: str = "self"


class Policy(_Strict):
    """A validated Safety Game policy. ``digest`` identifies its exact content."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: str = Field(min_length=1)
    description: str = ""
    refusal: str = Field(min_length=1)
    game: GameSettings = Field(default_factory=GameSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    probes: Probes
    categories: tuple[Category, ...] = ()
    scorers: Scorers = Field(default_factory=Scorers)

    @model_validator(mode="after")
    def _unique_categories(self) -> Policy:
        names = [c.name for c in self.categories]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"category names must be unique, repeated: {sorted(dupes)}")
        if "harm" in names:
            raise ValueError("category name 'harm' is reserved for the main harm probe")
        if self.sampling.refusal_helpfulness == "lazy" and self.sampling.mode != "adaptive":
            raise ValueError(
                "sampling.refusal_helpfulness: lazy skips a read on adaptive sampling's "
                "one-candidate path; it needs sampling.mode: adaptive"
            )
        if self.sampling.refusal_helpfulness_bound and self.sampling.refusal_helpfulness != "lazy":
            raise ValueError(
                "sampling.refusal_helpfulness_bound is used only with "
                "sampling.refusal_helpfulness: lazy"
            )
        if self.game.scope == "traffic":
            if self.categories:
                raise ValueError("game.scope: traffic prices one risk row: categories must be []")
            if self.sampling.mode == "adaptive":
                raise ValueError(
                    "sampling.mode: adaptive keeps a per-prompt budget; "
                    "it does not combine with game.scope: traffic"
                )
        return self

    @property
    def digest(self) -> str:
        """sha256 (12 hex) of the canonical policy content: changes whenever any rule does."""
        blob = self.model_dump_json().encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def ref(self) -> str:
        """``id@version#digest``: what audit records store."""
        return f"{self.id}@{self.version}#{self.digest}"

    @property
    def budgets(self) -> dict[str, float]:
        """Budget per risk row: the main harm probe first, then each category."""
        return {"harm": self.game.budget, **{c.name: c.budget for c in self.categories}}

    def with_budget(self, budget: float) -> Policy:
        """A copy with the main budget replaced (validated)."""
        return self.with_game(budget=budget)

    def with_game(self, **fields: Any) -> Policy:
        """A copy with these ``game`` fields replaced together (validated as a whole)."""
        data = self.model_dump()
        data["game"].update(fields)
        return policy_from_dict(data, source="<override>")


def _format_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ""
        for p in err["loc"]:
            loc += f"[{p}]" if isinstance(p, int) else (f".{p}" if loc else str(p))
        parts.append(f"{loc or '<root>'}: {err['msg']}")
    return f"Invalid policy {source}: " + "; ".join(parts)


def policy_from_dict(data: Any, source: str = "<dict>") -> Policy:
    if not isinstance(data, dict):
        raise ConfigError(f"Invalid policy {source}: expected a mapping at the top level")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def load_policy(ref: str | Path | None = None) -> Policy:
    """Load a policy: None -> the shipped default; a name -> a shipped policy; else a path.

    A path may point at a ``policy.yml`` file or at the folder holding it.
    """
    if ref is None:
        ref = DEFAULT_POLICY_ID
    path = Path(ref)
    if not path.exists() and isinstance(ref, str) and "/" not in ref and not ref.endswith(".yml"):
        shipped = resources.files("safetygame") / "policies" / ref / "policy.yml"
        if not shipped.is_file():
            raise ConfigError(f"Unknown policy {ref!r}: no such file or shipped policy")
        text = shipped.read_text(encoding="utf-8")
        source = f"'{ref}' (shipped)"
    else:
        if path.is_dir():
            path = path / "policy.yml"
        if not path.is_file():
            raise ConfigError(f"Policy file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"Invalid policy {path}: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"Policy file {path}: cannot read ({exc.strerror})") from None
        source = str(path)
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Invalid policy {source}: not valid YAML ({exc})") from None
    return policy_from_dict(data, source)


def policy_yaml(policy: Policy) -> str:
    """The effective policy as YAML (for ``safetygame policy show``)."""
    return yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
