"""Pruning budgets: ``retention=r``, ``tokens=k`` or ``threshold=t`` (one at a time)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmms_eval_redundancy.core.errors import UserError

BUDGET_KEYS = ("retention", "tokens", "threshold")
EXAMPLES = "give e.g. retention=0.25, tokens=64 or threshold=0.45"


class BudgetError(UserError):
    """A budget is missing, out of range, or given twice."""


@dataclass(frozen=True)
class Budget:
    """How many visual tokens to keep per image or frame."""

    kind: str  # "retention" | "tokens" | "threshold" | "all"
    value: float = 1.0

    def keep_count(self, n: int) -> int:
        """Number of tokens to keep out of ``n`` for count budgets (round half to even, at least 1)."""
        if self.kind == "all":
            return n
        if self.kind == "retention":
            return min(n, max(1, round(self.value * n)))
        if self.kind == "tokens":
            return min(n, int(self.value))
        raise BudgetError("a threshold budget has no fixed token count; only the codebook method uses it")

    def describe(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}={self.value:g}"


KEEP_ALL = Budget("all")


def parse_budget(retention=None, tokens=None, threshold=None) -> Budget | None:
    """Validate the budget arguments; ``None`` when none was given."""
    given = {k: v for k, v in zip(BUDGET_KEYS, (retention, tokens, threshold)) if v is not None}
    if len(given) > 1:
        raise BudgetError(
            f"two budgets given at once ({', '.join(f'{k}={v}' for k, v in given.items())}); "
            "give exactly one of retention=, tokens= or threshold="
        )
    if not given:
        return None
    kind, raw = next(iter(given.items()))
    try:
        if isinstance(raw, bool):  # lmms-eval's parser turns `true` into a bool
            raise TypeError(raw)
        value = float(raw)
    except (TypeError, ValueError):
        raise BudgetError(f"{kind}={raw!r} is not a number; {EXAMPLES}") from None
    if not math.isfinite(value):
        raise BudgetError(f"{kind}={raw!r} is not a finite number; {EXAMPLES}")
    if kind == "retention" and not 0 < value <= 1:
        raise BudgetError(f"retention={raw} is out of range; use 0 < retention <= 1 (e.g. retention=0.111 keeps 64 of 576)")
    if kind == "tokens" and (value != int(value) or value < 1):
        raise BudgetError(f"tokens={raw} is out of range; use a whole number >= 1")
    if kind == "threshold" and not -1 <= value <= 1:
        raise BudgetError(f"threshold={raw} is out of range; a cosine-similarity threshold lies in [-1, 1]")
    return Budget(kind, value)
