"""End to end through the real ``python -m lmms_eval`` and ``accelerate launch`` commands on local tasks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAMILIES, REPO

TASKS = "tiny_image,tiny_multi_image,tiny_video,tiny_image_choice"
DOCS = {"tiny_image": 8, "tiny_multi_image": 8, "tiny_video": 4, "tiny_image_choice": 8}
REQUESTS = 8 + 8 + 4 + 8 * 4  # multiple choice sends one loglikelihood request per choice


def run_lmms_eval(model_args: str, out: Path, *, processes: int = 1, batch_size: int = 2, tasks: str = TASKS,
                  limit: int | None = None):
    command = ["-m", "lmms_eval", "--model", "llava_redundancy", "--model_args", model_args, "--tasks", tasks,
               "--include_path", "tasks/local", "--output_path", str(out), "--batch_size", str(batch_size),
               "--log_samples"] + (["--limit", str(limit)] if limit else [])
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # torchrun-based data parallel with gloo; accelerate's --cpu flag starts one process unless given an MPI hostfile
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(port)]
        command = launcher + command
    else:
        command = [sys.executable] + command
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (results,) = out.glob("*/*_results.json")
    tokens = results.with_name(results.name.replace("_results.json", "_tokens.json"))
    return json.loads(results.read_text()), json.loads(tokens.read_text()), results.parent


def sample_outputs(folder: Path) -> dict:
    outputs = {}
    for path in folder.glob("*_samples_*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            outputs[(row["doc_id"], path.name.split("_samples_")[1])] = row["filtered_resps"]
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_every_task_kind_runs_and_writes_results_and_token_summary(tiny_models, local_data, tmp_path, family):
    results, tokens, _ = run_lmms_eval(f"pretrained={tiny_models[family]},method=random,retention=0.5", tmp_path)
    assert set(results["results"]) >= set(DOCS)
    assert results["config"]["model_args"].startswith("pretrained=")
    assert tokens["samples"] == REQUESTS
    assert tokens["settings"]["method"] == "random" and tokens["settings"]["family"] == family
    assert tokens["frames"] > 0 and tokens["images"] > 0
    assert 0.45 < tokens["achieved_retention"] < 0.55
    assert tokens["visual_tokens_after"] < tokens["visual_tokens_before"]
    if family != "llava":
        assert tokens["newline_tokens_after"] == tokens["newline_tokens_before"] > 0


METHOD_ARGS = {
    "divprune": "method=divprune,tokens=3",
    "fastervlm": "method=fastervlm,retention=0.3",
    "fastv": "method=fastv,retention=0.3,fastv_k=2",
    "pooling": "method=pooling,tokens=4,anyres=base_only",
    "codebook_double_softmax": "method=codebook,codebook={codebook},retention=0.3,variant=double_softmax",
}


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHOD_ARGS)
def test_every_method_runs_through_lmms_eval(tiny_models, tiny_codebook, local_data, tmp_path, family, method, batch_size):
    args = METHOD_ARGS[method].format(codebook=tiny_codebook[0])
    results, tokens, _ = run_lmms_eval(f"pretrained={tiny_models[family]},{args}", tmp_path, batch_size=batch_size)
    assert set(results["results"]) >= set(DOCS)
    assert tokens["samples"] == REQUESTS and tokens["frames"] > 0
    assert 0 < tokens["visual_tokens_after"] < tokens["visual_tokens_before"]
    assert tokens["settings"]["method"] == method.split("_")[0]


def test_codebook_threshold_run_keeps_fewer_tokens(tiny_models, tiny_codebook, local_data, tmp_path):
    codebook, threshold = tiny_codebook
    args = f"pretrained={tiny_models['llava']},method=codebook,codebook={codebook},threshold={threshold}"
    results, tokens, _ = run_lmms_eval(args, tmp_path, tasks="tiny_image,tiny_video")
    assert set(results["results"]) == {"tiny_image", "tiny_video"}
    assert 0 < tokens["visual_tokens_after"] < tokens["visual_tokens_before"]
    assert tokens["settings"]["variant"] == "threshold"
    assert tokens["settings"]["prototypes"] == 6


def test_two_cpu_processes_give_the_same_outputs_as_one(tiny_models, local_data, tmp_path):
    args = f"pretrained={tiny_models['llava_next']},method=random,retention=0.25"
    _, tokens_one, folder_one = run_lmms_eval(args, tmp_path / "one")
    _, tokens_two, folder_two = run_lmms_eval(args, tmp_path / "two", processes=2)
    assert tokens_two["world_size"] == 2
    assert tokens_two["samples"] == tokens_one["samples"] == REQUESTS
    for key in ("visual_tokens_before", "visual_tokens_after", "achieved_retention"):
        assert tokens_two[key] == tokens_one[key]
    one, two = sample_outputs(folder_one), sample_outputs(folder_two)
    assert one.keys() == two.keys()
    for key in one:
        if key[1].startswith("tiny_image_choice"):  # loglikelihoods: batches differ, so the last bits may too
            assert [g for _, g in two[key]] == [g for _, g in one[key]]
            assert [float(s) for s, _ in two[key]] == pytest.approx([float(s) for s, _ in one[key]], abs=1e-4)
        else:
            assert two[key] == one[key]
