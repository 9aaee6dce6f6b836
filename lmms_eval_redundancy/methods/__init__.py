"""Pruning methods, one module each; importing this package imports and so registers every one of them."""

import importlib
import pkgutil

from lmms_eval_redundancy.core.registry import (
    available_methods,
    build_method,
    method_class,
    param_fields,
    param_names,
)

__all__ = ["available_methods", "build_method", "method_class", "param_fields", "param_names"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
