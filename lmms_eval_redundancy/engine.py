"""From processor outputs to pruned LLM inputs: encode visuals, prune per image/frame, splice."""

from __future__ import annotations

import time

import torch

from lmms_eval_redundancy.adapters import PackedVisual, family_of
from lmms_eval_redundancy.efficiency import sync
from lmms_eval_redundancy.pruning import ANYRES_POLICIES, UnitRecord, prune_sample
from lmms_eval_redundancy.registry import MethodError, PruningMethod, Stage
from lmms_eval_redundancy.sequence import SplicedBatch, splice


def unit_records(visuals: list[PackedVisual]) -> list[UnitRecord]:
    """Keep-all records of a sample's images/frames, for methods that decide inside the LLM."""
    records = []
    for index, visual in enumerate(visuals):
        newlines = int(visual.newline.sum())
        for unit, positions in enumerate(visual.units):
            records.append(UnitRecord(kind="frame" if visual.kind == "video" else "image", visual=index, unit=unit,
                                      before=positions.numel(), after=positions.numel(),
                                      newlines_before=newlines if unit == 0 else 0,
                                      newlines_after=newlines if unit == 0 else 0))
    return records


def unit_map(visual_mask: torch.Tensor, visuals: list[list[PackedVisual]]) -> torch.Tensor:
    """``[B, T]``: at each visual position, the index of its record (as ``unit_records`` numbers them);
    -1 at text, padding and newline positions."""
    ids = torch.full(visual_mask.shape, -1, dtype=torch.long, device=visual_mask.device)
    for row, sample_visuals in enumerate(visuals):
        per_token, offset = [], 0
        for visual in sample_visuals:
            labels = torch.full((visual.length,), -1, dtype=torch.long, device=visual_mask.device)
            for unit, positions in enumerate(visual.units):
                labels[positions] = offset + unit
            offset += len(visual.units)
            per_token.append(labels)
        if per_token:
            ids[row, visual_mask[row]] = torch.cat(per_token)
    return ids


class PruningEngine:
    """Runs one pruning method on one model instance; holds no state shared with other instances."""

    def __init__(self, model, processor, method: PruningMethod, anyres: str = "full", log_keep_indices: bool = False):
        if anyres not in ANYRES_POLICIES:
            raise MethodError(f"anyres={anyres!r} is not supported; choose one of {', '.join(ANYRES_POLICIES)}")
        if method.stage is Stage.INSIDE_LLM and anyres != "full":
            raise MethodError(f"anyres={anyres} applies to methods before the LLM; {method.name} chooses among all "
                              "visual tokens of a sample inside the LLM: drop anyres=")
        self.model = model
        self.adapter = family_of(model.config.model_type)[1](model, processor)
        self.method = method
        self.anyres = anyres
        self.log_keep_indices = log_keep_indices
        self.pad_id = processor.tokenizer.pad_token_id
        method.attach(model)

    def settings(self) -> dict:
        return {**self.method.settings(), "anyres": self.anyres, "family": self.adapter.family}

    @torch.no_grad()
    def prepare(self, inputs, images_per_sample: list[int], videos_per_sample: list[int], keys: list[str],
                frames_as_images: list[int] | None = None) -> tuple[SplicedBatch, list[list[UnitRecord]]]:
        """Pruned, re-padded LLM inputs for a processed batch, and the token records of each sample.

        ``frames_as_images[b]`` counts the trailing images of sample ``b`` that are video frames (families
        without video input); they are recorded as frames.
        """
        self.method.selection_seconds = 0.0
        if self.method.needs_vision_scores:
            with self.method.observing_vision() as captured:
                visuals = self.adapter.encode(inputs, images_per_sample, videos_per_sample)
            self.adapter.attach_scores(visuals, captured, inputs)
        else:
            visuals = self.adapter.encode(inputs, images_per_sample, videos_per_sample)
        if self.anyres == "per_view":
            self.adapter.attach_views(visuals, inputs)
        kept, records = [], []
        started = time.perf_counter()
        for sample_visuals, key in zip(visuals, keys):
            if self.method.stage is Stage.BEFORE_LLM:
                features, sample_records = prune_sample(sample_visuals, self.method, key, self.anyres, self.log_keep_indices)
            else:
                features, sample_records = [v.features for v in sample_visuals], unit_records(sample_visuals)
            kept.append(features)
            records.append(sample_records)
        if self.method.stage is Stage.BEFORE_LLM:
            sync(self.model.device)
            self.method.selection_seconds += time.perf_counter() - started
        for sample_records, n_images, n_frames in zip(records, images_per_sample, frames_as_images or []):
            for record in sample_records:
                if record.visual >= n_images - n_frames:
                    record.kind, record.unit, record.visual = "frame", record.visual - (n_images - n_frames), n_images - n_frames
        lengths = [[v.length for v in sample_visuals] for sample_visuals in visuals]
        batch = splice(inputs["input_ids"], inputs["attention_mask"], lengths, kept, self.adapter.placeholder_ids,
                       self.pad_id, self.model.get_input_embeddings())
        if self.method.stage is Stage.INSIDE_LLM:
            batch.unit_ids = unit_map(batch.visual_mask, visuals)
            batch.prunable_mask = batch.unit_ids >= 0
        batch.vision_tiles = self._tiles_per_sample(inputs, images_per_sample, videos_per_sample)
        return batch, records

    def _tiles_per_sample(self, inputs, images_per_sample: list[int], videos_per_sample: list[int]) -> list[int]:
        """Views through the vision tower per sample: anyres tiles of its images plus its video frames."""
        image_tiles = self.adapter.tiles_per_image(inputs) if sum(images_per_sample) else []
        frames = inputs["pixel_values_videos"].shape[1] if sum(videos_per_sample) else 0
        tiles, start = [], 0
        for n_images, n_videos in zip(images_per_sample, videos_per_sample):
            tiles.append(sum(image_tiles[start:start + n_images]) + n_videos * frames)
            start += n_images
        return tiles

    def around_llm(self, batch: SplicedBatch, records: list[list[UnitRecord]]):
        """Context for the LLM call; methods acting inside the LLM hook in here."""
        return self.method.around_llm(batch, records, self.log_keep_indices)
