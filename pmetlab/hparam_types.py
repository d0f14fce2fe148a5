"""Field-type checks of the hyperparameter dataclasses: JSON-ish values (lists, ints for floats)
are coerced, wrong types and non-finite numbers refused with one line naming the field."""

from __future__ import annotations

import math
import numbers
from dataclasses import fields
from typing import Any

__all__ = ["check_field_types"]


def check_field_types(hp: Any) -> None:
    """Coerce and check every field of the frozen dataclass ``hp`` in place (by its annotation:
    "float", "int", "bool", "str"; ``layers`` and ``prefix_starts`` as sequences).

    Raises:
        ValueError: naming the class, the field, what was expected and what was received.
    """

    def bad(name: str, expected: str, v: Any) -> ValueError:
        return ValueError(f"{type(hp).__name__}.{name} must be {expected}, got {type(v).__name__}: {v!r}")

    for f in fields(hp):
        v = getattr(hp, f.name)
        kind = str(f.type)
        if f.name == "layers":
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                raise bad(f.name, "a sequence of layer indices", v)
            v = tuple(v)
            if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in v):
                raise bad(f.name, "a sequence of ints", v)
            v = tuple(int(x) for x in v)
        elif f.name == "prefix_starts":
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                raise bad(f.name, "a sequence of strings", v)
            v = tuple(v)
            if not all(isinstance(x, str) and x.strip() for x in v):
                raise bad(f.name, "a sequence of non-empty strings", v)
        elif kind == "float":
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise bad(f.name, "a number", v)
            v = float(v)
            if not math.isfinite(v):
                raise bad(f.name, "finite", v)
        elif kind == "int":
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise bad(f.name, "an int", v)
            v = int(v)
        elif kind == "bool":
            if not isinstance(v, bool):
                raise bad(f.name, "True or False", v)
        elif kind == "str":
            if not isinstance(v, str):
                raise bad(f.name, "a string", v)
        object.__setattr__(hp, f.name, v)
