"""The embedded default: a tiny local LLaVA model, a codebook made from it, and the local tasks.

``lmms-eval-redundancy demo`` sweeps every method over the local tasks on that model (one ``lmms_eval``
run per cell) and prints the comparison table. Everything is built locally; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from lmms_eval_redundancy.codebook.store import Codebook, save_codebook

REPO = Path(__file__).resolve().parent.parent
TASKS = "tiny_image,tiny_multi_image,tiny_video,tiny_image_choice"  # one sweep task entry


@torch.no_grad()
def tiny_codebook(model_dir: str | Path, out: str | Path, rows: int = 6) -> tuple[Path, float]:
    """A codebook for a tiny LLaVA checkpoint: ``rows`` of its projected tokens of one noise image,
    and a threshold (median score of another image's tokens) that keeps about half of them."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lmms_eval_redundancy.methods.codebook import redundancy_scores

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    features = model.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output
    prototypes = features[0][:rows].clone()
    threshold = round(float(redundancy_scores(features[1], prototypes).median()), 4)
    meta = {"model": str(model_dir), "source": "demo: projected tokens of a noise image", "threshold": str(threshold)}
    return save_codebook(Codebook(prototypes, meta), out), threshold


def run(out_dir: str | Path = "results/demo", batch_size: int = 2) -> dict:
    """Build the embedded default if needed, sweep every method over the local tasks, print the comparison."""
    from lmms_eval_redundancy.compare import compare, markdown
    from lmms_eval_redundancy.localdata import DATA_DIR, generate
    from lmms_eval_redundancy.sweep import load_sweep, run_sweep
    from lmms_eval_redundancy.tiny import build_tiny_model

    out_dir = Path(out_dir).resolve()
    model_dir = out_dir / "model" / "llava"
    if not (model_dir / "config.json").is_file():
        build_tiny_model("llava", model_dir)
    codebook, threshold = tiny_codebook(model_dir, out_dir / "model" / "codebook.safetensors")
    if not (DATA_DIR / "tiny_video.parquet").is_file():
        generate()
    quarter = {"retention": [0.25]}
    spec = {
        "output": str(out_dir / "runs"),
        "models": [{"pretrained": str(model_dir), "name": "tiny-llava"}],
        "methods": [
            {"method": "codebook", "codebook": str(codebook), "budgets": {"threshold": [threshold], **quarter}},
            {"method": "random", "budgets": quarter},
            {"method": "divprune", "budgets": quarter},
            {"method": "fastervlm", "budgets": quarter},
            {"method": "pooling", "budgets": quarter},
            {"method": "fastv", "budgets": quarter},
        ],
        "tasks": [TASKS],
        "include_path": str(REPO / "tasks" / "local"),
        "lmms_eval": {"batch_size": batch_size},
    }
    spec_path = out_dir / "sweep.yaml"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    counts = run_sweep(load_sweep(spec_path), env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    tables = compare(out_dir / "runs", out_dir / "compare")
    for table in tables.values():
        print(markdown(table))
    print(f"sweep: ran {counts['ran']} cells ({counts['already_done']} already done); tables and plots in {out_dir / 'compare'}")
    print("(random weights: the scores show the harness works, not model quality)")
    return tables
