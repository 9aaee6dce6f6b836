"""The codebook file format, its loader and the importer for the paper's released ``.pt`` files.

Format: one ``.safetensors`` file holding the tensor ``prototypes`` ``[P, D]`` (rows are visual tokens
after the multimodal projector) and string metadata:

- ``format``: ``lmms-eval-redundancy-codebook/1``
- ``model``: the checkpoint the codebook belongs to; ``hidden_size``: D (the LLM hidden size)
- ``embedding_space``: ``post_projector``
- ``threshold``: the recommended ``threshold=`` budget, if known
- ``source``: how it was built or where it was imported from; ``settings``: JSON of the build settings
- ``image_ids``: JSON list, the source image of each row (if known)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmms_eval_redundancy.core.errors import UserError

FORMAT = "lmms-eval-redundancy-codebook/1"
EMBEDDING_SPACE = "post_projector"

# Models of the paper's releases, recognised from their folder names.
RELEASE_MODELS = {
    "llava15": ("llava-hf/llava-1.5-7b-hf", 0.45),
    "llavanext": ("lmms-lab/llama3-llava-next-8b", 0.11),
    "llavaov": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", 0.5),
}


class CodebookError(UserError):
    """A codebook file is missing, malformed, or does not fit the model."""


@dataclass
class Codebook:
    prototypes: torch.Tensor
    meta: dict

    @property
    def hidden_size(self) -> int:
        return int(self.prototypes.shape[1])

    def check_hidden_size(self, model_hidden_size: int) -> None:
        if self.hidden_size != model_hidden_size:
            raise CodebookError(
                f"codebook {self.meta.get('path')} has prototypes of size {self.hidden_size} "
                f"(built for {self.meta.get('model', 'an unknown model')}) but this model's LLM hidden size is "
                f"{model_hidden_size}; use a codebook built for this model "
                "(`lmms-eval-redundancy build-codebook`) or pick the matching checkpoint"
            )


def check_codebook_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CodebookError(f"codebook file not found: {path}; pass codebook=PATH to an existing .safetensors or release .pt")
    if path.suffix not in (".safetensors", ".pt"):
        raise CodebookError(f"codebook {path} is neither a .safetensors codebook nor a release .pt")
    return path


def _load_release_tensor(path: Path) -> torch.Tensor:
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a release tensor"
        raise CodebookError(f"cannot read {path} as a released codebook tensor: {err}") from err
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        raise CodebookError(f"{path} does not hold a 2-D tensor [prototypes, hidden size]")
    return tensor


def load_codebook(path: str | Path) -> Codebook:
    """Load a project codebook (``.safetensors``) or a release ``.pt`` (metadata read from its folder)."""
    path = check_codebook_path(path)
    if path.suffix == ".pt":
        return release_codebook(path)
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
        if meta.get("format") != FORMAT or "prototypes" not in handle.keys():
            raise CodebookError(f"{path} is not a codebook in format {FORMAT} (no 'prototypes' tensor or format tag)")
        prototypes = handle.get_tensor("prototypes")
    if prototypes.dim() != 2 or prototypes.shape[0] == 0:
        raise CodebookError(f"{path}: prototypes must be a non-empty [P, D] tensor, got {tuple(prototypes.shape)}")
    meta["path"] = str(path)
    return Codebook(prototypes, meta)


def _release_settings(folder: Path) -> dict:
    settings = {}
    for text_file in sorted(folder.glob("config*.txt")):
        for line in text_file.read_text().splitlines():
            match = re.match(r"\s*([\w.\-]+)\s*[:=]\s*(.+?)\s*$", line)
            if match:
                settings[match.group(1)] = match.group(2)
    return settings


def release_codebook(path: str | Path, model: str | None = None, threshold: float | None = None) -> Codebook:
    """A paper release ``.pt`` with metadata from the files beside it (image ids, configs)."""
    path = Path(path)
    prototypes = _load_release_tensor(path)
    known = next((v for k, v in RELEASE_MODELS.items() if k in path.parent.name), (None, None))
    ids_file = path.with_suffix(".json")
    image_ids = json.loads(ids_file.read_text()) if ids_file.is_file() else None
    meta = {
        "format": FORMAT,
        "model": model or known[0] or "unknown",
        "hidden_size": str(prototypes.shape[1]),
        "embedding_space": EMBEDDING_SPACE,
        "source": f"paper release {path.parent.name}/{path.name}",
        "settings": json.dumps(_release_settings(path.parent)),
        "path": str(path),
    }
    if threshold is not None or known[1] is not None:
        meta["threshold"] = str(threshold if threshold is not None else known[1])
    if image_ids is not None:
        meta["image_ids"] = json.dumps(image_ids)
    return Codebook(prototypes, meta)


def save_codebook(codebook: Codebook, out: str | Path) -> Path:
    """Write ``codebook`` in the project format; returns the file written."""
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / "codebook.safetensors" if out.is_dir() or not out.suffix else out.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in codebook.meta.items() if k != "path"}
    meta.update(format=FORMAT, hidden_size=str(codebook.hidden_size), embedding_space=EMBEDDING_SPACE)
    save_file({"prototypes": codebook.prototypes.contiguous()}, str(out), metadata=meta)
    return out


def import_release(release: str | Path, out: str | Path, model: str | None = None, threshold: float | None = None) -> Path:
    """Convert a paper release ``.pt`` into the project format at ``out``."""
    return save_codebook(release_codebook(check_codebook_path(release), model, threshold), out)
