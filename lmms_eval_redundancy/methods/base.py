"""The two kinds of pruning method: choosing tokens before the LLM, and acting inside it.

A method is one module in this package: a subclass of ``BeforeLLM`` or ``InsideLLM`` decorated with
``lmms_eval_redundancy.core.registry.register``, with a ``name``, the budgets it accepts and a ``Params`` dataclass of its typed
parameters (model_args keys). Model-specific pieces (layers, projections, rotary embeddings) come from
the ``family`` object handed to ``attach``; hooks go on that model instance and are removed by ``detach``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from lmms_eval_redundancy.core.budget import Budget
from lmms_eval_redundancy.core.files import content_id
from lmms_eval_redundancy.core.registry import PATHS_KEY, NoParams, Stage, is_file_param
from lmms_eval_redundancy.core.timing import Stopwatch
from lmms_eval_redundancy.core.visuals import Selection, VisionNeed, VisualUnit

__all__ = ["BeforeLLM", "InsideLLM", "PruningMethod", "Selection", "VisionNeed", "VisualUnit"]


@dataclass
class PruningMethod:
    """What every method has: parameters, a budget, its settings record, hooks it can remove."""

    params: typing.Any
    budget: Budget
    name: typing.ClassVar[str] = ""
    stage: typing.ClassVar[Stage]
    budgets: typing.ClassVar[tuple[str, ...]] = ("retention", "tokens")
    Params: typing.ClassVar[type] = NoParams
    needs_grid: typing.ClassVar[bool] = False  # True: units must be plain token grids (not packed anyres views)
    needs_cls: typing.ClassVar[bool] = False  # True: only vision towers with a [CLS] token (CLIP, not SigLIP)
    selection: Stopwatch = field(default_factory=Stopwatch)  # time spent choosing tokens in the current batch
    _hooks: list = field(default_factory=list)

    def validate(self) -> None:
        """Check parameters against each other and the budget; raise ``MethodError`` when they clash."""

    def attach(self, model, family) -> None:
        """Bind to a loaded model (load data, check compatibility, install hooks with ``hook``)."""

    def hook(self, handle) -> None:
        """Keep a hook handle (from ``register_forward_pre_hook`` etc.) so that ``detach`` removes it."""
        self._hooks.append(handle)

    def detach(self) -> None:
        """Remove every hook this method installed."""
        while self._hooks:
            self._hooks.pop().remove()

    def settings(self) -> dict:
        """Effective settings, defaults included, as recorded in run summaries.

        File parameters appear as ``content_id`` (file stem and content hash); their paths go under ``paths``.
        """
        values = dataclasses.asdict(self.params)
        paths = {f.name: values[f.name] for f in dataclasses.fields(self.params) if is_file_param(f) and values[f.name]}
        values.update({name: content_id(path) for name, path in paths.items()})
        return {"method": self.name, "stage": self.stage.value, "budget": self.budget.describe(), **values,
                **({PATHS_KEY: paths} if paths else {})}


@dataclass
class BeforeLLM(PruningMethod):
    """Chooses among the projected tokens of each image or frame before they enter the LLM."""

    stage: typing.ClassVar[Stage] = Stage.BEFORE_LLM

    def vision_needs(self) -> tuple[VisionNeed, ...]:
        """What the method reads from inside the vision tower (after ``attach``); the family serves it to
        each unit as ``unit.vision`` and ``unit.tile_vision``."""
        return ()

    def select_unit(self, unit: VisualUnit) -> Selection:
        raise NotImplementedError

    def select_units(self, units: list[VisualUnit]) -> list[Selection]:
        """Selections for every unit of a batch at once; override to batch the work (same picks as ``select_unit``)."""
        return [self.select_unit(unit) for unit in units]


@dataclass
class InsideLLM(PruningMethod):
    """Drops visual tokens from the hidden states at some decoder layer; its hooks act in ``around_llm``."""

    stage: typing.ClassVar[Stage] = Stage.INSIDE_LLM

    @property
    def first_pruned_layer(self) -> int:
        """The first decoder layer that sees fewer tokens."""
        raise NotImplementedError

    def around_llm(self, batch, records, log_keep: bool = False):
        """Context for one generate/forward call over ``batch``; fills ``records`` with what was kept."""
        raise NotImplementedError

