"""The codebook builder's rules against plain references, and its presets."""

from __future__ import annotations

import math

import pytest
import torch

from lmms_eval_redundancy.codebook import (
    dpc_knn,
    jsd,
    jsd_topk,
    low_information,
    window_indices,
)
from lmms_eval_redundancy.codebook.builder import (
    BuildError,
    load_settings,
)


def test_jsd_topk_is_zero_for_equal_distributions():
    logits = torch.randn(3, 50)
    assert torch.allclose(jsd_topk(logits, logits.clone()), torch.zeros(3), atol=1e-7)


def test_jsd_topk_hand_computed_case():
    p_logits = torch.tensor([math.log(3.0), 0.0, -5.0, -9.0])  # top-2 ids: 0, 1 -> P = (0.75, 0.25)
    q_logits = torch.tensor([0.0, 0.0, 7.0, 1.0])  # gathered at ids 0, 1 -> Q = (0.5, 0.5)
    m = (0.625, 0.375)
    expected = 0.5 * ((m[0] * math.log(m[0] / 0.75) + m[1] * math.log(m[1] / 0.25)) / 2
                      + (m[0] * math.log(m[0] / 0.5) + m[1] * math.log(m[1] / 0.5)) / 2)
    assert jsd_topk(p_logits, q_logits, k=2).item() == pytest.approx(expected, rel=1e-5)  # computed in float32


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


LLAVA_V1_PROBE = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
                  "detailed, and polite answers to the human's questions. USER: <image>\nWhat does this image show? You "
                  "must provide a single word that best describes the image. ASSISTANT:")


def test_presets_probe_as_the_official_code_does():
    for preset, pad in (("llava15", 0), ("llavanext", 0), ("llavaov", 151643)):
        settings = load_settings(preset)
        assert settings.skip_article and settings.articles == ("A",) and settings.pad_token_id == pad, preset
    assert load_settings("llava15").prompt_text == LLAVA_V1_PROBE == load_settings("llavanext").prompt_text
    assert load_settings("llavaov").prompt_text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat does this image "
        "show? You must provide a single word that best describes the image.<|im_end|>\n<|im_start|>assistant\n")


def test_article_tokens_are_found_with_and_without_the_word_start_marker():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from lmms_eval_redundancy.codebook.builder import article_ids

    vocab = {"<unk>": 0, "A": 1, "\u2581A": 2, "\u2581Apple": 3, "a": 4, "\u2581a": 5, "\u0120A": 6, "\u2581The": 7}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")))
    assert article_ids(tokenizer, ("A",)) == [1, 2, 6]
    assert article_ids(tokenizer, ("A", "The")) == [1, 2, 6, 7]


def test_presets_hold_the_released_settings():
    assert load_settings("llava15").prob_thres == 0.15 and load_settings("llava15").min_images == 64
    assert load_settings("llavanext").prob_thres == 0.1
    ov = load_settings("llavaov")
    assert (ov.prob_thres, ov.jsd_thres, ov.per_image_max_size, ov.global_clusters, ov.min_images) == (0.08, 0.0018, 3, 24, 16)
    with pytest.raises(BuildError, match="presets: llava15, llavanext, llavaov"):
        load_settings("llava99")
