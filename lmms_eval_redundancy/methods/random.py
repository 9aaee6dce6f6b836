"""``random``: k tokens drawn uniformly without replacement, seeded per image so runs repeat exactly."""

import hashlib
from dataclasses import dataclass

import torch

from lmms_eval_redundancy.core.registry import register
from lmms_eval_redundancy.methods.base import BeforeLLM, Selection, VisualUnit


def select(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct indices of ``range(n)``, sorted."""
    return torch.randperm(n, generator=generator)[:k].sort().values


def unit_generator(seed: int, key: str) -> torch.Generator:
    """A generator whose state depends only on the seed and the unit, not on batching or rank."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@register
class RandomPruning(BeforeLLM):
    name = "random"

    @dataclass
    class Params:
        seed: int = 0

    def select_units(self, units: list[VisualUnit]) -> list[Selection]:
        """Each unit's draw from its own generator (on the CPU), moved to the device in one transfer."""
        if not units:
            return []
        sizes = [unit.features.shape[0] for unit in units]
        picks = [select(n, self.budget.keep_count(n), unit_generator(self.params.seed, unit.key)) for unit, n in zip(units, sizes)]
        moved = torch.cat(picks).to(units[0].features.device).split([keep.numel() for keep in picks])
        return [Selection(keep) for keep in moved]
