"""Sweep specs: cells, folder names, dry runs, Slurm scripts and multi-process commands (nothing runs)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch
import yaml

from lmms_eval_redundancy.codebook.store import Codebook, save_codebook
from lmms_eval_redundancy.tools.compare import markdown
from lmms_eval_redundancy.tools.sweep import dry_run, load_sweep, slurm_script


def write_spec(path: Path, model: str, out: Path, **extra) -> Path:
    spec = {
        "output": str(out),
        "models": [{"pretrained": model, "name": "tiny"}],
        "methods": [{"method": "random", "budgets": {"retention": [0.25, 0.5]}},
                    {"method": "fastv", "fastv_k": 2, "budgets": {"tokens": [4, 8]}}],
        "tasks": ["tiny_image"],
        "include_path": str(out / "tasks"),
        "model_args": {"dtype": "float32"},
        "lmms_eval": {"batch_size": 2, "log_samples": True},
        **extra,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cells_are_the_reference_plus_methods_times_budgets(tmp_path):
    sweep = load_sweep(write_spec(tmp_path / "spec.yaml", "tiny/llava", tmp_path / "out"))
    assert [(c.method, c.params) for c in sweep.cells] == [
        ("none", ()), ("random", (("retention", 0.25),)), ("random", (("retention", 0.5),)),
        ("fastv", (("fastv_k", 2), ("tokens", 4))), ("fastv", (("fastv_k", 2), ("tokens", 8)))]
    listing = dry_run(sweep)
    assert listing.count("todo") == 5 and "--model_args pretrained=" in listing and "method=fastv" in listing
    assert "fastv_k-2_tokens-4" in str(sweep.cells[3].folder)


def test_a_codebook_appears_in_folder_names_by_stem_and_content_hash(tmp_path):
    (tmp_path / "a").mkdir()
    codebook = save_codebook(Codebook(torch.ones(2, 4), {"model": "m"}), tmp_path / "a" / "cb.safetensors")
    spec = write_spec(tmp_path / "spec.yaml", "tiny/llava", tmp_path / "out",
                      methods=[{"method": "codebook", "codebook": str(codebook), "budgets": {"threshold": [0.5]}}])
    folder = load_sweep(spec).cells[1].folder.relative_to(tmp_path / "out")
    assert str(tmp_path) not in str(folder) and "/a/" not in str(folder)
    assert folder.parts[1].startswith("codebook_codebook-cb-") and folder.parts[1].endswith("_threshold-0.5")


def test_slurm_script_runs_one_cell_per_array_task(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "tiny/llava", tmp_path / "out", slurm={"partition": "gpu", "time": "04:00:00"})
    script = slurm_script(load_sweep(spec))
    assert "#SBATCH --array=0-4\n" in script and "#SBATCH --partition=gpu\n" in script and "#SBATCH --time=04:00:00\n" in script
    assert script.rstrip().endswith(f'sweep {spec.resolve()} --cell "$SLURM_ARRAY_TASK_ID"')


def test_multi_process_cells_go_through_accelerate(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "tiny/llava", tmp_path / "out",
                      accelerate={"num_processes": 8, "launch_args": ["--num_machines", 2]})
    line = dry_run(load_sweep(spec)).splitlines()[1]
    assert "accelerate.commands.launch --multi_gpu --num_processes 8 --num_machines 2 -m lmms_eval" in line


def test_compare_never_shows_a_missing_cell_as_zero():
    table = pd.DataFrame({"run": ["none", "random"], "task (acc)": [0.5, math.nan]})
    assert markdown(table).splitlines()[-1].split("|")[2].strip() == "—"
