"""Model families, chosen from a checkpoint's ``model_type``; ``FAMILIES`` is the one list of them."""

from pathlib import Path

import torch

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.families.base import Family, FamilyError
from lmms_eval_redundancy.families.llava import Llava
from lmms_eval_redundancy.families.llava_next import LlavaNext
from lmms_eval_redundancy.families.llava_onevision import LlavaOnevision
from lmms_eval_redundancy.families.tiny import build_tokenizer

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


def build_tiny_model(family: str, out_dir: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """Build a random tiny ``family`` checkpoint and save it (model, tokenizer, processors) to ``out_dir``."""
    cls = family_of(family)
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = cls.tiny_config(tokenizer, image_size, patch_size, cls.tiny_tower)
    torch.manual_seed(seed)
    model = cls.model_class(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    cls.tiny_processor(tokenizer, image_size, patch_size, cls.tiny_tower).save_pretrained(out_dir)
    return out_dir


__all__ = ["FAMILIES", "Family", "FamilyError", "UnsupportedModelError", "build_tiny_model", "family_of"]
