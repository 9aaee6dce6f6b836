"""The package outside the repository: a pasted method file, and a wheel install used from an empty folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import yaml
from conftest import REPO, readme_methods, run_lmms_eval, sample_outputs

from lmms_eval_redundancy.families import FAMILIES

README_RUNS = {"merge_rest": "retention=0.5", "two_cuts": "retention=0.5"}  # the merging and the multi-stage base
BATCH_SIZES = (1, 2)


def test_the_readme_methods_pasted_into_methods_run_through_lmms_eval(tiny_models, local_tasks, tmp_path):
    """Exactly what a reader does: the package (a copy here) plus each README example in ``methods/``, no other
    edit. The merging and the multi-stage examples run on every family at batch 1 and 2 with the same outputs
    and token counts (per decoder layer too), the selecting one once; the 13 runs go through one
    ``python -m lmms_eval --config`` process (a list of runs)."""
    copy = tmp_path / "site"
    shutil.copytree(REPO / "lmms_eval_redundancy", copy / "lmms_eval_redundancy",
                    ignore=shutil.ignore_patterns("__pycache__", "builtin"))
    examples = readme_methods()
    assert [name for name, _ in examples] == ["largest_norm.py", "merge_rest.py", "two_cuts.py"]
    for file_name, code in examples:
        (copy / "lmms_eval_redundancy" / "methods" / file_name).write_text(code)
    runs = {(method, family, size): (README_RUNS[method], tmp_path / "out" / f"{method}-{family}-{size}")
            for method in README_RUNS for family in FAMILIES for size in BATCH_SIZES}
    runs["largest_norm", "llava", 2] = "retention=0.5,power=1", tmp_path / "out" / "largest_norm"
    config = [{"model": "llava_redundancy", "tasks": "tiny_multi_image", "include_path": str(local_tasks),
               "batch_size": size, "limit": 2, "log_samples": True, "output_path": str(out),
               "model_args": f"pretrained={tiny_models[family]},method={method},{args},output_dir={out}"}
              for (method, family, size), (args, out) in runs.items()]
    (tmp_path / "runs.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "lmms_eval", "--config", str(tmp_path / "runs.yaml")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    summaries = {run: tokens_of(out) for run, (_, out) in runs.items()}
    for method in README_RUNS:
        for family in FAMILIES:
            (one, one_folder), (two, two_folder) = (summaries[method, family, size] for size in BATCH_SIZES)
            assert one["settings"]["method"] == method and sample_outputs(one_folder) == sample_outputs(two_folder)
            assert token_counts(one) == token_counts(two), (method, family)
            assert 0 < one["visual_tokens_after"] < one["visual_tokens_before"]
    largest_norm, _ = summaries["largest_norm", "llava", 2]
    assert largest_norm["settings"]["power"] == 1.0 and 0.45 < largest_norm["achieved_retention"] < 0.55
    merged, _ = summaries["merge_rest", "llava_next", 2]
    units = [u for sample in merged["per_sample"] for u in sample["units"]]
    assert units and all(u["merged"] == 1 for u in units)  # one merged token per image, recorded as merged
    two_cuts, _ = summaries["two_cuts", "llava_onevision", 2]  # all, then half, then a quarter of the tokens
    assert two_cuts["visual_tokens_after"] < two_cuts["visual_tokens_layer_mean"] < two_cuts["visual_tokens_before"]


def token_counts(summary: dict) -> list:
    """Each unit's visual tokens before, after and at every decoder layer, in document order."""
    return sorted((s["request"], s["task"], s["doc_id"], u["visual"], u["unit"], u["before"], u["after"], u.get("layers"))
                  for s in summary["per_sample"] for u in s["units"])


def tokens_of(out):
    """The token summary of the run written to ``out`` and its results folder."""
    (path,) = out.glob("*/*_tokens.json")
    return json.loads(path.read_text()), path.parent


def test_a_wheel_install_runs_the_builtin_model_on_tasks_it_writes_into_an_empty_folder(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("builtin/shapes/model.safetensors", "codebooks/shapes/codebook.safetensors",
                 "tasks/local/shapes_image.yaml", "tasks/local/utils.py", "tasks/paper/redundancy_video.yaml",
                 "codebook/presets/llava15.yaml", "published/llava_published.csv", "published/lmms_eval_tasks.csv"):
        assert f"lmms_eval_redundancy/{data}" in names, data
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import lmms_eval_redundancy; print(lmms_eval_redundancy.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))
    subprocess.run([sys.executable, "-m", "lmms_eval_redundancy.cli", "make-local-data", "--out", "tasks"], cwd=empty,
                   env=env, check=True, capture_output=True, timeout=600)
    results, tokens, _ = run_lmms_eval("pretrained=builtin:shapes", empty / "out", empty / "tasks", tasks="shapes_image",
                                       limit=8, env={"PYTHONPATH": str(site)}, cwd=empty)
    assert results["results"]["shapes_image"]["exact_match,none"] >= 0.5
    assert tokens["settings"]["pretrained"] == "builtin:shapes"
    codebook = site / "lmms_eval_redundancy" / "codebooks" / "shapes" / "codebook.safetensors"
    _, tokens, _ = run_lmms_eval(f"pretrained=builtin:shapes,method=codebook,codebook={codebook},retention=0.25",
                                 empty / "out_codebook", empty / "tasks", tasks="shapes_image", limit=4,
                                 env={"PYTHONPATH": str(site)}, cwd=empty)
    assert tokens["settings"]["paths"]["codebook"] == str(codebook) and tokens["achieved_retention"] == 0.25
    assert sorted(p.name for p in empty.iterdir()) == ["out", "out_codebook", "tasks"]  # only where it was pointed


def test_a_newly_registered_method_is_in_every_generated_parametrisation(tmp_path):
    """A throwaway method, registered by a plugin before collection, appears in the cross-family, evaluator and
    batching tests, whose parameters come from the registry (no list names it)."""
    (tmp_path / "throwaway_method.py").write_text(
        "import torch\n"
        "from lmms_eval_redundancy.core.registry import register\n"
        "from lmms_eval_redundancy.methods.base import BeforeLLM, Selection\n\n\n"
        "@register\n"
        "class Throwaway(BeforeLLM):\n"
        "    name = 'throwaway'\n\n"
        "    def select_unit(self, unit):\n"
        "        return Selection(torch.arange(1))\n")
    files = ["tests/integration/test_model.py", "tests/integration/test_local_tasks.py", "tests/unit/test_methods.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "-p", "throwaway_method", *files],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    picked = {line.split("::")[1].split("[")[0] for line in done.stdout.splitlines() if "throwaway" in line}
    assert picked == {"test_every_method_batch_of_two_equals_batch_of_one", "test_every_method_runs_every_task_kind",
                      "test_every_method_selects_a_ragged_batch_as_it_selects_one_unit_at_a_time"}
