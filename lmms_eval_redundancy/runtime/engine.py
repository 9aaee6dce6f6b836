"""The pruning engine: the one pipeline from processor outputs to pruned LLM inputs (encode, score, select, splice).

Public API, usable without lmms-eval::

    loaded = load("llava-hf/llava-1.5-7b-hf")
    method = build_method("codebook", Budget("tokens", 64), codebook="llava15.safetensors")
    engine = PruningEngine(loaded.model, loaded.processor, loaded.family, method)
    inputs = engine.processor_inputs([prompt], [[image]], [])
    batch, records = engine.prune(inputs, images_per_sample=[1], videos_per_sample=[0], keys=["doc0"])
    with engine.around_llm(batch, records):
        output = loaded.model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lmms_eval_redundancy.core.registry import MethodError, Stage
from lmms_eval_redundancy.core.splice import SplicedBatch, splice
from lmms_eval_redundancy.core.timing import Stopwatch
from lmms_eval_redundancy.core.units import (
    ANYRES_POLICIES,
    keep_all_records,
    prune_batch,
    unit_map,
)
from lmms_eval_redundancy.core.visuals import PackedVisual, UnitRecord


@dataclass
class Pruned:
    """What the pipeline made of one batch: LLM inputs, token records, the encoded visuals, and (aligned with
    each sample's records) every unit's positions in its visual."""

    batch: SplicedBatch
    records: list[list[UnitRecord]]
    visuals: list[list[PackedVisual]]
    unit_positions: list[list[torch.Tensor]]

    def kept_positions(self, sample: int, visual: int) -> torch.Tensor:
        """bool ``[L]``: the tokens of a visual the LLM keeps (after the LLM call for methods inside it),
        newline tokens included when kept; a unit that merged tokens counts as kept whole. Needs kept
        indices in the records (``log_keep_indices``)."""
        packed = self.visuals[sample][visual]
        kept = torch.zeros(packed.length, dtype=torch.bool, device=packed.features.device)
        for record, positions in zip(self.records[sample], self.unit_positions[sample]):
            if record.visual == visual:
                if record.keep is None and not record.merged:
                    raise ValueError("the records carry no kept indices: build the engine with log_keep_indices=True")
                kept[positions if record.merged else positions[record.keep]] = True
                if record.unit == 0 and record.newlines_after:
                    kept |= packed.newline
        return kept


class PruningEngine:
    """Runs one pruning method on one model instance; holds no state shared with other instances."""

    def __init__(self, model, processor, family, method, anyres: str = "full", log_keep_indices: bool = False):
        if anyres not in ANYRES_POLICIES:
            raise MethodError(f"anyres={anyres!r} is not supported; choose one of {', '.join(ANYRES_POLICIES)}")
        if method.stage is Stage.INSIDE_LLM and anyres != "full":
            raise MethodError(f"anyres={anyres} applies to methods before the LLM; {method.name} chooses among all "
                              "visual tokens of a sample inside the LLM: drop anyres=")
        self.model = model
        self.processor = processor
        self.family = family
        self.method = method
        self.anyres = anyres
        self.log_keep_indices = log_keep_indices
        self.pad_id = processor.tokenizer.pad_token_id
        self.vision = Stopwatch()  # the family's encode in the current batch (vision tower, projector, vision needs)
        self.selection_in_vision = 0  # how many of ``method.selection``'s blocks ran inside it (the vision needs)
        method.attach(model, family)

    def settings(self) -> dict:
        return {**self.method.settings(), "anyres": self.anyres, "family": self.family.name}

    def processor_inputs(self, prompts: list[str], images: list[list], videos: list):
        """Processor outputs for a batch on the model's device, pixels in the model's dtype; the torchvision-backed
        image and video processors resize and normalise on that device.

        ``images`` is nested per sample (samples without images left out), ``videos`` flat in sample order.
        """
        inputs = self.processor(text=prompts, images=images or None, videos=videos or None, padding=True,
                                return_tensors="pt", device=self.model.device).to(self.model.device)
        for name in ("pixel_values", "pixel_values_videos"):
            if name in inputs:
                inputs[name] = inputs[name].to(self.model.dtype)
        return inputs

    def prune(self, inputs, images_per_sample: list[int], videos_per_sample: list[int], keys: list[str],
              frames_as_images: list[int] | None = None,
              texts: list[str] | None = None) -> tuple[SplicedBatch, list[list[UnitRecord]]]:
        """Pruned, re-padded LLM inputs for a processed batch and the token records of each sample: the
        ``pipeline`` without gradients."""
        pruned = self.pipeline(inputs, images_per_sample, videos_per_sample, keys, frames_as_images, texts=texts)
        return pruned.batch, pruned.records

    def pipeline(self, inputs, images_per_sample: list[int], videos_per_sample: list[int], keys: list[str],
                 frames_as_images: list[int] | None = None, grad: bool = False, texts: list[str] | None = None) -> Pruned:
        """Encode, score, select, splice: the one path from processor outputs to LLM inputs.

        ``keys`` name the samples (random choices are seeded by them); ``frames_as_images[b]`` counts the
        trailing images of sample ``b`` that are video frames (families without video input): they are
        recorded as frames. ``grad=True`` keeps the autograd graph (training through pruning). ``texts``: each
        sample's prompt text (the question, without the chat template), for methods conditioned on it.
        """
        with torch.set_grad_enabled(grad):
            self.method.selection.reset()
            self.vision.reset()
            before_llm = self.method.stage is Stage.BEFORE_LLM
            needs = self.method.vision_needs() if before_llm else ()
            with self.vision.timing(self.model.device):
                visuals = self.family.encode(inputs, images_per_sample, videos_per_sample, needs, self.method.selection)
            self.selection_in_vision = self.method.selection.mark()
            if before_llm:
                with self.method.selection.timing(self.model.device):
                    pruned = prune_batch(visuals, self.method, keys, self.anyres, self.log_keep_indices, self.family.project,
                                         texts)
            else:
                pruned = [([v.features for v in sample], keep_all_records(sample), [u for v in sample for u in v.units])
                          for sample in visuals]
            kept = [features for features, _, _ in pruned]
            records = [sample_records for _, sample_records, _ in pruned]
            for sample_records, n_images, n_frames in zip(records, images_per_sample, frames_as_images or []):
                for record in sample_records:
                    if record.visual >= n_images - n_frames:
                        record.kind, record.unit, record.visual = "frame", record.visual - (n_images - n_frames), n_images - n_frames
            lengths = [[v.length for v in sample_visuals] for sample_visuals in visuals]
            batch = splice(inputs["input_ids"], inputs["attention_mask"], lengths, kept, self.family.placeholder_ids,
                           self.pad_id, self.model.get_input_embeddings())
        if not before_llm:
            batch.unit_ids = unit_map(batch.visual_mask, visuals)
            batch.prunable_mask = batch.unit_ids >= 0
            batch.keys, batch.visuals = keys, visuals
        batch.vision_tiles = self._tiles_per_sample(inputs, images_per_sample, videos_per_sample)
        return Pruned(batch, records, visuals, [positions for _, _, positions in pruned])

    def _tiles_per_sample(self, inputs, images_per_sample: list[int], videos_per_sample: list[int]) -> list[int]:
        """Views through the vision tower per sample: anyres tiles of its images plus its video frames."""
        image_tiles = self.family.tiles_per_image(inputs) if sum(images_per_sample) else []
        frames = inputs["pixel_values_videos"].shape[1] if sum(videos_per_sample) else 0
        tiles, start = [], 0
        for n_images, n_videos in zip(images_per_sample, videos_per_sample):
            tiles.append(sum(image_tiles[start:start + n_images]) + n_videos * frames)
            start += n_images
        return tiles

    def around_llm(self, batch: SplicedBatch, records: list[list[UnitRecord]], new_tokens: int | None = None):
        """Context for the LLM call (``new_tokens``: the most tokens it generates, if known); methods acting inside the
        LLM hook in here."""
        if self.method.stage is Stage.INSIDE_LLM:
            return self.method.around_llm(batch, records, self.log_keep_indices, new_tokens)
        return contextlib.nullcontext()

    def close(self) -> None:
        """Remove the method's hooks from the model."""
        self.method.detach()
