"""``show-kept``: draw which visual tokens each method keeps, over the image the model sees.

Each panel shows the vision tiles of one image as the model receives them (the base view, then the
anyres crops in their grid), with dropped token patches darkened. Panels of several methods/budgets are
placed side by side in one PNG.
"""

from __future__ import annotations

import difflib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
)

from lmms_eval_redundancy.core.budget import BUDGET_KEYS, KEEP_ALL, parse_budget
from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.files import write_atomically
from lmms_eval_redundancy.core.registry import build_method, method_class
from lmms_eval_redundancy.core.visuals import PackedVisual
from lmms_eval_redundancy.runtime.engine import PruningEngine
from lmms_eval_redundancy.runtime.loading import load
from lmms_eval_redundancy.runtime.prompts import chat_prompt, chat_template_of

DIM = 0.2  # brightness of dropped patches
SAMPLE_KEY = "show/image/0"  # seeds random choices


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"codebook,codebook=cb.safetensors,threshold=0.45"`` -> ``("codebook", {...})``; ``UserError`` when the
    method is unknown, an option is not ``key=value`` or the budget is invalid (checked before any model loads)."""
    from lmms_eval.utils import simple_parse_args_string

    method, _, options = spec.partition(",")
    try:
        parsed = simple_parse_args_string(options)
    except ValueError:
        raise UserError(f"--method {spec!r}: write it as METHOD,key=value,... (e.g. \"fastv,retention=0.25\")") from None
    method_class(method)
    parse_budget(parsed.get("retention"), parsed.get("tokens"), parsed.get("threshold"))
    return method, parsed


def read_image(path: str | Path) -> Image.Image:
    """The image file at ``path`` in RGB; ``UserError`` when it is missing or not an image."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image file {path} not found; give --image an existing image file") from None
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise UserError(f"cannot read {path} as an image ({err}); give --image a PNG, JPEG or other image file") from None


def task_image(task: str, doc: int, include_path: str | None) -> Image.Image:
    """The first visual of document ``doc`` of an lmms-eval task (local tasks load offline)."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=include_path)
    if task not in manager.all_tasks:
        close = difflib.get_close_matches(task, manager.all_tasks, n=1)
        raise UserError(f"unknown task {task!r}" + (f" (did you mean {close[0]}?)" if close else "")
                        + "; give an lmms-eval task name, and --include_path for tasks outside lmms-eval")
    task_obj = get_task_dict([task], manager)[task]
    split = task_obj.config.test_split or task_obj.config.validation_split
    documents = task_obj.dataset[split]
    if not 0 <= doc < len(documents):
        raise UserError(f"--doc {doc} is out of range: {task} has {len(documents)} documents (0 to {len(documents) - 1})")
    visuals = task_obj.doc_to_visual(documents[doc])
    if not visuals or not isinstance(visuals[0], Image.Image):
        raise UserError(f"document {doc} of {task} has no image to show; pick another --doc or task")
    return visuals[0].convert("RGB")


def tile_images(processor, pixel_values: torch.Tensor) -> list[np.ndarray]:
    """The vision tiles of one image as uint8 arrays ``[H, W, 3]`` (normalisation undone)."""
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    tiles = pixel_values.reshape(-1, *pixel_values.shape[-3:]).float().cpu()
    return [((t * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy() for t in tiles]


def kept_positions(engine: PruningEngine, image: Image.Image) -> tuple[object, PackedVisual, torch.Tensor, list]:
    """Run the pipeline (and, for methods inside the LLM, the prefill) on one image: processor inputs, the
    packed visual, the bool mask of its kept tokens and its token records."""
    prompt = chat_prompt(engine.processor, chat_template_of(engine.processor), "Describe the image.", 1, 0)
    inputs = engine.processor_inputs([prompt], [[image]], [])
    with torch.no_grad():
        pruned = engine.pipeline(inputs, [1], [0], [SAMPLE_KEY])
        with engine.around_llm(pruned.batch, pruned.records):
            engine.model(inputs_embeds=pruned.batch.inputs_embeds, attention_mask=pruned.batch.attention_mask,
                         logits_to_keep=1)
    return inputs, pruned.visuals[0][0], pruned.kept_positions(0, 0).cpu(), pruned.records[0]


def render_panel(processor, family, inputs, visual, kept: torch.Tensor, title: list[str], scale: int = 1) -> Image.Image:
    """Tiles with dropped patches darkened: the base view, then the crop mosaic to its right."""
    tiles = tile_images(processor, inputs["pixel_values"])
    side = family.patch_grid
    shade = [np.full((side * side,), DIM) for _ in tiles]
    for tile, patch, keep in zip(visual.tiles.tolist(), visual.patches.tolist(), kept.tolist()):
        if tile >= 0 and keep:
            shade[tile][patch] = 1.0
    shaded = []
    for tile, factors in zip(tiles, shade):
        tile = np.kron(tile, np.ones((scale, scale, 1), dtype=np.uint8))
        cell = tile.shape[0] // side
        mask = np.kron(factors.reshape(side, side), np.ones((cell, cell)))
        shaded.append((tile[: side * cell, : side * cell] * mask[..., None]).astype(np.uint8))
    size = shaded[0].shape[0]
    crops = shaded[1:]
    rows, columns = 0, 0
    if crops:
        rows, columns = get_anyres_image_grid_shape(inputs["image_sizes"][0].tolist(), family.config.image_grid_pinpoints,
                                                    family.config.vision_config.image_size)
    header = 14 * len(title) + 4
    text_width = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(line)) for line in title) + 4
    width = max(size * (1 + columns) + (8 if crops else 0), text_width)
    canvas = Image.new("RGB", (width, max(size, size * rows) + header), "white")
    canvas.paste(Image.fromarray(shaded[0]), (0, header))
    for i, crop in enumerate(crops):
        canvas.paste(Image.fromarray(crop), (size + 8 + (i % columns) * size, header + (i // columns) * size))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title):
        draw.text((2, 2 + 14 * i), line, fill="black")
    return canvas


def show_kept(pretrained: str, image: Image.Image, specs: list[str], out: str, scale: int = 1) -> str:
    """One panel per ``method,key=value,...`` spec, side by side, written to ``out`` (PNG, all at once: a failed run
    leaves no file). Every spec is checked before the model loads."""
    parsed = [parse_spec(spec) for spec in specs]
    loaded = load(pretrained)
    panels = []
    for name, options in parsed:
        anyres = options.pop("anyres", "full")
        budget = parse_budget(*(options.pop(key, None) for key in BUDGET_KEYS)) or KEEP_ALL
        engine = PruningEngine(loaded.model, loaded.processor, loaded.family, build_method(name, budget, **options),
                               anyres, log_keep_indices=True)
        inputs, visual, kept, records = kept_positions(engine, image)
        engine.close()
        settings = engine.settings()
        total = int((~visual.newline).sum())
        # merged tokens (pooling) have no kept subset: their whole unit is shown, the title gives the count
        title = [f"{settings['method']} {settings['budget']}",
                 f"anyres={settings['anyres']}: {sum(r.after for r in records)}/{total} kept"]
        panels.append(render_panel(loaded.processor, loaded.family, inputs, visual, kept, title, scale))
    height = max(p.height for p in panels)
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 12 * (len(panels) - 1), height), "white")
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 12
    png = io.BytesIO()
    sheet.save(png, format="PNG")
    write_atomically(out, png.getvalue())
    return out
