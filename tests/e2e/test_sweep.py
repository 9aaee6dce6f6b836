"""A sweep on the tiny model: interrupted and resumed through real ``lmms_eval`` runs; compare's numbers."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import yaml

from lmms_eval_redundancy.tools.compare import compare
from lmms_eval_redundancy.tools.sweep import dry_run, load_sweep, run_sweep


@pytest.fixture(scope="module")
def swept(tiny_models, local_tasks, tmp_path_factory):
    """The 4-cell sweep, run as: cells 0 and 2, a half-written cell 1, then everything."""
    root = tmp_path_factory.mktemp("sweep")
    spec = {
        "output": str(root / "out"),
        "models": [{"pretrained": str(tiny_models["llava"]), "name": "tiny"}],
        "methods": [{"method": "random", "budgets": {"retention": [0.25, 0.5]}},
                    {"method": "fastv", "fastv_k": 2, "budgets": {"tokens": [4]}}],
        "tasks": ["tiny_image"],
        "include_path": str(local_tasks),
        "model_args": {"dtype": "float32"},
        "lmms_eval": {"batch_size": 2, "log_samples": True},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    sweep = load_sweep(root / "spec.yaml")
    sweep.spec = spec
    first = [run_sweep(sweep, only=i) for i in (0, 2)]
    sweep.cells[1].folder.mkdir(parents=True)
    (sweep.cells[1].folder / "partial_results.json").write_text("{")
    counts = run_sweep(sweep)
    return sweep, first, counts


def test_an_interrupted_sweep_completes_only_the_missing_cells(swept):
    sweep, first, counts = swept
    assert first == [{"ran": 1, "already_done": 0, "failed": []}] * 2
    assert counts == {"ran": 2, "already_done": 2, "failed": []}
    assert all(cell.done for cell in sweep.cells)
    assert not (sweep.cells[1].folder / "partial_results.json").exists()


def test_compare_tables_match_the_results_files(swept):
    sweep, _, _ = swept
    out = sweep.cells[0].folder.parents[1] / "compare"
    tables, duplicates = compare(sweep.cells[0].folder.parents[1], out)
    (table,) = tables.values()
    assert duplicates == [] and len(table) == len(sweep.cells)
    reference = None
    for cell in sweep.cells:
        (results_file,) = cell.folder.glob("*/*_results.json")
        tokens = json.loads(results_file.with_name(results_file.name.replace("_results", "_tokens")).read_text())
        score = json.loads(results_file.read_text())["results"]["tiny_image"]["exact_match,none"]
        label = "none" if cell.method == "none" else f"{cell.method} {tokens['settings']['budget']}"
        row = table[table["run"].str.startswith(label)].iloc[0]
        assert row["tiny_image (exact_match)"] == score
        assert row["tokens after last cut / sample"] == pytest.approx(tokens["visual_tokens_after"] / tokens["samples_with_visuals"])
        assert row["achieved retention"] == pytest.approx(tokens["achieved_retention"])
        efficiency = tokens["efficiency"]["generate_until"]
        flops = efficiency["llm_prefill_flops_per_sample"] + efficiency["vision_flops_per_sample"]
        device_prefill = {sample["doc_id"]: sample["efficiency"]["device_prefill_seconds"] for sample in tokens["per_sample"]
                          if sample["efficiency"]["batch_index"] > 0}  # after the warm-up batch
        reference = reference or (flops, device_prefill)
        assert row["FLOPs ratio"] == pytest.approx(flops / reference[0])
        ratios = [reference[1][doc] / seconds for doc, seconds in device_prefill.items()]
        assert len(ratios) >= 2 and row["device prefill speed-up"] == pytest.approx(statistics.median(ratios))
    for suffix in (".md", ".csv", ".tex"):
        assert (out / f"llava{suffix}").is_file()
    assert (out / "llava_score_vs_tokens.png").is_file() and (out / "llava_pareto_prefill.png").is_file()
    # the random model scores 0 everywhere, so "% of unpruned" is undefined: shown as missing, never as zero
    assert table["% of unpruned (mean)"].isna().all()
    assert "| —" in (out / "llava.md").read_text() and ",," in (out / "llava.csv").read_text().replace(",\n", ",,\n")


def test_a_failing_cell_is_recorded_the_others_run_and_the_sweep_exits_non_zero_naming_it(swept, tmp_path):
    sweep, _, _ = swept
    spec = {**sweep.spec, "methods": [{"method": "fastv", "fastv_k": 99, "budgets": {"tokens": [4]}},
                                      {"method": "random", "budgets": {"retention": [0.25]}}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run([sys.executable, "-m", "lmms_eval_redundancy.cli", "sweep", str(tmp_path / "spec.yaml")],
                          capture_output=True, text=True, timeout=600)
    error = "llava_redundancy: error: fastv_k=99 must be below the LLM's"  # read from the cell's log
    assert done.returncode != 0
    assert "1 cell(s) failed" in done.stderr and f"fastv fastv_k=99 tokens=4 | tiny_image: {error}" in done.stderr
    assert f"cell 1 failed: tiny | fastv fastv_k=99 tokens=4 | tiny_image: {error}" in done.stdout
    assert "sweep: ran 0 cells, 2 were already done" in done.stdout  # the reference and random 0.25 from before
    failing = load_sweep(tmp_path / "spec.yaml").cells[1]
    record = json.loads((failing.folder / "failed.json").read_text())
    assert not failing.done and record["returncode"] == 1 and record["error"].startswith(error)
    assert not record["environment"]


def test_a_cell_whose_results_file_broke_is_not_done_and_a_rerun_redoes_only_it(swept):
    sweep, _, _ = swept
    broken = sweep.cells[2]
    (results,) = broken.folder.glob("*/*_results.json")
    results.write_text(results.read_text()[:100])
    assert f"[2] broken (results file unreadable)  {broken.label}" in dry_run(sweep)
    done = subprocess.run([sys.executable, "-m", "lmms_eval_redundancy.cli", "sweep", str(sweep.spec_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sweep: ran 1 cells, 3 were already done" in done.stdout
    assert all(cell.done for cell in sweep.cells)
