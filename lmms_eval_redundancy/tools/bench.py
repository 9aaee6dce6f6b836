"""Speed of every registered method against the unpruned model, on a random LLaVA-1.5-7B-shaped checkpoint.

The checkpoint has LLaVA-1.5-7B's widths (CLIP-L/336 tower, 4096-wide Llama with 11008 MLP) and the given
depths, so that it also runs on a CPU. Every figure is measured in the same run, so ratios are what to read.
``speed`` times device prefill (vision tower, selection, LLM prefill) and end-to-end samples/s through the real
``llava_redundancy`` path, against FLOPs- and (on a GPU) roofline-predicted speed-ups; ``overhead`` times each
method's own selection work (``method.selection``) against unpruned prefill.
"""

from __future__ import annotations

import functools
import gc
import statistics
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from tabulate import tabulate

from lmms_eval_redundancy.codebook.store import Codebook, save_codebook
from lmms_eval_redundancy.core.budget import KEEP_ALL, Budget
from lmms_eval_redundancy.core.registry import (
    UNPRUNED,
    MethodError,
    available_methods,
    build_method,
    file_params,
    param_names,
)
from lmms_eval_redundancy.core.timing import cpu_threads, elapsed, stamp, sync
from lmms_eval_redundancy.families.base import patch_grid
from lmms_eval_redundancy.families.tiny import (
    CHAT_TEMPLATE,
    build_tiny_clip,
    build_tokenizer,
    real_geometry_config,
)
from lmms_eval_redundancy.lmms.requests import simple_requests
from lmms_eval_redundancy.runtime.decoding import Decoding
from lmms_eval_redundancy.runtime.efficiency import Quartiles
from lmms_eval_redundancy.runtime.engine import PruningEngine
from lmms_eval_redundancy.runtime.loading import load
from lmms_eval_redundancy.runtime.prompts import chat_prompt, chat_template_of

VISUAL_TOKENS = 576
# ``speed``'s question: LLaVA-1.5's system prompt and a short question, so that a request has a real one's text
# length (616 LLM tokens unpruned, 104 with 64 visual tokens kept), on which the LLM's matrix sizes depend
QUESTION = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the human's questions. Describe the image in detail.")


def save_geometry_checkpoint(folder: Path, text_layers: int, vision_layers: int, dtype: torch.dtype) -> Path:
    """A random LLaVA-1.5-7B-shaped checkpoint (real widths, given depths) with a processor, saved to ``folder``."""
    from transformers import (
        CLIPImageProcessor,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer()
    config = real_geometry_config("llava-1.5-7b", text_layers=text_layers, vision_layers=vision_layers,
                                  intermediate_size=11008, vocab_size=len(tokenizer))
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).to(dtype).eval().save_pretrained(folder)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    return folder


def example_params(method: str, scratch: Path, hidden_size: int, clip_text_tower: dict | None = None) -> dict:
    """Values for a method's file parameters (a random codebook of the model's width for each) and its CLIP text
    tower (a random one reading CLIP-L/336's 1024-wide vision states: tiny, or as ``clip_text_tower`` sizes it,
    ``build_tiny_clip``'s keywords)."""
    params = {}
    if "clip_text" in param_names(method):
        params["clip_text"] = str(build_tiny_clip(scratch / "clip", vision_width=1024, **(clip_text_tower or {})))
    files = file_params(method)
    if files:
        path = save_codebook(Codebook(torch.randn(454, hidden_size), {"model": "random"}), scratch / "random.safetensors")
        params.update({name: str(path) for name in files})
    return params


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


def default_batch_sizes() -> list[int]:
    """Batch sizes ``speed`` measures by default: 1 and 8 on a GPU, 1 on a CPU (to keep it short)."""
    return [1, 8] if torch.cuda.is_available() else [1]


