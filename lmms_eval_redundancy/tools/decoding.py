"""Decode-step time per method against unpruned at one batch size (what ``bench``'s prefill figures leave out).

Run: ``python -m lmms_eval_redundancy.tools.decoding [METHOD ...]`` (default: fastv) on the reduced LLaVA-1.5-7B shapes
of ``bench`` (real widths, 4 LLM layers and 1 vision layer on a CPU; the real depths and fp16 on a GPU).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate
from transformers import LogitsProcessor, LogitsProcessorList

from lmms_eval_redundancy.core.budget import KEEP_ALL, Budget
from lmms_eval_redundancy.core.registry import UNPRUNED, build_method
from lmms_eval_redundancy.runtime.engine import PruningEngine
from lmms_eval_redundancy.runtime.loading import load
from lmms_eval_redundancy.runtime.prompts import chat_prompt, chat_template_of
from lmms_eval_redundancy.tools.bench import (
    VISUAL_TOKENS,
    default_depths,
    random_images,
    save_geometry_checkpoint,
)

QUESTIONS = ("Describe the image.", "What is in it?", "Is there a cat in this picture or not?", "Colour?")


class StepClock(LogitsProcessor):
    """Marks the logits of every generated token: CUDA events on a GPU (no synchronisation), process time on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list = []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.process_time())
        return scores

    def step_seconds(self) -> list[float]:
        """Seconds of each decode step: from one token's logits to the next one's."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [start.elapsed_time(end) / 1000 for start, end in zip(self.marks, self.marks[1:])]
        return [end - start for start, end in zip(self.marks, self.marks[1:])]


@torch.no_grad()
def decode_steps(methods: list[str] | None = None, tokens: int = 64, batch_size: int = 8, steps: int = 16,
                 repeats: int = 2, checkpoint: Path | None = None) -> list[dict]:
    """Median decode-step time (and its interquartile range) of each method keeping ``tokens`` of the visual tokens, and
    of unpruned, over ``repeats`` generate calls of ``steps`` + 1 tokens for ``batch_size`` prompts of different lengths
    (each call's first decode step, which builds what the later ones reuse, left out); on ``checkpoint`` or the reduced
    LLaVA-1.5-7B shapes of ``bench``."""
    with tempfile.TemporaryDirectory() as folder:
        if checkpoint is None:
            text_layers, vision_layers, dtype = default_depths(None, 1)
            checkpoint = save_geometry_checkpoint(Path(folder) / "model", text_layers, vision_layers, dtype)
        loaded = load(str(checkpoint))
        template = chat_template_of(loaded.processor)
        prompts = [chat_prompt(loaded.processor, template, QUESTIONS[row % len(QUESTIONS)], 1, 0) for row in range(batch_size)]
        inputs = [[image] for image in random_images(batch_size)]
        rows = []
        for name in [UNPRUNED, *(methods or ["fastv"])]:
            method = build_method(name, KEEP_ALL if name == UNPRUNED else Budget("tokens", tokens))
            engine = PruningEngine(loaded.model, loaded.processor, loaded.family, method)
            seconds = []
            for _ in range(repeats):
                batch, records = engine.prune(engine.processor_inputs(prompts, inputs, []), [1] * batch_size,
                                              [0] * batch_size, [f"decode{row}" for row in range(batch_size)])
                clock = StepClock(loaded.model.device)
                with engine.around_llm(batch, records, steps + 1):
                    loaded.model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                          max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                                          suppress_tokens=loaded.family.placeholder_ids,
                                          logits_processor=LogitsProcessorList([clock]))
                seconds += clock.step_seconds()[1:]
            engine.close()
            quartiles = statistics.quantiles(seconds, n=4, method="inclusive")
            rows.append({"method": name, "decode step ms": 1000 * statistics.median(seconds),
                         "IQR ms": f"{1000 * quartiles[0]:.2f}-{1000 * quartiles[2]:.2f}"})
        config = loaded.model.config
    for row in rows:
        row["vs unpruned"] = row["decode step ms"] / rows[0]["decode step ms"]
    clock = "CUDA events" if loaded.model.device.type == "cuda" else f"process time, {torch.get_num_threads()} threads"
    print(f"{config.text_config.num_hidden_layers} LLM layers of width {config.text_config.hidden_size}, "
          f"{loaded.model.dtype}, batch {batch_size}, keep {tokens} of {VISUAL_TOKENS} visual tokens, median of "
          f"{repeats} x {steps - 1} decode steps ({clock})")
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3f"))
    return rows


if __name__ == "__main__":
    decode_steps(sys.argv[1:] or None)
