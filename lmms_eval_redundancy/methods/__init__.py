"""Pruning methods, one module each; importing this package imports and so registers every one of them.

Look methods up through ``lmms_eval_redundancy.core.registry``, which imports this package on first use.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
