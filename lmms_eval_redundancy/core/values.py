"""Strict readers of option values (model_args, method parameters): a value they cannot read is refused
with the key, the value and what is accepted, never guessed."""

from __future__ import annotations

import math

from lmms_eval_redundancy.core.errors import UserError

TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")


def strict_bool(key: str, value) -> bool:
    """``true/false``, ``yes/no``, ``1/0`` in any case (or a real bool); anything else is refused.

    lmms-eval's parser has already turned ``true``/``false`` into bools and ``1``/``0`` into ints.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS + FALSE_WORDS:
        return text in TRUE_WORDS
    raise UserError(f"{key}={value!r} is not a boolean; use one of true/false, yes/no, 1/0 (any case)")


def whole_number(key: str, value) -> int:
    """An integer given as an int, a whole float or its text (``"4"``, ``4.0``); bools and fractions refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = "" if isinstance(value, bool) else str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not number.is_integer():
        raise UserError(f"{key}={value!r} is not a whole number")
    return int(number)


def positive_int(key: str, value, usage: str = "") -> int:
    """A whole number >= 1; ``usage`` follows the refusal (how the value is meant to be given)."""
    try:
        number = whole_number(key, value)
    except UserError:
        number = 0
    if number < 1:
        raise UserError(f"{key}={value!r} is not a whole number >= 1{usage}")
    return number
