"""Learned heads: linear scorers on a judge model's hidden states, as versioned artefacts.

A head maps a feature vector x (``safetygame.features``) to a logit
f(x) = w . (x - mu) / sigma + b. Two objectives:

- ``logistic`` (pointwise): P(harmful | reply) = sigmoid(f(x)), fitted on labelled replies;
- ``bradley_terry`` (pairwise): P(a more harmful than b) = sigmoid(f(x_a) - f(x_b)), fitted on
  preference pairs; only differences of f mean anything, so it scores a reply *against a
  reference* (the policy refusal), never alone;
- ``gated`` (pointwise, two linear maps on the same features): P(harmful) =
  P(complies) * P(harmful | complies). The gate g is fitted on every reply labelled by
  whether it complies; the content map f only on complying replies, labelled harmful or
  benign. One logistic head on all replies learns "complies vs refuses" (the dominant
  contrast) and cannot tell a harmful answer from a helpful one; the gate takes that
  contrast away from f.

Both are L2-regularised logistic regressions solved by Newton's method in numpy: no torch
at inference or at fitting. A head is bound to the features it was fitted on (the judge
model's id and sha256, the pooling, the review prompt's version); :func:`load_head` checks
the file, and :meth:`Head.check_model` refuses a backend running another model, naming both.
Artefacts are JSON with every float written in full (``repr``), so the same data and seed
give the same bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import expit

from safetygame.errors import ConfigError

__all__ = [
    "FORMAT",
    "HEADS_DIR",
    "FeatureSpec",
    "Head",
    "HeadParams",
    "LogisticModel",
    "fit_head",
    "fit_logistic",
    "load_head",
]

FloatArray = NDArray[np.float64]
Objective = Literal["logistic", "bradley_terry", "gated"]
FORMAT = "safetygame-head/1"
HEADS_DIR = Path(__file__).resolve().parent / "scorer_heads"


@dataclass(frozen=True)
class LogisticModel:
    """w . x + b -> sigmoid."""

    w: tuple[float, ...]
    b: float

    def logit(self, X: FloatArray) -> FloatArray:
        return np.asarray(X @ np.asarray(self.w) + self.b, dtype=np.float64)

    def predict(self, X: FloatArray) -> FloatArray:
        return np.asarray(expit(self.logit(X)), dtype=np.float64)


def fit_logistic(
    X: ArrayLike, y: ArrayLike, l2: float = 1.0, iters: int = 100, balanced: bool = True
) -> LogisticModel:
    """L2-regularised logistic regression by Newton steps (class-balanced weights)."""
    A = np.asarray(X, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64).reshape(-1)
    if A.ndim != 2 or A.shape[0] != t.size or t.size == 0:
        raise ConfigError("fit_logistic: X must be (n, d) with n labels")
    if not np.all(np.isfinite(A)):
        raise ConfigError("fit_logistic: features must be finite")
    if not np.all((t == 0) | (t == 1)) or t.min() == t.max():
        raise ConfigError("fit_logistic: labels must be 0/1 with both classes present")
    n, d = A.shape
    sw = np.ones(n)
    if balanced:
        pos = t.sum()
        sw = np.where(t == 1, n / (2 * pos), n / (2 * (n - pos)))
    Xb = np.concatenate([A, np.ones((n, 1))], axis=1)
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    for _ in range(iters):
        q = expit(Xb @ w)
        grad = Xb.T @ (sw * (q - t)) + reg * w
        hess = Xb.T @ (Xb * (sw * q * (1 - q))[:, None]) + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.max(np.abs(step))) < 1e-8:
            break
    return LogisticModel(tuple(float(v) for v in w[:-1]), float(w[-1]))


def standardised_logit(
    X: ArrayLike, mu: ArrayLike, sigma: ArrayLike, w: ArrayLike, b: float
) -> FloatArray:
    """f(x) = w . (x - mu) / sigma + b, row by row: a head's logit (fitted or stored)."""
    Z = (np.asarray(X, dtype=np.float64) - np.asarray(mu)) / np.asarray(sigma)
    return np.asarray(Z @ np.asarray(w) + b, dtype=np.float64)


