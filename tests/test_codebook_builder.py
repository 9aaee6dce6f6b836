"""The codebook builder: its rules against plain references, and whole builds on a tiny model."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from lmms_eval_redundancy.codebook import dpc_knn, jsd, jsd_topk, low_information, window_indices
from lmms_eval_redundancy.codebook.builder import BuildError, build_codebook, load_settings
from lmms_eval_redundancy.codebook.store import load_codebook

TINY_SETTINGS = dict(jsd_thres=4e-4, per_image_clusters=4, per_image_max_size=8, global_clusters=3, min_images=1,
                     batch_size=16)


# ---- rules ------------------------------------------------------------------------------------------

def test_jsd_topk_is_zero_for_equal_distributions():
    logits = torch.randn(3, 50)
    assert torch.allclose(jsd_topk(logits, logits.clone()), torch.zeros(3), atol=1e-7)


def test_jsd_topk_hand_computed_case():
    p_logits = torch.tensor([math.log(3.0), 0.0, -5.0, -9.0])  # top-2 ids: 0, 1 -> P = (0.75, 0.25)
    q_logits = torch.tensor([0.0, 0.0, 7.0, 1.0])  # gathered at ids 0, 1 -> Q = (0.5, 0.5)
    m = (0.625, 0.375)
    expected = 0.5 * ((m[0] * math.log(m[0] / 0.75) + m[1] * math.log(m[1] / 0.25)) / 2
                      + (m[0] * math.log(m[0] / 0.5) + m[1] * math.log(m[1] / 0.5)) / 2)
    assert jsd_topk(p_logits, q_logits, k=2).item() == pytest.approx(expected, rel=1e-6)


def test_standard_jsd_matches_its_definition():
    p_logits, q_logits = torch.randn(40), torch.randn(40)
    p, q = p_logits.double().softmax(0).tolist(), q_logits.double().softmax(0).tolist()
    m = [(a + b) / 2 for a, b in zip(p, q)]
    expected = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m))
    assert jsd(p_logits, q_logits).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("position", "rows", "cols"), [(0, (0, 1, 2), (0, 1, 2)), (12, (1, 2, 3), (1, 2, 3)),
                                                        (24, (2, 3, 4), (2, 3, 4)), (2, (0, 1, 2), (1, 2, 3)),
                                                        (4, (0, 1, 2), (2, 3, 4)), (15, (2, 3, 4), (0, 1, 2))])
def test_3x3_windows_shift_inward_at_borders(position, rows, cols):
    assert window_indices(5, 5)[position].tolist() == [r * 5 + c for r in rows for c in cols]


def test_windows_need_a_3x3_grid():
    with pytest.raises(ValueError, match="2x5"):
        window_indices(2, 5)


def test_low_information_rule_is_strict_on_both_thresholds():
    p_max = torch.tensor([0.1, 0.1, 0.15, 0.1, 0.2])
    j_context = torch.tensor([0.001, 0.002, 0.0, 0.0, 0.0])
    j_global = torch.tensor([0.0, 0.0, 0.0, 0.002 / 16, 0.0])
    assert low_information(p_max, j_context, j_global, 0.15, 0.002).tolist() == [True, False, False, False, False]


def dpc_knn_reference(x: torch.Tensor, n_clusters: int, k: int, seed: int) -> list[int]:
    n, c = x.shape
    rows = x.double().tolist()
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(rows[i], rows[j]))) / math.sqrt(c) for j in range(n)] for i in range(n)]
    noise = (torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e-6).tolist()
    density = [math.exp(-sum(d * d for d in sorted(dist[i])[:k]) / k) + noise[i] for i in range(n)]
    overall = max(max(r) for r in dist)
    delta = [min((dist[i][j] for j in range(n) if density[j] > density[i]), default=overall) for i in range(n)]
    centres = sorted(range(n), key=lambda i: -delta[i] * density[i])[:n_clusters]
    labels = [min(range(n_clusters), key=lambda r: (dist[i][centres[r]], r)) for i in range(n)]
    for rank, centre in enumerate(centres):
        labels[centre] = rank
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_dpc_knn_equals_a_brute_force_version(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    x = torch.cat([torch.randn(8, 5, generator=generator) + 4 * torch.randn(1, 5, generator=generator) for _ in range(3)])
    assert dpc_knn(x, 3, k=5, seed=seed).tolist() == dpc_knn_reference(x, 3, 5, seed)


def test_dpc_knn_is_seeded():
    x = torch.randn(30, 4)
    assert torch.equal(dpc_knn(x, 4, seed=1), dpc_knn(x, 4, seed=1))


def test_presets_hold_the_released_settings():
    assert load_settings("llava15").prob_thres == 0.15 and load_settings("llava15").min_images == 64
    assert load_settings("llavanext").prob_thres == 0.1
    ov = load_settings("llavaov")
    assert (ov.prob_thres, ov.jsd_thres, ov.per_image_max_size, ov.global_clusters, ov.min_images) == (0.08, 0.0018, 3, 24, 16)
    with pytest.raises(BuildError, match="presets: llava15, llavanext, llavaov"):
        load_settings("llava99")


# ---- whole builds -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def training_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = np.zeros((32, 32, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        pixels[8:24, 8:24] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def same_codebook(a: Path, b: Path) -> bool:
    """Byte-identical prototype tensors and equal metadata (safetensors orders header keys arbitrarily)."""
    first, second = load_codebook(a), load_codebook(b)
    meta = lambda c: {k: v for k, v in c.meta.items() if k != "path"}  # noqa: E731
    return first.prototypes.numpy().tobytes() == second.prototypes.numpy().tobytes() and meta(first) == meta(second)


def settings(**changes):
    return load_settings("llava15", **{**TINY_SETTINGS, **changes})


def test_build_writes_a_codebook_the_loader_accepts_and_repeats_byte_for_byte(tiny_models, training_images, tmp_path):
    first = build_codebook(str(tiny_models["llava"]), training_images, tmp_path / "a", settings())
    codebook = load_codebook(first)
    codebook.check_hidden_size(64)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["images"] == 9 and report["unreadable"] == 1
    assert 0 < report["low_information"] < report["probed_tokens"] == 8 * 16
    assert codebook.prototypes.shape[0] == report["prototypes"] == len(json.loads(codebook.meta["image_ids"]))
    assert (tmp_path / "a" / "report_scatter.png").is_file() and (tmp_path / "a" / "report_clusters.png").is_file()
    second = build_codebook(str(tiny_models["llava"]), training_images, tmp_path / "b", settings())
    assert same_codebook(first, second)


def test_no_passing_token_names_the_thresholds_to_relax(tiny_models, training_images, tmp_path):
    with pytest.raises(BuildError, match="relax prob_thres .* or jsd_thres"):
        build_codebook(str(tiny_models["llava"]), training_images, tmp_path, settings(jsd_thres=1e-9))


def test_unsupported_model_is_refused(training_images, tmp_path):
    from transformers import BertConfig

    from lmms_eval_redundancy.adapters import UnsupportedModelError

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError):
        build_codebook(str(tmp_path / "bert"), training_images, tmp_path / "out", settings())


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
    path.write_text("preset: llava15\n" + "".join(f"{k}: {v}\n" for k, v in {**TINY_SETTINGS, "batch_size": 1}.items()))
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
