"""A deterministic synthetic visual benchmark: small coloured shapes and grey clutter on large redundant backgrounds.

Three local lmms-eval tasks (``tasks/local/shapes_*.yaml``): ``shapes_image`` (colour, shape, count, left/right),
``shapes_multi_image`` (which of two images shows a colour; which shows more objects) and
``shapes_video`` (first colour, shape, direction of motion). Answers are single words, cycled so every
answer of a question type is equally frequent; a model that sees no visual tokens can only guess.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lmms_eval_redundancy.embedded.localdata import (
    COLORS,
    png_cell,
    write_parquet,
    write_video,
)

SHAPES = ("circle", "square", "triangle", "cross")
COUNTS = ("one", "two", "three", "four")
CANVAS = 128  # pixels per side: 2x2 anyres crops of the 64-pixel tower plus the base view, 336 visual tokens
BACKGROUNDS = ("flat", "gradient", "texture")


def background(rng: np.random.Generator, size: int) -> Image.Image:
    """A large redundant region: a light, unsaturated canvas that is flat, a linear gradient or a soft texture."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    tone = rng.uniform(150, 225) + rng.uniform(-10, 10, size=3)
    y, x = np.mgrid[0:size, 0:size] / size
    if kind == "flat":
        level = np.zeros((size, size))
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        level = rng.uniform(25, 50) * ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle))
    elif rng.integers(2):  # texture: stripes
        angle, period = rng.uniform(0, np.pi), rng.uniform(8, 24) / size
        level = 12 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    else:  # texture: smooth blotches
        coarse = Image.fromarray(rng.uniform(0, 255, size=(6, 6)).astype(np.uint8))
        level = (np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=float) - 128) / 128 * 20
    pixels = tone + level[..., None] + rng.integers(-3, 4, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw_shape(image: Image.Image, shape: str, color: str, centre: tuple[float, float], radius: float) -> None:
    """Draw one filled shape in place."""
    draw = ImageDraw.Draw(image)
    x, y, r, fill = centre[0], centre[1], radius, COLORS[color]
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    else:
        draw.rectangle([x - r, y - r / 3, x + r, y + r / 3], fill=fill)
        draw.rectangle([x - r / 3, y - r, x + r / 3, y + r], fill=fill)


def clutter(rng: np.random.Generator, image: Image.Image, avoid: list[tuple[float, float]], radius: float) -> None:
    """Distractors: two to five small grey marks (dots and strokes) away from the objects; no question is about them."""
    draw, size = ImageDraw.Draw(image), image.size[0]
    for _ in range(int(rng.integers(2, 6))):
        for _ in range(100):
            x, y = rng.uniform(4, size - 4, size=2)
            if all((x - a) ** 2 + (y - b) ** 2 > (1.6 * radius) ** 2 for a, b in avoid):
                break
        grey = int(rng.integers(70, 120))
        if rng.integers(2):
            r = rng.uniform(1.5, 3)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(grey, grey, grey))
        else:
            dx, dy = rng.uniform(-6, 6, size=2)
            draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=(grey, grey, grey), width=2)


def object_radius(size: int) -> float:
    """The radius of every object on a ``size``-pixel canvas."""
    return size / 7


def patch_coverage(images: list[Image.Image], patch: int = 8) -> tuple[float, float]:
    """Mean share of ``patch``-pixel patches that a coloured object touches, and that grey clutter touches."""
    objects, clutter = [], []
    for image in images:
        pixels = np.asarray(image.convert("RGB")).astype(int)
        spread, side = pixels.max(axis=-1) - pixels.min(axis=-1), pixels.shape[0] // patch
        for share, mask in ((objects, spread > 80), (clutter, (pixels.max(axis=-1) < 125) & (spread < 20))):
            share.append(mask[: side * patch, : side * patch].reshape(side, patch, side, patch).any(axis=(1, 3)).mean())
    return float(np.mean(objects)), float(np.mean(clutter))


def scene(rng: np.random.Generator, size: int, objects: list[tuple[str, str]], region: str = "any") -> Image.Image:
    """``objects`` (shape, colour) placed without overlap in ``region`` ("any", "left" or "right") on a
    ``background``, with ``clutter``."""
    image = background(rng, size)
    radius = object_radius(size)
    low, high = radius * 1.2, size - radius * 1.2
    x_low, x_high = {"any": (low, high), "left": (low, size / 2 - radius), "right": (size / 2 + radius, high)}[region]
    placed: list[tuple[float, float]] = []
    for shape, color in objects:
        for _ in range(200):
            centre = (float(rng.uniform(x_low, x_high)), float(rng.uniform(low, high)))
            if all((centre[0] - a) ** 2 + (centre[1] - b) ** 2 > (2.3 * radius) ** 2 for a, b in placed):
                break
        placed.append(centre)
        draw_shape(image, shape, color, centre, radius)
    clutter(rng, image, placed, radius)
    return image


