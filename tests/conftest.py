"""Shared fixtures: tiny checkpoints of the three families, local task data, a tiny codebook."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
FAMILIES = ("llava", "llava_next", "llava_onevision")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Random tiny checkpoints saved to disk, one per family (loaded back with from_pretrained by users)."""
    from lmms_eval_redundancy.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def local_data() -> Path:
    """The local tasks' data under tasks/local/data (generated once, deterministic)."""
    from lmms_eval_redundancy import localdata, shapes

    localdata.generate()
    shapes.generate()
    return localdata.DATA_DIR


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


class FakeRequest:
    """What lmms-eval hands a simple model: an object with ``args``."""

    def __init__(self, *args):
        self.args = args


def requests_for(wrapper, docs: list[dict], kind: str = "generate_until", task: str = "unit"):
    """Requests over ``docs`` (each with ``question``, ``visuals`` and, for loglikelihood, ``target``)."""
    wrapper.task_dict = {task: {"test": dict(enumerate(docs))}}
    gen_kwargs = {"max_new_tokens": 6, "until": ["</s>"]}
    return [
        FakeRequest(doc["question"], doc["target"] if kind == "loglikelihood" else dict(gen_kwargs),
                    lambda d: d["visuals"], i, task, "test")
        for i, doc in enumerate(docs)
    ]


def fake_model_config(hidden_size: int) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(hidden_size=hidden_size)))


@pytest.fixture(scope="session")
def tiny_codebook(tiny_models, tmp_path_factory) -> tuple[Path, float]:
    """A codebook for the tiny LLaVA model and a threshold that keeps part, not all, of its tokens."""
    from lmms_eval_redundancy.tiny import tiny_codebook as build

    return build(tiny_models["llava"], tmp_path_factory.mktemp("codebook") / "tiny.safetensors")
