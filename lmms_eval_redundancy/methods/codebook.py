"""``codebook``: drop visual tokens that look like known-redundant prototypes (the paper's method).

Score of a post-projector token f: ``s(f) = max_p cos(f, C_p)``. Variants: ``threshold`` keeps tokens
with ``s < t`` (at least the lowest-scoring one per image); ``ratio`` keeps the ``round(r*N)`` (or
``tokens=k``) tokens with the smallest ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmms_eval_redundancy.budget import Budget
from lmms_eval_redundancy.registry import MethodError, PruningMethod, Selection, VisualUnit, register

VARIANTS = ("threshold", "ratio")


def redundancy_scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``[N]`` max cosine similarity of each token to the prototypes (computed in float32)."""
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    c = torch.nn.functional.normalize(prototypes.to(f.device).float(), dim=-1)
    return (f @ c.T).max(dim=-1).values


def keep_below(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, bool]:
    """Indices with ``score < threshold``; if none, the lowest-scoring index. Returns (keep, floor_hit)."""
    keep = torch.nonzero(scores < threshold).flatten()
    if keep.numel():
        return keep, False
    return scores.argmin().reshape(1), True


def keep_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` lowest-scoring indices (ties to the lower index), sorted."""
    return torch.sort(scores, stable=True).indices[:k].sort().values


def select(features, prototypes, *, threshold=None, retention=None, tokens=None, variant="threshold") -> torch.Tensor:
    """Sorted keep indices for ``features [N, D]`` given ``prototypes [P, D]``."""
    scores = redundancy_scores(features, prototypes)
    if variant == "threshold":
        if threshold is None:
            raise ValueError("variant='threshold' needs threshold=")
        return keep_below(scores, threshold)[0]
    if variant == "ratio":
        budget = Budget("retention", retention) if retention is not None else Budget("tokens", tokens)
        return keep_lowest(scores, budget.keep_count(scores.numel()))
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")


@register
class CodebookPruning(PruningMethod):
    name = "codebook"
    budgets = ("threshold", "retention", "tokens")

    @dataclass
    class Params:
        codebook: str = ""
        variant: str = ""  # filled in from the budget: threshold= -> "threshold", retention=/tokens= -> "ratio"

    def validate(self) -> None:
        from lmms_eval_redundancy.codebook.store import check_codebook_path

        if not self.params.codebook:
            raise MethodError(
                "method=codebook needs codebook=PATH: a codebook .safetensors (see `lmms-eval-redundancy "
                "import-codebook` and `build-codebook`) or a release .pt from the paper"
            )
        check_codebook_path(self.params.codebook)
        implied = "threshold" if self.budget.kind == "threshold" else "ratio"
        if self.budget.kind == "all":
            raise MethodError("method=codebook needs a budget: threshold=t, retention=r or tokens=k")
        if self.params.variant and self.params.variant not in VARIANTS:
            raise MethodError(f"unknown codebook variant {self.params.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.params.variant and self.params.variant != implied:
            raise MethodError(
                f"variant={self.params.variant} does not match the budget {self.budget.describe()}: "
                "variant=threshold takes threshold=, variant=ratio takes retention= or tokens="
            )
        self.params.variant = implied
        self.prototypes = None

    def attach(self, model) -> None:
        from lmms_eval_redundancy.codebook.store import load_codebook

        codebook = load_codebook(self.params.codebook)
        codebook.check_hidden_size(model.config.text_config.hidden_size)
        self.codebook_meta = codebook.meta
        self.prototypes = torch.nn.functional.normalize(codebook.prototypes.float(), dim=-1)

    def settings(self) -> dict:
        extra = {"prototypes": None if self.prototypes is None else int(self.prototypes.shape[0])}
        return {**super().settings(), **extra}

    def select_unit(self, unit: VisualUnit) -> Selection:
        if self.prototypes.device != unit.features.device:
            self.prototypes = self.prototypes.to(unit.features.device)
        scores = redundancy_scores(unit.features, self.prototypes)
        if self.params.variant == "threshold":
            keep, floor_hit = keep_below(scores, self.budget.value)
            return Selection(keep, floor_hit)
        return Selection(keep_lowest(scores, self.budget.keep_count(scores.numel())))
