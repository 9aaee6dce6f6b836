"""Model families, chosen from a checkpoint's ``model_type``; ``FAMILIES`` is the one list of them."""

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.families.base import Family, FamilyError
from lmms_eval_redundancy.families.llava import Llava
from lmms_eval_redundancy.families.llava_next import LlavaNext
from lmms_eval_redundancy.families.llava_onevision import LlavaOnevision

FAMILIES: dict[str, type[Family]] = {family.name: family for family in (Llava, LlavaNext, LlavaOnevision)}


class UnsupportedModelError(UserError):
    """The checkpoint is not one of the LLaVA families this project supports."""


def family_of(model_type: str) -> type[Family]:
    """The family class for a config ``model_type``."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; llava_redundancy runs checkpoints of type "
            f"{', '.join(FAMILIES)} (llava-hf LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision)"
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "FamilyError", "UnsupportedModelError", "family_of"]
