"""The codebook file format, its loader, and the importer for the paper's released ``.pt`` files.

The release tests read the reference codebooks from ``../shared/reference-codebooks`` next to the
checkout (override with LMMS_EVAL_REDUNDANCY_REFERENCE_CODEBOOKS) and skip when they are absent.
They only ever write to ``tmp_path``: the reference files are never copied into the repository.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import LLAVA15_PT, LLAVAOV_PT, release_file
from safetensors.torch import save_file

from lmms_eval_redundancy.codebook import store
from lmms_eval_redundancy.codebook.store import (
    Codebook,
    CodebookError,
    load_codebook,
    save_codebook,
)

# --------------------------------------------------------------------------------------------------
# Format and loader
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_save_load_round_trip_keeps_tensor_and_metadata(tmp_path, dtype):
    prototypes = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    written = save_codebook(Codebook(prototypes, {"model": "org/some-model", "threshold": 0.3}),
                            tmp_path / "cb.safetensors")
    assert written == tmp_path / "cb.safetensors" and written.is_file()
    loaded = load_codebook(written)
    assert loaded.prototypes.dtype == dtype
    assert torch.equal(loaded.prototypes, prototypes)
    for key in ("format", "model", "hidden_size", "embedding_space"):
        assert key in loaded.meta
    assert loaded.meta["format"] == store.FORMAT
    assert loaded.meta["model"] == "org/some-model"
    assert loaded.meta["hidden_size"] == "8"
    assert loaded.meta["embedding_space"] == "post_projector"
    assert loaded.meta["threshold"] == "0.3"
    assert loaded.meta["path"] == str(written)
    assert loaded.hidden_size == 8


def test_save_codebook_to_a_folder_writes_codebook_safetensors(tmp_path):
    written = save_codebook(Codebook(torch.ones(2, 3), {"model": "m"}), tmp_path / "out")
    assert written == tmp_path / "out" / "codebook.safetensors"
    assert torch.equal(load_codebook(written).prototypes, torch.ones(2, 3))


def test_load_safetensors_without_format_tag_raises_codebook_error(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"prototypes": torch.randn(3, 4)}, str(path), metadata={"model": "m", "hidden_size": "4"})
    with pytest.raises(CodebookError, match="format"):
        load_codebook(path)
    bare = tmp_path / "bare.safetensors"
    save_file({"prototypes": torch.randn(3, 4)}, str(bare))
    with pytest.raises(CodebookError):
        load_codebook(bare)


def test_load_safetensors_without_prototypes_tensor_raises_codebook_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weights": torch.randn(3, 4)}, str(path), metadata={"format": store.FORMAT})
    with pytest.raises(CodebookError):
        load_codebook(path)


def test_load_missing_or_wrong_suffix_file_raises_codebook_error(tmp_path):
    with pytest.raises(CodebookError, match="not found"):
        load_codebook(tmp_path / "missing.safetensors")
    other = tmp_path / "codebook.npy"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(CodebookError):
        load_codebook(other)


def test_check_hidden_size_error_names_both_sizes():
    codebook = Codebook(torch.zeros(2, 37), {"model": "org/m", "path": "x.safetensors"})
    codebook.check_hidden_size(37)
    with pytest.raises(CodebookError) as info:
        codebook.check_hidden_size(53)
    message = str(info.value)
    assert re.search(r"\b37\b", message)
    assert re.search(r"\b53\b", message)


# --------------------------------------------------------------------------------------------------
# The paper's release
# --------------------------------------------------------------------------------------------------

def test_import_llava15_release_reads_back_with_shape_model_threshold_and_ids(tmp_path):
    pt = release_file(LLAVA15_PT)
    out = store.import_release(pt, tmp_path / "c.safetensors")
    assert out == tmp_path / "c.safetensors" and out.is_file()
    codebook = load_codebook(out)
    assert tuple(codebook.prototypes.shape) == (454, 4096)
    assert codebook.prototypes.dtype == torch.float16
    assert codebook.meta["model"] == "llava-hf/llava-1.5-7b-hf"
    assert codebook.meta["threshold"] == "0.45"
    assert codebook.meta["hidden_size"] == "4096"
    assert codebook.meta["embedding_space"] == "post_projector"
    assert len(json.loads(codebook.meta["image_ids"])) == 454
    assert isinstance(json.loads(codebook.meta["settings"]), dict)


def test_import_llava15_release_preserves_the_tensor(tmp_path):
    pt = release_file(LLAVA15_PT)
    original = torch.load(pt, map_location="cpu", weights_only=True)
    codebook = load_codebook(store.import_release(pt, tmp_path / "c.safetensors"))
    assert torch.equal(codebook.prototypes, original)


def test_imported_llava15_codebook_checks_hidden_size(tmp_path):
    pt = release_file(LLAVA15_PT)
    codebook = load_codebook(store.import_release(pt, tmp_path / "c.safetensors"))
    codebook.check_hidden_size(4096)
    with pytest.raises(CodebookError) as info:
        codebook.check_hidden_size(3584)
    assert "4096" in str(info.value) and "3584" in str(info.value)


def test_load_codebook_reads_the_llava15_release_pt_directly():
    pt = release_file(LLAVA15_PT)
    codebook = load_codebook(pt)
    assert tuple(codebook.prototypes.shape) == (454, 4096)
    assert codebook.meta["model"] == "llava-hf/llava-1.5-7b-hf"
    assert codebook.meta["threshold"] == "0.45"


def test_import_onevision_release_has_shape_45_by_3584(tmp_path):
    pt = release_file(LLAVAOV_PT)
    codebook = load_codebook(store.import_release(pt, tmp_path / "ov.safetensors"))
    assert tuple(codebook.prototypes.shape) == (45, 3584)
    assert codebook.meta["model"] == "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    assert codebook.meta["threshold"] == "0.5"
    assert len(json.loads(codebook.meta["image_ids"])) == 45
    codebook.check_hidden_size(3584)
    with pytest.raises(CodebookError):
        codebook.check_hidden_size(4096)
