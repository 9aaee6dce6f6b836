"""The pruning-method registry, its one door: registration, lookup, typed parameters and building.

Methods register themselves with ``@register`` when their module is imported. The first lookup imports
the ``lmms_eval_redundancy.methods`` package by name, which imports every module in that folder, so a
new method file is found without being named anywhere.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass, field
from enum import Enum

from lmms_eval_redundancy.core.budget import Budget
from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.values import strict_bool, whole_number

UNPRUNED = "none"  # the method that keeps every token: the reference of every comparison
PATHS_KEY = "paths"  # settings entry with the paths of file parameters (identity is their content, recorded apart)


class Stage(str, Enum):
    BEFORE_LLM = "before_llm"  # acts on projected visual features before they enter the LLM
    INSIDE_LLM = "inside_llm"  # acts on hidden states inside the decoder


class MethodError(UserError):
    """Unknown method, unknown parameter, or a parameter of the wrong type."""


_METHODS: dict[str, type] = {}
METHODS_PACKAGE = "lmms_eval_redundancy.methods"


def file_param():
    """A ``Params`` field holding a file path: settings record the file by content (``content_id``), not by path."""
    return field(default="", metadata={"file": True})


def choice_param(default: str, choices: tuple[str, ...], official: str | None = None):
    """A ``Params`` field taking one of ``choices``; ``official`` is the value ``faithful=true`` selects
    (the behaviour of the method's official code, where the project's default differs)."""
    metadata = {"choices": choices, **({"official": official} if official is not None else {})}
    return field(default=default, metadata=metadata)


def is_file_param(param: dataclasses.Field) -> bool:
    """Whether a ``Params`` field names a file (declared with ``file_param``)."""
    return bool(param.metadata.get("file"))


@dataclass
class NoParams:
    """Parameters of a method that takes none besides its budget."""


def register(cls: type) -> type:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise MethodError(f"method {cls.name!r} is registered twice ({_METHODS[cls.name].__module__} and {cls.__module__})")
    _METHODS[cls.name] = cls
    return cls


def _methods() -> dict[str, type]:
    importlib.import_module(METHODS_PACKAGE)
    return _METHODS


def available_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_methods())


def method_classes() -> list[type]:
    """The registered method classes, by name."""
    return [_methods()[name] for name in available_methods()]


def method_class(name: str) -> type:
    if name not in _methods():
        raise MethodError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}")
    return _METHODS[name]


def file_params(name: str) -> list[str]:
    """Names of a method's file parameters."""
    return [f.name for f in param_fields(name) if is_file_param(f)]


def param_fields(name: str) -> list[dataclasses.Field]:
    """The typed parameters of a method (its ``Params`` dataclass fields)."""
    return list(dataclasses.fields(method_class(name).Params))


def param_names(name: str) -> list[str]:
    return [f.name for f in param_fields(name)]


def _coerce(value, annotation, key: str):
    """Convert a model_args value (already typed by lmms-eval's parser, or a string) to ``annotation``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if value is None:
        return None
    readers = {bool: strict_bool, int: whole_number}
    if annotation in readers:
        try:
            return readers[annotation](key, value)
        except UserError as err:
            raise MethodError(str(err)) from None
    try:
        return annotation(value)
    except (TypeError, ValueError):
        raise MethodError(f"{key}={value!r} is not a valid {annotation.__name__}") from None


def build_method(name: str, budget: Budget, faithful: bool = False, **raw_params):
    """Instantiate a registered method, checking parameter names, types, choices and the budget kind.

    ``faithful``: parameters not given take their ``official`` value (the official code's behaviour).
    """
    cls = method_class(name)
    if budget.kind not in cls.budgets + ("all",):
        allowed = ", ".join(f"{b}=" for b in cls.budgets) or "no budget"
        raise MethodError(f"method {name!r} does not accept a {budget.kind}= budget; it accepts {allowed}")
    hints = typing.get_type_hints(cls.Params)
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(raw_params) - set(fields))
    if unknown:
        raise MethodError(
            f"unknown parameter(s) {', '.join(unknown)} for method {name!r}; "
            f"its parameters are: {', '.join(sorted(fields)) or 'none'}"
        )
    if faithful:
        raw_params = {**{k: f.metadata["official"] for k, f in fields.items() if "official" in f.metadata}, **raw_params}
    values = {k: _coerce(v, hints[k], k) for k, v in raw_params.items()}
    for key, value in values.items():
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise MethodError(f"{key}={value!r} is not one of {', '.join(choices)} (method {name!r})")
    params = cls.Params(**values)
    method = cls(params=params, budget=budget)
    method.validate()
    return method