def image_docs(n: int, rng: np.random.Generator, size: int) -> list[dict]:
    """Single-image questions, cycling question types and, within each, the answers."""
    colors = list(COLORS)
    docs = []
    for i in range(n):
        kind, turn = i % 4, i // 4
        shape, color = SHAPES[int(rng.integers(len(SHAPES)))], colors[int(rng.integers(len(colors)))]
        if kind == 0:
            color = colors[turn % len(colors)]
            image, question, answer = scene(rng, size, [(shape, color)]), "what color is the shape ?", color
        elif kind == 1:
            shape = SHAPES[turn % len(SHAPES)]
            image, question, answer = scene(rng, size, [(shape, color)]), "what shape is this ?", shape
        elif kind == 2:
            count = turn % len(COUNTS) + 1
            image = scene(rng, size, [(shape, color)] * count)
            question, answer = "how many objects are in the image ?", COUNTS[count - 1]
        else:
            side = ("left", "right")[turn % 2]
            image, question, answer = scene(rng, size, [(shape, color)], side), "is the shape on the left or right ?", side
        docs.append({"id": i, "kind": ("color", "shape", "count", "position")[kind], "image": png_cell(image),
                     "question": question, "answer": answer})
    return docs


def multi_image_docs(n: int, rng: np.random.Generator, size: int) -> list[dict]:
    """Two-image questions: which image shows a colour; which image shows more objects."""
    colors = list(COLORS)
    docs = []
    for i in range(n):
        kind, turn = i % 2, i // 2
        answer = ("first", "second")[turn % 2]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if kind == 0:
            target, other = rng.choice(len(colors), size=2, replace=False)
            scenes = [[(shape, colors[target])], [(shape, colors[other])]]
            question = f"which image shows a {colors[target]} shape ? first or second"
        else:
            few, many = sorted(int(c) for c in rng.choice(np.arange(1, 5), size=2, replace=False))
            color = colors[int(rng.integers(len(colors)))]
            scenes = [[(shape, color)] * many, [(shape, color)] * few]
            question = "which image shows more objects ? first or second"
        if answer == "second":
            scenes.reverse()
        first, second = (scene(rng, size, objects) for objects in scenes)
        docs.append({"id": i, "kind": ("which_color", "more_objects")[kind], "image_1": png_cell(first), "image_2": png_cell(second),
                     "question": question, "answer": answer})
    return docs


def video_docs(n: int, rng: np.random.Generator, size: int, video_dir: Path, frames: int = 8) -> list[dict]:
    """Short clips: the first colour shown, the shape shown, the direction a shape moved."""
    colors = list(COLORS)
    video_dir.mkdir(parents=True, exist_ok=True)
    docs = []
    radius = object_radius(size)
    for i in range(n):
        kind, turn = i % 3, i // 3
        shape, color = SHAPES[int(rng.integers(len(SHAPES)))], colors[int(rng.integers(len(colors)))]
        clip = []
        if kind == 0:
            first = colors[turn % len(colors)]
            order = [first] + [c for c in rng.permutation(colors).tolist() if c != first][:2]
            for color_now in order:
                still = scene(rng, size, [(shape, color_now)])
                clip += [still] * (frames // len(order) + 1)
            question, answer = "what color appeared first ?", first
        elif kind == 1:
            shape = SHAPES[turn % len(SHAPES)]
            still = scene(rng, size, [(shape, color)])
            clip = [still] * frames
            question, answer = "what shape appeared ?", shape
        else:
            answer = ("left", "right")[turn % 2]
            y = float(rng.uniform(radius * 1.5, size - radius * 1.5))
            xs = np.linspace(radius * 1.5, size - radius * 1.5, frames)
            base = background(rng, size)
            clutter(rng, base, [], radius)
            for x in (xs if answer == "right" else xs[::-1]):
                frame = base.copy()
                draw_shape(frame, shape, color, (float(x), y), radius)
                clip.append(frame)
            question = "the shape moved left or right ?"
        name = f"shapes{i:04d}.mp4"
        write_video(clip[:frames], video_dir / name)
        docs.append({"id": i, "kind": ("first_color", "shape", "motion")[kind], "video": f"{video_dir.parent.name}/videos/{name}",
                     "question": question, "answer": answer})
    return docs


def generate(out_dir: str | Path, docs: int = 96, size: int = CANVAS, seed: int = 0) -> Path:
    """Write the three tasks' parquet files (and the videos) under ``out_dir``; same seed, same bytes."""
    import datasets

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = datasets.Value("string")
    single = image_docs(docs, np.random.default_rng([seed, 0]), size)
    write_parquet(single, datasets.Features({"id": datasets.Value("int32"), "kind": text, "image": datasets.Image(),
                                      "question": text, "answer": text}), out_dir / "shapes_image.parquet")
    pairs = multi_image_docs(docs, np.random.default_rng([seed, 1]), size)
    write_parquet(pairs, datasets.Features({"id": datasets.Value("int32"), "kind": text, "image_1": datasets.Image(),
                                     "image_2": datasets.Image(), "question": text, "answer": text}),
           out_dir / "shapes_multi_image.parquet")
    clips = video_docs(docs // 2, np.random.default_rng([seed, 2]), size, out_dir / "videos")
    write_parquet(clips, datasets.Features({"id": datasets.Value("int32"), "kind": text, "video": text, "question": text,
                                     "answer": text}), out_dir / "shapes_video.parquet")
    return out_dir
