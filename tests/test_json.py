"""The one JSON conversion shared by the CLI, the eval log and the audit log."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path

import numpy as np

from safetygame._json import to_jsonable
from safetygame.agent import Status
from safetygame.backends.base import Message


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    value: float
    scores: tuple[float, ...]
    array: np.ndarray
    status: Status
    messages: tuple[Message, ...] = ()


def test_results_become_plain_json_values() -> None:
    row = Row(
        "a",
        math.nan,
        (1.0, math.inf, -math.inf),
        np.array([[0.5, np.nan]]),
        Status.OK,
        (Message("user", "hi"),),
    )
    out = to_jsonable({"row": row, 3: np.float32(0.25), "n": np.int64(7), "ok": np.bool_(True)})
    assert out == {
        "row": {
            "name": "a",
            "value": None,
            "scores": [1.0, None, None],
            "array": [[0.5, None]],
            "status": "ok",
            "messages": [{"role": "user", "content": "hi"}],
        },
        "3": 0.25,
        "n": 7,
        "ok": True,
    }
    assert type(out["n"]) is int and type(out["ok"]) is bool
    json.dumps(out, allow_nan=False)


def test_enums_paths_and_unknown_objects() -> None:
    class ToDict:
        def to_dict(self) -> dict[str, float]:
            return {"x": math.nan}

    class Opaque:
        def __str__(self) -> str:
            return "opaque"

    assert to_jsonable([Colour.RED, Path("/tmp/x"), ToDict(), Opaque(), None]) == [
        "red",
        "/tmp/x",
        {"x": None},
        "opaque",
        None,
    ]
