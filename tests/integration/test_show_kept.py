"""The show-kept picture: kept patches bright, dropped ones dark, one panel per method; no picture when refused."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import image
from PIL import Image

from lmms_eval_redundancy.cli import main
from lmms_eval_redundancy.lmms.model import LlavaRedundancy
from lmms_eval_redundancy.tools.show import DIM, kept_positions, render_panel


def test_panel_darkens_exactly_the_dropped_patches(tiny_models):
    w = LlavaRedundancy(pretrained=str(tiny_models["llava"]), device="cpu", method="random", tokens=3, log_keep_indices=True)
    white = Image.new("RGB", (32, 32), "white")
    inputs, visual, kept, records = kept_positions(w.engine, white)
    assert int(kept.sum()) == 3
    assert kept.nonzero().flatten().tolist() == records[0].keep
    panel = np.asarray(render_panel(w.processor, w.engine.family, inputs, visual, kept, ["t"], scale=1))
    tile = panel[panel.shape[0] - 32:, :32].mean(axis=-1)  # the base view, 4x4 patches of 8 px
    patch_brightness = tile.reshape(4, 8, 4, 8).mean(axis=(1, 3)).flatten()
    bright = patch_brightness > patch_brightness.max() * (1 + DIM) / 2
    assert bright.nonzero()[0].tolist() == kept.nonzero().flatten().tolist()


def test_show_kept_command_writes_one_panel_per_method(tiny_models, tmp_path):
    source = tmp_path / "in.png"
    image(64, 40, 3).save(source)
    out = tmp_path / "kept.png"
    main(["show-kept", str(tiny_models["llava_next"]), "--image", str(source), "--method", "none",
          "--method", "fastv,retention=0.3", "--method", "pooling,tokens=4,anyres=base_only", "--out", str(out)])
    sheet = Image.open(out)
    assert sheet.width > 3 * 4 * 32 and sheet.height > 4 * 32


def refusal(argv: list[str], capsys) -> str:
    """``main(argv)`` exits with status 2; its message."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_a_method_refused_after_another_was_drawn_leaves_no_png(tiny_models, tmp_path, capsys):
    source, out = tmp_path / "in.png", tmp_path / "kept.png"
    image(32, 32).save(source)
    message = refusal(["show-kept", str(tiny_models["llava"]), "--image", str(source), "--method", "none",
                       "--method", "fastv,retention=0.5,bogus=1", "--out", str(out)], capsys)
    assert "error: " in message and "bogus" in message
    assert list(tmp_path.iterdir()) == [source]  # neither the picture nor a part of it


def test_a_document_out_of_range_and_a_zero_scale_are_refused(tiny_models, local_tasks, tmp_path, capsys):
    task = ["show-kept", str(tiny_models["llava"]), "--task", "tiny_image", "--include_path", str(local_tasks),
            "--method", "none", "--out", str(tmp_path / "kept.png")]
    assert "--doc 99 is out of range: tiny_image has 8 documents (0 to 7)" in refusal(task + ["--doc", "99"], capsys)
    assert "argument --scale: 0 is out of range" in refusal(task + ["--scale", "0"], capsys)
    assert not list(tmp_path.iterdir())
