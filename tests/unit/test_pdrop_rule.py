"""PyramidDrop's rules against a loop reference of the official code and the official fidelity cases."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FIDELITY, fidelity_cases, fidelity_tensors, official_expected

from lmms_eval_redundancy.methods import pdrop


def block_mask(length: int, start: int, count: int) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.bool)
    mask[start:start + count] = True
    return mask


# ---- a loop reference of pdrop_rank_drop (inference branch, one sample) ---------------------------------

def official_reference(query, keys, valid, query_index, image_start, image_count, keep_count):
    """The official rule written out in float64 for ``query [H, L, d]``, ``keys [Hkv, L, d]``: softmax of the
    query row over the keys it sees (causal, real), head mean, top ``keep_count`` image tokens.
    Returns (kept image positions, surviving positions, image scores)."""
    heads, length, dim = query.shape
    groups = heads // keys.shape[0]
    scores = [0.0] * length
    for head in range(heads):
        row = query[head, query_index].double()
        logits = {j: float(row @ keys[head // groups, j].double()) / math.sqrt(dim)
                  for j in range(length) if valid[j] and j <= query_index}
        top = max(logits.values())
        total = sum(math.exp(value - top) for value in logits.values())
        for j, value in logits.items():
            scores[j] += math.exp(value - top) / total / heads
    image = range(image_start, image_start + image_count)
    kept = sorted(sorted(image, key=lambda j: (-scores[j], j))[:keep_count])
    survivors = [j for j in range(length) if valid[j] and (j not in image or j in kept)]
    return kept, survivors, [scores[j] for j in image]


def random_sample(generator, heads=4, kv_heads=4, dim=8):
    """One sample: text, an image block, text; its q/k and the official settings."""
    before = int(torch.randint(1, 12, (1,), generator=generator))
    count = int(torch.randint(4, 40, (1,), generator=generator))
    after = int(torch.randint(1, 10, (1,), generator=generator))
    length = before + count + after
    query = torch.randn(heads, length, dim, generator=generator)
    keys = torch.randn(kv_heads, length, dim, generator=generator)
    keep = int(torch.randint(1, count + 1, (1,), generator=generator))
    return query, keys, before, count, keep


def padded_batch(samples, left: list[bool]):
    """Stack samples of different lengths, each padded on its side; returns the batch tensors."""
    length = max(s[0].shape[1] for s in samples) + 3
    noise = torch.Generator().manual_seed(length)
    queries, keys, valid, image, offsets = [], [], [], [], []
    for (query, key, start, count, _), on_left in zip(samples, left):
        pad = length - query.shape[1]
        offset = pad if on_left else 0
        rows = slice(offset, offset + query.shape[1])
        q = torch.randn(query.shape[0], length, query.shape[2], generator=noise) * 9  # padding holds garbage
        k = torch.randn(key.shape[0], length, key.shape[2], generator=noise) * 9
        q[:, rows], k[:, rows] = query, key
        real = torch.zeros(length, dtype=torch.bool)
        real[rows] = True
        queries.append(q)
        keys.append(k)
        valid.append(real)
        image.append(block_mask(length, offset + start, count))
        offsets.append(offset)
    return torch.stack(queries), torch.stack(keys), torch.stack(valid), torch.stack(image), offsets


def run(query, keys, valid, image, counts, dtype=torch.float32):
    """Scores and survivors of a batch, the query being each row's last real token."""
    last = torch.arange(valid.shape[1]).masked_fill(~valid, -1).max(dim=1).values
    row = query[torch.arange(query.shape[0]), :, last].unsqueeze(2)
    scores = pdrop.last_token_attention(row, keys, valid, dtype)
    return scores, pdrop.select(scores, valid, image, counts)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_one_sample_equals_the_official_reference(seed, kv_heads):
    generator = torch.Generator().manual_seed(seed)
    query, keys, start, count, keep = random_sample(generator, kv_heads=kv_heads)
    length = query.shape[1]
    valid = torch.ones(length, dtype=torch.bool)
    scores, survivors = run(query[None], keys[None], valid[None], block_mask(length, start, count)[None], [keep])
    kept, expected_survivors, expected_scores = official_reference(query, keys, valid, length - 1, start, count, keep)
    assert survivors[0].nonzero().flatten().tolist() == expected_survivors
    assert (survivors[0] & block_mask(length, start, count)).nonzero().flatten().tolist() == kept
    assert torch.allclose(scores[0, start:start + count].double(), torch.tensor(expected_scores, dtype=torch.float64), atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", range(6))
def test_a_ragged_padded_batch_picks_exactly_what_each_sample_picks_alone(seed, dtype):
    generator = torch.Generator().manual_seed(100 + seed)
    samples = [random_sample(generator, heads=8, kv_heads=2, dim=(16, 128)[seed % 2]) for _ in range(5)]
    samples[1][1][:, samples[1][2] + 3] = samples[1][1][:, samples[1][2] + 1]  # tied image keys inside one sample
    query, keys, valid, image, offsets = padded_batch(samples, left=[True, False, True, False, True])
    scores, survivors = run(query.to(dtype), keys.to(dtype), valid, image, [s[4] for s in samples], dtype)
    for index, (q, k, start, count, keep) in enumerate(samples):
        length = q.shape[1]
        alone_scores, alone = run(q[None].to(dtype), k[None].to(dtype), torch.ones(1, length, dtype=torch.bool),
                                  block_mask(length, start, count)[None], [keep], dtype)
        rows = slice(offsets[index], offsets[index] + length)
        assert torch.equal(survivors[index, rows], alone[0])
        assert not survivors[index, ~valid[index]].any()
        assert torch.equal(scores[index, rows], alone_scores[0])


def test_keep_counts_above_the_image_count_keep_the_whole_block_and_positions_renumber():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.2, 0.0, 0.3]])
    valid = torch.tensor([[False, True, True, True, True, True]])
    image = torch.tensor([[False, False, True, True, True, False]])
    assert pdrop.select(scores, valid, image, [1]).tolist() == [[False, True, True, False, False, True]]  # tie: lower
    assert pdrop.select(scores, valid, image, [9]).tolist() == [[False, True, True, True, True, True]]
    keep = pdrop.select(scores, valid, image, [2])
    assert pdrop.renumbered_positions(keep).tolist() == [[-1, 0, 1, 2, -1, 3]]


