"""Selection overhead of each method against unpruned prefill, on a LLaVA-1.5-shaped random model.

The model has LLaVA-1.5-7B's widths (CLIP-L/336 tower, 4096-wide Llama with 11008 MLP) but fewer layers
so that it runs on a CPU; every figure is measured in the same run, so the ratio is what to read.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from lmms_eval_redundancy.adapters import LlavaAdapter
from lmms_eval_redundancy.budget import Budget
from lmms_eval_redundancy.codebook.store import Codebook, save_codebook
from lmms_eval_redundancy.methods import fastv, fastervlm
from lmms_eval_redundancy.pruning import prune_sample
from lmms_eval_redundancy.registry import build_method
from lmms_eval_redundancy.tiny import MODEL_CLASSES, real_geometry_config


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def capture_input(module: torch.nn.Module, run) -> tuple[tuple, dict]:
    """The (args, kwargs) ``module`` receives during ``run()``."""
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.setdefault("call", (a, k)) and None, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen["call"]


@torch.no_grad()
def run(text_layers: int = 2, vision_layers: int = 24, keep_tokens: int = 64, text_tokens: int = 40,
        repeats: int = 3, seed: int = 0) -> list[dict]:
    """Print and return one row per method: its selection time and that time over unpruned prefill."""
    torch.manual_seed(seed)
    config = real_geometry_config("llava-1.5-7b", text_layers=text_layers, vision_layers=vision_layers,
                                  intermediate_size=11008)
    model = MODEL_CLASSES["llava"](config).eval()
    adapter = LlavaAdapter(model, processor=None)
    pixels = torch.randn(1, 3, 336, 336)
    visuals = adapter.encode({"pixel_values": pixels}, [1], [0])
    text = torch.randn(1, text_tokens, config.text_config.hidden_size)
    embeds = torch.cat([text[:, : text_tokens // 2], visuals[0][0].features[None], text[:, text_tokens // 2:]], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)

    def prefill():
        adapter.encode({"pixel_values": pixels}, [1], [0])
        model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1)

    prefill_time = median_seconds(prefill, repeats)
    budget = Budget("tokens", keep_tokens)
    rows = []
    scratch = tempfile.TemporaryDirectory()
    codebook = save_codebook(Codebook(torch.randn(454, config.text_config.hidden_size), {"model": "random"}),
                             Path(scratch.name) / "random.safetensors")
    for name in ("random", "codebook", "divprune", "pooling", "fastervlm"):
        method = build_method(name, budget, **({"codebook": str(codebook)} if name == "codebook" else {}))
        if name == "codebook":
            method.attach(model)
        extra = 0.0
        if name == "fastervlm":
            method.attach(model)
            layers = fastervlm.encoder_layers(model.model.vision_tower)
            attention = layers[method.layer].self_attn
            args, kwargs = capture_input(attention, lambda: adapter.encode({"pixel_values": pixels}, [1], [0]))
            hidden = args[0] if args else kwargs["hidden_states"]
            extra = median_seconds(lambda: fastervlm.attention_scores(attention, hidden, True), repeats)
            with method.observing_vision() as captured:
                scored = adapter.encode({"pixel_values": pixels}, [1], [0])
            adapter.attach_scores(scored, captured, {"pixel_values": pixels})
            sample = scored[0]
        else:
            sample = visuals[0]
        select = median_seconds(lambda: prune_sample(sample, method, "bench"), repeats)
        rows.append({"method": name, "selection ms": 1000 * (select + extra)})

    layer_k1 = model.model.language_model.layers[1].self_attn
    args, kwargs = capture_input(layer_k1, lambda: model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1))
    hidden = args[0] if args else kwargs["hidden_states"]
    prunable = torch.zeros(mask.shape, dtype=torch.bool)
    prunable[:, text_tokens // 2: text_tokens // 2 + 576] = True

    def fastv_selection():
        scores = fastv.last_token_attention(layer_k1, hidden, kwargs["position_embeddings"], mask.bool())
        fastv.rectangular(fastv.keep_positions(scores, prunable, [keep_tokens]), mask.shape[1])

    rows.append({"method": "fastv (K=2)", "selection ms": 1000 * median_seconds(fastv_selection, repeats)})
    for row in rows:
        row["fraction of unpruned prefill"] = row["selection ms"] / (1000 * prefill_time)
    print(f"LLaVA-1.5-7B widths, {vision_layers} vision layers, {text_layers} LLM layers, 576 visual + {text_tokens} "
          f"text tokens, keep {keep_tokens}; unpruned prefill (vision + LLM) {1000 * prefill_time:.1f} ms, "
          f"median of {repeats}, {torch.get_num_threads()} threads")
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4f"))
    return rows


def save_geometry_checkpoint(folder: Path, text_layers: int, vision_layers: int, dtype: torch.dtype) -> Path:
    """A random LLaVA-1.5-7B-shaped checkpoint (real widths, given depths) with a processor, saved to ``folder``."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from lmms_eval_redundancy.tiny import CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer()
    config = real_geometry_config("llava-1.5-7b", text_layers=text_layers, vision_layers=vision_layers,
                                  intermediate_size=11008, vocab_size=len(tokenizer))
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    model = MODEL_CLASSES["llava"](config).to(dtype).eval()
    model.save_pretrained(folder)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    return folder


