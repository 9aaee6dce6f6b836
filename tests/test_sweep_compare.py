"""Sweeps on the tiny model and local tasks: cells, resuming, Slurm emission, processes; compare's numbers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO

from lmms_eval_redundancy.compare import compare, markdown
from lmms_eval_redundancy.sweep import dry_run, load_sweep, run_sweep, slurm_script

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_spec(path: Path, model: Path, out: Path, **extra) -> Path:
    spec = {
        "output": str(out),
        "models": [{"pretrained": str(model), "name": "tiny"}],
        "methods": [{"method": "random", "budgets": {"retention": [0.25, 0.5]}},
                    {"method": "fastv", "fastv_k": 2, "budgets": {"tokens": [4, 8]}}],
        "tasks": ["tiny_image"],
        "include_path": str(REPO / "tasks" / "local"),
        "model_args": {"dtype": "float32"},
        "lmms_eval": {"batch_size": 2, "log_samples": True},
        **extra,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def swept(tiny_models, local_data, tmp_path_factory):
    """The 5-cell sweep, run as: cells 0 and 2, a half-written cell 1, then everything."""
    root = tmp_path_factory.mktemp("sweep")
    sweep = load_sweep(write_spec(root / "spec.yaml", tiny_models["llava"], root / "out"))
    cwd = Path.cwd()
    os.chdir(REPO)  # local task data paths are relative to the repository
    try:
        first = [run_sweep(sweep, only=i, env=ENV) for i in (0, 2)]
        sweep.cells[1].folder.mkdir(parents=True)
        (sweep.cells[1].folder / "partial_results.json").write_text("{")
        counts = run_sweep(sweep, env=ENV)
    finally:
        os.chdir(cwd)
    return sweep, first, counts


def test_cells_are_the_reference_plus_methods_times_budgets(tiny_models, tmp_path):
    sweep = load_sweep(write_spec(tmp_path / "spec.yaml", tiny_models["llava"], tmp_path / "out"))
    assert [(c.method, c.params) for c in sweep.cells] == [
        ("none", ()), ("random", (("retention", 0.25),)), ("random", (("retention", 0.5),)),
        ("fastv", (("fastv_k", 2), ("tokens", 4))), ("fastv", (("fastv_k", 2), ("tokens", 8)))]
    listing = dry_run(sweep)
    assert listing.count("todo") == 5 and "--model_args pretrained=" in listing and "method=fastv" in listing
    assert "fastv_k-2_tokens-4" in str(sweep.cells[3].folder)


def test_slurm_script_runs_one_cell_per_array_task(tiny_models, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", tiny_models["llava"], tmp_path / "out", slurm={"partition": "gpu", "time": "04:00:00"})
    script = slurm_script(load_sweep(spec))
    assert "#SBATCH --array=0-4\n" in script and "#SBATCH --partition=gpu\n" in script and "#SBATCH --time=04:00:00\n" in script
    assert script.rstrip().endswith(f'sweep {spec.resolve()} --cell "$SLURM_ARRAY_TASK_ID"')


def test_multi_process_cells_go_through_accelerate(tiny_models, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", tiny_models["llava"], tmp_path / "out",
                      accelerate={"num_processes": 8, "launch_args": ["--num_machines", 2]})
    line = dry_run(load_sweep(spec)).splitlines()[1]
    assert "accelerate.commands.launch --multi_gpu --num_processes 8 --num_machines 2 -m lmms_eval" in line


def test_an_interrupted_sweep_completes_only_the_missing_cells(swept):
    sweep, first, counts = swept
    assert first == [{"ran": 1, "already_done": 0}] * 2
    assert counts == {"ran": 3, "already_done": 2}
    assert all(cell.done for cell in sweep.cells)
    assert not (sweep.cells[1].folder / "partial_results.json").exists()


def test_compare_tables_match_the_results_files(swept):
    sweep, _, _ = swept
    out = sweep.cells[0].folder.parents[1] / "compare"
    (table,) = compare(sweep.cells[0].folder.parents[1], out).values()
    reference = None
    for cell in sweep.cells:
        (results_file,) = cell.folder.glob("*/*_results.json")
        tokens = json.loads(results_file.with_name(results_file.name.replace("_results", "_tokens")).read_text())
        score = json.loads(results_file.read_text())["results"]["tiny_image"]["exact_match,none"]
        label = "none" if cell.method == "none" else f"{cell.method} {tokens['settings']['budget']}"
        row = table[table["run"].str.startswith(label)].iloc[0]
        assert row["tiny_image (exact_match)"] == score
        assert row["retained tokens / sample"] == pytest.approx(tokens["visual_tokens_after"] / tokens["samples_with_visuals"])
        assert row["achieved retention"] == pytest.approx(tokens["achieved_retention"])
        efficiency = tokens["efficiency"]["generate_until"]
        flops = efficiency["llm_prefill_flops_per_sample"] + efficiency["vision_flops_per_sample"]
        reference = reference or (flops, efficiency["prefill_seconds_per_sample"])
        assert row["FLOPs ratio"] == pytest.approx(flops / reference[0])
        assert row["prefill speed-up"] == pytest.approx(reference[1] / efficiency["prefill_seconds_per_sample"])
    for suffix in (".md", ".csv", ".tex"):
        assert (out / f"llava{suffix}").is_file()
    assert (out / "llava_score_vs_tokens.png").is_file() and (out / "llava_pareto_prefill.png").is_file()
    # the random model scores 0 everywhere, so "% of unpruned" is undefined: shown as missing, never as zero
    assert table["% of unpruned (mean)"].isna().all()
    assert "| —" in (out / "llava.md").read_text() and ",," in (out / "llava.csv").read_text().replace(",\n", ",,\n")


def test_compare_never_shows_a_missing_cell_as_zero():
    table = pd.DataFrame({"run": ["none", "random"], "task (acc)": [0.5, math.nan]})
    assert markdown(table).splitlines()[-1].split("|")[2].strip() == "—"


def test_two_processes_give_the_same_outputs_as_one(swept, tiny_models, tmp_path):
    sweep, _, _ = swept
    spec = write_spec(tmp_path / "spec.yaml", tiny_models["llava"], tmp_path / "out", accelerate={"num_processes": 2},
                      methods=[{"method": "random", "budgets": {"retention": [0.25]}}])
    parallel = load_sweep(spec)
    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        assert run_sweep(parallel, env=ENV) == {"ran": 2, "already_done": 0}
    finally:
        os.chdir(cwd)

    def outputs(cell):
        (samples,) = cell.folder.glob("*/*_samples_tiny_image.jsonl")
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        return sorted((r["doc_id"], r["filtered_resps"][0], r["exact_match"]) for r in rows)

    for one, two in zip(sweep.cells[:2], parallel.cells):
        assert (one.method, one.params) == (two.method, two.params)
        assert outputs(two) == outputs(one)