@dataclass(frozen=True)
class DeviceRates:
    """What the device sustains: FLOP/s of a large matmul and bytes/s of a large copy (read + write)."""

    matmul_flops: float
    bandwidth: float

    def roofline_seconds(self, flops: float, bytes_moved: float) -> float:
        """The roofline's time for work of ``flops`` moving ``bytes_moved``: whichever bound is slower."""
        return max(flops / self.matmul_flops, bytes_moved / self.bandwidth)


def measure_rates(device: torch.device, size: int = 8192, copy_bytes: int = 2**30, dtype: torch.dtype = torch.float16,
                  repeats: int = 5) -> DeviceRates:
    """The device's matmul rate (a timed ``size``-square matmul in ``dtype``) and memory bandwidth (a timed copy of
    ``copy_bytes``), medians of ``repeats`` after a warm-up, on the device's clock (``core.timing``)."""
    left, right = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    source = torch.empty(copy_bytes // dtype.itemsize, device=device, dtype=dtype)
    target = torch.empty_like(source)

    def median_seconds(work) -> float:
        work()
        times = []
        for _ in range(repeats):
            started = stamp(device)
            work()
            times.append(elapsed(started, stamp(device)))
        return statistics.median(times)

    matmul = median_seconds(lambda: left @ right)
    copy = median_seconds(lambda: target.copy_(source))
    return DeviceRates(2 * size**3 / matmul, 2 * source.numel() * source.element_size() / copy)


def sample_bytes(config, llm_tokens_layer_mean: float, vision_tiles: float, dtype_bytes: int) -> float:
    """Activation and KV-cache bytes one sample's prefill moves: every matrix multiply reads its input and writes
    its output once (no fusion), each decoder layer writes its keys and values; weights are counted per batch."""
    text, vision = config.text_config, config.vision_config
    hidden, inner = text.hidden_size, text.intermediate_size
    kv = hidden // text.num_attention_heads * (getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    # q/k/v, o, gate and up, down; then keys and values written to the cache
    per_token_layer = (2 * hidden + 2 * kv) + 2 * hidden + 2 * (hidden + inner) + (inner + hidden) + 2 * kv
    width, vision_inner = vision.hidden_size, vision.intermediate_size
    patches = patch_grid(vision) ** 2 + int(vision.model_type.startswith("clip"))
    per_patch_layer = 4 * width + 2 * width + (width + vision_inner) + (vision_inner + width)  # q/k/v, o, fc1, fc2
    per_patch_projector = (width + hidden) + 2 * hidden  # its two linear layers, over every patch
    llm = llm_tokens_layer_mean * text.num_hidden_layers * per_token_layer
    return dtype_bytes * (llm + vision_tiles * patches * (vision.num_hidden_layers * per_patch_layer + per_patch_projector))


def weight_bytes(model) -> int:
    """Bytes of the weights a prefill reads: every parameter but the input embedding table (only rows are gathered)."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - embedding.numel() * embedding.element_size()


@dataclass
class TimedRun:
    """One method at one batch size: its per-sample records after the warm-up batch and the wall time of the
    ``generate_until`` call that made them."""

    method: str
    batch_size: int
    samples: list[dict]
    seconds: float

    def mean(self, key: str) -> float:
        return statistics.fmean(s["efficiency"][key] for s in self.samples)

    @property
    def device_prefill(self) -> dict[int, float]:
        return {s["doc_id"]: s["efficiency"]["device_prefill_seconds"] for s in self.samples}

    @property
    def flops(self) -> float:
        """Analytic prefill FLOPs per sample: vision tower and LLM prefill."""
        return self.mean("llm_prefill_flops") + self.mean("vision_flops")


def speed_rows(runs: list[TimedRun], config, weights: int, dtype_bytes: int, rates: DeviceRates | None = None,
               llava_hf_samples_per_second: float | None = None) -> list[dict]:
    """Each run against the unpruned run at its batch size: measured device prefill speed-up (median and quartiles
    of the per-document ratios), the FLOPs-predicted one and their ratio; with ``rates`` the roofline-predicted
    speed-up (per batch: weights once, activations and KV per sample) and measured / roofline; samples/s and its
    ratio to unpruned (and to lmms-eval's ``llava_hf`` when given)."""
    references = {run.batch_size: run for run in runs if run.method == UNPRUNED}

    def roofline(run: TimedRun) -> float:
        moved = weights + run.batch_size * sample_bytes(config, run.mean("llm_tokens_layer_mean"),
                                                        run.mean("vision_tiles"), dtype_bytes)
        return rates.roofline_seconds(run.batch_size * run.flops, moved)

    rows = []
    for run in runs:
        reference = references[run.batch_size]
        ours, theirs = run.device_prefill, reference.device_prefill
        speed_up = Quartiles.of(theirs[doc] / ours[doc] for doc in ours.keys() & theirs.keys())
        predicted = reference.flops / run.flops
        row = {"method": run.method, "batch": run.batch_size,
               "visual tokens": statistics.fmean(sum(u["after"] for u in s["units"]) for s in run.samples),
               "LLM tokens": run.mean("llm_tokens_layer_mean"),
               "device prefill ms": 1000 * statistics.median(ours.values()),
               "speed-up (IQR)": "1 (reference)" if run is reference else str(speed_up), "FLOPs-predicted": predicted, "measured / FLOPs": speed_up.median / predicted}
        if rates is not None:
            row["roofline-predicted"] = roofline(reference) / roofline(run)
            row["measured / roofline"] = speed_up.median / row["roofline-predicted"]
        samples_per_second = len(run.samples) / run.seconds
        row["samples/s"] = samples_per_second
        row["vs unpruned"] = samples_per_second / (len(reference.samples) / reference.seconds)
        if llava_hf_samples_per_second is not None:
            row["vs llava_hf"] = samples_per_second / llava_hf_samples_per_second
        row["speed-up"] = speed_up
        rows.append(row)
    return rows


def never_ending(model, eos_token_id: int) -> None:
    """Zero the output row of the end-of-text token, so that greedy decoding of random weights generates every
    token it is asked for (equal work for every method)."""
    with torch.no_grad():
        model.get_output_embeddings().weight[eos_token_id] = 0


def interleaved_runs(wrapper, methods: dict[str, typing.Callable[[], typing.Any]], docs: list[dict], batch_size: int,
                     samples: int, new_tokens: int) -> list[TimedRun]:
    """Every method of ``methods`` (name -> a fresh method object) through ``wrapper`` (a ``llava_redundancy`` model),
    taking turns batch by batch: a warm-up round, then ``samples`` timed rounds over the same documents. Each turn
    puts the method's engine on the wrapper's one model; a busy machine's changing load then slows all alike."""
    wrapper.batch_size_per_gpu = batch_size
    requests = simple_requests(wrapper, docs[:(samples + 1) * batch_size], task="bench",
                               gen_kwargs={"max_new_tokens": new_tokens})
    runs = {name: TimedRun(name, batch_size, [], 0.0) for name in methods}
    family = wrapper.engine.family
    for turn in range(samples + 1):
        for name, build in methods.items():
            wrapper.engine = PruningEngine(wrapper.model, wrapper.processor, family, build())
            wrapper.decoding = Decoding.default(wrapper.engine.method.stage)  # the method's cache, as a run of it has
            started = time.perf_counter()
            wrapper.generate_until(requests[turn * batch_size:(turn + 1) * batch_size])
            seconds = time.perf_counter() - started
            wrapper.engine.close()
            if turn:  # turn 0 warms every method up
                runs[name].samples += wrapper.ledger.samples[-batch_size:]
                runs[name].seconds += seconds
    return list(runs.values())


def llava_hf_samples_per_second(checkpoint: Path, docs: list[dict], device: torch.device, dtype: torch.dtype,
                                samples: int, new_tokens: int) -> float:
    """Requests per second of lmms-eval's own ``llava_hf`` model (batch 1, its only size) on ``samples`` of the
    same requests after a warm-up request, wall time of its ``generate_until``."""
    from lmms_eval.models.simple.llava_hf import LlavaHf

    # device_map: lmms-eval 0.7.3 passes its default "" on to transformers 5, which refuses it
    model = LlavaHf(pretrained=str(checkpoint), device=str(device), device_map=str(device),
                    dtype=str(dtype).removeprefix("torch."))
    never_ending(model.model, model.tokenizer.eos_token_id)
    requests = simple_requests(model, docs[:samples + 1], task="bench", gen_kwargs={"max_new_tokens": new_tokens})
    model.generate_until(requests[:1])
    started = time.perf_counter()
    model.generate_until(requests[1:])
    seconds = time.perf_counter() - started
    return samples / seconds


def speed(methods: list[str] | None = None, tokens: int = 64, samples: int = 5, batch_sizes: list[int] | None = None,
          text_layers: int | None = None, vision_layers: int | None = None, new_tokens: int | None = None,
          threads: int | None = None) -> list[dict]:
    """Device prefill and end-to-end speed per method at ``tokens`` of 576 visual tokens, against unpruned, in one run.

    The methods run through the real ``llava_redundancy`` path on one loaded model, taking turns batch by batch
    (``interleaved_runs``) at each of ``batch_sizes``: a warm-up batch each, then ``samples`` batches of
    single-image requests generating ``new_tokens`` tokens each. Device prefill (vision tower + selection + LLM
    prefill; host preparation left out) comes from the model's per-sample phases, FLOPs from its analytic records;
    samples/s is requests over the wall time of the timed ``generate_until`` calls. On a GPU also the roofline
    from the device's measured rates and lmms-eval's ``llava_hf`` on the same requests.

    ``threads``: torch's CPU threads (default on a CPU: 1). Several threads share each matrix multiply and wait for
    the slowest at its end; on a shared machine a thread the system pauses stalls the others, which costs small
    (pruned) multiplies more per FLOP than large ones, so one thread measures the work, not the machine's load.
    """
    from lmms_eval_redundancy.lmms.model import LlavaRedundancy

    transformers.logging.set_verbosity_error()  # random checkpoints: their loading reports are expected, not news
    gpu = torch.cuda.is_available()
    with cpu_threads(threads or (None if gpu else 1)):
        text_layers, vision_layers, dtype = default_depths(text_layers, vision_layers)
        batch_sizes = batch_sizes or default_batch_sizes()
        new_tokens = new_tokens or (16 if gpu else 4)
        docs = [{"question": QUESTION, "visuals": [image]} for image in random_images((samples + 1) * max(batch_sizes))]
        hf_rate = None
        with tempfile.TemporaryDirectory() as folder:
            scratch = Path(folder)
            checkpoint = save_geometry_checkpoint(scratch / "model", text_layers, vision_layers, dtype)
            wrapper = LlavaRedundancy(pretrained=str(checkpoint), dtype=str(dtype).removeprefix("torch."))
            never_ending(wrapper.model, wrapper.tokenizer.eos_token_id)
            builders = {name: functools.partial(build_method, name, KEEP_ALL if name == UNPRUNED else Budget("tokens", tokens),
                                                **example_params(name, scratch, 4096))
                        for name in pruned_methods(methods)}
            runs = [run for batch in batch_sizes for run in interleaved_runs(wrapper, builders, docs, batch, samples, new_tokens)]
            config, weights, device = wrapper.model.config, weight_bytes(wrapper.model), wrapper.device
            del wrapper
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
                hf_rate = llava_hf_samples_per_second(checkpoint, docs, device, dtype, samples, new_tokens)
        rates = measure_rates(device) if gpu else None
        rows = speed_rows(runs, config, weights, dtype.itemsize, rates, hf_rate)
        where = (f"GPU {torch.cuda.get_device_name()} (matmul {rates.matmul_flops / 1e12:.0f} TFLOP/s, copy "
                 f"{rates.bandwidth / 1e9:.0f} GB/s; llava_hf {hf_rate:.2f} samples/s at batch 1)") if gpu else \
            f"CPU, {torch.get_num_threads()} threads"
        print(f"LLaVA-1.5-7B widths, {vision_layers} vision layers, {text_layers} LLM layers, {where}, {dtype}, keep "
              f"{tokens} of {VISUAL_TOKENS} visual tokens; per batch size the methods take turns: a warm-up batch each, then "
              f"{samples} batches each, {new_tokens} new tokens per request; device prefill speed-up: median (interquartile range) of "
              "the per-request ratios to unpruned")
        print(tabulate([{k: v for k, v in row.items() if k != "speed-up"} for row in rows], headers="keys",
                       tablefmt="github", floatfmt=".3f"))
        return rows


@torch.no_grad()
def overhead(methods: list[str] | None = None, tokens: int = 64, repeats: int = 3, text_layers: int = 3,
             vision_layers: int = 24) -> list[dict]:
    """Each method's own selection time over unpruned prefill: the median over ``repeats`` (after a warm-up) of the
    ratio of its selection to an unpruned prefill run right before it, so that both see the same machine load.

    Prefill is timed from processor outputs (preprocessing excluded) to the first token's logits. A method
    reading a CLIP text tower gets a random one of CLIP-L/336's text geometry; a method that cannot run on
    this model (e.g. stage layers beyond ``text_layers``) gets a row saying why.
    """
    clip_l_text = {"projection_dim": 768, "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                                   "num_attention_heads": 12}}
    image = random_images(1)[0]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        loaded = load(str(save_geometry_checkpoint(scratch / "model", text_layers, vision_layers, torch.float32)))
        prompt = chat_prompt(loaded.processor, chat_template_of(loaded.processor), "Describe the image.", 1, 0)

        def prefill(engine: PruningEngine) -> float:
            inputs = engine.processor_inputs([prompt], [[image]], [])
            started = time.perf_counter()
            batch, records = engine.prune(inputs, [1], [0], ["bench"])
            with engine.around_llm(batch, records):
                loaded.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, logits_to_keep=1)
            sync(loaded.model.device)
            return time.perf_counter() - started

        reference = PruningEngine(loaded.model, loaded.processor, loaded.family, build_method(UNPRUNED, KEEP_ALL))
        for name in pruned_methods(methods):
            params = example_params(name, scratch, loaded.model.config.text_config.hidden_size, clip_l_text)
            try:
                method = build_method(name, KEEP_ALL if name == UNPRUNED else Budget("tokens", tokens), **params)
                engine = reference if name == UNPRUNED else PruningEngine(loaded.model, loaded.processor, loaded.family, method)
            except MethodError as error:
                rows.append({"method": name, "note": str(error)})
                continue
            unpruned, pruned, selection = [], [], []
            for _ in range(repeats + 1):
                unpruned.append(prefill(reference))
                pruned.append(prefill(engine))
                selection.append(engine.method.selection.seconds)
            if engine is not reference:
                engine.close()
            rows.append({"method": name, "unpruned prefill ms": 1000 * statistics.median(unpruned[1:]),
                         "prefill ms": 1000 * statistics.median(pruned[1:]),
                         "selection ms": 1000 * statistics.median(selection[1:]),
                         "selection / unpruned prefill": statistics.median(
                             s / u for s, u in zip(selection[1:], unpruned[1:]))})
        reference.close()
    print(f"LLaVA-1.5-7B widths, {vision_layers} vision layers, {text_layers} LLM layers, {VISUAL_TOKENS} visual "
          f"tokens, keep {tokens}; median of {repeats} after a warm-up, {torch.get_num_threads()} threads")
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4f", missingval=""))
    return rows