def run_speed(methods: list[str], tokens: int = 64, samples: int = 3, text_layers: int | None = None,
              vision_layers: int | None = None) -> list[dict]:
    """Prefill latency per method at ``tokens`` of 576 visual tokens, against unpruned, in one run.

    Each method runs through the real ``llava_redundancy`` path on ``samples`` single-image requests
    after one warm-up request; prefill time (vision tower, pruning, LLM prefill to the first token) and
    analytic FLOPs come from the model's own per-sample efficiency records.
    """
    import numpy as np
    from PIL import Image

    from lmms_eval_redundancy.model import LlavaRedundancy

    gpu = torch.cuda.is_available()
    text_layers = text_layers or (32 if gpu else 4)
    vision_layers = vision_layers or (24 if gpu else 3)
    dtype = torch.float16 if gpu else torch.float32
    scratch = tempfile.TemporaryDirectory()
    folder = save_geometry_checkpoint(Path(scratch.name) / "model", text_layers, vision_layers, dtype)
    codebook = save_codebook(Codebook(torch.randn(454, 4096), {"model": "random"}), Path(scratch.name) / "codebook.safetensors")
    rng = np.random.default_rng(0)
    docs = {i: {"image": Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))} for i in range(samples + 1)}
    request = lambda i: type("Request", (), {"args": ("Describe the image.", {"max_new_tokens": 1}, lambda d: [d["image"]], i, "bench", "test")})()  # noqa: E731
    rows = []
    for spec in ["none"] + [m for m in methods if m != "none"]:
        extra = {"codebook": str(codebook)} if spec == "codebook" else {}
        budget = {} if spec == "none" else {"tokens": tokens}
        wrapper = LlavaRedundancy(pretrained=str(folder), method=spec, dtype=str(dtype).removeprefix("torch."), **budget, **extra)
        wrapper.task_dict = {"bench": {"test": docs}}
        wrapper.generate_until([request(0)])  # warm-up
        wrapper.generate_until([request(i) for i in range(1, samples + 1)])
        measured = [s["efficiency"] for s in wrapper.ledger.samples[1:]]
        kept = [sum(u["after"] for u in s["units"]) for s in wrapper.ledger.samples[1:]]
        rows.append({"method": spec, "visual tokens": statistics.fmean(kept),
                     "prefill ms": 1000 * statistics.median(m["prefill_seconds"] for m in measured),
                     "flops": statistics.fmean(m["llm_prefill_flops"] + m["vision_flops"] for m in measured)})
        del wrapper
    for row in rows:
        row["measured speed-up"] = rows[0]["prefill ms"] / row["prefill ms"]
        row["FLOPs-predicted speed-up"] = rows[0]["flops"] / row["flops"]
    print(f"LLaVA-1.5-7B widths, {vision_layers} vision layers, {text_layers} LLM layers, {'GPU ' + torch.cuda.get_device_name() if gpu else 'CPU'}"
          f", {dtype}, keep {tokens} of 576 visual tokens, median prefill of {samples} requests after a warm-up")
    print(tabulate([{k: v for k, v in r.items() if k != "flops"} for r in rows], headers="keys", tablefmt="github", floatfmt=".3f"))
    return rows
