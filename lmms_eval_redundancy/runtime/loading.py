"""Loading a LLaVA-family checkpoint (a folder, a hub id or ``builtin:NAME``) with its processor and family.

Bad options and broken checkpoint files are refused as ``UserError``s that name the file and the fix,
before any weights load where that can be known up front.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.families import Family, family_of

BUILTIN = resources.files("lmms_eval_redundancy") / "builtin"  # models shipped with the package (data, no code)
PRETRAINED_FORMS = ("a LLaVA-family checkpoint folder (with config.json), a hub id such as llava-hf/llava-1.5-7b-hf, "
                    "or builtin:NAME")
RESAVE = ("check that it is a whole checkpoint saved with save_pretrained (config.json, *.safetensors weights, "
          "tokenizer and processor files): download it again or save it again")


def builtin_names() -> list[str]:
    return sorted(entry.name for entry in BUILTIN.iterdir() if (entry / "config.json").is_file())


def resolve_pretrained(pretrained: str) -> str:
    """``builtin:NAME`` -> the folder of a model shipped with the package; a local path -> itself, once checked to
    be a checkpoint folder; anything else (a hub id) unchanged."""
    text = str(pretrained)
    if text.startswith("builtin:"):
        name = text.split(":", 1)[1]
        if name not in builtin_names():
            raise UserError(f"unknown built-in model {text!r}; built-in models: "
                            + ", ".join(f"builtin:{n}" for n in builtin_names()))
        return str(BUILTIN / name)
    path = Path(text).expanduser()
    if path.exists() or text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1:
        check_checkpoint_folder(path)
        return str(path)
    return text


def check_checkpoint_folder(path: Path) -> None:
    """Refuse a missing folder, a file, a folder without ``config.json`` and unreadable ``*.safetensors`` weights."""
    if not path.exists():
        raise UserError(f"pretrained={path}: no such folder; give {PRETRAINED_FORMS}")
    if not path.is_dir():
        raise UserError(f"pretrained={path} is a file, not a checkpoint folder; give {PRETRAINED_FORMS}")
    if not (path / "config.json").is_file():
        raise UserError(f"pretrained={path} has no config.json, so it is not a checkpoint folder; give {PRETRAINED_FORMS}")
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(f"weights file {weights} cannot be read as safetensors ({err}): it is truncated or in "
                            f"another format; {RESAVE}") from err


def torch_dtype(dtype: str | None):
    """``None``/``"auto"`` unchanged, else the torch floating-point dtype of that name."""
    if dtype in (None, "auto"):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UserError(f"dtype={dtype!r} is not a floating-point torch dtype; use auto (the checkpoint's), float16, "
                        "bfloat16 or float32")
    return value


def check_attn_implementation(name: str | None) -> None:
    """Refuse an attention implementation transformers does not know (``org/name`` hub kernels are its to check)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name and "/" not in name and name not in known:
        raise UserError(f"attn_implementation={name!r} is not one of {', '.join(known)}; leave it out for "
                        "transformers' default (sdpa)")


def check_device(device) -> None:
    """Refuse a device string torch cannot parse, or a device this machine does not have."""
    if device is None:
        return
    usage = "use device=cpu, cuda or cuda:N, or leave device out (a GPU when there is one, else the CPU)"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"device={device!r} is not a device; {usage}") from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)
    count = backend.device_count() if hasattr(backend, "device_count") else 0
    if (parsed.index or 0) >= count:
        raise UserError(f"device={device} is not available: this machine has {count} {parsed.type} device(s); {usage}")


def check_torchvision() -> None:
    """Refuse to load without torchvision: the image and video processors run on it (on the model's device),
    where transformers would otherwise fall back to its PIL processors on the CPU."""
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        raise UserError("torchvision is not installed, and llava_redundancy preprocesses images and videos with "
                        "transformers' torchvision-backed processors (on the model's device): install it with "
                        "`pip install torchvision` (a dependency of lmms-eval-redundancy; pick the build matching "
                        "your torch)")


@contextlib.contextmanager
def reading_checkpoint(pretrained: str, path: str):
    """transformers' errors while reading ``path`` as ``UserError``s naming the checkpoint and the fix."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, EOFError, SafetensorError, pickle.UnpicklingError) as err:
        fix = RESAVE if Path(path).is_dir() else "check the hub id and the network (HF_HUB_OFFLINE=1 reads the local cache only)"
        raise UserError(f"cannot load the checkpoint {pretrained}: {str(err).rstrip('.')}; {fix}; pretrained= takes "
                        f"{PRETRAINED_FORMS}") from err


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

    check_attn_implementation(attn_implementation)
    check_device(device)
    check_torchvision()
    path = resolve_pretrained(pretrained)
    options = {"revision": revision, "trust_remote_code": trust_remote_code}
    load_kwargs = {**options, "dtype": torch_dtype(dtype)}
    with reading_checkpoint(pretrained, path):
        config = AutoConfig.from_pretrained(path, **options)
    family_class = family_of(config.model_type)
    if attn_implementation:
        load_kwargs["attn_implementation"] = attn_implementation
    if device_map:
        load_kwargs["device_map"] = device_map
    with reading_checkpoint(pretrained, path):
        model = family_class.model_class.from_pretrained(path, **load_kwargs).eval()
        processor = AutoProcessor.from_pretrained(path, backend="torchvision", **options)
    if not device_map:
        model.to(device or default_device(process_layout().local_rank))
    return Loaded(model, processor, family_class(model, processor), path)
