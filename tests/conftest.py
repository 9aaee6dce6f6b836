"""Shared fixtures and helpers; tests are in three tiers, marked by their folder.

- ``unit/``: pure functions and files (seconds, no model forward passes beyond toy tensors);
- ``integration/``: the wrapper, engine and builder in-process on tiny models (lmms-eval's evaluator
  in-process where a test needs tasks);
- ``e2e/``: real commands in subprocesses (``python -m lmms_eval``, ``accelerate launch``, sweeps,
  builder processes, a wheel build), one per distinct path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_eval_redundancy.families import FAMILIES

# The two test workers share two cores: one thread each, in their subprocesses too. The tiny models gain
# nothing from more threads, and two workers' spinning thread pools on two cores slow each other many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TIERS = ("unit", "integration", "e2e")
REFERENCE = Path(os.environ.get("LMMS_EVAL_REDUNDANCY_REFERENCE_CODEBOOKS") or REPO.parent / "shared" / "reference-codebooks")
LLAVA15_PT = "241228-162634-llava15/coco_train_500samples_numPrototypes-454.pt"
LLAVAOV_PT = "241225-101925-llavaov/coco_train_1200samples_numPrototypes-45.pt"


def release_file(relative: str) -> Path:
    path = REFERENCE / relative
    if not path.is_file():
        pytest.skip(f"reference codebook {relative} not available under {REFERENCE}")
    return path


FIDELITY = REPO.parent / "shared" / "fidelity"  # the official code's outputs on synthetic cases, beside the repository


def fidelity_cases(method: str, kind: str | None = None) -> list:
    """The official-code cases of ``method`` (``FIDELITY/<method>.json``; those of ``kind`` when given) as pytest
    parameters named by case id; one skipped parameter when the file is absent."""
    path = FIDELITY / f"{method}.json"
    if not path.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no fidelity cases under {FIDELITY}"))]
    return [pytest.param(case, id=case["id"]) for case in json.loads(path.read_text())["cases"] if kind in (None, case["kind"])]


@functools.cache
def fidelity_tensors(method: str) -> dict[str, torch.Tensor]:
    """The tensors that ``method``'s official-code cases name, read once per worker."""
    from safetensors.torch import load_file

    return load_file(FIDELITY / f"{method}.safetensors")


def official_expected(case: dict) -> tuple[dict, dict]:
    """A case's expected values and tensors under the project's tie rule: where the official order of tied scores
    decides, the lower index first."""
    if case["tie_order_dependent"]:
        return case["expected_lower_index_ties"], case["expected_lower_index_ties_tensors"]
    return case["expected"], case["expected_tensors"]


LOCAL_TASKS = "tiny_image,tiny_multi_image,tiny_video,tiny_image_choice"
LOCAL_DOCS = {"tiny_image": 8, "tiny_multi_image": 8, "tiny_video": 4, "tiny_image_choice": 8}
LOCAL_REQUESTS = 8 + 8 + 4 + 8 * 4  # multiple choice sends one loglikelihood request per choice


def readme_methods() -> list[tuple[str, str]]:
    """File name and code of every example of the README's "Adding a method", in order."""
    section = (REPO / "README.md").read_text().split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"`lmms_eval_redundancy/methods/(\w+\.py)`:\n\n```python\n(.*?)```", section, re.S)


def register_readme_methods() -> None:
    """Each README example as a module of the methods package, registered like a pasted file (the generated
    "every method" tests then cover them)."""
    for file_name, code in readme_methods():
        name = f"lmms_eval_redundancy.methods.{file_name.removesuffix('.py')}"
        if name not in sys.modules:
            module = sys.modules[name] = types.ModuleType(name)
            exec(compile(code, f"README.md ({file_name})", "exec"), module.__dict__)


register_readme_methods()


