"""The embedded default: a tiny local LLaVA model, a codebook made from it, and the local tasks.

``lmms-eval-redundancy demo`` runs ``python -m lmms_eval`` once per method on that model and prints
the token summary of each run next to its scores. Everything is built locally; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tabulate import tabulate

from lmms_eval_redundancy.codebook.store import Codebook, save_codebook

REPO = Path(__file__).resolve().parent.parent
TASKS = "tiny_image,tiny_multi_image,tiny_video,tiny_image_choice"


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


def run(out_dir: str | Path = "results/demo", batch_size: int = 2) -> list[dict]:
    """Build the embedded default if needed, evaluate each method on it, and return one row per run."""
    from lmms_eval_redundancy.localdata import DATA_DIR, generate
    from lmms_eval_redundancy.tiny import build_tiny_model

    out_dir = Path(out_dir).resolve()
    model_dir = out_dir / "model" / "llava"
    if not (model_dir / "config.json").is_file():
        build_tiny_model("llava", model_dir)
    codebook, threshold = tiny_codebook(model_dir, out_dir / "model" / "codebook.safetensors")
    if not (DATA_DIR / "tiny_video.parquet").is_file():
        generate()
    runs = {
        "none": "method=none",
        "random r=0.25": "method=random,retention=0.25",
        f"codebook t={threshold}": f"method=codebook,codebook={codebook},threshold={threshold}",
        "codebook r=0.25": f"method=codebook,codebook={codebook},retention=0.25",
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for label, args in runs.items():
        run_dir = out_dir / "runs" / label.replace(" ", "_").replace("=", "")
        print(f"[demo] {label}: python -m lmms_eval ... -> {run_dir}", flush=True)
        command = [sys.executable, "-m", "lmms_eval", "--model", "llava_redundancy",
                   "--model_args", f"pretrained={model_dir},{args}", "--tasks", TASKS,
                   "--include_path", str(REPO / "tasks" / "local"), "--output_path", str(run_dir),
                   "--batch_size", str(batch_size)]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"lmms_eval failed for {label}:\n{done.stderr[-4000:]}")
        results_file = max(run_dir.glob("*/*_results.json"), key=lambda p: p.stat().st_mtime)
        results = json.loads(results_file.read_text())["results"]
        tokens = json.loads(results_file.with_name(results_file.name.replace("_results", "_tokens")).read_text())
        row = {"run": label, "kept tokens": tokens["visual_tokens_after"], "of": tokens["visual_tokens_before"],
               "retention": round(tokens["achieved_retention"], 3), "floor hits": tokens["floor_hits"]}
        for task, metrics in sorted(results.items()):
            score = next(v for k, v in metrics.items() if k.endswith(",none") and "stderr" not in k)
            row[task] = round(score, 3)
        rows.append(row)
    print(tabulate(rows, headers="keys", tablefmt="github"))
    print("(random weights: the scores show the harness works, not model quality)")
    return rows
