"""Sweep specs: cells, folder names, dry runs, Slurm scripts and multi-process commands; cell states, the
errors read from cell logs and the folder locks (nothing runs)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import record_run

from lmms_eval_redundancy.codebook.store import Codebook, save_codebook
from lmms_eval_redundancy.tools.compare import markdown
from lmms_eval_redundancy.tools.sweep import (
    Lock,
    SweepError,
    cell_state,
    dry_run,
    error_from_log,
    load_sweep,
    slurm_script,
)


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


def test_a_cell_is_done_only_while_its_record_results_and_tokens_files_parse(tmp_path):
    record_run(tmp_path / "model", "20260101_000000", {"method": "none"}, {"tiny_image": 1.0})
    (tmp_path / "cell.json").write_text(json.dumps({"results": ["model/20260101_000000_results.json"]}))
    results, tokens = tmp_path / "model" / "20260101_000000_results.json", tmp_path / "model" / "20260101_000000_tokens.json"
    assert cell_state(tmp_path) == "done"
    tokens.write_text("")  # what a full disk used to leave
    assert cell_state(tmp_path) == "broken (tokens file unreadable)"
    tokens.unlink()
    assert cell_state(tmp_path) == "broken (tokens file missing)"
    results.write_text(results.read_text()[:20])
    assert cell_state(tmp_path) == "broken (results file unreadable)"
    results.unlink()
    assert cell_state(tmp_path) == "broken (results file missing)"
    (tmp_path / "cell.json").write_text("{")
    assert cell_state(tmp_path) == "broken (cell.json unreadable)"
    (tmp_path / "cell.json").unlink()
    assert cell_state(tmp_path) == "todo"
    (tmp_path / "failed.json").write_text("{}")
    assert cell_state(tmp_path) == "failed"


LOGS = {  # log text -> (the error read from it, whether the environment caused it)
    "ours": ("loading...\nllava_redundancy: error: fastv_k=99 must be below the LLM's 4 layers\n",
             ("llava_redundancy: error: fastv_k=99 must be below the LLM's 4 layers", False)),
    "lmms_eval_caught_an_import_error": (
        "\x1b[32m2026-11-28\x1b[0m | INFO | start\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "    import filelock._api\nModuleNotFoundError: No module named 'filelock._api'\n\x1b[31m2026-11-28 | ERROR | "
        "lmms_eval.__main__:cli_evaluate:614 - Error during evaluation: No module named 'filelock._api'. Please set "
        "`--verbosity=DEBUG` to get more information.\x1b[0m\n",
        ("ModuleNotFoundError: No module named 'filelock._api'", True)),
    "chained_version_error": (
        "Traceback (most recent call last):\n  File \"a.py\"\nKeyError: 1\n\nDuring handling of the above exception, another "
        "exception occurred:\n\nTraceback (most recent call last):\n  File \"b.py\"\n"
        "lmms_eval_redundancy.core.versions.UnsupportedVersionError: filelock 4.3.1 is not supported\n",
        ("lmms_eval_redundancy.core.versions.UnsupportedVersionError: filelock 4.3.1 is not supported", True)),
    "evaluation_error_only": ("ERROR | Error during evaluation: Tasks not found: x. Please set `--verbosity=DEBUG` to get more.\n",
                              ("Tasks not found: x", False)),
    "argument_error": ("usage: lmms_eval [-h]\nlmms_eval: error: argument --limit: invalid float value: 'a'\n",
                       ("lmms_eval: error: argument --limit: invalid float value: 'a'", False)),
    "nothing": ("killed\n", (None, False)),
}


@pytest.mark.parametrize("case", LOGS)
def test_the_error_that_ended_a_run_is_read_from_its_log(case):
    log, expected = LOGS[case]
    assert error_from_log(log) == expected


def test_array_tasks_share_the_folder_lock_a_whole_sweep_holds_it_alone(tmp_path):
    path = tmp_path / ".sweep.lock"
    with Lock(path, "the folder", shared=True), Lock(path, "the folder", shared=True):  # two `--cell` runs
        with pytest.raises(SweepError, match="the folder is in use by `sweep --cell` runs of this sweep"), Lock(path, "the folder"):
            pass
        assert path.exists()
    assert not path.exists()  # the last one out removes it
    with Lock(path, "the folder") as owner:
        owner.record(cell_group=12345)
        assert json.loads(path.read_text())["cell_group"] == 12345
        with pytest.raises(SweepError, match=f"the folder is in use by another sweep: pid {os.getpid()} on "), \
                Lock(path, "the folder", shared=True):
            pass
    assert not path.exists()