def test_grouped_query_keys_are_repeated_like_the_models_attention():
    generator = torch.Generator().manual_seed(7)
    query, keys = torch.randn(1, 6, 1, 8, generator=generator), torch.randn(1, 2, 20, 8, generator=generator)
    valid = torch.ones(1, 20, dtype=torch.bool)
    repeated = keys[:, :, None].expand(1, 2, 3, 20, 8).reshape(1, 6, 20, 8)  # transformers' repeat_kv
    assert torch.equal(pdrop.last_token_attention(query, keys, valid), pdrop.last_token_attention(query, repeated, valid))


def test_budget_arithmetic_matches_the_spec():
    assert pdrop.stage_counts(576, pdrop.OFFICIAL_RATIOS) == [576, 288, 144, 72]
    assert pdrop.layer_mean(576, pdrop.OFFICIAL_LAYERS, pdrop.OFFICIAL_RATIOS, 32) == 270
    assert pdrop.stage_counts(576, pdrop.ratios_for(0.19, 3)) == [576, 109, 20, 3]
    for target, lam, mean in [(192, 0.56, 191.875), (128, 0.42, 127.4375), (64, 0.19, 62.9375)]:
        assert pdrop.solve_lambda(576, target) == lam
        assert pdrop.layer_mean(576, pdrop.BUDGET_LAYERS, pdrop.ratios_for(lam, 3), 32) == mean


def test_decode_positions_drop_what_each_sample_dropped_before_the_layer():
    positions = torch.tensor([[700], [650], [30]])
    counts = [576, 200, 0]
    for stage in range(3):
        positions = pdrop.decode_shift(positions, counts, pdrop.OFFICIAL_RATIOS, stage)
    assert positions.flatten().tolist() == [700 - (576 - 72), 650 - (200 - 25), 30]


# ---- the official cases ----------------------------------------------------------------------------------

