"""From processor outputs to pruned LLM inputs: encode visuals, prune per image/frame, splice."""

from __future__ import annotations

import contextlib

import torch

from lmms_eval_redundancy.adapters import family_of
from lmms_eval_redundancy.pruning import ANYRES_POLICIES, UnitRecord, prune_sample
from lmms_eval_redundancy.registry import MethodError, PruningMethod, Stage
from lmms_eval_redundancy.sequence import SplicedBatch, splice


class PruningEngine:
    """Runs one pruning method on one model instance; holds no state shared with other instances."""

    def __init__(self, model, processor, method: PruningMethod, anyres: str = "full", log_keep_indices: bool = False):
        if anyres not in ANYRES_POLICIES:
            raise MethodError(f"anyres={anyres!r} is not supported; choose one of {', '.join(ANYRES_POLICIES)}")
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
        if self.method.needs_vision_scores:
            with self.method.observing_vision() as captured:
                visuals = self.adapter.encode(inputs, images_per_sample, videos_per_sample)
            self.adapter.attach_scores(visuals, captured, inputs)
        else:
            visuals = self.adapter.encode(inputs, images_per_sample, videos_per_sample)
        kept, records = [], []
        for sample_visuals, key in zip(visuals, keys):
            if self.method.stage is Stage.BEFORE_LLM:
                features, sample_records = prune_sample(sample_visuals, self.method, key, self.anyres, self.log_keep_indices)
            else:
                features, sample_records = [v.features for v in sample_visuals], []
            kept.append(features)
            records.append(sample_records)
        for sample_records, n_images, n_frames in zip(records, images_per_sample, frames_as_images or []):
            for record in sample_records:
                if record.visual >= n_images - n_frames:
                    record.kind, record.unit, record.visual = "frame", record.visual - (n_images - n_frames), n_images - n_frames
        lengths = [[v.length for v in sample_visuals] for sample_visuals in visuals]
        batch = splice(inputs["input_ids"], inputs["attention_mask"], lengths, kept, self.adapter.placeholder_ids,
                       self.pad_id, self.model.get_input_embeddings())
        return batch, records

    def around_llm(self, batch: SplicedBatch, records: list[list[UnitRecord]]):
        """Context for the LLM call; methods acting inside the LLM hook in here."""
        hook = getattr(self.method, "around_llm", None)
        return hook(batch, records) if hook else contextlib.nullcontext()
