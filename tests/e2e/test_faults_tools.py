"""Bad inputs and faults of compare, build-codebook, import-codebook, show-kept, make-tiny and make-local-data.

Through the ``lmms-eval-redundancy`` command's ``main`` in this process (one case also as a real process, for
the exit status and stderr at the process boundary): each refused case exits 2 with
``lmms-eval-redundancy <command>: error: <message>`` (no traceback) and leaves nothing it would have written
(no table, plot, PNG, codebook or report, no temporary file). Then what compare warns about (a ``--limit 8``
rerun beside a ``--limit 4`` reference, a speed-up whose spread overlaps 1.0) and a codebook build that probes
a replaced image again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_BUILD_SETTINGS, cli_in_process, image, record_run

NONE = {"method": "none", "budget": "all"}
RANDOM = {"method": "random", "budget": "retention=0.5"}
WRITES = ("compare", "kept.png", "codebook.safetensors", "report.json", "report_scatter.png", "c.safetensors")

# case id -> (arguments with {root} (the case's folder), {llava} and {runs} placeholders, message excerpt)
CASES = {
    "compare_empty_folder": (["compare", "{root}/empty"], "holds no llava_redundancy runs"),
    "compare_truncated_results": (["compare", "{runs}"], "_results.json: the results file is truncated or not JSON"),
    "compare_results_gone": (["compare", "{runs}"], "_tokens.json: its results file 20260101_000001_results.json is gone"),
    "compare_out_unwritable": (["compare", "{runs}", "--out", "{root}/file/compare"], "cannot create the output folder"),
    "compare_published_missing": (["compare", "{runs}", "--published", "{root}/none.csv"], "cannot read published numbers"),
    "build_images_missing": (["build-codebook", "{llava}", "{root}/nowhere", "{root}/out"], "images folder"),
    "build_images_empty": (["build-codebook", "{llava}", "{root}/empty", "{root}/out"], "no images in"),
    "build_all_unreadable": (["build-codebook", "{llava}", "{root}/broken", "{root}/out"],
                             "none of the 2 images could be read:\n  "),
    "build_preset_typo": (["build-codebook", "{llava}", "{root}/broken", "{root}/out", "--settings", "llava16"],
                          "no settings file or preset named 'llava16' (did you mean llava15?)"),
    "build_settings_key_typo": (["build-codebook", "{llava}", "{root}/broken", "{root}/out", "--settings", "{root}/typo.yaml"],
                                "unknown build setting(s) prob_thresh (did you mean prob_thres?)"),
    "build_settings_not_yaml": (["build-codebook", "{llava}", "{root}/broken", "{root}/out", "--settings", "{root}/bad.yaml"],
                                "cannot read build settings"),
    "build_limit_0": (["build-codebook", "{llava}", "{root}/broken", "{root}/out", "--limit", "0"],
                      "argument --limit: 0 is out of range; give a whole number >= 1"),
    "import_release_missing": (["import-codebook", "{root}/none.pt", "{root}/c.safetensors"], "release file"),
    "import_model_unknown": (["import-codebook", "{root}/mine/cb.pt", "{root}/c.safetensors"],
                             "its folder name 'mine' holds none of llava15, llavanext, llavaov"),
    "show_image_missing": (["show-kept", "{llava}", "--image", "{root}/none.png", "--method", "none", "--out", "{root}/kept.png"],
                           "image file"),
    "show_image_unreadable": (["show-kept", "{llava}", "--image", "{root}/broken/a.png", "--method", "none",
                               "--out", "{root}/kept.png"], "as an image"),
    "show_method_unknown": (["show-kept", "{llava}", "--image", "{root}/ok.png", "--method", "nonee", "--out", "{root}/kept.png"],
                            "unknown method 'nonee'"),
    "show_budget_out_of_range": (["show-kept", "{llava}", "--image", "{root}/ok.png", "--method", "none",
                                  "--method", "fastv,retention=2", "--out", "{root}/kept.png"], "retention=2 is out of range"),
    "show_task_unknown": (["show-kept", "{llava}", "--task", "mmbench_en_devv", "--method", "none", "--out", "{root}/kept.png"],
                          "unknown task 'mmbench_en_devv' (did you mean mmbench_en_dev?)"),
    "local_data_shapes_docs_0": (["make-local-data", "--out", "{root}/out", "--shapes-docs", "0"],
                                 "argument --shapes-docs: 0 is out of range"),
    "make_tiny_out_unwritable": (["make-tiny", "{root}/file/tiny", "--family", "llava"], "cannot create the output folder"),
}


def cli(*args) -> subprocess.CompletedProcess:
    """The real command in its own process."""
    return subprocess.run([sys.executable, "-m", "lmms_eval_redundancy.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)


def record_timed_run(folder: Path, stamp: str, settings: dict, score: float, device_prefill: list[float]) -> None:
    """``record_run`` with per-sample timings, plus what lmms-eval and the ledger write besides: the ``--limit``
    (one document per device prefill time) and the documents run."""
    record_run(folder, stamp, settings, {"tiny_image": score}, device_prefill=device_prefill)
    results_file, tokens_file = folder / f"{stamp}_results.json", folder / f"{stamp}_tokens.json"
    limit = len(device_prefill)
    results = {**json.loads(results_file.read_text()), "config": {"limit": limit, "offset": 0},
               "n-samples": {"tiny_image": {"original": 8, "effective": limit}}}
    results_file.write_text(json.dumps(results))
    tokens = json.loads(tokens_file.read_text())
    tokens["results_file"] = results_file.name
    tokens_file.write_text(json.dumps(tokens))


def bad_inputs(root: Path, case: str) -> None:
    """The files of one case under ``root``."""
    (root / "empty").mkdir(parents=True)
    (root / "file").write_text("a file where a folder should be")
    (root / "broken").mkdir()
    for name in ("a.png", "b.jpg"):
        (root / "broken" / name).write_bytes(b"not an image")
    image(32, 32).save(root / "ok.png")
    (root / "typo.yaml").write_text(yaml.safe_dump({"preset": "llava15", "prob_thresh": 0.1}))
    (root / "bad.yaml").write_text("preset: llava15\nprob_thres: [0.1\n")
    (root / "mine").mkdir()
    torch.save(torch.randn(4, 8), root / "mine" / "cb.pt")
    runs = root / "runs"
    record_timed_run(runs / "ref", "20260101_000000", NONE, 1.0, [1.0] * 4)
    record_timed_run(runs / "random", "20260101_000001", RANDOM, 0.5, [0.5] * 4)
    if case == "compare_truncated_results":
        results = runs / "random" / "20260101_000001_results.json"
        results.write_text(results.read_text()[:40])
    if case == "compare_results_gone":
        (runs / "random" / "20260101_000001_results.json").unlink()


@pytest.fixture(scope="module")
def refused(tiny_models, tmp_path_factory):
    """Every case run once: ``case -> (completed command, the case's folder)``."""
    base = tmp_path_factory.mktemp("tool_faults")
    done = {}
    for case, (arguments, _) in CASES.items():
        root = base / case
        bad_inputs(root, case)
        args = [a.format(root=root, runs=root / "runs", llava=tiny_models["llava"]) for a in arguments]
        done[case] = cli_in_process(*args), root
    return done


@pytest.mark.parametrize("case", CASES)
def test_bad_inputs_are_refused_with_a_message_and_leave_nothing(refused, case):
    done, root = refused[case]
    command = CASES[case][0][0]
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"lmms-eval-redundancy {command}: error: " in done.stderr and CASES[case][1] in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    left = [p for p in root.rglob("*") if p.name in WRITES or ".tmp" in p.name]
    # an output folder holds at most the resumable probe cache (skip markers of the unreadable images)
    left += [p for p in (root / "out").rglob("*") if p.is_file() and p.parent.name != "probes" and p.name != "probe_stats_rank0.json"]
    assert not left, left


def test_the_command_process_exits_2_with_the_message_and_no_traceback(tmp_path):
    done = cli("compare", tmp_path)
    assert done.returncode == 2 and "lmms-eval-redundancy compare: error: " in done.stderr, done.stderr[-3000:]
    assert "holds no llava_redundancy runs" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """compare on an unpruned run of 4 documents and random runs of 4 and of 8 (its prefill times all over)."""
    runs = tmp_path_factory.mktemp("limits")
    record_timed_run(runs / "ref4", "20260101_000000", NONE, 1.0, [1.0, 1.1, 0.9, 1.0])
    record_timed_run(runs / "random4", "20260101_000001", RANDOM, 0.5, [0.5, 0.6, 0.55, 0.6])
    record_timed_run(runs / "random8", "20260101_000002", RANDOM, 0.75, [0.4, 2.0, 0.5, 1.8, 0.6, 1.5, 0.7, 2.1])
    done = cli_in_process("compare", runs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, runs / "compare"


def test_a_limit_8_rerun_is_its_own_row_and_its_other_documents_are_warned_about(compared):
    done, out = compared
    table = (out / "tiny.md").read_text()
    assert "| random retention=0.5 (--limit=4) " in table and "| random retention=0.5 (--limit=8) " in table
    warning = ("random retention=0.5 (--limit=8): its documents differ from those of its unpruned reference none "
               "(tiny_image: 8 documents from 0 vs 4 from 0)")
    assert f"compare: warning: {warning}" in done.stderr
    assert f"- warning: {warning}" in table and f"- warning: {warning}" in done.stdout


def test_a_speed_up_whose_spread_overlaps_one_is_marked_unreliable(compared):
    _, out = compared
    rows = {cells[1]: cells for line in (out / "tiny.md").read_text().splitlines() if line.startswith("| ")
            for cells in [[cell.strip() for cell in line.split("|")]]}
    # documents 1-3 paired (document 0 is each run's warm-up): the median ratio with the quartiles
    assert "0.556 (0.553-1.18) unreliable" in rows["random retention=0.5 (--limit=8)"]
    assert "1.67 (1.65-1.75)" in rows["random retention=0.5 (--limit=4)"]
    csv = (out / "tiny.csv").read_text().splitlines()
    assert csv[0].split(",")[-5:] == ["device prefill speed-up", "speed-up spread", "samples/s", "FLOPs ratio",
                                      "KV-cache bytes / sample"]
    limit8 = next(line for line in csv if "--limit=8" in line).split(",")
    float(limit8[-5])  # the speed-up stays a number; its spread and flag are beside it
    assert limit8[-4].endswith(" unreliable")


def test_a_rebuild_probes_an_image_that_was_unreadable_before_it_was_replaced(tiny_models, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        image(32, 32, seed=i).save(images / f"img{i}.png")
    (images / "img3.png").write_bytes(b"not an image yet")
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"preset": "llava15", **TINY_BUILD_SETTINGS, "min_images": 0, "prompt_text": None}))
    out = tmp_path / "out"
    first = cli_in_process("build-codebook", tiny_models["llava"], images, out, "--settings", settings)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "1 unreadable image(s) left out:" in first.stderr and "img3.png: cannot identify image file" in first.stderr
    assert json.loads((out / "report.json").read_text())["unreadable_images"][0]["id"] == "img3"
    image(32, 32, seed=3).save(images / "img3.png")
    second = cli_in_process("build-codebook", tiny_models["llava"], images, out, "--settings", settings)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((out / "probe_stats_rank0.json").read_text())["probed"] == 1  # the replaced image, only it
    report = json.loads((out / "report.json").read_text())
    assert (report["images"], report["unreadable"]) == (4, 0) and not (out / "probes" / "img3.skip").exists()
    assert "unreadable" not in second.stderr
