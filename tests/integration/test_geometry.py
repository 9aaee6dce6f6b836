"""Real checkpoint geometry (random weights, cut-down text towers): visual token counts per image and frame."""

from __future__ import annotations

import pytest
import torch

from lmms_eval_redundancy.families import family_of
from lmms_eval_redundancy.families.tiny import real_geometry_config


def build(name: str):
    config = real_geometry_config(name, text_layers=1, vision_layers=1)
    torch.manual_seed(0)
    family = family_of(config.model_type)
    model = family.model_class(config).eval()
    return model, family(model)


@torch.no_grad()
def test_llava_15_has_576_tokens_per_336px_image():
    model, family = build("llava-1.5-7b")
    visuals = family.encode({"pixel_values": torch.randn(2, 3, 336, 336)}, [2], [0])[0]
    assert [v.length for v in visuals] == [576, 576]
    assert visuals[0].grids == [(24, 24)] and visuals[0].features.shape[1] == 4096


@torch.no_grad()
def test_llava_next_packs_base_view_crops_and_one_newline_per_row():
    model, family = build("llava-v1.6-vicuna-7b")
    # a 672x672 image: best pinpoint 672x672 -> 2x2 crops of 336 + the base view
    inputs = {"pixel_values": torch.randn(1, 5, 3, 336, 336), "image_sizes": torch.tensor([[672, 672]])}
    visual = family.encode(inputs, [1], [0])[0][0]
    assert visual.length == 576 + 48 * 48 + 48
    assert int(visual.newline.sum()) == 48
    assert visual.units[0].numel() == 576 + 48 * 48
    assert visual.base.tolist() == list(range(576))


@torch.no_grad()
def test_onevision_has_729_tokens_per_384px_view_and_196_per_video_frame():
    model, family = build("llava-onevision-qwen2-0.5b")
    # two images in one sample: base view only, each with its newline
    inputs = {"pixel_values": torch.randn(2, 1, 3, 384, 384), "image_sizes": torch.tensor([[384, 384]] * 2),
              "batch_num_images": torch.tensor([2])}
    images = family.encode(inputs, [2], [0])[0]
    assert [v.units[0].numel() for v in images] == [729, 729]
    assert [v.length for v in images] == [730, 730]
    video = family.encode({"pixel_values_videos": torch.randn(1, 4, 3, 384, 384)}, [0], [1])[0][0]
    assert [u.numel() for u in video.units] == [196] * 4
    assert video.grids == [(14, 14)] * 4
    assert video.length == 4 * 196 + 1 and bool(video.newline[-1])


def test_real_hidden_sizes_decide_codebook_compatibility():
    from lmms_eval_redundancy.codebook.store import Codebook, CodebookError

    codebook = Codebook(torch.randn(3, 4096), {"model": "llava-hf/llava-1.5-7b-hf"})
    codebook.check_hidden_size(real_geometry_config("llava-1.5-7b").text_config.hidden_size)
    with pytest.raises(CodebookError):
        codebook.check_hidden_size(real_geometry_config("llava-onevision-qwen2-7b").text_config.hidden_size)