def pytest_collection_modifyitems(items):
    """Mark every test with the tier of its folder (``pytest -m unit`` runs the fast tier alone), and run the slow
    tiers first (e2e, integration, unit): the workers take whole modules in this order, so short ones fill the end."""
    tier_of = {item: Path(str(item.fspath)).parent.name for item in items}
    for item, tier in tier_of.items():
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
    items.sort(key=lambda item: -TIERS.index(tier_of[item]) if tier_of[item] in TIERS else 0)


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """Every test leaves torch's thread count as it found it (results of later tests in the worker depend on it)."""
    before = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == before, f"the test changed torch's CPU threads from {before} to {torch.get_num_threads()}"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Random tiny checkpoints saved to disk, one per family (loaded back with from_pretrained by users)."""
    from lmms_eval_redundancy.families import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def local_tasks(tmp_path_factory) -> Path:
    """The local tasks and their generated data (the --include_path of local runs)."""
    from lmms_eval_redundancy.embedded.tasks import write_local_tasks

    return write_local_tasks(tmp_path_factory.mktemp("local_tasks"))


@pytest.fixture(scope="session")
def tiny_codebook(tiny_models, tmp_path_factory) -> tuple[Path, float]:
    """A codebook for the tiny LLaVA model: 6 of its projected tokens of one noise image, and a threshold
    (the median score of another image's tokens) that keeps about half of them."""
    from lmms_eval_redundancy.codebook.store import Codebook, save_codebook
    from lmms_eval_redundancy.core.budget import KEEP_ALL
    from lmms_eval_redundancy.core.registry import UNPRUNED, build_method
    from lmms_eval_redundancy.methods.codebook import redundancy_scores
    from lmms_eval_redundancy.runtime.engine import PruningEngine
    from lmms_eval_redundancy.runtime.loading import load

    loaded = load(str(tiny_models["llava"]), device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    engine = PruningEngine(loaded.model, loaded.processor, loaded.family, build_method(UNPRUNED, KEEP_ALL))
    inputs = engine.processor_inputs([loaded.processor.image_token] * 2, [[image] for image in images], [])
    (first,), (second,) = engine.pipeline(inputs, [1, 1], [0, 0], ["a", "b"]).visuals
    prototypes = first.features[:6].clone()
    threshold = round(float(redundancy_scores(second.features, prototypes).median()), 4)
    meta = {"model": str(tiny_models["llava"]), "source": "tiny: projected tokens of a noise image", "threshold": str(threshold)}
    return save_codebook(Codebook(prototypes, meta), tmp_path_factory.mktemp("codebook") / "tiny.safetensors"), threshold


def tiny_wrapper(path, **model_args):
    """The ``llava_redundancy`` model on the tiny checkpoint at ``path``, on the CPU in float32 (``model_args`` as
    on lmms-eval's command line)."""
    from lmms_eval_redundancy.lmms.model import LlavaRedundancy

    return LlavaRedundancy(pretrained=str(path), device="cpu", dtype="float32", **model_args)


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def official_next_tokens(model, states: torch.Tensor, picks: list[torch.Tensor], image_size) -> torch.Tensor:
    """The visual tokens of one LLaVA-NeXT image in the official ``spatial`` layout, from per-view ``picks`` (patch
    indices, base view first) on the vision states ``states [views, side * side, C]`` of an eager run of
    ``model``'s tower: base view, then the stitched crop grid read row-major (no unpadding, no newline tokens),
    through the projector."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
    )

    from lmms_eval_redundancy.methods.vispruner import official_anyres_mask

    side = int(states.shape[1] ** 0.5)
    masks = torch.zeros(len(picks), side * side, dtype=torch.bool)
    for mask, chosen in zip(masks, picks):
        mask[chosen] = True
    size = [int(x) for x in image_size]  # (height, width), as the processor gives it
    rows, columns = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
    keep = official_anyres_mask(masks, size[::-1], columns, rows, side, unpad=False)
    grid = states[1:].view(rows, columns, side, side, -1).permute(0, 2, 1, 3, 4).reshape(-1, states.shape[-1])
    with torch.no_grad():
        return model.model.multi_modal_projector(torch.cat([states[0], grid])[keep])


def requests_for(wrapper, docs: list[dict], kind: str = "generate_until", task: str = "unit"):
    """Requests over ``docs`` (each with ``question``, ``visuals`` and, for loglikelihood, ``target``)."""
    from lmms_eval_redundancy.lmms.requests import simple_requests

    return simple_requests(wrapper, docs, kind, task, gen_kwargs={"max_new_tokens": 6, "until": ["</s>"]})


def method_cases() -> dict[str, dict]:
    """model_args of every registered method (the unpruned reference left out) on the tiny models, from what
    it declares: a count budget, ``anyres=base_only`` when it needs a token grid, file parameters marked
    ``"<codebook>"`` (the tiny codebook), a ``clip_text`` parameter marked ``"<clip_text>"`` (the tiny CLIP)."""
    from lmms_eval_redundancy.core.registry import (
        UNPRUNED,
        file_params,
        method_classes,
        param_names,
    )

    cases = {}
    for cls in method_classes():
        if cls.name == UNPRUNED:
            continue
        budget = {"retention": 0.4} if "retention" in cls.budgets else {"tokens": 4}
        case = {"method": cls.name, **budget, **{param: "<codebook>" for param in file_params(cls.name)}}
        if "clip_text" in param_names(cls.name):
            case["clip_text"] = "<clip_text>"
        cases[cls.name] = {**case, "anyres": "base_only"} if cls.needs_grid else case
    return cases


def codebook_keep(folder: Path, features, prototypes, budget, **params):
    """Keep indices of the shipped ``codebook`` method for one unit of ``features``, given ``prototypes``."""
    from types import SimpleNamespace

    from lmms_eval_redundancy.codebook.store import Codebook, save_codebook
    from lmms_eval_redundancy.core.registry import build_method
    from lmms_eval_redundancy.core.visuals import VisualUnit

    path = save_codebook(Codebook(prototypes, {"model": "unit test"}), folder / "keep.safetensors")
    method = build_method("codebook", budget, codebook=str(path), **params)
    method.attach(SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(hidden_size=prototypes.shape[1]))), None)
    return method.select_unit(VisualUnit(features, key="unit")).keep


def with_files(args: dict, codebook: Path) -> dict:
    """``args`` with file parameters pointing at ``codebook`` and ``clip_text`` at the tiny CLIP checkpoint."""
    files = {"<codebook>": lambda: str(codebook), "<clip_text>": lambda: str(tiny_clip())}
    return {key: files[value]() if value in files else value for key, value in args.items()}


@functools.cache
def tiny_clip(vision_width: int = 32) -> Path:
    """A tiny CLIP checkpoint (text tower, tokenizer, visual projection) for towers ``vision_width`` wide (the
    tiny models'), built once per test session."""
    import tempfile

    from lmms_eval_redundancy.families.tiny import build_tiny_clip

    return build_tiny_clip(Path(tempfile.mkdtemp(prefix="tiny_clip_")) / "clip", vision_width)


def cli_in_process(*args) -> subprocess.CompletedProcess:
    """``lmms-eval-redundancy ARGS`` run by its own ``main`` in this process (the command's whole code path
    without a process start): the exit status (0, or the ``SystemExit`` code) and what it printed."""
    from lmms_eval_redundancy.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(arg) for arg in args])
        except SystemExit as ended:
            code = ended.code if isinstance(ended.code, int) else 1
            if not isinstance(ended.code, (int, type(None))):
                print(ended.code, file=sys.stderr)
    return subprocess.CompletedProcess(["lmms-eval-redundancy", *map(str, args)], code or 0, out.getvalue(), err.getvalue())


def supports(method: str, family: str) -> bool:
    """Whether ``method`` runs on the tiny ``family`` model (methods needing [CLS] skip SigLIP towers)."""
    from lmms_eval_redundancy.core.registry import method_class

    return not (method_class(method).needs_cls and FAMILIES[family].tiny_tower == "siglip")


@functools.cache
def task_manager(include_path: Path):
    """lmms-eval's task index with ``include_path`` (built once: it scans all of lmms-eval's tasks)."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path))


def evaluate(wrapper, tasks: str, include_path: Path, limit: int | None = None) -> tuple[dict, dict]:
    """lmms-eval's own evaluator, in-process, on ``wrapper``: (results, token summary of this evaluation)."""
    from lmms_eval.evaluator import simple_evaluate

    from lmms_eval_redundancy.lmms.ledger import summarize

    start = len(wrapper.ledger.samples)
    results = simple_evaluate(model=wrapper, tasks=tasks.split(","), limit=limit, log_samples=True,
                              task_manager=task_manager(include_path), verbosity="ERROR")
    return results, summarize(wrapper.ledger.samples[start:])


def run_lmms_eval(model_args: str, out: Path, include_path: Path, *, processes: int = 1, batch_size: int = 2,
                  tasks: str = LOCAL_TASKS, limit: int | None = None, env: dict | None = None, cwd: Path = REPO):
    """The real ``python -m lmms_eval`` (or ``accelerate launch`` with ``processes``): (results, tokens, folder)."""
    command = ["-m", "lmms_eval", "--model", "llava_redundancy", "--model_args", model_args, "--tasks", tasks,
               "--include_path", str(include_path), "--output_path", str(out), "--batch_size", str(batch_size),
               "--log_samples"] + (["--limit", str(limit)] if limit else [])
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # torchrun-based data parallel with gloo; accelerate's --cpu flag starts one process unless given an MPI hostfile
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(port)]
        command = launcher + command
    else:
        command = [sys.executable] + command
    done = subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (results,) = out.glob("*/*_results.json")
    tokens = results.with_name(results.name.replace("_results.json", "_tokens.json"))
    return json.loads(results.read_text()), json.loads(tokens.read_text()), results.parent


