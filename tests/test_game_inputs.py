"""Input validation of safetygame.game: every bad input is a ValueError naming the field."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from safetygame.errors import ConfigError
from safetygame.game import Margins, choose, margins, solve, solve_batch, solve_pooled

H = [0.1, 0.5, 0.9]
D = [0.0, 0.1, 0.4]


@pytest.mark.parametrize(
    ("h", "d", "refusal", "match"),
    [
        ([0.1, math.nan, 0.9], D, 0, r"helpfulness\[1\] is NaN"),
        (H, [0.0, 0.1, math.nan], 0, r"harm\[2\] is NaN"),
        (H, [0.0, math.inf, 0.1], 0, r"harm\[1\] is inf"),
        ([0.1, 1.5, 0.9], D, 0, r"helpfulness\[1\] must be in \[0, 1\]"),
        (H, [0.0, -0.1, 0.4], 0, r"harm\[1\] must be in \[0, 1\]"),
        (H, [[0.0, 0.1, 0.2], [0.0, 0.2, 2.0]], 0, r"harm\[1, 2\] must be in \[0, 1\]"),
        ([], [], 0, "helpfulness is empty"),
        (H, [], 0, "harm is empty"),
        (H, [0.0, 0.1], 0, "harm must have shape"),
        ([[0.1, 0.2]], [0.1, 0.2], 0, "helpfulness must be 1-D"),
        (H, D, 3, "refusal index 3 is out of range"),
        (H, D, -1, "refusal index -1 is out of range"),
        (H, D, 1.0, "refusal must be an integer"),
        (H, D, True, "refusal must be an integer"),
        (["a", "b", "c"], D, 0, "helpfulness must be an array of numbers"),
    ],
)
def test_bad_scores(h: Any, d: Any, refusal: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        margins(h, d, refusal)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("Invalid input: ")


MG = margins(H, D)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": -0.1}, "budget must be >= 0"),
        ({"budget": math.nan}, "budget is NaN"),
        ({"budget": math.inf}, "budget is inf"),
        ({"budget": "0.2"}, "budget must be a number"),
        ({"budget": [0.1, 0.2]}, "budget has 2 entries but harm has 1 rows"),
        ({"budget": 0.2, "epsilon": -0.01}, "epsilon must be >= 0"),
        ({"budget": 0.2, "epsilon": math.nan}, "epsilon is NaN"),
        ({"budget": 0.2, "beta": -1.0}, "beta must be >= 0"),
        ({"budget": 0.2, "beta": math.inf}, "beta is inf"),
        ({"budget": 0.2, "beta": 1.0, "penalty": -1.0}, "penalty must be >= 0"),
        ({"budget": 0.2, "beta": 1.0, "temperature": 0.0}, "temperature must be > 0"),
        ({"budget": 0.2, "beta": 1.0, "temperature": -1.0}, "temperature must be > 0"),
        ({"budget": 0.2, "temperature": 0.1}, "temperature needs a finite beta"),
        ({"budget": 0.2, "method": "simplex"}, "method must be"),
        (
            {"budget": 0.2, "beta": 1.0, "temperature": 0.1, "method": "highs"},
            "temperature .* is not an LP",
        ),
    ],
)
def test_bad_solve_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        solve(MG, **kwargs)


def test_multi_budget_arguments() -> None:
    mg = margins(H, [D, [0.0, 0.2, 0.1]])
    with pytest.raises(ConfigError, match=r"budget\[1\] must be >= 0"):
        solve(mg, [0.1, -0.2])
    with pytest.raises(ConfigError, match="budget has 3 entries but harm has 2 rows"):
        solve(mg, [0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="method 'exact' supports one budget"):
        solve(mg, [0.1, 0.2], method="exact")
    with pytest.raises(ConfigError, match=r"beta .* supports one budget only"):
        solve(mg, [0.1, 0.2], beta=1.0)
    # A scalar budget applies to every row.
    assert solve(mg, 0.1).budget.tolist() == [0.1, 0.1]


def test_solve_needs_margins() -> None:
    with pytest.raises(ConfigError, match="margins must be a Margins"):
        solve((H, D), 0.2)  # type: ignore[arg-type]


def test_margins_constructor_checks() -> None:
    with pytest.raises(ConfigError, match="must be 0 at the refusal"):
        Margins(np.array([0.1, 0.2]), np.array([0.0, 0.1]), 0)
    with pytest.raises(ConfigError, match=r"M\[1\] is NaN"):
        Margins(np.array([0.0, math.nan]), np.array([0.0, 0.1]), 0)
    with pytest.raises(ConfigError, match="Delta must have shape"):
        Margins(np.array([0.0, 0.2]), np.array([0.0, 0.1, 0.3]), 0)
    with pytest.raises(ConfigError, match=r"Delta\[1\] must be in \[-1, 1\]"):
        Margins(np.array([0.0, 0.2]), np.array([0.0, 1.5]), 0)
    src = np.array([0.0, 0.2])
    mg = Margins(src, np.array([0.0, 0.1]), 0)
    # The caller's array is copied, not locked.
    assert src.flags.writeable and not mg.M.flags.writeable


def test_batch_inputs() -> None:
    M = np.array([[0.0, 0.2], [0.0, 0.3]])
    D = np.array([[0.0, 0.1], [0.0, 0.2]])
    with pytest.raises(ConfigError, match="Delta must have the shape of M"):
        solve_batch(M, D[:, :1], 0.1)
    with pytest.raises(ConfigError, match="M must be 2-D"):
        solve_batch(M[0], D[0], 0.1)
    with pytest.raises(ConfigError, match=r"mask\[1, 0\] hides the refusal"):
        solve_batch(M, D, 0.1, mask=np.array([[True, True], [False, True]]))
    with pytest.raises(ConfigError, match="mask must be boolean"):
        solve_batch(M, D, 0.1, mask=np.ones((2, 2)))
    with pytest.raises(ConfigError, match="budget must be >= 0"):
        solve_batch(M, D, -0.1)
    with pytest.raises(ConfigError, match=r"budget\[1\] must be in \[0, inf\]"):
        solve_batch(M, D, np.array([0.1, -0.1]))
    with pytest.raises(ConfigError, match="refusal column"):
        solve_batch(M + 0.1, D, 0.1)
    bad = M.copy()
    bad[1, 1] = math.nan
    with pytest.raises(ConfigError, match=r"M\[1, 1\] is NaN"):
        solve_batch(bad, D, 0.1)
    # ...unless the NaN is masked out.
    out = solve_batch(bad, D, 0.1, mask=np.array([[True, True], [True, False]]))
    assert out.strategy[1].tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError, match="epsilon must be >= 0"):
        solve_batch(M, D, 0.1, epsilon=-1.0)


def test_pooled_inputs_are_checked_as_the_batch_ones() -> None:
    M = np.array([[0.0, 0.2], [0.0, 0.3]])
    D = np.array([[0.0, 0.1], [0.0, 0.2]])
    with pytest.raises(ConfigError, match="budget must be >= 0"):
        solve_pooled(M, D, -0.1)
    with pytest.raises(ConfigError, match="budget must be a number"):
        solve_pooled(M, D, np.array([0.1, 0.1]))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"mask\[1, 0\] hides the refusal"):
        solve_pooled(M, D, 0.1, mask=np.array([[True, True], [False, True]]))
    bad = M.copy()
    bad[1, 1] = math.nan
    with pytest.raises(ConfigError, match=r"M\[1, 1\] is NaN"):
        solve_pooled(bad, D, 0.1)
    out = solve_pooled(bad, D, 0.1, mask=np.array([[True, True], [True, False]]))
    assert out.success and out.strategy[1].tolist() == [1.0, 0.0]


def test_choose_mode() -> None:
    with pytest.raises(ConfigError, match="mode must be"):
        choose(solve(MG, 0.2), "best")  # type: ignore[arg-type]
