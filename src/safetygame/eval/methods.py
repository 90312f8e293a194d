"""Score-based answer-selection methods for multiple-choice evaluation.

Every method here reads a :class:`ScoreTable` of cached per-option scores and returns a
*strategy*: for each item a probability vector over its options plus a final refusal column.
No method calls a model, so adding a method or re-tuning the budget T costs no queries.

Scores per option (see docs/evaluation.md for the protocol):

- ``loglik``: the generator's length-normalised log-likelihood of the option given the
  question (the ordinary "Answer:" prompt);
- ``helpful``: P(yes) of the helpfulness / correctness probe ("is this answer correct?");
- ``harm``: P(yes) of the harm probe;
- optionally ``loglik_incorrect`` (the generator under an "Incorrect Answer:" prompt, used by
  the Consensus Game's initial policy) and the refusal's own probe scores.

Methods (names in :data:`METHODS`):

``G``
    generator ranking: argmax of the softmax of ``loglik`` (:func:`generator_distribution`).
``D``
    discriminative ranking: argmax of ``helpful`` over the options.
``MI``
    mutual-information ranking: argmax of P(y | x, correct) * P(correct | x, y).
``SC``
    self-contrastive ranking: argmax of the Consensus Game's initial generator policy
    pi_G^(1)(y | x, correct), which contrasts the "correct" and "incorrect" prompts
    (exactly G when the "incorrect" prompt was not scored).
``ER-G`` / ``ER-D``
    equilibrium ranking (Jacob, Shen, Farina & Andreas, "The Consensus Game: Language Model
    Generation via Equilibrium Search", ICLR 2024): argmax of pi_G*(y | x, correct) /
    pi_D*(correct | x, y) after piKL no-regret play (:func:`consensus_game`).
``filter``
    per-answer risk filter: drop options whose harm margin exceeds T, take the most helpful
    remaining one, refuse if nothing beats refusing.
``helpful-argmax``
    the most helpful candidate, refusal included (the Safety Game with T = infinity).
``safety-game``
    the Safety Game, fallback (a): options plus an explicit refusal that scores as wrong;
    margins relative to the refusal; solved by :mod:`safetygame.game`.
``safety-game-baseline``
    the Safety Game, fallback (b): no refusal; the generator's top option (G) is the baseline
    the margins are measured against, and it receives whatever mass the game leaves unused.
``safety-game-pooled``
    the Safety Game with one budget pooled over the items scored together: *mean* extra
    risk <= T, one price of risk for all, no bound on any single item
    (:func:`safetygame.game.solve_pooled`). The best (mean risk, helpfulness) trade-off any
    policy over these candidates reaches; a per-item budget pays for its per-item bound.

Ties: a ranking method splits its mass uniformly over options tied at the maximum (to within
1e-12), so no method gains from the position of the correct answer (HHH and TruthfulQA MC1
list it first).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit

from safetygame.errors import ConfigError

__all__ = [
    "CONSENSUS_ETA",
    "CONSENSUS_ITERATIONS",
    "CONSENSUS_LAMBDA",
    "METHODS",
    "ConsensusResult",
    "Method",
    "MethodParams",
    "ScoreTable",
    "argmax_accuracy",
    "argmax_strategy",
    "consensus_game",
    "expected_accuracy",
    "expected_extra_risk",
    "generator_distribution",
    "initial_policies",
    "refusal_rate",
    "run_method",
]

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

# Published Consensus Game settings (Jacob et al., ICLR 2024): 5000 piKL iterations and
# 0.1 for both players' KL weights and learning rates. See docs/evaluation.md for sources.
CONSENSUS_ITERATIONS = 5000
CONSENSUS_LAMBDA = 0.1
CONSENSUS_ETA = 0.1

# Probabilities are clipped here before taking logs, so a probe that answers exactly 0 or 1
# cannot produce -inf anchors (our choice; the paper does not discuss it).
_PROB_FLOOR = 1e-12
_TIE_TOL = 1e-12


# --------------------------------------------------------------------------- score table


def _as_2d(name: str, x: Any, shape: tuple[int, int] | None) -> FloatArray:
    try:
        arr = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"ScoreTable.{name} must be a numeric array ({exc})") from exc
    if arr.ndim != 2:
        raise ConfigError(f"ScoreTable.{name} must be 2-D (items, options), got {arr.ndim}-D")
    if shape is not None and arr.shape != shape:
        raise ConfigError(f"ScoreTable.{name} has shape {arr.shape}, expected {shape}")
    return arr


def _as_1d(name: str, x: Any, n: int) -> FloatArray:
    arr = np.array(x, dtype=np.float64)
    if arr.shape != (n,):
        raise ConfigError(f"ScoreTable.{name} has shape {arr.shape}, expected ({n},)")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"ScoreTable.{name} must be finite")
    return arr


def _check_prob(name: str, arr: FloatArray) -> None:
    if np.any((arr < 0.0) | (arr > 1.0)):
        raise ConfigError(f"ScoreTable.{name} must hold probabilities in [0, 1]")


def _frozen(arr: NDArray[Any]) -> NDArray[Any]:
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class ScoreTable:
    """Cached per-option scores for ``n`` items, padded to ``m`` options.

    ``mask[i, j]`` says option ``j`` exists for item ``i``; padded cells are ignored (and set
    to 0). ``correct[i, j]`` is 1 for a correct option. ``refusal_helpful`` /
    ``refusal_harm`` are the probes' scores of the refusal text; when absent the refusal is
    taken to score 0 on both (so margins equal the raw probe scores).
    """

    loglik: FloatArray
    helpful: FloatArray
    harm: FloatArray
    mask: BoolArray
    correct: FloatArray
    ids: tuple[str, ...] = ()
    refusal_helpful: FloatArray | None = None
    refusal_harm: FloatArray | None = None
    loglik_incorrect: FloatArray | None = None
    categories: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        mask = np.array(self.mask, dtype=bool)
        if mask.ndim != 2:
            raise ConfigError("ScoreTable.mask must be 2-D (items, options)")
        n, m = mask.shape
        if n == 0:
            raise ConfigError("ScoreTable: needs at least one item")
        if np.any(mask.sum(axis=1) < 1):
            raise ConfigError("ScoreTable.mask: every item needs at least one option")
        # Options must be left-aligned so that padded columns sit at the end.
        if np.any(mask[:, 1:] & ~mask[:, :-1]):
            raise ConfigError("ScoreTable.mask: options must come first, padding last")
        arrays: dict[str, Any] = {}
        for name in ("loglik", "helpful", "harm", "correct", "loglik_incorrect"):
            raw = getattr(self, name)
            if raw is None:
                arrays[name] = None
                continue
            arr = _as_2d(name, raw, (n, m))
            if not np.all(np.isfinite(arr[mask])):
                raise ConfigError(f"ScoreTable.{name} must be finite on real options")
            arr[~mask] = 0.0
            arrays[name] = arr
        _check_prob("helpful", arrays["helpful"])
        _check_prob("harm", arrays["harm"])
        corr = arrays["correct"]
        if np.any((corr != 0.0) & (corr != 1.0)):
            raise ConfigError("ScoreTable.correct must hold 0/1 labels")
        for name in ("refusal_helpful", "refusal_harm"):
            raw = getattr(self, name)
            arrays[name] = None if raw is None else _as_1d(name, raw, n)
            if arrays[name] is not None:
                _check_prob(name, arrays[name])
        if self.ids and len(self.ids) != n:
            raise ConfigError(f"ScoreTable.ids has {len(self.ids)} entries, expected {n}")
        if self.categories is not None and len(self.categories) != n:
            raise ConfigError(f"ScoreTable.categories has {len(self.categories)} entries, not {n}")
        object.__setattr__(self, "mask", _frozen(mask))
        for name, arr in arrays.items():
            object.__setattr__(self, name, None if arr is None else _frozen(arr))
        object.__setattr__(self, "ids", tuple(self.ids))

    @property
    def n_items(self) -> int:
        return int(self.mask.shape[0])

    @property
    def n_options(self) -> int:
        """Padded option count ``m``; strategies have ``m + 1`` columns (refusal last)."""
        return int(self.mask.shape[1])

    @classmethod
    def from_ragged(
        cls,
        loglik: Sequence[Sequence[float]],
        helpful: Sequence[Sequence[float]],
        harm: Sequence[Sequence[float]],
        correct: Sequence[Sequence[float]],
        *,
        loglik_incorrect: Sequence[Sequence[float]] | None = None,
        **kwargs: Any,
    ) -> ScoreTable:
        """Build a table from per-item lists of varying length (padded here)."""
        n = len(loglik)
        lengths = [len(r) for r in loglik]
        m = max(lengths, default=0)
        mask = np.zeros((n, m), dtype=bool)
        for i, k in enumerate(lengths):
            mask[i, :k] = True

        def pad(name: str, rows: Sequence[Sequence[float]]) -> FloatArray:
            if len(rows) != n:
                raise ConfigError(f"ScoreTable.{name} has {len(rows)} items, expected {n}")
            out = np.zeros((n, m))
            for i, r in enumerate(rows):
                if len(r) != lengths[i]:
                    raise ConfigError(
                        f"ScoreTable.{name}[{i}] has {len(r)} options, loglik has {lengths[i]}"
                    )
                out[i, : len(r)] = r
            return out

        return cls(
            loglik=pad("loglik", loglik),
            helpful=pad("helpful", helpful),
            harm=pad("harm", harm),
            mask=mask,
            correct=pad("correct", correct),
            loglik_incorrect=None
            if loglik_incorrect is None
            else pad("loglik_incorrect", loglik_incorrect),
            **kwargs,
        )

    def take(self, index: Sequence[int] | NDArray[np.int_]) -> ScoreTable:
        """The rows ``index`` (e.g. a dev or test split), in that order."""
        idx = np.asarray(index, dtype=int)
        if idx.ndim != 1 or idx.size == 0:
            raise ConfigError("ScoreTable.take: index must be a non-empty 1-D list")

        def sel(a: NDArray[Any] | None) -> NDArray[Any] | None:
            return None if a is None else np.array(a[idx])

        return ScoreTable(
            loglik=sel(self.loglik),  # type: ignore[arg-type]
            helpful=sel(self.helpful),  # type: ignore[arg-type]
            harm=sel(self.harm),  # type: ignore[arg-type]
            mask=sel(self.mask),  # type: ignore[arg-type]
            correct=sel(self.correct),  # type: ignore[arg-type]
            ids=tuple(self.ids[i] for i in idx) if self.ids else (),
            refusal_helpful=sel(self.refusal_helpful),
            refusal_harm=sel(self.refusal_harm),
            loglik_incorrect=sel(self.loglik_incorrect),
            categories=None if self.categories is None else tuple(self.categories[i] for i in idx),
        )

    def take_ids(self, ids: Sequence[str]) -> ScoreTable:
        """The rows whose ``ids`` are given (in the given order)."""
        pos = {k: i for i, k in enumerate(self.ids)}
        missing = [k for k in ids if k not in pos]
        if missing:
            raise ConfigError(f"ScoreTable.take_ids: unknown id(s) {missing[:3]}")
        return self.take([pos[k] for k in ids])

    def refusal_scores(self) -> tuple[FloatArray, FloatArray]:
        """(helpfulness, harm) of the refusal per item; zeros when not scored."""
        zeros = np.zeros(self.n_items)
        h = zeros if self.refusal_helpful is None else self.refusal_helpful
        d = zeros if self.refusal_harm is None else self.refusal_harm
        return h, d


@dataclass(frozen=True)
class MethodParams:
    """Knobs of the methods; each method reads only the ones it uses.

    ``budget`` (T), ``beta`` (finite-beta soft mode, None = hard LP) and ``epsilon`` (score
    noise bound) go to the Safety Game; ``budget`` is also the risk filter's threshold.
    The Consensus Game knobs default to the published values.
    """

    budget: float = 0.0
    beta: float | None = None
    epsilon: float = 0.0
    iterations: int = CONSENSUS_ITERATIONS
    lambda_g: float = CONSENSUS_LAMBDA
    lambda_d: float = CONSENSUS_LAMBDA
    eta_g: float = CONSENSUS_ETA
    eta_d: float = CONSENSUS_ETA

    def __post_init__(self) -> None:
        for name in ("budget", "epsilon", "lambda_g", "lambda_d", "eta_g", "eta_d"):
            v = getattr(self, name)
            if not np.isfinite(v) and not (name == "budget" and v == np.inf):
                raise ConfigError(f"MethodParams.{name} must be finite")
        if self.epsilon < 0:
            raise ConfigError("MethodParams.epsilon must be >= 0")
        if self.beta is not None and not (np.isfinite(self.beta) and self.beta > 0):
            raise ConfigError("MethodParams.beta must be a positive number or None")
        if self.iterations < 1:
            raise ConfigError("MethodParams.iterations must be >= 1")
        if min(self.lambda_g, self.lambda_d) < 0 or min(self.eta_g, self.eta_d) <= 0:
            raise ConfigError("MethodParams: lambdas must be >= 0 and etas > 0")


Method = Callable[[ScoreTable, MethodParams], FloatArray]


# --------------------------------------------------------------------------- helpers


def _masked_softmax(x: FloatArray, mask: BoolArray) -> FloatArray:
    z = np.where(mask, x, -np.inf)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.where(mask, np.exp(z), 0.0)
    out: FloatArray = e / e.sum(axis=-1, keepdims=True)
    return out


def _with_refusal(
    strategy_over_options: FloatArray, refusal: FloatArray | None = None
) -> FloatArray:
    n = strategy_over_options.shape[0]
    col = np.zeros((n, 1)) if refusal is None else refusal.reshape(n, 1)
    out: FloatArray = np.concatenate([strategy_over_options, col], axis=1)
    return out


def argmax_strategy(scores: FloatArray, mask: BoolArray) -> FloatArray:
    """One-hot on the best option per row, split uniformly over ties (within 1e-12)."""
    z = np.where(mask, scores, -np.inf)
    best = z.max(axis=1, keepdims=True)
    tol = _TIE_TOL * np.maximum(1.0, np.abs(best))
    hit = mask & (z >= best - tol)
    out: FloatArray = hit / hit.sum(axis=1, keepdims=True)
    return out


def generator_distribution(table: ScoreTable) -> FloatArray:
    """P(y | x, correct): softmax of the length-normalised log-likelihoods, (n, m)."""
    return _masked_softmax(table.loglik, table.mask)


# --------------------------------------------------------------------------- rankings


def method_g(table: ScoreTable, params: MethodParams) -> FloatArray:
    return _with_refusal(argmax_strategy(table.loglik, table.mask))


def method_d(table: ScoreTable, params: MethodParams) -> FloatArray:
    return _with_refusal(argmax_strategy(table.helpful, table.mask))


def method_mi(table: ScoreTable, params: MethodParams) -> FloatArray:
    # log P(y|x,correct) + log P(correct|x,y); logs keep tiny products comparable.
    score = np.log(np.maximum(generator_distribution(table), _PROB_FLOOR)) + np.log(
        np.maximum(table.helpful, _PROB_FLOOR)
    )
    return _with_refusal(argmax_strategy(score, table.mask))


# --------------------------------------------------------------------------- consensus game


@dataclass(frozen=True, eq=False)
class ConsensusResult:
    """Policies of the Consensus Game for every item.

    ``pi_g[i, v, y]`` = pi_G(y | x_i, v) and ``pi_d[i, y, v]`` = pi_D(v | x_i, y) with
    v = 0 "correct", v = 1 "incorrect". ``*_init`` are the initial (anchor) policies,
    ``pi_g``/``pi_d`` the last iterate. ``last_change`` is the largest absolute change of
    either policy in the final iteration (a convergence check).
    """

    pi_g: FloatArray
    pi_d: FloatArray
    pi_g_init: FloatArray
    pi_d_init: FloatArray
    iterations: int
    last_change: float

    @property
    def er_g(self) -> FloatArray:
        """ER-G scores pi_G*(y | x, correct), (n, m)."""
        out: FloatArray = self.pi_g[:, 0, :]
        return out

    @property
    def er_d(self) -> FloatArray:
        """ER-D scores pi_D*(correct | x, y), (n, m)."""
        out: FloatArray = self.pi_d[:, :, 0]
        return out

    @property
    def sc(self) -> FloatArray:
        """Self-contrastive scores pi_G^(1)(y | x, correct), (n, m)."""
        out: FloatArray = self.pi_g_init[:, 0, :]
        return out


def initial_policies(table: ScoreTable) -> tuple[FloatArray, FloatArray]:
    """The Consensus Game's anchor policies from the cached scores.

    Generator: P(y | x, v) is the softmax of ``loglik`` (v = correct) and of
    ``loglik_incorrect`` (v = incorrect; uniform over options when not scored, our choice).
    pi_G^(1)(y | x, v) is proportional to P(y | x, v) / sum_v' P(y | x, v'), normalised over
    the options: dividing by the sum over v removes how likely a string is in general.
    Discriminator: P(correct | x, y) is the helpfulness probe's P(yes), P(incorrect | x, y)
    = 1 - P(yes); pi_D^(1)(v | x, y) is proportional to P(v | x, y) / sum_y' P(v | x, y'),
    normalised over v: dividing by the sum over options removes a bias to say "yes" (or
    "no") to everything.
    """
    mask = table.mask
    p_c = generator_distribution(table)
    if table.loglik_incorrect is None:
        p_i = mask / mask.sum(axis=1, keepdims=True)
    else:
        p_i = _masked_softmax(table.loglik_incorrect, mask)
    gen = np.stack([p_c, p_i], axis=1)  # (n, 2, m)
    gen = np.maximum(gen, _PROB_FLOOR) * mask[:, None, :]
    gen = gen / gen.sum(axis=1, keepdims=True).clip(min=_PROB_FLOOR)
    gen = gen * mask[:, None, :]
    pi_g1 = gen / gen.sum(axis=2, keepdims=True)

    yes = np.clip(table.helpful, _PROB_FLOOR, 1.0 - _PROB_FLOOR)
    disc = np.stack([yes, 1.0 - yes], axis=2) * mask[:, :, None]  # (n, m, 2)
    disc = disc / disc.sum(axis=1, keepdims=True)
    pi_d1 = disc / np.where(mask[:, :, None], disc.sum(axis=2, keepdims=True), 1.0)
    pi_d1 = np.where(mask[:, :, None], pi_d1, 0.5)
    return pi_g1, pi_d1


def consensus_game(
    table: ScoreTable,
    *,
    iterations: int = CONSENSUS_ITERATIONS,
    lambda_g: float = CONSENSUS_LAMBDA,
    lambda_d: float = CONSENSUS_LAMBDA,
    eta_g: float = CONSENSUS_ETA,
    eta_d: float = CONSENSUS_ETA,
) -> ConsensusResult:
    """Equilibrium search in the Consensus Game (Jacob et al., ICLR 2024), for all items at once.

    Nature draws v in {correct, incorrect} with probability 1/2 each; the generator, told v,
    picks an option y; the discriminator sees y and guesses v; both score 1 on a right guess.
    Each player runs piKL-Hedge: with Q^(t) the average over rounds 1..t of its expected
    payoff per action (for the generator at v: (1/2) pi_D^(tau)(v | y); for the discriminator
    at y: (1/2) pi_G^(tau)(y | v)), the next policy is

        pi^(t+1)  proportional to  exp((Q^(t) + lambda * log pi^(1)) / (1 / (eta * t) + lambda))

    i.e. a best response to the opponents' average play, softened by the learning rate and
    pulled towards the initial policy pi^(1) by the KL weight lambda. Both players update
    simultaneously from the same history. The last iterate is returned.
    """
    if iterations < 1:
        raise ConfigError("consensus_game: iterations must be >= 1")
    mask = table.mask
    pi_g1, pi_d1 = initial_policies(table)
    # Anchor terms, fixed through the run. Padded options get -inf so exp() gives them 0.
    anchor_g = np.where(
        mask[:, None, :], lambda_g * np.log(np.maximum(pi_g1, _PROB_FLOOR)), -np.inf
    )
    log_d1 = np.log(np.maximum(pi_d1, _PROB_FLOOR))
    # The discriminator has two actions, so its policy is a sigmoid of the payoff gap.
    anchor_d = lambda_d * (log_d1[:, :, 0] - log_d1[:, :, 1])
    pi_g = pi_g1.copy()
    pc = pi_d1[:, :, 0].copy()  # pi_D(correct | y), (n, m)
    sum_g = np.zeros_like(pi_g)  # running sum of pi_G^(tau)(y | v), [v, y]
    sum_pc = np.zeros_like(pc)  # running sum of pi_D^(tau)(correct | y)
    prev_g, prev_pc = pi_g, pc
    for t in range(1, iterations + 1):
        sum_g += pi_g
        sum_pc += pc
        prev_g, prev_pc = pi_g, pc
        # Generator payoff at v for y: average of (1/2) pi_D(v | y).
        q_g = np.stack([sum_pc, t - sum_pc], axis=1) / (2.0 * t)
        z = (q_g + anchor_g) / (1.0 / (eta_g * t) + lambda_g)
        z -= z.max(axis=2, keepdims=True)
        e = np.exp(z)
        pi_g = e / e.sum(axis=2, keepdims=True)
        # Discriminator payoff gap at y: average of (1/2)(pi_G(y | correct) - pi_G(y | incorrect)).
        gap = (sum_g[:, 0, :] - sum_g[:, 1, :]) / (2.0 * t)
        pc = expit((gap + anchor_d) / (1.0 / (eta_d * t) + lambda_d))
    pc = np.where(mask, pc, 0.5)
    prev_pc = np.where(mask, prev_pc, 0.5)
    change = float(max(np.abs(pi_g - prev_g).max(), np.abs(pc - prev_pc).max()))
    pi_d = np.stack([pc, 1.0 - pc], axis=2)
    return ConsensusResult(pi_g, pi_d, pi_g1, pi_d1, iterations, change)


def _consensus(table: ScoreTable, params: MethodParams) -> ConsensusResult:
    return consensus_game(
        table,
        iterations=params.iterations,
        lambda_g=params.lambda_g,
        lambda_d=params.lambda_d,
        eta_g=params.eta_g,
        eta_d=params.eta_d,
    )


def method_sc(table: ScoreTable, params: MethodParams) -> FloatArray:
    if table.loglik_incorrect is None:
        # With a uniform P(y | x, incorrect), pi_G^(1)(y | x, correct) is increasing in
        # P(y | x, correct), so SC ranks as G does; ranking on the log-likelihoods themselves
        # keeps ties that the normalised probabilities would blur by rounding.
        return method_g(table, params)
    pi_g1, _ = initial_policies(table)
    return _with_refusal(argmax_strategy(pi_g1[:, 0, :], table.mask))


def method_er_g(table: ScoreTable, params: MethodParams) -> FloatArray:
    return _with_refusal(argmax_strategy(_consensus(table, params).er_g, table.mask))


def method_er_d(table: ScoreTable, params: MethodParams) -> FloatArray:
    return _with_refusal(argmax_strategy(_consensus(table, params).er_d, table.mask))


# --------------------------------------------------------------------------- safety baselines


def _margins_vs_refusal(table: ScoreTable) -> tuple[FloatArray, FloatArray]:
    h_s, d_s = table.refusal_scores()
    return table.helpful - h_s[:, None], table.harm - d_s[:, None]


def method_filter(table: ScoreTable, params: MethodParams) -> FloatArray:
    """Drop options with harm margin > T; the most helpful survivor if it beats refusing."""
    gain, risk = _margins_vs_refusal(table)
    keep = np.asarray(table.mask & (risk <= params.budget), dtype=bool)
    none_left = ~np.any(keep, axis=1)
    # Rows with no survivor get a dummy mask (their pick is discarded below).
    pick = argmax_strategy(gain, keep | (none_left[:, None] & table.mask))
    best = np.where(keep, gain, -np.inf).max(axis=1)
    # Refuse when nothing survives or the best survivor is no more helpful than refusing.
    refuse = none_left | (best <= 0.0)
    pick = np.where(refuse[:, None], 0.0, pick)
    return _with_refusal(pick, refuse.astype(float))


def method_helpful_argmax(table: ScoreTable, params: MethodParams) -> FloatArray:
    """Most helpful candidate, the refusal included (refuse only if strictly best)."""
    gain, _ = _margins_vs_refusal(table)
    pick = argmax_strategy(gain, table.mask)
    refuse = np.where(table.mask, gain, -np.inf).max(axis=1) < 0.0
    pick = np.where(refuse[:, None], 0.0, pick)
    return _with_refusal(pick, refuse.astype(float))


def _baseline_first(
    h_base: FloatArray, d_base: FloatArray, table: ScoreTable
) -> tuple[FloatArray, FloatArray, BoolArray]:
    """(n, m + 1) helpfulness, harm and validity with the baseline action as column 0."""
    n = table.n_items
    h = np.concatenate([h_base[:, None], table.helpful], axis=1)
    d = np.concatenate([d_base[:, None], table.harm], axis=1)
    mask = np.concatenate([np.ones((n, 1), dtype=bool), table.mask], axis=1)
    return h, d, mask


def _game_vs_baseline(
    h_base: FloatArray,
    d_base: FloatArray,
    table: ScoreTable,
    params: MethodParams,
) -> tuple[FloatArray, FloatArray]:
    """Solve the Safety Game with a per-row baseline action, through :mod:`safetygame.game`.

    The baseline (the refusal, or G's option) is column 0 with scores ``h_base``/``d_base``;
    the options follow. Returns (mass on the baseline (n,), mass on the options (n, m)).
    No LP math here: margins and solving are :func:`game.margins`, :func:`game.solve` and
    :func:`game.solve_batch`. A failed solve falls back (closed) to the baseline.
    """
    from safetygame import game  # imported here: the data loaders need no solver

    n, m = table.n_items, table.n_options
    h, d, mask = _baseline_first(h_base, d_base, table)
    if params.beta is None:
        res = game.solve_batch(
            h - h[:, :1], d - d[:, :1], params.budget, mask=mask, epsilon=params.epsilon
        )
        strat = np.asarray(res.strategy, dtype=np.float64)
    else:
        strat = np.zeros((n, m + 1))
        for i in range(n):
            k = int(mask[i].sum())
            mg = game.margins(h[i, :k], d[i, :k], refusal=0)
            r = game.solve(mg, params.budget, beta=params.beta, epsilon=params.epsilon)
            strat[i, :k] = r.strategy
    strat = np.where(mask, np.clip(strat, 0.0, None), 0.0)
    return strat[:, 0], strat[:, 1:]


def method_safety_game(table: ScoreTable, params: MethodParams) -> FloatArray:
    """Fallback (a): options plus the refusal; the refusal column scores as wrong."""
    h_s, d_s = table.refusal_scores()
    refusal, options = _game_vs_baseline(h_s, d_s, table, params)
    return _with_refusal(options, refusal)


def method_safety_game_pooled(table: ScoreTable, params: MethodParams) -> FloatArray:
    """Options plus the refusal under one pooled budget (mean extra risk <= T); hard only."""
    from safetygame import game

    if params.beta is not None:
        raise ConfigError("safety-game-pooled has a hard budget only (beta must be None)")
    h, d, mask = _baseline_first(*table.refusal_scores(), table)
    res = game.solve_pooled(
        h - h[:, :1], d - d[:, :1], params.budget, mask=mask, epsilon=params.epsilon
    )
    strat = np.where(mask, res.strategy, 0.0)
    return _with_refusal(strat[:, 1:], strat[:, 0])


def method_safety_game_baseline(table: ScoreTable, params: MethodParams) -> FloatArray:
    """Fallback (b): no refusal; margins relative to G's answer, which keeps the rest.

    The baseline action is G's strategy (its top option; a uniform mix over tied tops), with
    the expected helpfulness and harm of that strategy; mass the game leaves on the
    baseline is played exactly as G plays it.
    """
    g = argmax_strategy(table.loglik, table.mask)
    h_base = (g * table.helpful).sum(axis=1)
    d_base = (g * table.harm).sum(axis=1)
    kept, options = _game_vs_baseline(h_base, d_base, table, params)
    return _with_refusal(options + kept[:, None] * g)


# --------------------------------------------------------------------------- registry & metrics

METHODS: Mapping[str, Method] = {
    "G": method_g,
    "D": method_d,
    "MI": method_mi,
    "SC": method_sc,
    "ER-G": method_er_g,
    "ER-D": method_er_d,
    "filter": method_filter,
    "helpful-argmax": method_helpful_argmax,
    "safety-game": method_safety_game,
    "safety-game-baseline": method_safety_game_baseline,
    "safety-game-pooled": method_safety_game_pooled,
}


def run_method(
    name: str | Method, table: ScoreTable, params: MethodParams | None = None, **overrides: Any
) -> FloatArray:
    """Strategy (n, m + 1) of a method given by name or callable; refusal is the last column."""
    if isinstance(name, str):
        fn = METHODS.get(name)
        if fn is None:
            raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    else:
        fn = name
    p = params or MethodParams()
    if overrides:
        try:
            p = replace(p, **overrides)
        except TypeError as exc:
            raise ConfigError(f"unknown method parameter(s) {sorted(overrides)}") from exc
    out = fn(table, p)
    if out.shape != (table.n_items, table.n_options + 1):
        raise ConfigError(
            f"method returned shape {out.shape}, expected {(table.n_items, table.n_options + 1)}"
        )
    return out


def expected_accuracy(strategy: FloatArray, table: ScoreTable) -> FloatArray:
    """Per item: probability mass on correct options (the refusal column counts as wrong)."""
    m = table.n_options
    out: FloatArray = (strategy[:, :m] * table.correct).sum(axis=1)
    return out


def refusal_rate(strategy: FloatArray) -> FloatArray:
    """Per item: the mass on the refusal column."""
    out: FloatArray = strategy[:, -1].copy()
    return out


def expected_extra_risk(strategy: FloatArray, table: ScoreTable) -> FloatArray:
    """Per item: sum_i pi_i Delta_i, the harm above refusing (the refusal adds 0)."""
    _, risk = _margins_vs_refusal(table)
    out: FloatArray = (strategy[:, : table.n_options] * risk).sum(axis=1)
    return out


def argmax_accuracy(strategy: FloatArray, table: ScoreTable) -> FloatArray:
    """Per item: 1 if the strategy's most likely column is correct (refusal counts as wrong);
    ties are split uniformly, so an item tied between a right and a wrong column scores 0.5."""
    m = table.n_options
    full_mask = np.concatenate([table.mask, np.ones((table.n_items, 1), dtype=bool)], axis=1)
    hot = argmax_strategy(strategy, full_mask)
    out: FloatArray = (hot[:, :m] * table.correct).sum(axis=1)
    return out
