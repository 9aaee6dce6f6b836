"""Bad model_args, options and files given to ``--model llava_redundancy``.

Each refused run must end with ``llava_redundancy: error: <message>`` (no traceback) and leave no results, token
summary or token log. Four cases go through the real ``python -m lmms_eval`` (exit status 1), one for each
moment a run can be refused: parsing model_args, an lmms-eval option, loading, answering; they run two
processes at a time. The other cases go through lmms-eval's constructor ``create_from_arg_string`` in this
process (the same code path, without a process start each). Also: ``faithful=no`` means false, and a disk
that fills as the token summary is written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REPO
from safetensors.torch import save_file

from lmms_eval_redundancy.codebook.store import (
    FORMAT,
    Codebook,
    CodebookError,
    import_release,
    load_codebook,
    save_codebook,
)
from lmms_eval_redundancy.lmms.ledger import TokenLedger
from lmms_eval_redundancy.lmms.model import LlavaRedundancy

TASK = "tiny_image"

# case id -> (model_args with {llava}, {next} and {files} placeholders, lmms_eval options, message excerpt)
COMMAND_CASES = {  # through `python -m lmms_eval`: refused while parsing, by an lmms-eval option, while loading,
    # and while answering
    "faithful_maybe": ("pretrained={llava},faithful=maybe", [], "faithful='maybe' is not a boolean; use one of true/false"),
    "batch_size_auto": ("pretrained={llava}", ["--batch_size", "auto"], "`auto` is not supported"),
    "truncated_weights": ("pretrained={files}/truncated", [], "truncated/model.safetensors cannot be read as safetensors"),
    "pooling_on_anyres_views": ("pretrained={next},method=pooling,retention=0.5", [], "pooling needs a token grid"),
}
IN_PROCESS_CASES = {  # through lmms-eval's constructor `create_from_arg_string`, in this process
    "batch_size_in_model_args": ("pretrained={llava},batch_size=4", {},
                                 "drop batch_size= from --model_args and pass --batch_size N"),
    "batch_size_0": ("pretrained={llava}", {"batch_size": "0"}, "batch_size='0' is not a whole number >= 1"),
    "batch_size_negative": ("pretrained={llava}", {"batch_size": "-1"}, "batch_size='-1' is not a whole number >= 1"),
    "max_frames_num_0": ("pretrained={llava},max_frames_num=0", {}, "max_frames_num=0 is not a whole number >= 1"),
    "missing_checkpoint_folder": ("pretrained={files}/missing/folder", {},
                                  "missing/folder: no such folder; give a LLaVA-family checkpoint folder (with config.json)"),
    "broken_config": ("pretrained={files}/broken_config", {}, "not a valid JSON file; check that it is a whole checkpoint"),
    "tokens_0": ("pretrained={llava},method=random,tokens=0", {}, "tokens=0 is out of range; use a whole number >= 1"),
    "tokens_fraction": ("pretrained={llava},method=random,tokens=2.5", {}, "tokens=2.5 is out of range"),
    "retention_1.5": ("pretrained={llava},method=random,retention=1.5", {}, "retention=1.5 is out of range"),
    "threshold_nan": ("pretrained={llava},method=codebook,threshold=nan", {}, "threshold=nan is not a finite number"),
    "codebook_param_on_random": ("pretrained={llava},method=random,retention=0.5,codebook={files}/nan.safetensors", {},
                                 "codebook= is a parameter of method codebook"),
    "codebook_nan": ("pretrained={llava},method=codebook,threshold=0.4,codebook={files}/nan.safetensors", {},
                     "nan.safetensors: 384 of its 384 prototype values are not finite (NaN or inf); rebuild it"),
    "codebook_truncated": ("pretrained={llava},method=codebook,threshold=0.4,codebook={files}/truncated.safetensors", {},
                           "truncated.safetensors is not a readable .safetensors file"),
    "dtype_float13": ("pretrained={llava},dtype=float13", {}, "dtype='float13' is not a floating-point torch dtype"),
    "attn_bogus": ("pretrained={llava},attn_implementation=bogus", {}, "attn_implementation='bogus' is not one of eager"),
    "device_absent": ("pretrained={llava},device=cuda:99", {}, "device=cuda:99 is not available"),
    "log_keep_indices_2": ("pretrained={llava},log_keep_indices=2", {}, "log_keep_indices=2 is not a boolean"),
    "trust_remote_code_maybe": ("pretrained={llava},trust_remote_code=maybe", {}, "trust_remote_code='maybe' is not a boolean"),
    "folder_without_config": ("pretrained={files}/empty", {}, "empty has no config.json"),
    "unknown_builtin": ("pretrained=builtin:nope", {}, "unknown built-in model 'builtin:nope'; built-in models: builtin:shapes"),
    "tokens_true": ("pretrained={llava},method=random,tokens=true", {}, "tokens=True is not a number"),
    "key_typo": ("pretrained={llava},method=random,retension=0.5", {}, "did you mean retention=?"),
    "fastv_k_0": ("pretrained={llava},method=fastv,retention=0.5,fastv_k=0", {}, "fastv_k=0 is out of range"),
    "seed_fraction": ("pretrained={llava},method=random,retention=0.5,seed=1.5", {}, "seed=1.5 is not a whole number"),
    "codebook_missing": ("pretrained={llava},method=codebook,threshold=0.4,codebook={files}/none.safetensors", {},
                         "codebook file not found"),
    "codebook_wrong_tensor": ("pretrained={llava},method=codebook,threshold=0.4,codebook={files}/weights.safetensors", {},
                              "weights.safetensors is not a codebook in format"),
    "codebook_zero_rows": ("pretrained={llava},method=codebook,threshold=0.4,codebook={files}/empty.safetensors", {},
                           "prototypes must be a non-empty [P, D] tensor, got (0, 64)"),
    "device_gpu": ("pretrained={llava},device=gpu", {}, "device='gpu' is not a device"),
    "device_twice": ("pretrained={llava},device=cpu", {"device": "cpu"}, "device is given twice"),
    "no_pretrained": ("method=random,retention=0.5", {}, "--model_args needs pretrained="),
    "not_key_value": ("pretrained={llava},faithful", {}, "is not a comma-separated list of key=value"),
    "anyres_unknown": ("pretrained={llava},anyres=tiles", {}, "anyres='tiles' is not supported"),
    "chat_template_broken": ("pretrained={llava},chat_template={{% if %}}", {}, "cannot render a prompt"),
}


def lmms_eval(model_args: str, out, include_path, options=(), launcher=("-m", "lmms_eval")):
    command = [sys.executable, *launcher, "--model", "llava_redundancy", "--model_args", model_args, "--tasks", TASK,
               "--include_path", str(include_path), "--output_path", str(out), "--limit", "2", *options]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def bad_files(root, tiny_models, tiny_codebook):
    """Broken checkpoints and codebooks under ``root``."""
    good = tiny_models["llava"]
    (root / "empty").mkdir()
    for name in ("truncated", "broken_config"):
        shutil.copytree(good, root / name)
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    (root / "broken_config" / "config.json").write_text('{"model_type": "llava",')
    codebook = load_codebook(tiny_codebook[0])
    save_codebook(Codebook(torch.full_like(codebook.prototypes, float("nan")), {"model": "tiny"}), root / "nan.safetensors")
    (root / "truncated.safetensors").write_bytes(tiny_codebook[0].read_bytes()[:100])
    save_file({"weights": codebook.prototypes}, str(root / "weights.safetensors"), metadata={"format": FORMAT})
    save_file({"prototypes": torch.zeros(0, 64)}, str(root / "empty.safetensors"), metadata={"format": FORMAT})


@pytest.fixture(scope="module")
def bad_paths(tiny_models, tiny_codebook, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    bad_files(root, tiny_models, tiny_codebook)
    return {"llava": tiny_models["llava"], "next": tiny_models["llava_next"], "files": root}


@pytest.fixture(scope="module")
def refused(bad_paths, local_tasks):
    """Every command case run once, two at a time: ``case -> (completed process, its output folder)``."""

    def run(case):
        model_args, options, _ = COMMAND_CASES[case]
        out = bad_paths["files"] / "out" / case
        return case, (lmms_eval(model_args.format(**bad_paths), out, local_tasks, options), out)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, COMMAND_CASES))


def left_behind(out) -> list:
    """Results, token summaries (or parts of them) and token logs under ``out``."""
    return [p for pattern in ("*_results.json", "*tokens*") for p in out.rglob(pattern)] if out.exists() else []


@pytest.mark.parametrize("case", COMMAND_CASES)
def test_bad_model_args_and_files_are_refused_with_a_message_and_leave_nothing(refused, case):
    done, out = refused[case]
    assert done.returncode == 1, done.stderr[-3000:]
    assert "llava_redundancy: error: " in done.stderr and COMMAND_CASES[case][2] in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not left_behind(out)


@pytest.mark.parametrize("case", IN_PROCESS_CASES)
def test_lmms_eval_constructor_ends_the_run_on_more_bad_model_args(bad_paths, tmp_path, case):
    model_args, options, message = IN_PROCESS_CASES[case]
    with pytest.raises(SystemExit) as ended:
        LlavaRedundancy.create_from_arg_string(f"{model_args.format(**bad_paths)},output_dir={tmp_path / 'out'}",
                                               {"batch_size": 1, "max_batch_size": None, "device": None, **options})
    assert str(ended.value.code).startswith("llava_redundancy: error: ") and message in str(ended.value.code)
    assert not left_behind(tmp_path / "out")


def test_faithful_no_and_log_keep_indices_no_mean_false(tiny_models, tmp_path):
    """Before: any non-empty text meant true, so `faithful=no` selected the official float16 distances."""
    args = f"pretrained={tiny_models['llava']},method=divprune,retention=0.5,faithful=no,log_keep_indices=No"
    model = LlavaRedundancy.create_from_arg_string(f"{args},output_dir={tmp_path}", {"batch_size": 1})
    assert model.ledger.settings["precision"] == "float32"  # faithful=true would select "model"
    assert model.engine.log_keep_indices is False


def test_a_full_disk_while_writing_the_token_summary_leaves_no_file_and_exits_1(tiny_models, local_tasks, tmp_path):
    """The disk fills half-way through the summary: no summary, not a part of one, and exit status 1."""
    full_disk = tmp_path / "full_disk.py"
    full_disk.write_text(textwrap.dedent("""
        import errno, os, pathlib, runpy, sys
        write_bytes = pathlib.Path.write_bytes
        def fill_up(path, data):
            if "_tokens.json" not in path.name:
                return write_bytes(path, data)
            write_bytes(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        pathlib.Path.write_bytes = fill_up
        sys.argv[0] = "lmms_eval"
        runpy.run_module("lmms_eval", run_name="__main__", alter_sys=True)
    """))
    out = tmp_path / "out"
    done = lmms_eval(f"pretrained={tiny_models['llava']}", out, local_tasks, launcher=(str(full_disk),))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "llava_redundancy: error: could not write the token summary" in done.stderr
    assert os.strerror(28) in done.stderr
    (results,) = out.glob("*/*_results.json")  # lmms-eval's own record is written before ours
    assert json.loads(results.read_text())["results"][TASK]
    assert not [p for p in out.rglob("*tokens.json*")]


@pytest.mark.parametrize(("prototypes", "message"), [
    (torch.tensor([[1.0, float("inf")], [0.5, 0.5]]), "1 of its 4 prototype values are not finite"),
    (torch.ones(3, 4, dtype=torch.int64), "prototypes are torch.int64, not floating point"),
    (torch.ones(4), "must be a non-empty [P, D] tensor, got (4,)"),
    (torch.ones(3, 0), "must be a non-empty [P, D] tensor, got (3, 0)"),
])
def test_codebooks_that_cannot_score_tokens_are_refused_with_path_and_fix(tmp_path, prototypes, message):
    path = tmp_path / "bad.safetensors"
    save_file({"prototypes": prototypes}, str(path), metadata={"format": FORMAT})
    with pytest.raises(CodebookError) as refused:
        load_codebook(path)
    assert message in str(refused.value) and str(path) in str(refused.value) and "build-codebook" in str(refused.value)


def test_importing_a_safetensors_codebook_says_it_is_used_directly(tiny_codebook, tmp_path):
    with pytest.raises(CodebookError, match="already in this project's format: use it directly"):
        import_release(tiny_codebook[0], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_discarded_ledger_removes_the_folders_it_made_and_writes_no_summary(tmp_path):
    ledger = TokenLedger(0, 1, tmp_path / "out" / "model", {"method": "none"})
    ledger.add("generate_until", "task", "test", 0, [])
    assert ledger.log_file.is_file()
    ledger.discard()
    assert ledger.finish() is None and not (tmp_path / "out").exists()
    assert TokenLedger(0, 1, tmp_path / "quiet", {}).finish() is None and not (tmp_path / "quiet").exists()