def official_dtype(case: dict) -> torch.dtype:
    return torch.float16 if case["dtype"] == "float16" else torch.float32


def assert_official_scores(scores: torch.Tensor, expected: torch.Tensor) -> None:
    """fp16 scores exactly; float32 ones within rounding (per-key sums where the official code has a matmul)."""
    if expected.dtype == torch.float16:
        assert torch.equal(scores, expected)
    else:
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("case", fidelity_cases("pdrop", "select"))
def test_official_select_case(case):
    settings, tensors = case["settings"], fidelity_tensors("pdrop")
    expected, expected_tensors = official_expected(case)
    query, keys = (tensors[case["inputs"][name]] for name in ("query_states", "key_states"))
    valid = tensors[case["inputs"]["attention_mask"]].bool()
    query_index = settings["prompt_len"] + settings["image_tokens"] - 1
    assert query_index == int(valid.nonzero().max())  # the official query row is the last real token
    counts = pdrop.stage_counts(settings["image_tokens_original"], settings["image_token_ratio_list"])
    assert counts[settings["cur_num"]: settings["cur_num"] + 2] == [settings["image_tokens"], settings["keep_length"]]
    image = block_mask(valid.shape[0], settings["image_index"], settings["image_tokens"])
    scores, keep = run(query[None], keys[None], valid[None], image[None], [settings["keep_length"]], official_dtype(case))
    assert (keep[0] & image).nonzero().flatten().tolist() == expected["top_rank_index"]
    assert keep[0].nonzero().flatten().tolist() == expected["keep_positions"]
    assert pdrop.renumbered_positions(keep)[0][keep[0]].tolist() == expected["new_position_ids"]
    assert_official_scores(scores[0, image], tensors[expected_tensors["image_scores"]])


@pytest.mark.parametrize("case", fidelity_cases("pdrop", "stage"))
def test_official_stage_case(case):
    settings, tensors = case["settings"], fidelity_tensors("pdrop")
    expected, expected_tensors = official_expected(case)
    inputs = {name: tensors[key] for name, key in case["inputs"].items()}
    valid = inputs["attention_mask"].bool()
    counts = pdrop.stage_counts(settings["image_tokens_original"], settings["image_token_ratio_list"])
    image_tokens, keep_length = counts[settings["cur_num"]], counts[settings["cur_num"] + 1]
    assert (image_tokens, keep_length) == (expected["image_tokens"], expected["keep_length"])
    image = block_mask(valid.shape[0], settings["image_index"], image_tokens)
    scores, keep = pdrop.stage(
        inputs["hidden_states"][None], valid[None], inputs["position_ids"][None], inputs["input_layernorm_weight"],
        inputs["q_proj_weight"], inputs["k_proj_weight"], settings["num_heads"], settings["num_key_value_heads"],
        settings["rms_eps"], settings["rope_base"], image[None], [keep_length], dtype=official_dtype(case))
    assert keep[0].nonzero().flatten().tolist() == expected["keep_positions"]
    assert pdrop.renumbered_positions(keep)[0][keep[0]].tolist() == expected["new_position_ids"]
    assert_official_scores(scores[0, image], tensors[expected_tensors["image_scores"]])


@pytest.mark.parametrize("case", fidelity_cases("pdrop", "decode_shift"))
def test_official_decode_shift_case(case):
    settings = case["settings"]
    shifted = pdrop.decode_shift(torch.tensor([settings["position_id"]]), [settings["image_tokens_original"]],
                                 settings["image_token_ratio_list"], settings["stage"])
    assert shifted.item() == case["expected"]["position_id_out"]


