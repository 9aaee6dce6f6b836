"""Shrink each sample's visual placeholders to the kept counts and build the LLM input embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class PlaceholderMismatchError(RuntimeError):
    """The prompt's visual placeholders do not match the visual features."""


@dataclass
class SplicedBatch:
    input_ids: torch.Tensor  # [B, T], left-padded
    attention_mask: torch.Tensor  # [B, T]
    inputs_embeds: torch.Tensor  # [B, T, D]
    visual_mask: torch.Tensor  # bool [B, T], positions holding visual tokens
    unit_ids: torch.Tensor | None = None  # long [B, T], for inside-LLM methods: record index, -1 elsewhere
    prunable_mask: torch.Tensor | None = None  # bool [B, T], for inside-LLM methods: unit_ids >= 0
    vision_tiles: list[int] | None = None  # views through the vision tower per sample
    keys: list[str] | None = None  # for inside-LLM methods: sample keys (random choices are seeded by them)
    visuals: list | None = None  # for inside-LLM methods: each sample's PackedVisual list (layout of its tokens)


def splice(input_ids, attention_mask, lengths, kept_features, placeholder_ids, pad_id, embed) -> SplicedBatch:
    """Rebuild a left-padded batch with ``len(kept)`` placeholders per visual and scatter the features in.

    ``lengths[b]`` are the original placeholder counts of sample ``b``'s visuals in order,
    ``kept_features[b]`` their kept features; ``embed`` is the LLM's input embedding module.
    """
    ids_list = []
    placeholders = torch.tensor(placeholder_ids, device=input_ids.device)
    for row, mask, row_lengths, row_kept in zip(input_ids, attention_mask, lengths, kept_features):
        ids = row[mask.bool()]
        positions = torch.nonzero(torch.isin(ids, placeholders)).flatten()
        if positions.numel() != sum(row_lengths):
            raise PlaceholderMismatchError(
                f"the prompt has {positions.numel()} visual placeholder tokens but its visuals produced "
                f"{sum(row_lengths)} features; check that the processor and model configs agree"
            )
        keep = torch.ones_like(ids, dtype=torch.bool)
        start = 0
        for length, features in zip(row_lengths, row_kept):
            keep[positions[start + features.shape[0]:start + length]] = False
            start += length
        ids_list.append(ids[keep])
    width = max(ids.numel() for ids in ids_list)
    new_ids = input_ids.new_full((len(ids_list), width), pad_id)
    new_mask = torch.zeros_like(new_ids)
    for b, ids in enumerate(ids_list):
        new_ids[b, width - ids.numel():] = ids
        new_mask[b, width - ids.numel():] = 1
    visual_mask = torch.isin(new_ids, placeholders) & new_mask.bool()
    embeds = embed(torch.where(visual_mask, torch.zeros_like(new_ids), new_ids))
    flat = [f for row in kept_features for f in row]
    if flat:
        features = torch.cat(flat).to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1), features)
    return SplicedBatch(new_ids, new_mask, embeds, visual_mask)
