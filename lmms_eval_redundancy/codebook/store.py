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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.files import write_atomically

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


REMAKE = ("rebuild it with `lmms-eval-redundancy build-codebook`, or convert the paper's release .pt with "
          "`lmms-eval-redundancy import-codebook`")


def check_codebook_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise CodebookError(f"codebook {path} is a folder; pass codebook=PATH to a codebook .safetensors file or a release .pt")
    if not path.is_file():
        raise CodebookError(f"codebook file not found: {path}; pass codebook=PATH to an existing .safetensors or "
                            f"release .pt, or {REMAKE}")
    if path.suffix not in (".safetensors", ".pt"):
        raise CodebookError(f"codebook {path} is neither a .safetensors codebook nor a release .pt")
    return path


def _checked_prototypes(prototypes: torch.Tensor, path: Path) -> torch.Tensor:
    """``prototypes`` if they are a non-empty ``[P, D]`` floating-point tensor of finite values."""
    if prototypes.dim() != 2 or 0 in prototypes.shape:
        raise CodebookError(f"codebook {path}: prototypes must be a non-empty [P, D] tensor, got "
                            f"{tuple(prototypes.shape)}; {REMAKE}")
    if not prototypes.is_floating_point():
        raise CodebookError(f"codebook {path}: prototypes are {prototypes.dtype}, not floating point; {REMAKE}")
    non_finite = int((~torch.isfinite(prototypes)).sum())
    if non_finite:
        raise CodebookError(f"codebook {path}: {non_finite} of its {prototypes.numel()} prototype values are not finite "
                            f"(NaN or inf); {REMAKE}")
    return prototypes


def _load_release_tensor(path: Path) -> torch.Tensor:
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a release tensor"
        raise CodebookError(f"cannot read {path} as a released codebook tensor: {err}; it is truncated or not the "
                            "paper's release .pt: download the release again") from err
    if not isinstance(tensor, torch.Tensor):
        raise CodebookError(f"{path} does not hold a 2-D tensor [prototypes, hidden size] but {type(tensor).__name__}; "
                            "import-codebook reads the paper's released .pt files")
    return _checked_prototypes(tensor, path)


def _read_safetensors(path: Path) -> Codebook:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta, names = dict(handle.metadata() or {}), list(handle.keys())
            if meta.get("format") != FORMAT or "prototypes" not in names:
                raise CodebookError(f"{path} is not a codebook in format {FORMAT} (tensors {names}, format tag "
                                    f"{meta.get('format')!r}; a codebook holds 'prototypes'); {REMAKE}")
            prototypes = handle.get_tensor("prototypes")
    except SafetensorError as err:
        raise CodebookError(f"codebook {path} is not a readable .safetensors file ({err}): it is truncated or in "
                            f"another format; {REMAKE}") from None
    except OSError as err:
        raise CodebookError(f"cannot read codebook {path}: {err}; check that the file exists and is readable") from None
    return Codebook(_checked_prototypes(prototypes, path), {**meta, "path": str(path)})


def load_codebook(path: str | Path) -> Codebook:
    """Load a project codebook (``.safetensors``) or a release ``.pt`` (metadata read from its folder), refusing
    unreadable files and prototypes that are empty, not ``[P, D]`` or not finite."""
    path = check_codebook_path(path)
    return release_codebook(path) if path.suffix == ".pt" else _read_safetensors(path)


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
    """Write ``codebook`` in the project format, all or nothing; returns the file written."""
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / "codebook.safetensors" if out.is_dir() or not out.suffix else out.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in codebook.meta.items() if k != "path"}
    meta.update(format=FORMAT, hidden_size=str(codebook.hidden_size), embedding_space=EMBEDDING_SPACE)
    write_atomically(out, save({"prototypes": codebook.prototypes.contiguous()}, metadata=meta))
    return out


def import_release(release: str | Path, out: str | Path, model: str | None = None, threshold: float | None = None) -> Path:
    """Convert a paper release ``.pt`` into the project format at ``out``."""
    release = check_codebook_path(release)
    if release.suffix == ".safetensors":
        raise CodebookError(f"{release} is a .safetensors codebook, already in this project's format: use it directly "
                            f"(codebook={release}); import-codebook converts the paper's released .pt files")
    return save_codebook(release_codebook(release, model, threshold), out)
