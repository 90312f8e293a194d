"""One conversion of results to JSON values, shared by every writer.

The CLI's ``--json`` output, the eval log and the gateway's audit records all go through
:func:`to_jsonable`, so a value reads the same wherever it is written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic_core import to_jsonable_python

__all__ = ["to_jsonable"]


def _fallback(obj: Any) -> Any:
    # Types pydantic does not know; what this returns is converted in turn.
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return str(obj)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values (dicts, lists, str, int, float, bool, None) from results.

    Dataclasses become dicts of their fields, enums their value, tuples and sets lists,
    paths strings, numpy arrays and scalars lists and numbers, other keys strings; NaN and
    infinities become None (JSON has no such numbers). An object of any other type becomes
    its ``to_dict()`` if it has one, else its ``str``.
    """
    return to_jsonable_python(obj, inf_nan_mode="null", fallback=_fallback)