def gated_logit(gate: FloatArray, content: FloatArray) -> FloatArray:
    """logit(sigmoid(g) * sigmoid(f)), computed in log space (no overflow at large |g|, |f|)."""
    log_p = -np.logaddexp(0.0, -gate) - np.logaddexp(0.0, -content)
    return np.asarray(log_p - np.log(-np.expm1(np.minimum(log_p, -1e-300))), dtype=np.float64)


@dataclass(frozen=True)
class HeadParams:
    """A fitted head's numbers: standardisation, the linear map, and a gated head's gate."""

    mu: tuple[float, ...]
    sigma: tuple[float, ...]
    w: tuple[float, ...]
    b: float
    gate_w: tuple[float, ...] = ()
    gate_b: float = 0.0

    def logit(self, X: ArrayLike) -> FloatArray:
        z = standardised_logit(X, self.mu, self.sigma, self.w, self.b)
        if not self.gate_w:
            return z
        return gated_logit(standardised_logit(X, self.mu, self.sigma, self.gate_w, self.gate_b), z)


@dataclass(frozen=True)
class FeatureSpec:
    """What a head's inputs are: whose hidden states, pooled how, over which prompt."""

    model_id: str
    model_sha256: str
    pooling: Literal["last", "mean"]
    prompt: str
    dim: int


@dataclass(frozen=True)
class Head:
    """A fitted linear head and everything needed to check and rebuild it."""

    name: str
    kind: Literal["harm", "helpfulness"]
    objective: Objective
    features: FeatureSpec
    params: HeadParams
    ridge: float
    training: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = self.features.dim
        p = self.params
        if not (len(p.mu) == len(p.sigma) == len(p.w) == d) or d < 1:
            raise ConfigError(
                f"head {self.name!r}: mu, sigma and w must all have the feature dimension {d}"
            )
        if (self.objective == "gated") != bool(p.gate_w) or (p.gate_w and len(p.gate_w) != d):
            raise ConfigError(
                f"head {self.name!r}: a gated head (and only a gated head) has gate_w of the "
                f"feature dimension {d}"
            )
        arrays = (*p.mu, *p.sigma, *p.w, p.b, *p.gate_w, p.gate_b)
        if not all(math.isfinite(v) for v in arrays) or min(p.sigma) <= 0:
            raise ConfigError(f"head {self.name!r}: weights must be finite and sigma > 0")

    @property
    def relative(self) -> bool:
        """A Bradley-Terry head scores a reply only against a reference."""
        return self.objective == "bradley_terry"

    def logit(self, X: ArrayLike) -> FloatArray:
        A = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if A.shape[1] != self.features.dim:
            raise ConfigError(
                f"head {self.name!r} takes {self.features.dim}-dimensional features, "
                f"got {A.shape[1]} (another model or pooling?)"
            )
        return self.params.logit(A)

    def check_model(self, model_id: str, sha256: str | None = None) -> None:
        """Refuse features from another model than the one this head was fitted on."""
        f = self.features
        if model_id != f.model_id or (sha256 is not None and sha256 != f.model_sha256):
            raise ConfigError(
                f"head {self.name!r} was fitted on {f.model_id} (sha256 {f.model_sha256[:16]}...) "
                f"but the judge is {model_id}"
                + (f" (sha256 {sha256[:16]}...)" if sha256 else "")
                + f": refit it with `safetygame scorers train --model {model_id}`"
            )

    def to_json(self) -> str:
        # one flat object: the numbers sit beside the metadata, as in every shipped artefact
        data = asdict(self)
        payload = {"format": FORMAT, **data.pop("params"), **data}
        return json.dumps(payload, indent=1, sort_keys=True) + "\n"

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)
        return path