def test_stage_over_a_padded_batch_equals_each_row_alone():
    """The float32 from-hidden cases' inputs as one ragged batch (padding on alternating sides) under the first
    case's layer weights: every row is cut as when run alone, and the first row as officially."""
    cases = [param.values[0] for param in fidelity_cases("pdrop", "stage")]
    cases = [case for case in cases if case is not None and case["dtype"] == "float32"]
    if not cases:
        pytest.skip(f"no fidelity cases under {FIDELITY}")
    tensors = fidelity_tensors("pdrop")
    weights = {name: tensors[cases[0]["inputs"][name]] for name in ("input_layernorm_weight", "q_proj_weight", "k_proj_weight")}
    settings = cases[0]["settings"]

    def cut(hidden, valid, positions, image, keep_lengths):
        return pdrop.stage(hidden, valid, positions, weights["input_layernorm_weight"], weights["q_proj_weight"],
                           weights["k_proj_weight"], settings["num_heads"], settings["num_key_value_heads"],
                           settings["rms_eps"], settings["rope_base"], image, keep_lengths)[1]

    width = max(tensors[case["inputs"]["hidden_states"]].shape[0] for case in cases) + 2
    rows, alone = [], []
    for index, case in enumerate(cases):
        hidden, positions = (tensors[case["inputs"][name]] for name in ("hidden_states", "position_ids"))
        valid = tensors[case["inputs"]["attention_mask"]].bool()
        length, offset = hidden.shape[0], (width - hidden.shape[0]) * (index % 2)
        counts = pdrop.stage_counts(case["settings"]["image_tokens_original"], case["settings"]["image_token_ratio_list"])
        image_tokens, keep_length = counts[case["settings"]["cur_num"]], counts[case["settings"]["cur_num"] + 1]
        image = block_mask(length, case["settings"]["image_index"], image_tokens)
        alone.append(cut(hidden[None], valid[None], positions[None], image[None], [keep_length])[0])
        padded = [torch.zeros(width, hidden.shape[1]), torch.zeros(width, dtype=torch.bool),
                  torch.zeros(width, dtype=torch.long), torch.zeros(width, dtype=torch.bool)]
        for target, source in zip(padded, (hidden, valid, positions, image)):
            target[offset:offset + length] = source
        rows.append((padded, offset, length, keep_length))
    batch = [torch.stack([row[0][i] for row in rows]) for i in range(4)]
    keep = cut(*batch, [row[3] for row in rows])
    for (_, offset, length, _), row_keep, row_alone in zip(rows, keep, alone):
        assert torch.equal(row_keep[offset:offset + length], row_alone)
        assert row_keep.sum() == row_alone.sum()
    assert alone[0].nonzero().flatten().tolist() == official_expected(cases[0])[0]["keep_positions"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stage_computes_q_and_k_as_a_qwen2_layer_does(dtype):
    """Grouped-query heads, q/k biases and RoPE base 1e6: the stage's scores equal those from the q/k of
    transformers' own Qwen2 layer modules."""
    from transformers import Qwen2Config
    from transformers.models.qwen2 import modeling_qwen2

    config = Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=8,
                         rope_theta=1e6, rms_norm_eps=1e-6, num_hidden_layers=1)
    torch.manual_seed(0)
    layer = modeling_qwen2.Qwen2DecoderLayer(config, layer_idx=0).to(dtype)
    rotary_embedding = modeling_qwen2.Qwen2RotaryEmbedding(config)
    with torch.no_grad():
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 40, 32, generator=generator).to(dtype)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :7] = False  # left padding
    position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)
    image = torch.zeros(2, 40, dtype=torch.bool)
    image[0, 3:30], image[1, 10:33] = True, True
    attention = layer.self_attn
    with torch.no_grad():
        scores, keep = pdrop.stage(hidden, valid, position_ids, layer.input_layernorm.weight, attention.q_proj.weight,
                                   attention.k_proj.weight, 4, 2, 1e-6, 1e6, image, [9, 5],
                                   attention.q_proj.bias, attention.k_proj.bias)
        normed = layer.input_layernorm(hidden)
        query = attention.q_proj(normed).view(2, 40, 4, 8).transpose(1, 2)
        keys = attention.k_proj(normed).view(2, 40, 2, 8).transpose(1, 2)
        cos, sin = rotary_embedding(hidden, position_ids)
        query, keys = modeling_qwen2.apply_rotary_pos_emb(query, keys, cos, sin)
    expected = pdrop.last_token_attention(query[:, :, -1:], keys, valid)
    assert torch.equal(scores, expected)
    assert torch.equal(keep, pdrop.select(expected, valid, image, [9, 5]))
    assert keep[image].sum() == 14
