"""``codebook``: drop visual tokens that look like known-redundant prototypes (the paper's method).

Score of a post-projector token f: ``s(f) = max_p cos(f, C_p)``. Variants: ``threshold`` keeps tokens
with ``s < t`` (at least the lowest-scoring one per image); ``ratio`` keeps the ``round(r*N)`` (or
``tokens=k``) tokens with the smallest ``s``; ``double_softmax`` (the official multi-image and video rule)
scores ``max_p softmax_N(A) * softmax_P(A)`` of the cosine matrix ``A`` and keeps the
``N - round(N * (1 - r))`` lowest-scoring tokens. Video is pruned per frame by the engine.

``ties=strict`` is the official double-softmax cut: drop the ``m = N - k`` highest scores and every score
equal to the ``m``-th highest, so ties at the cut drop extra tokens (at least one token is kept, as a
floor). ``precision=model`` scores in the features' dtype (the model's, fp16 in the official runs) instead
of float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmms_eval_redundancy.codebook.store import load_codebook
from lmms_eval_redundancy.core.budget import Budget
from lmms_eval_redundancy.core.registry import (
    MethodError,
    choice_param,
    file_param,
    register,
)
from lmms_eval_redundancy.methods.base import BeforeLLM, Selection, VisualUnit

VARIANTS = ("threshold", "ratio", "double_softmax")


def cosines(features: torch.Tensor, prototypes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N, P]`` cosine similarities, both sides normalised and multiplied in ``dtype``."""
    f = torch.nn.functional.normalize(features.to(dtype), dim=-1)
    c = torch.nn.functional.normalize(prototypes.to(f.device, dtype), dim=-1)
    return f @ c.T


def redundancy_scores(features: torch.Tensor, prototypes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N]`` max cosine similarity of each token to the prototypes (computed in ``dtype``)."""
    return cosines(features, prototypes, dtype).max(dim=-1).values


def double_softmax_scores(features: torch.Tensor, prototypes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N]``: max over prototypes of softmax-over-tokens times softmax-over-prototypes of the cosines."""
    cosine = cosines(features, prototypes, dtype)
    return (cosine.softmax(dim=0) * cosine.softmax(dim=1)).max(dim=-1).values


def double_softmax_keep_count(n: int, budget: Budget) -> int:
    """The official count ``N - round(N * (1 - r))``, which can differ from ``round(r * N)`` by one."""
    if budget.kind == "retention":
        return max(1, n - round(n * (1 - budget.value)))
    return budget.keep_count(n)


def keep_below(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, bool]:
    """Indices with ``score < threshold``; if none, the lowest-scoring index. Returns (keep, floor_hit)."""
    keep = torch.nonzero(scores < threshold).flatten()
    if keep.numel():
        return keep, False
    return scores.argmin().reshape(1), True


def keep_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` lowest-scoring indices (ties to the lower index), sorted."""
    return torch.sort(scores, stable=True).indices[:k].sort().values


def keep_strictly_below_cut(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, bool]:
    """The official tie rule: indices scoring strictly below the ``N - k``-th highest score (all when
    ``k = N``); if that leaves none, the lowest-scoring index. Returns (keep, floor_hit)."""
    drop = scores.numel() - k
    if drop <= 0:
        return torch.arange(scores.numel(), device=scores.device), False
    return keep_below(scores, float(scores.topk(drop).values[-1]))


@register
class CodebookPruning(BeforeLLM):
    name = "codebook"
    budgets = ("threshold", "retention", "tokens")

    @dataclass
    class Params:
        codebook: str = file_param()  # a codebook .safetensors, or a paper release .pt
        variant: str = ""  # default from the budget: threshold= -> "threshold", retention=/tokens= -> "ratio"
        ties: str = choice_param("count", ("count", "strict"), official="strict")  # double_softmax's cut
        precision: str = choice_param("float32", ("float32", "model"), official="model")  # scoring dtype

    def validate(self) -> None:
        if not self.params.codebook:
            raise MethodError(
                "method=codebook needs codebook=PATH: a codebook .safetensors (see `lmms-eval-redundancy "
                "import-codebook` and `build-codebook`) or a release .pt from the paper"
            )
        implied = "threshold" if self.budget.kind == "threshold" else "ratio"
        if self.budget.kind == "all":
            raise MethodError("method=codebook needs a budget: threshold=t, retention=r or tokens=k")
        if self.params.variant and self.params.variant not in VARIANTS:
            raise MethodError(f"unknown codebook variant {self.params.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.params.variant and (self.params.variant == "threshold") != (implied == "threshold"):
            raise MethodError(
                f"variant={self.params.variant} does not match the budget {self.budget.describe()}: "
                "variant=threshold takes threshold=, variant=ratio and variant=double_softmax take retention= or tokens="
            )
        self.params.variant = self.params.variant or implied
        self.codebook = load_codebook(self.params.codebook)  # read and checked before any model loads
        self.prototypes = None

    def attach(self, model, family) -> None:
        self.codebook.check_hidden_size(model.config.text_config.hidden_size)
        prototypes = self.codebook.prototypes
        if self.params.precision == "model":  # as officially: the stored rows in the model's dtype, normalised there
            self.prototypes, self.dtype = prototypes, None
        else:
            self.prototypes, self.dtype = torch.nn.functional.normalize(prototypes.float(), dim=-1), torch.float32

    def settings(self) -> dict:
        extra = {"prototypes": None if self.prototypes is None else int(self.prototypes.shape[0])}
        return {**super().settings(), **extra}

    def select_unit(self, unit: VisualUnit) -> Selection:
        if self.prototypes.device != unit.features.device:
            self.prototypes = self.prototypes.to(unit.features.device)
        n, dtype = unit.features.shape[0], self.dtype or unit.features.dtype
        if self.params.variant == "double_softmax":
            scores = double_softmax_scores(unit.features, self.prototypes, dtype)
            k = double_softmax_keep_count(n, self.budget)
            if self.params.ties == "strict":
                return Selection(*keep_strictly_below_cut(scores, k))
            return Selection(keep_lowest(scores, k))
        scores = redundancy_scores(unit.features, self.prototypes, dtype)
        if self.params.variant == "threshold":
            keep, floor_hit = keep_below(scores, self.budget.value)
            return Selection(keep, floor_hit)
        return Selection(keep_lowest(scores, self.budget.keep_count(n)))
