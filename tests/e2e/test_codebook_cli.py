"""The build-codebook and import-codebook commands: a killed build resumes; two processes build what one does."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import LLAVA15_PT, REPO, release_file, same_codebook
from conftest import TINY_BUILD_SETTINGS as TINY_SETTINGS
from conftest import build_settings as settings

from lmms_eval_redundancy.codebook.builder import (
    build_codebook,
)
from lmms_eval_redundancy.codebook.store import load_codebook


def build_command(model, images, out, settings_file, processes=1):
    command = ["-m", "lmms_eval_redundancy.cli", "build-codebook", str(model), str(images), str(out), "--settings", str(settings_file)]
    if processes == 1:
        return [sys.executable] + command
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)] + command


@pytest.fixture()
def settings_file(tmp_path) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"preset": "llava15", **TINY_SETTINGS, "batch_size": 1, "prompt_text": None}))
    return path


def test_killed_build_resumes_without_reprobing_finished_images(tiny_models, training_images, tmp_path, settings_file):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(build_command(tiny_models["llava"], training_images, out, settings_file), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((out / "probes").glob("*.pt"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list((out / "probes").glob("*.pt"))) + len(list((out / "probes").glob("*.skip")))
    assert 2 <= finished < 9, "the build was not interrupted mid-way"
    done = subprocess.run(build_command(tiny_models["llava"], training_images, out, settings_file), cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((out / "probe_stats_rank0.json").read_text())
    assert stats["probed"] + stats["skipped_unreadable"] == 9 - finished
    uninterrupted = build_codebook(str(tiny_models["llava"]), training_images, tmp_path / "ref", settings(batch_size=1))
    assert same_codebook(out / "codebook.safetensors", uninterrupted)


def test_two_processes_build_the_same_codebook_as_one(tiny_models, training_images, tmp_path, settings_file):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # torchrun runs each process with one thread; float reductions depend on the thread count, so the
    # single process gets one thread too, and the two codebooks must then agree bit for bit
    one = subprocess.run(build_command(tiny_models["llava"], training_images, tmp_path / "one", settings_file),
                         cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    two = subprocess.run(build_command(tiny_models["llava"], training_images, tmp_path / "two", settings_file, processes=2),
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "probe_stats_rank1.json").read_text())["assigned"] > 0
    assert same_codebook(tmp_path / "two" / "codebook.safetensors", tmp_path / "one" / "codebook.safetensors")


def test_cli_import_codebook_exits_zero_and_writes_the_file(tmp_path):
    pt = release_file(LLAVA15_PT)
    out = tmp_path / "cli" / "c.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "lmms_eval_redundancy.cli", "import-codebook", str(pt), str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    assert tuple(load_codebook(out).prototypes.shape) == (454, 4096)
