"""The embedded default: the built-in shapes model, its committed codebook and the shapes benchmark.

``lmms-eval-redundancy demo`` sweeps every method at several budgets (the codebook at its thresholds)
over ``shapes_image``, ``shapes_multi_image`` and ``shapes_video`` against the unpruned model, one
``lmms_eval`` run per cell, then writes the comparison tables and plots. Nothing is downloaded; a rerun
skips finished cells.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CODEBOOK = REPO / "codebooks" / "shapes" / "codebook.safetensors"
TASKS = "shapes_image,shapes_multi_image,shapes_video"  # one sweep task entry: one lmms_eval run per cell
RETENTIONS = [0.05, 0.1, 0.25, 0.5]


def sweep_spec(out_dir: Path, batch_size: int) -> dict:
    """The sweep of the main job: every method at ``RETENTIONS``, the codebook also at its thresholds."""
    from lmms_eval_redundancy.codebook.store import load_codebook

    thresholds = json.loads(load_codebook(CODEBOOK).meta["thresholds"])
    budgets = {"retention": RETENTIONS}
    return {
        "output": str(out_dir / "runs"),
        "models": [{"pretrained": "builtin:shapes", "name": "shapes"}],
        "methods": [
            {"method": "codebook", "codebook": str(CODEBOOK), "budgets": {"threshold": thresholds, **budgets}},
            *({"method": method, "budgets": budgets} for method in ("fastv", "fastervlm", "divprune", "random")),
            {"method": "pooling", "anyres": "base_only", "budgets": budgets},  # pooling needs one token grid
        ],
        "tasks": [TASKS],
        "include_path": str(REPO / "tasks" / "local"),
        "lmms_eval": {"batch_size": batch_size},
    }


def run(out_dir: str | Path = "results", batch_size: int = 16) -> dict:
    """Sweep every method over the shapes tasks on ``builtin:shapes``, then print and write the comparison."""
    from lmms_eval_redundancy import shapes
    from lmms_eval_redundancy.compare import compare, markdown
    from lmms_eval_redundancy.sweep import load_sweep, run_sweep

    out_dir = Path(out_dir).resolve()
    if not (shapes.DATA_DIR / "shapes_video.parquet").is_file():
        shapes.generate()
    spec_path = out_dir / "sweep.yaml"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(yaml.safe_dump(sweep_spec(out_dir, batch_size), sort_keys=False))
    counts = run_sweep(load_sweep(spec_path), env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    tables = compare(out_dir / "runs", out_dir / "compare")
    for table in tables.values():
        print(markdown(table))
    print(f"sweep: ran {counts['ran']} cells ({counts['already_done']} already done); tables and plots in {out_dir / 'compare'}")
    return tables
