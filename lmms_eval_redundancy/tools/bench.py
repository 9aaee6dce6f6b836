"""Speed of every registered method against the unpruned model, on a random LLaVA-1.5-7B-shaped checkpoint.

The checkpoint has LLaVA-1.5-7B's widths (CLIP-L/336 tower, 4096-wide Llama with 11008 MLP) and the given
depths, so that it also runs on a CPU. Every figure is measured in the same run, so ratios are what to read.
``speed`` times prefill through the real ``llava_redundancy`` path; ``overhead`` times each method's own
selection work (``method.selection``) against unpruned prefill.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tabulate import tabulate

from lmms_eval_redundancy.codebook.store import Codebook, save_codebook
from lmms_eval_redundancy.core.budget import KEEP_ALL, Budget
from lmms_eval_redundancy.core.registry import (
    UNPRUNED,
    available_methods,
    build_method,
    file_params,
)
from lmms_eval_redundancy.families.tiny import (
    CHAT_TEMPLATE,
    build_tokenizer,
    real_geometry_config,
)
from lmms_eval_redundancy.lmms.requests import simple_requests
from lmms_eval_redundancy.runtime.engine import PruningEngine
from lmms_eval_redundancy.runtime.loading import load
from lmms_eval_redundancy.runtime.prompts import chat_prompt, chat_template_of

VISUAL_TOKENS = 576


def save_geometry_checkpoint(folder: Path, text_layers: int, vision_layers: int, dtype: torch.dtype) -> Path:
    """A random LLaVA-1.5-7B-shaped checkpoint (real widths, given depths) with a processor, saved to ``folder``."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer()
    config = real_geometry_config("llava-1.5-7b", text_layers=text_layers, vision_layers=vision_layers,
                                  intermediate_size=11008, vocab_size=len(tokenizer))
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).to(dtype).eval().save_pretrained(folder)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    return folder


def example_params(method: str, scratch: Path, hidden_size: int) -> dict:
    """Values for a method's file parameters: a random codebook of the model's width for each."""
    files = file_params(method)
    if not files:
        return {}
    path = save_codebook(Codebook(torch.randn(454, hidden_size), {"model": "random"}), scratch / "random.safetensors")
    return {name: str(path) for name in files}


def pruned_methods(methods: list[str] | None) -> list[str]:
    """The methods to time (default: every registered one), the unpruned reference first."""
    chosen = [m for m in (methods or available_methods()) if m != UNPRUNED]
    return [UNPRUNED] + chosen


def random_images(count: int, size: int = 336) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def default_depths(text_layers: int | None, vision_layers: int | None) -> tuple[int, int, torch.dtype]:
    """Real depths (32 LLM, 24 vision layers) and fp16 on a GPU; 4 and 3 layers in float32 on a CPU."""
    gpu = torch.cuda.is_available()
    return text_layers or (32 if gpu else 4), vision_layers or (24 if gpu else 3), torch.float16 if gpu else torch.float32


def speed(methods: list[str] | None = None, tokens: int = 64, samples: int = 3, text_layers: int | None = None,
          vision_layers: int | None = None) -> list[dict]:
    """Prefill latency per method at ``tokens`` of 576 visual tokens, against unpruned, in one run.

    Each method runs through the real ``llava_redundancy`` path on ``samples`` single-image requests after
    one warm-up request; prefill time (vision tower, pruning, LLM prefill to the first token) and analytic
    FLOPs come from the model's own per-sample efficiency records.
    """
    from lmms_eval_redundancy.lmms.model import LlavaRedundancy

    text_layers, vision_layers, dtype = default_depths(text_layers, vision_layers)
    docs = [{"question": "Describe the image.", "visuals": [image]} for image in random_images(samples + 1)]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        checkpoint = save_geometry_checkpoint(scratch / "model", text_layers, vision_layers, dtype)
        for name in pruned_methods(methods):
            budget = {} if name == UNPRUNED else {"tokens": tokens}
            wrapper = LlavaRedundancy(pretrained=str(checkpoint), method=name, dtype=str(dtype).removeprefix("torch."),
                                      **budget, **example_params(name, scratch, 4096))
            requests = simple_requests(wrapper, docs, task="bench", gen_kwargs={"max_new_tokens": 1})
            wrapper.generate_until(requests[:1])  # warm-up
            wrapper.generate_until(requests[1:])
            measured = [s["efficiency"] for s in wrapper.ledger.samples[1:]]
            kept = [sum(u["after"] for u in s["units"]) for s in wrapper.ledger.samples[1:]]
            rows.append({"method": name, "visual tokens": statistics.fmean(kept),
                         "prefill ms": 1000 * statistics.median(m["prefill_seconds"] for m in measured),
                         "flops": statistics.fmean(m["llm_prefill_flops"] + m["vision_flops"] for m in measured)})
            wrapper.engine.close()
    for row in rows:
        row["measured speed-up"] = rows[0]["prefill ms"] / row["prefill ms"]
        row["FLOPs-predicted speed-up"] = rows[0]["flops"] / row["flops"]
    device = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"LLaVA-1.5-7B widths, {vision_layers} vision layers, {text_layers} LLM layers, {device}, {dtype}, keep "
          f"{tokens} of {VISUAL_TOKENS} visual tokens, median prefill of {samples} requests after a warm-up")
    print(tabulate([{k: v for k, v in r.items() if k != "flops"} for r in rows], headers="keys", tablefmt="github", floatfmt=".3f"))
    return rows


@torch.no_grad()
def overhead(methods: list[str] | None = None, tokens: int = 64, repeats: int = 3, text_layers: int = 3,
             vision_layers: int = 24) -> list[dict]:
    """Each method's own selection time (median of ``repeats`` after a warm-up) over unpruned prefill."""
    image = random_images(1)[0]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        loaded = load(str(save_geometry_checkpoint(scratch / "model", text_layers, vision_layers, torch.float32)))
        prompt = chat_prompt(loaded.processor, chat_template_of(loaded.processor), "Describe the image.", 1, 0)
        for name in pruned_methods(methods):
            method = build_method(name, KEEP_ALL if name == UNPRUNED else Budget("tokens", tokens),
                                  **example_params(name, scratch, loaded.model.config.text_config.hidden_size))
            engine = PruningEngine(loaded.model, loaded.processor, loaded.family, method)
            prefill, selection = [], []
            for _ in range(repeats + 1):
                started = time.perf_counter()
                batch, records = engine.prune(engine.processor_inputs([prompt], [[image]], []), [1], [0], ["bench"])
                with engine.around_llm(batch, records):
                    loaded.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, logits_to_keep=1)
                prefill.append(time.perf_counter() - started)
                selection.append(method.selection.seconds)
            engine.close()
            rows.append({"method": name, "prefill ms": 1000 * statistics.median(prefill[1:]),
                         "selection ms": 1000 * statistics.median(selection[1:])})
    for row in rows:
        row["selection / unpruned prefill"] = row["selection ms"] / rows[0]["prefill ms"]
    print(f"LLaVA-1.5-7B widths, {vision_layers} vision layers, {text_layers} LLM layers, {VISUAL_TOKENS} visual "
          f"tokens, keep {tokens}; median of {repeats} after a warm-up, {torch.get_num_threads()} threads")
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4f"))
    return rows