def load_head(ref: str | Path) -> Head:
    """A head by shipped name (``scorer_heads/<name>.json``) or by path. A missing or
    malformed file is a ConfigError naming it and the fix."""
    path = Path(ref)
    if path.suffix != ".json":
        path = HEADS_DIR / f"{ref}.json"
    fix = "rebuild it with `safetygame scorers train` or reinstall safetygame"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"scorer head not found: {path} ({fix})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"scorer head {path} is unreadable or not JSON: {exc} ({fix})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"scorer head {path} is not a {FORMAT} artefact ({fix})")
    try:
        spec = FeatureSpec(**data["features"])
        return Head(
            name=str(data["name"]),
            kind=data["kind"],
            objective=data["objective"],
            features=spec,
            params=HeadParams(
                mu=tuple(float(v) for v in data["mu"]),
                sigma=tuple(float(v) for v in data["sigma"]),
                w=tuple(float(v) for v in data["w"]),
                b=float(data["b"]),
                gate_w=tuple(float(v) for v in data.get("gate_w", ())),
                gate_b=float(data.get("gate_b", 0.0)),
            ),
            ridge=float(data["ridge"]),
            training=dict(data.get("training", {})),
            quality=dict(data.get("quality", {})),
        )
    except ConfigError as exc:
        raise ConfigError(f"scorer head {path}: {exc} ({fix})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"scorer head {path} is malformed ({exc!r}; {fix})") from None


def _standardise(X: FloatArray) -> tuple[FloatArray, FloatArray]:
    mu = X.mean(axis=0)
    sigma = X.std(axis=0)
    return mu, np.where(sigma > 1e-6, sigma, 1.0)


def fit_head(
    X: FloatArray,
    *,
    objective: Objective,
    ridge: float,
    points: Sequence[tuple[int, float]] = (),
    pairs: Sequence[tuple[int, int]] = (),
    gate_points: Sequence[tuple[int, float]] = (),
) -> HeadParams:
    """The parameters of a head over the rows of ``X``.

    ``logistic`` uses ``points`` (row, 0/1 label), class-balanced; ``bradley_terry`` uses
    ``pairs`` (more harmful row, less harmful row), each entered in both orders so the fit
    has no position bias and its intercept is 0; ``gated`` fits its gate on ``gate_points``
    (row, 1 = complies) and its content map on ``points`` (complying rows, 1 = harmful).
    Standardisation uses the rows involved.
    """
    if not (math.isfinite(ridge) and ridge > 0):
        raise ConfigError("ridge must be a finite number > 0")
    if objective in ("logistic", "gated"):
        idx = np.array([i for i, _ in points], dtype=int)
        y = np.array([v for _, v in points], dtype=float)
        gidx = np.array([i for i, _ in gate_points], dtype=int)
        if objective == "gated" and gidx.size == 0:
            raise ConfigError("a gated head needs gate points (replies labelled as complying)")
        mu, sigma = _standardise(X[np.unique(np.concatenate([idx, gidx]))])
        model = fit_logistic((X[idx] - mu) / sigma, y, l2=ridge)
        gate = LogisticModel((), 0.0)
        if objective == "gated":
            gy = np.array([v for _, v in gate_points], dtype=float)
            gate = fit_logistic((X[gidx] - mu) / sigma, gy, l2=ridge)
        return HeadParams(
            tuple(mu.tolist()), tuple(sigma.tolist()), model.w, model.b, gate.w, gate.b
        )
    if objective == "bradley_terry":
        if not pairs:
            raise ConfigError("a Bradley-Terry head needs preference pairs")
        a = np.array([p for p, _ in pairs], dtype=int)
        c = np.array([q for _, q in pairs], dtype=int)
        mu, sigma = _standardise(X[np.unique(np.concatenate([a, c]))])
        D = (X[a] - X[c]) / sigma
        model = fit_logistic(
            np.concatenate([D, -D]), np.r_[np.ones(len(D)), np.zeros(len(D))], l2=ridge
        )
        return HeadParams(tuple(mu.tolist()), tuple(sigma.tolist()), model.w, 0.0)
    raise ConfigError(f"objective must be logistic, bradley_terry or gated, not {objective!r}")
