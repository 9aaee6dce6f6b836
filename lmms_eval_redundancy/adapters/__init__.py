"""Model-family adapters, chosen from a checkpoint's ``model_type``."""

from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

from lmms_eval_redundancy.adapters.base import FamilyAdapter, PackedVisual
from lmms_eval_redundancy.adapters.llava import LlavaAdapter
from lmms_eval_redundancy.adapters.llava_next import LlavaNextAdapter
from lmms_eval_redundancy.adapters.llava_onevision import LlavaOnevisionAdapter

FAMILIES = {
    "llava": (LlavaForConditionalGeneration, LlavaAdapter),
    "llava_next": (LlavaNextForConditionalGeneration, LlavaNextAdapter),
    "llava_onevision": (LlavaOnevisionForConditionalGeneration, LlavaOnevisionAdapter),
}


class UnsupportedModelError(ValueError):
    """The checkpoint is not one of the LLaVA families this project supports."""


def family_of(model_type: str):
    """``(model class, adapter class)`` for a config ``model_type``."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; llava_redundancy runs checkpoints of type "
            f"{', '.join(FAMILIES)} (llava-hf LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision)"
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "FamilyAdapter", "PackedVisual", "UnsupportedModelError", "family_of"]
