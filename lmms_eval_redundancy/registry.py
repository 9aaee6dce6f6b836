"""The pruning-method registry: each method declares its stage, budgets and typed parameters."""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass
from enum import Enum

import torch

from lmms_eval_redundancy.budget import Budget


class Stage(str, Enum):
    BEFORE_LLM = "before_llm"  # acts on projected visual features before they enter the LLM
    INSIDE_LLM = "inside_llm"  # acts on hidden states inside the decoder


class MethodError(ValueError):
    """Unknown method, unknown parameter, or a parameter of the wrong type."""


@dataclass
class VisualUnit:
    """The tokens of one image (or one video frame) that a method chooses from.

    ``features`` are post-projector tokens ``[N, D]`` with newline tokens already removed; ``key``
    identifies the unit across runs (used to seed random choices); ``grid`` is the (rows, cols) of
    the token grid when the unit is a plain raster (``None`` for packed anyres sequences); ``scores``
    are per-token vision-tower attention scores for methods that ask for them.
    """

    features: torch.Tensor
    key: str
    grid: tuple[int, int] | None = None
    scores: torch.Tensor | None = None


@dataclass
class Selection:
    """Sorted keep indices into a unit, and how the budget was met.

    Methods that merge tokens (pooling) also return ``features``, the tokens that replace the unit; they
    take the places of its first ``len(features)`` tokens (``keep`` then is ``arange(len(features))``).
    """

    keep: torch.Tensor
    floor_hit: bool = False
    features: torch.Tensor | None = None


@dataclass
class NoParams:
    """Parameters of a method that takes none besides its budget."""


@dataclass
class PruningMethod:
    """Base class: subclasses set ``name``, ``stage``, ``budgets``, ``Params`` and implement ``select_unit``."""

    params: typing.Any
    budget: Budget
    name: typing.ClassVar[str] = ""
    stage: typing.ClassVar[Stage] = Stage.BEFORE_LLM
    budgets: typing.ClassVar[tuple[str, ...]] = ("retention", "tokens")
    Params: typing.ClassVar[type] = NoParams
    needs_vision_scores: typing.ClassVar[bool] = False  # if True, implement ``observing_vision()``
    first_pruned_layer: typing.ClassVar[int | None] = None  # inside-LLM methods: the first decoder layer with fewer tokens
    selection_seconds: float = 0.0  # time spent choosing tokens in the current batch (hooks add theirs)

    def validate(self) -> None:
        """Check parameters against each other and the budget; raise ``MethodError`` when they clash."""

    def attach(self, model) -> None:
        """Bind to a loaded model (load data, check compatibility, install instance hooks)."""

    def around_llm(self, batch, records, log_keep: bool = False):
        """Context for one LLM call over ``batch``; inside-LLM methods arm their hooks here and fill ``records``."""
        return contextlib.nullcontext()

    def select_unit(self, unit: VisualUnit) -> Selection:
        raise NotImplementedError

    def settings(self) -> dict:
        """Effective settings, defaults included, as recorded in run summaries."""
        return {"method": self.name, "stage": self.stage.value, "budget": self.budget.describe(),
                **dataclasses.asdict(self.params)}


_METHODS: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if cls.name in _METHODS:
        raise MethodError(f"method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    import lmms_eval_redundancy.methods  # noqa: F401  (registers the built-in methods)

    return sorted(_METHODS)


def method_class(name: str) -> type[PruningMethod]:
    import lmms_eval_redundancy.methods  # noqa: F401  (registers the built-in methods)

    if name not in _METHODS:
        raise MethodError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}")
    return _METHODS[name]


def param_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(method_class(name).Params)]


def _coerce(value, annotation, key: str):
    """Convert a model_args value (already typed by lmms-eval's parser, or a string) to ``annotation``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if value is None:
        return None
    if annotation is bool:
        text = str(value).lower()
        if text in ("true", "1", "yes", "false", "0", "no"):
            return text in ("true", "1", "yes")
    else:
        try:
            converted = annotation(float(value)) if annotation is int else annotation(value)
            if annotation is not int or converted == float(value):
                return converted
        except (TypeError, ValueError):
            pass
    raise MethodError(f"{key}={value!r} is not a valid {annotation.__name__}")


def build_method(name: str, budget: Budget, **raw_params) -> PruningMethod:
    """Instantiate a registered method, checking parameter names, types and the budget kind."""
    cls = method_class(name)
    if budget.kind not in cls.budgets + ("all",):
        allowed = ", ".join(f"{b}=" for b in cls.budgets) or "no budget"
        raise MethodError(f"method {name!r} does not accept a {budget.kind}= budget; it accepts {allowed}")
    hints = typing.get_type_hints(cls.Params)
    known = {f.name for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(raw_params) - known)
    if unknown:
        raise MethodError(
            f"unknown parameter(s) {', '.join(unknown)} for method {name!r}; "
            f"its parameters are: {', '.join(sorted(known)) or 'none'}"
        )
    params = cls.Params(**{k: _coerce(v, hints[k], k) for k, v in raw_params.items()})
    method = cls(params=params, budget=budget)
    method.validate()
    return method
