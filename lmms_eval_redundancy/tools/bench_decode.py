"""Decoding speed per token: transformers' dynamic KV cache against the static cache the wrapper decodes with
before the LLM (and with the decoding step compiled), on the random LLaVA-1.5-7B-shaped checkpoint of ``bench``.

Every variant decodes the same pruned batch through ``generate`` with the keyword arguments the wrapper passes
(``runtime.decoding.Decoding``); a logits processor marks the end of every step, so prefill is left out. The
figures are the median and interquartile range over every decoding step of the timed runs, after one warm-up
run per variant (its wall time, compilation included, is printed too); the timed runs take turns, one of each
variant at a time, so that a drifting load on the machine touches every variant alike.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate
from transformers import LogitsProcessor, LogitsProcessorList

from lmms_eval_redundancy.core.budget import Budget
from lmms_eval_redundancy.core.registry import build_method
from lmms_eval_redundancy.core.timing import Stamp, elapsed, stamp
from lmms_eval_redundancy.runtime.decoding import Decoding
from lmms_eval_redundancy.runtime.efficiency import Quartiles
from lmms_eval_redundancy.runtime.engine import PruningEngine
from lmms_eval_redundancy.runtime.loading import load
from lmms_eval_redundancy.runtime.prompts import chat_prompt, chat_template_of
from lmms_eval_redundancy.tools.bench import (
    VISUAL_TOKENS,
    default_depths,
    random_images,
    save_geometry_checkpoint,
)

VARIANTS = {  # what the wrapper does: "static" on a CPU; on a GPU transformers compiles the static step itself
    "dynamic cache": Decoding(static_cache=False),
    "static cache": Decoding(transformers_compile=False),
    "static cache, compiled step": Decoding(transformers_compile=True),
}


class StepClock(LogitsProcessor):
    """Stamps every next-token logits on the device's clock (``core.timing.stamp``: no synchronisation per step);
    passes scores through."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[Stamp] = []

    def __call__(self, input_ids, scores):
        self.marks.append(stamp(self.device))
        return scores

    def step_seconds(self) -> list[float]:
        """Seconds of each decoding step: between consecutive marks (the first mark ends the prefill)."""
        return [elapsed(start, end) for start, end in zip(self.marks, self.marks[1:])]


@torch.no_grad()
def decode_run(engine: PruningEngine, batch, decoding: Decoding, new_tokens: int) -> tuple[list[float], list, float]:
    """One ``generate`` of exactly ``new_tokens`` greedy tokens: per-step seconds, the tokens, wall seconds."""
    model = engine.model
    clock = StepClock(model.device)
    started = time.perf_counter()
    output = model.generate(**decoding.generate_inputs(model, batch.inputs_embeds, batch.attention_mask, new_tokens),
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            suppress_tokens=engine.family.placeholder_ids, logits_processor=LogitsProcessorList([clock]),
                            pad_token_id=engine.pad_id)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return clock.step_seconds(), output.tolist(), time.perf_counter() - started


def decode_speed(batch_sizes: tuple[int, ...] = (1, 8), new_tokens: int = 16, runs: int = 3, tokens: int = 64,
                 compiled: bool = False, text_layers: int | None = None, vision_layers: int | None = None) -> list[dict]:
    """Per-token decode time of each ``VARIANTS`` entry (the compiled step only with ``compiled``) at each batch
    size, prompts of one image with ``tokens`` of its 576 visual tokens kept (random picks; ``tokens=576``: all)."""
    text_layers, vision_layers, dtype = default_depths(text_layers, vision_layers)
    variants = {name: decoding for name, decoding in VARIANTS.items() if compiled or not decoding.transformers_compile}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        loaded = load(str(save_geometry_checkpoint(Path(folder) / "model", text_layers, vision_layers, dtype)))
        method = build_method("random", Budget("tokens", tokens))
        engine = PruningEngine(loaded.model, loaded.processor, loaded.family, method)
        prompt = chat_prompt(loaded.processor, chat_template_of(loaded.processor), "Describe the image.", 1, 0)
        for size in batch_sizes:
            inputs = engine.processor_inputs([prompt] * size, [[image] for image in random_images(size)], [])
            batch, _ = engine.prune(inputs, [1] * size, [0] * size, [f"bench{i}" for i in range(size)])
            warm_up = {name: decode_run(engine, batch, decoding, new_tokens)[2] for name, decoding in variants.items()}
            steps, sequences = {name: [] for name in variants}, {}
            for _ in range(runs):
                for name, decoding in variants.items():
                    seconds, sequences[name], _ = decode_run(engine, batch, decoding, new_tokens)
                    steps[name] += seconds
            spread = {name: Quartiles.of(seconds) for name, seconds in steps.items()}
            for name, step in spread.items():
                rows.append({"batch": size, "decoding": name, "ms/token": 1000 * step.median,
                             "IQR ms": f"{1000 * step.low:.1f}-{1000 * step.high:.1f}",
                             "speed-up": spread["dynamic cache"].median / step.median, "warm-up run s": warm_up[name],
                             "same tokens": sequences[name] == sequences["dynamic cache"]})
        engine.close()
    device = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"LLaVA-1.5-7B widths, {vision_layers} vision layers, {text_layers} LLM layers, {device}, {dtype}, "
          f"{tokens} of {VISUAL_TOKENS} visual tokens, {new_tokens} new tokens; median and interquartile range over "
          f"the {runs * (new_tokens - 1)} decoding steps of {runs} runs after a warm-up run")
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".2f"))
    return rows
