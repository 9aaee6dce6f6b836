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
from torch.nn.utils.rnn import pad_sequence

from lmms_eval_redundancy.codebook.store import load_codebook
from lmms_eval_redundancy.core.budget import Budget
from lmms_eval_redundancy.core.registry import (
    MethodError,
    choice_param,
    file_param,
    register,
)
from lmms_eval_redundancy.methods.base import (
    BeforeLLM,
    Selection,
    VisualUnit,
    row_indices,
)

VARIANTS = ("threshold", "ratio", "double_softmax")


def cosines(features: torch.Tensor, prototypes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N, P]`` cosine similarities, both sides normalised and multiplied in ``dtype``."""
    f = torch.nn.functional.normalize(features.to(dtype), dim=-1)
    c = torch.nn.functional.normalize(prototypes.to(f.device, dtype), dim=-1)
    return f @ c.T


def redundancy_scores(features: torch.Tensor, prototypes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N]`` max cosine similarity of each token to the prototypes (computed in ``dtype``)."""
    return cosines(features, prototypes, dtype).max(dim=-1).values


def unit_scores(features: list[torch.Tensor], prototypes: torch.Tensor, dtype: torch.dtype = torch.float32,
                double_softmax: bool = False) -> torch.Tensor:
    """``[U, L]`` scores of the tokens of each unit ``[N_u, D]``, padded with ``+inf`` to the longest: the max cosine
    to the prototypes or (``double_softmax``) the max of softmax-over-the-unit's-tokens times
    softmax-over-prototypes of the cosines. One product for all units (each token's cosines depend on it alone)."""
    lengths = [unit.shape[0] for unit in features]
    if not double_softmax:
        scores = redundancy_scores(torch.cat(features), prototypes, dtype)
        return pad_sequence(scores.split(lengths), batch_first=True, padding_value=float("inf"))
    cosine = cosines(torch.cat(features), prototypes, dtype)  # [sum N_u, P]
    over_tokens = pad_sequence(cosine.split(lengths), batch_first=True, padding_value=-float("inf")).softmax(dim=1)
    over_prototypes = pad_sequence(cosine.softmax(dim=1).split(lengths), batch_first=True)
    scores = (over_tokens * over_prototypes).max(dim=-1).values
    padding = torch.arange(scores.shape[1], device=scores.device) >= torch.tensor(lengths, device=scores.device)[:, None]
    return scores.masked_fill(padding, float("inf"))


def double_softmax_keep_count(n: int, budget: Budget) -> int:
    """The official count ``N - round(N * (1 - r))``, which can differ from ``round(r * N)`` by one."""
    if budget.kind == "retention":
        return max(1, n - round(n * (1 - budget.value)))
    return budget.keep_count(n)


def keep_below(scores: torch.Tensor, thresholds: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``scores [U, L]`` (padding ``+inf``): the positions scoring below its threshold, or if none, its
    lowest-scoring position (first on ties). Returns (keep mask ``[U, L]``, floor hit ``[U]``)."""
    keep = scores < (thresholds[:, None] if isinstance(thresholds, torch.Tensor) else thresholds)
    floor = ~keep.any(dim=1)
    lowest = torch.zeros_like(keep).scatter_(1, scores.argmin(dim=1, keepdim=True), True)
    return keep | (lowest & floor[:, None]), floor


def keep_lowest(scores: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Keep mask ``[U, L]`` of the ``ks[u]`` lowest scores of each row (padding ``+inf``; ties to the lower index)."""
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.zeros_like(order, dtype=torch.bool).scatter_(1, order, ranks < ks[:, None])


def keep_strictly_below_cut(scores: torch.Tensor, ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official tie rule per row of ``scores [U, L]`` (padding ``+inf``): positions scoring strictly below the
    ``N_u - k_u``-th highest score (all when ``k_u = N_u``); if that leaves none, the lowest-scoring position.
    Returns (keep mask, floor hit)."""
    valid = scores != float("inf")
    drop = valid.sum(dim=1) - ks
    descending = torch.sort(scores.masked_fill(~valid, -float("inf")), dim=1, descending=True).values
    cut = descending.gather(1, (drop - 1).clamp(min=0)[:, None]).squeeze(1)
    return keep_below(scores, torch.where(drop > 0, cut, float("inf")))


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

    def select_units(self, units: list[VisualUnit]) -> list[Selection]:
        """Every unit's scores in one product, then every unit's keep rule at once (units padded)."""
        if not units:
            return []
        device = units[0].features.device
        if self.prototypes.device != device:
            self.prototypes = self.prototypes.to(device)
        double_softmax = self.params.variant == "double_softmax"
        scores = unit_scores([unit.features for unit in units], self.prototypes, self.dtype or units[0].features.dtype,
                             double_softmax)
        counts = [unit.features.shape[0] for unit in units]
        if self.params.variant == "threshold":
            keep, floor = keep_below(scores, self.budget.value)
        else:
            count = (lambda n: double_softmax_keep_count(n, self.budget)) if double_softmax else self.budget.keep_count
            ks = torch.tensor([count(n) for n in counts], device=device)
            if double_softmax and self.params.ties == "strict":
                keep, floor = keep_strictly_below_cut(scores, ks)
            else:
                keep, floor = keep_lowest(scores, ks), torch.zeros(len(units), dtype=torch.bool, device=device)
        return [Selection(kept, hit) for kept, hit in zip(row_indices(keep), floor.tolist())]
