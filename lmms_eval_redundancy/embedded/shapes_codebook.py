"""The built-in shapes model's codebook, built by the project's builder from generated training scenes."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lmms_eval_redundancy.codebook.builder import build_codebook, load_settings
from lmms_eval_redundancy.codebook.store import Codebook, load_codebook, save_codebook
from lmms_eval_redundancy.core.budget import KEEP_ALL
from lmms_eval_redundancy.core.files import product_folder
from lmms_eval_redundancy.core.registry import UNPRUNED, build_method
from lmms_eval_redundancy.embedded import shapes
from lmms_eval_redundancy.embedded.training import TrainSettings
from lmms_eval_redundancy.methods.codebook import redundancy_scores
from lmms_eval_redundancy.runtime.engine import PruningEngine
from lmms_eval_redundancy.runtime.loading import load

CODEBOOK = product_folder("codebooks") / "shapes" / "codebook.safetensors"  # what the main job uses


def prunable_tokens(loaded, images: list[bytes]) -> list[torch.Tensor]:
    """The LLM-input tokens of each PNG image that pruning chooses from (every view; newlines left out)."""
    engine = PruningEngine(loaded.model, loaded.processor, loaded.family, build_method(UNPRUNED, KEEP_ALL))
    tokens = []
    for data in images:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = engine.processor_inputs([loaded.processor.image_token], [[image]], [])
        (visual,) = engine.pipeline(inputs, [1], [0], ["codebook"]).visuals[0]
        tokens.append(visual.features[~visual.newline])
    return tokens


def build_shapes_codebook(out_dir: str | Path, images: int = 256, threshold_images: int = 64,
                          keep_fractions: tuple[float, ...] = (0.1, 0.25, 0.5), pretrained: str = "builtin:shapes") -> Path:
    """The shapes model's codebook, built by ``build-codebook`` (preset ``shapes``) from training images.

    The images are the first ``images`` single-image scenes of the training data (``TrainSettings.data_seed``).
    The codebook's ``thresholds`` are the redundancy scores below which ``keep_fractions`` of the
    prunable tokens (base view and crops, as ``anyres=full`` prunes them) of the next ``threshold_images``
    training scenes fall (the middle one is ``threshold``).
    """
    out_dir = Path(out_dir)
    train = TrainSettings()
    docs = shapes.image_docs(images + threshold_images, np.random.default_rng([train.data_seed, 0]), train.canvas)
    settings = load_settings("shapes")
    with tempfile.TemporaryDirectory() as folder:
        for doc in docs[:images]:
            Path(folder, f"train{doc['id']:05d}.png").write_bytes(doc["image"]["bytes"])
        path = build_codebook(pretrained, folder, out_dir, settings)
    shutil.rmtree(out_dir / "probes", ignore_errors=True)
    codebook = load_codebook(path)
    loaded = load(pretrained, device="cpu")
    scores = torch.cat([redundancy_scores(tokens, codebook.prototypes)
                        for tokens in prunable_tokens(loaded, [doc["image"]["bytes"] for doc in docs[images:]])])
    thresholds = [round(float(scores.quantile(q)), 4) for q in keep_fractions]
    meta = {**codebook.meta, "model": pretrained, "thresholds": json.dumps(thresholds),
            "threshold": str(thresholds[len(thresholds) // 2]),
            "thresholds_keep": json.dumps(list(keep_fractions))}
    return save_codebook(Codebook(codebook.prototypes, meta), path)
