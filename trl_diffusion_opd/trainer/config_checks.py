"""The configurations' value checks. Each raises `ValueError("`field` must be <what is accepted>, got <value>.")`: one
line that the CLI prints as is, so a bad value fails at parse time, before any model is loaded. Pure Python: the
commands' `--help` and the eval command's arguments use them without importing torch."""

from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def check_int(name: str, value: Any, minimum: int | None = None, optional: bool = False) -> int | None:
    """`value` if it is an integer >= `minimum` (or `None` when `optional`), else a `ValueError` naming `name`."""
    if value is None and optional:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or (minimum is not None and value < minimum):
        accepted = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if optional else "")
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    return int(value)


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> float | None:
    """`value` if it is a finite real number in the range (`None` when `optional`), else a `ValueError` naming
    `name`. NaN and ±inf are refused: they pass comparisons silently and surface as a non-finite loss later."""
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        accepted = f"a finite number{_range_text(low, high, low_open, high_open)}" + (" or None" if optional else "")
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is `True` or `False` (a string such as "no" would otherwise be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices) -> Any:
    """`value` if it is one of `choices`, else a `ValueError` naming `name` and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")
    return value


def check_output_dir(name: str, value: Any) -> None:
    """An output folder may not exist yet, but must not be a file."""
    if value is not None and os.path.isfile(os.path.expanduser(str(value))):
        raise ValueError(f"`{name}` must be a folder, but '{value}' is an existing file.")


def check_reward_names(name: str, names: list[Any]) -> None:
    """Every item of `names` that is a string must be a registered reward (plug-ins' included)."""
    from ..rewards import reward_names

    unknown = [item for item in names if isinstance(item, str) and item not in reward_names()]
    if unknown:
        raise ValueError(
            f"`{name}` names unknown reward(s) {unknown}; available rewards: {', '.join(reward_names())}."
        )


def _as_dict(value: Any, name: str) -> Any:
    """Dict fields are also accepted as JSON strings (command line, environment)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"`{name}` must be a dict or a JSON object string, got {value!r}: {error}") from error
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"`{name}` must be a dict, got {type(value).__name__}: {value!r}")
    return value


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
