"""The main job on the embedded default: the built-in shapes model, its shipped codebook, the shapes benchmark.

``lmms-eval-redundancy demo`` sweeps every registered method at several budgets (threshold budgets at the
codebook's calibrated thresholds) over ``shapes_image``, ``shapes_multi_image`` and ``shapes_video``
against the unpruned model, one ``lmms_eval`` run per cell, then writes the comparison tables and plots.
Everything it writes goes under its output folder (default ``./results``); nothing is downloaded; a
rerun skips finished cells. The runs go to ``runs/<inputs_stamp>``, so runs of another version of the
model, codebook or benchmark data are never reused (nor deleted). A cell failing because of the Python
environment (an import error, an unsupported version) stops the job at once with that error and the fix;
when no cell finished there is nothing to compare, and the job ends with the cells' errors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from lmms_eval_redundancy.codebook.store import load_codebook
from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.files import write_atomically
from lmms_eval_redundancy.core.registry import (
    UNPRUNED,
    available_methods,
    file_params,
    method_class,
    param_names,
)
from lmms_eval_redundancy.embedded.shapes_codebook import CODEBOOK
from lmms_eval_redundancy.embedded.tasks import data_stamp, write_local_tasks
from lmms_eval_redundancy.runtime.loading import BUILTIN

TASKS = "shapes_image,shapes_multi_image,shapes_video"  # one sweep task entry: one lmms_eval run per cell
RETENTIONS = [0.1, 0.25]  # every method at two budgets keeps the main job within 10 minutes on 2 cores
SHAPES_DOCS = 96


def inputs_stamp() -> str:
    """What the main job's scores depend on besides the code of the methods: the model, the codebook, the data."""
    digest = hashlib.sha256(data_stamp(SHAPES_DOCS).encode())
    for path in (Path(str(BUILTIN / "shapes" / "model.safetensors")), CODEBOOK):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def shapes_clip_text(folder: Path) -> Path:
    """A seeded tiny CLIP text tower (and visual projection) as wide as the shapes model's vision tower, built into
    ``folder``: the shapes tower has no CLIP text tower of its own, so ``cdpruner``'s relevance term on it is
    uninformative (random text and projection weights); its similarity term is the model's own."""
    from transformers import AutoConfig

    from lmms_eval_redundancy.families.tiny import build_tiny_clip

    width = AutoConfig.from_pretrained(str(BUILTIN / "shapes")).vision_config.hidden_size
    return build_tiny_clip(folder, vision_width=width)


def method_entries(clip_text: Path | None = None) -> list[dict]:
    """One sweep entry per registered method, from what it declares: its budgets, file parameters, grid need,
    a ``clip_text`` checkpoint (``clip_text``)."""
    meta = load_codebook(CODEBOOK).meta
    calibrated = dict(zip(json.loads(meta["thresholds_keep"]), json.loads(meta["thresholds"])))
    thresholds = [calibrated[retention] for retention in RETENTIONS]  # the thresholds that keep those shares
    entries = []
    for name in available_methods():
        cls = method_class(name)
        if name == UNPRUNED:
            continue  # the sweep adds the unpruned reference itself
        budgets = {"retention": RETENTIONS} if "retention" in cls.budgets else {}
        if "threshold" in cls.budgets:
            budgets["threshold"] = thresholds
        entry = {"method": name, **{param: str(CODEBOOK) for param in file_params(name)}}
        if "clip_text" in param_names(name):
            entry["clip_text"] = str(clip_text)
        if cls.needs_grid:
            entry["anyres"] = "base_only"  # the model's single images are anyres; one token grid is the base view
        entries.append({**entry, "budgets": budgets})
    return entries


def sweep_spec(runs_dir: Path, tasks_dir: Path, batch_size: int) -> dict:
    """The sweep of the main job: every method at ``RETENTIONS``, threshold budgets at the codebook's thresholds
    (``cdpruner`` with the tiny CLIP of ``shapes_clip_text``, built beside ``tasks_dir``)."""
    return {
        "output": str(runs_dir),
        "models": [{"pretrained": "builtin:shapes", "name": "shapes"}],
        "methods": method_entries(shapes_clip_text(tasks_dir.parent / "clip_text")),
        "tasks": [TASKS],
        "include_path": str(tasks_dir),
        "lmms_eval": {"batch_size": batch_size},
    }


def run(out_dir: str | Path = "results", batch_size: int = 16) -> dict:
    """Sweep every method over the shapes tasks on ``builtin:shapes``, then print and write the comparison."""
    from lmms_eval_redundancy.tools.compare import compare, markdown
    from lmms_eval_redundancy.tools.sweep import failure_report, load_sweep, run_sweep

    out_dir = Path(out_dir).resolve()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {out_dir}: {err.strerror}; give --out a folder you can write") from None
    tasks_dir = write_local_tasks(out_dir / "tasks", shapes_docs=SHAPES_DOCS)
    runs_dir = out_dir / "runs" / inputs_stamp()
    spec_path = out_dir / "sweep.yaml"
    write_atomically(spec_path, yaml.safe_dump(sweep_spec(runs_dir, tasks_dir, batch_size), sort_keys=False))
    sweep = load_sweep(spec_path)
    counts = run_sweep(sweep, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if not any(cell.done for cell in sweep.cells):
        raise SystemExit(f"{failure_report(counts['failed'])}\nno cell finished, so there is nothing to compare")
    tables, _ = compare(runs_dir, out_dir / "compare")
    for table in tables.values():
        print(markdown(table))
    print(f"sweep: ran {counts['ran']} cells ({counts['already_done']} already done); tables and plots in {out_dir / 'compare'}")
    if counts["failed"]:
        raise SystemExit(failure_report(counts["failed"]))
    return tables