def sample_outputs(folder: Path) -> dict:
    """``(doc_id, task file) -> filtered responses`` from lmms-eval's logged samples."""
    outputs = {}
    for path in folder.glob("*_samples_*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            outputs[(row["doc_id"], path.name.split("_samples_")[1])] = row["filtered_resps"]
    return outputs


# ---- codebook builds on the tiny model ----------------------------------------------------------------

# the released LLaVA-1.5 preset scaled to the tiny model; its probe text is the chat template's (the tiny
# word-level vocabulary lacks most words of the official English probe text)
TINY_BUILD_SETTINGS = dict(jsd_thres=4e-4, per_image_clusters=4, per_image_max_size=8, global_clusters=3, min_images=1,
                           batch_size=16)


@pytest.fixture(scope="session")
def training_images(tmp_path_factory) -> Path:
    """Eight flat images with a square each, and one unreadable file."""
    folder = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = np.zeros((32, 32, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        pixels[8:24, 8:24] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def same_codebook(a: Path, b: Path) -> bool:
    """Byte-identical prototype tensors and equal metadata (safetensors orders header keys arbitrarily)."""
    from lmms_eval_redundancy.codebook.store import load_codebook

    first, second = load_codebook(a), load_codebook(b)
    meta = lambda c: {k: v for k, v in c.meta.items() if k != "path"}  # noqa: E731
    return first.prototypes.numpy().tobytes() == second.prototypes.numpy().tobytes() and meta(first) == meta(second)


def build_settings(**changes):
    """The tiny build settings (``prompt_text`` unset: the chat template) with ``changes``."""
    from lmms_eval_redundancy.codebook.builder import load_settings

    return dataclasses.replace(load_settings("llava15", **TINY_BUILD_SETTINGS), **{"prompt_text": None, **changes})


def record_run(folder: Path, stamp: str, settings: dict, scores: dict[str, float], kept: int = 8,
               device_prefill: list[float] | None = None) -> None:
    """A recorded run as lmms-eval and the wrapper leave it: ``<stamp>_results.json`` and ``<stamp>_tokens.json``;
    with ``device_prefill``, per-sample records of documents 0, 1, ... of each task, one batch each (document 0
    the warm-up), with these device prefill seconds, 0.1 s of host preparation and 0.4 s of decode."""
    folder.mkdir(parents=True, exist_ok=True)
    results = {"results": {task: {"alias": task, "exact_match,none": score, "exact_match_stderr,none": 0.0}
                           for task, score in scores.items()}}
    (folder / f"{stamp}_results.json").write_text(json.dumps(results))
    efficiency = {"generate_until": {"llm_prefill_flops_per_sample": 100.0 * kept, "vision_flops_per_sample": 10.0}}
    tokens = {"settings": {"pretrained": "tiny", "family": "llava", "stage": "before_llm", "anyres": "full", **settings},
              "samples": 4, "samples_with_visuals": 4, "visual_tokens_before": 64, "visual_tokens_after": 4 * kept,
              "efficiency": efficiency}
    if device_prefill is not None:
        tokens["per_sample"] = [
            {"request": "generate_until", "task": task, "split": "test", "doc_id": doc, "units": [],
             "efficiency": {"batch_index": doc, "host_seconds": 0.1, "device_prefill_seconds": seconds, "decode_seconds": 0.4}}
            for task in scores for doc, seconds in enumerate(device_prefill)]
    (folder / f"{stamp}_tokens.json").write_text(json.dumps(tokens))


# ---- inside-LLM methods: a plain no-cache reference --------------------------------------------------------


# documents of the inside-LLM method tests: one image, two images, one wide image
STAGE_DOCS = [
    {"question": "what color is this ?", "visuals": [image(32, 32, 0)]},
    {"question": "which image is blue ?", "visuals": [image(48, 32, 1), image(32, 56, 2)]},
    {"question": "what ?", "visuals": [image(64, 40, 3)]},
]


def cached_greedy(w, batch, records, steps: int = 6) -> list[int]:
    """Greedy tokens of the first sample of ``batch`` with the method's hooks and the KV cache, as a run decodes."""
    with torch.no_grad(), w.engine.around_llm(batch, records):
        out = w.model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                               max_new_tokens=steps, do_sample=False, suppress_tokens=w.engine.family.placeholder_ids,
                               pad_token_id=w.tokenizer.pad_token_id, eos_token_id=w.tokenizer.eos_token_id)
    return out[0].tolist()


def prefill_state(wrapper, batch, records) -> dict:
    """Prefill ``batch`` through ``wrapper``'s multi-stage method; its state after the prefill (``stages``: the
    ``StageState`` list, stage 0 = all tokens; plus what the method keeps there)."""
    import torch

    method, captured = wrapper.engine.method, {}
    record = method._record

    def spy(records, log_keep):
        captured.update(method.state, stages=list(method.state["stages"]))
        record(records, log_keep)

    method._record = spy
    try:
        with torch.no_grad(), wrapper.engine.around_llm(batch, records):
            wrapper.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
    finally:
        del method._record
    return captured


def prefill_state_and_attention_input(wrapper, batch, records, layer: int = 0) -> tuple[dict, torch.Tensor]:
    """``prefill_state`` and the hidden states that decoder layer ``layer``'s attention received in that prefill."""
    seen = []
    attention = wrapper.engine.family.decoder_layers[layer].self_attn
    handle = attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
    try:
        state = prefill_state(wrapper, batch, records)
    finally:
        handle.remove()
    return state, seen[0]


def prefill_stages(wrapper, batch, records) -> list:
    """The ``StageState`` list of ``prefill_state``."""
    return prefill_state(wrapper, batch, records)["stages"]


def pruned_reference_generate(path, batch, stages, cut_layers: list[int], renumber: bool, steps: int,
                              suppress: list[int]) -> list[int]:
    """Greedy decoding of one unpadded sample without a cache: every step recomputes the whole pruned forward.

    Layers from ``cut_layers[j]`` on see every position but the keys stage ``j + 1`` dropped (``stages``: what
    the method kept, by original position); with ``renumber`` their rotary positions are lowered by the tokens
    dropped before them (decoded tokens by all the stage dropped), else the original positions stay."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    llm = model.model.language_model
    embeds = batch.inputs_embeds
    prompt = embeds.shape[1]
    kept_per_stage = [torch.zeros(1, prompt, dtype=torch.bool).scatter_(1, s.index, s.valid) for s in stages]

    def hook_for(kept: torch.Tensor):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            length = hidden.shape[1]
            keys = torch.nn.functional.pad(kept, (0, length - prompt), value=True)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            kwargs["attention_mask"] = (causal[None] & keys[:, None, :])[:, None]
            if renumber:
                dropped = (~keys).long().cumsum(dim=1)
                kwargs["position_embeddings"] = llm.rotary_emb(hidden, torch.arange(length)[None] - dropped)
            return args, kwargs

        return hook

    handles = []
    for index in range(cut_layers[0], len(llm.layers)):
        stage = sum(layer <= index for layer in cut_layers)
        handles.append(llm.layers[index].register_forward_pre_hook(hook_for(kept_per_stage[stage]), with_kwargs=True))
    tokens = []
    try:
        with torch.no_grad():
            for _ in range(steps):
                hidden = llm(inputs_embeds=embeds, attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long)).last_hidden_state
                logits = model.lm_head(hidden[:, -1])
                logits[:, suppress] = float("-inf")
                token = logits.argmax(-1)
                tokens.append(int(token))
                embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], dim=1)
    finally:
        for handle in handles:
            handle.remove()
    return tokens


def layerwise_reference_generate(path, embeds, cuts: dict, steps: int, suppress: list[int]) -> list[int]:
    """Greedy decoding of one unpadded sample without a cache, running the decoder layers one by one on fresh
    inputs at every step. Before layer ``l`` in ``cuts``, ``cuts[l](prompt_rows [1, P, D], positions [P])`` returns
    the prompt's new rows and their position ids (rows may be dropped, reordered or new); the decoded tokens
    follow the last prompt position."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    llm = model.model.language_model
    tokens = []
    with torch.no_grad():
        for step in range(steps):
            hidden, prompt = embeds, embeds.shape[1] - step
            positions = torch.arange(hidden.shape[1])
            for index, layer in enumerate(llm.layers):
                if index in cuts:
                    rows, prompt_positions = cuts[index](hidden[:, :prompt], positions[:prompt])
                    hidden, prompt = torch.cat([rows, hidden[:, prompt:]], dim=1), rows.shape[1]
                    positions = torch.cat([prompt_positions, prompt_positions[-1] + 1 + torch.arange(step)])
                length = hidden.shape[1]
                mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
                hidden = layer(hidden, attention_mask=mask, position_ids=positions[None],
                               position_embeddings=llm.rotary_emb(hidden, positions[None]))
            logits = model.lm_head(llm.norm(hidden)[:, -1])
            logits[:, suppress] = float("-inf")
            token = logits.argmax(-1)
            tokens.append(int(token))
            embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], dim=1)
    return tokens
