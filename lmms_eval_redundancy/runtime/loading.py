"""Loading a LLaVA-family checkpoint (a folder, a hub id or ``builtin:NAME``) with its processor and family."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

import torch

from lmms_eval_redundancy.families import Family, family_of

BUILTIN = resources.files("lmms_eval_redundancy") / "builtin"  # models shipped with the package (data, no code)


def builtin_names() -> list[str]:
    return sorted(entry.name for entry in BUILTIN.iterdir() if (entry / "config.json").is_file())


def resolve_pretrained(pretrained: str) -> str:
    """``builtin:NAME`` -> the folder of a model shipped with the package; anything else unchanged."""
    if not str(pretrained).startswith("builtin:"):
        return pretrained
    name = str(pretrained).split(":", 1)[1]
    if name not in builtin_names():
        raise ValueError(f"unknown built-in model {pretrained!r}; built-in models: "
                         + ", ".join(f"builtin:{n}" for n in builtin_names()))
    return str(BUILTIN / name)


@dataclass(frozen=True)
class ProcessLayout:
    """This process's place in a data-parallel launch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def process_layout(accelerator=None) -> ProcessLayout:
    """Rank, world size and local rank from ``accelerator`` when it spans processes, else from the launcher's
    environment (torchrun / ``accelerate launch`` set it; on CPU-only machines accelerate reports one process)."""
    if accelerator is not None and accelerator.num_processes > 1:
        return ProcessLayout(accelerator.process_index, accelerator.num_processes, accelerator.local_process_index)
    return ProcessLayout(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                         int(os.environ.get("LOCAL_RANK", "0")))


def default_device(local_rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


@dataclass
class Loaded:
    """A model in eval mode with its processor and family."""

    model: torch.nn.Module
    processor: object
    family: Family
    path: str


def load(pretrained: str, *, device: str | torch.device | None = None, dtype: str | None = "auto",
         attn_implementation: str | None = None, device_map: str | None = None, revision: str = "main",
         trust_remote_code: bool = False) -> Loaded:
    """Load ``pretrained`` with ``from_pretrained``: the family's model class, the processor, the family.

    ``device`` defaults to this process's GPU (or the CPU); with ``device_map`` the model is placed by it.
    """
    from transformers import AutoConfig, AutoProcessor

    path = resolve_pretrained(pretrained)
    options = {"revision": revision, "trust_remote_code": trust_remote_code}
    family_class = family_of(AutoConfig.from_pretrained(path, **options).model_type)
    load_kwargs = {**options, "dtype": dtype if dtype in (None, "auto") else getattr(torch, str(dtype))}
    if attn_implementation:
        load_kwargs["attn_implementation"] = attn_implementation
    if device_map:
        load_kwargs["device_map"] = device_map
    model = family_class.model_class.from_pretrained(path, **load_kwargs).eval()
    if not device_map:
        model.to(device or default_device(process_layout().local_rank))
    processor = AutoProcessor.from_pretrained(path, **options)
    return Loaded(model, processor, family_class(model, processor), path)
