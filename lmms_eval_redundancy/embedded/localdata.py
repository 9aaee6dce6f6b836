"""Deterministic data for the tiny local tasks (plain-colour images, image pairs, short videos), and the
parquet, image and video writers the shapes benchmark shares."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def colored_image(color: str, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A plain ``color`` image (width, height) with mild noise."""
    base = np.array(COLORS[color], dtype=np.int16)
    noise = rng.integers(-20, 21, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def png_cell(image: Image.Image) -> dict:
    """An image as a parquet cell of datasets' Image feature."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_parquet(rows: list[dict], features, path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


def write_video(frames: list[Image.Image], path: Path, fps: int = 4) -> None:
    import cv2

    width, height = frames[0].size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(cv2.cvtColor(np.asarray(frame), cv2.COLOR_RGB2BGR))
    writer.release()


def generate(out_dir: str | Path, docs: int = 8, seed: int = 0) -> Path:
    """Write ``tiny_image``, ``tiny_multi_image`` and ``tiny_video`` data under ``out_dir``."""
    import datasets

    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    sizes = [(32, 32), (48, 32), (32, 56), (64, 64)]

    single = [{"id": i, "image": png_cell(colored_image(names[i % 4], rng, sizes[i % 4])), "answer": names[i % 4],
               "question": "what color is this image ?"} for i in range(docs)]
    write_parquet(single, datasets.Features({"id": datasets.Value("int32"), "image": datasets.Image(),
                                      "answer": datasets.Value("string"), "question": datasets.Value("string")}),
           out_dir / "tiny_image.parquet")

    pairs = []
    for i in range(docs):
        first, second = names[i % 4], names[(i + 1 + i // 4) % 4]
        pairs.append({"id": i, "image_1": png_cell(colored_image(first, rng, sizes[i % 4])),
                      "image_2": png_cell(colored_image(second, rng, sizes[(i + 1) % 4])),
                      "question": f"which image is {first} ? first or second", "answer": "first"})
    write_parquet(pairs, datasets.Features({"id": datasets.Value("int32"), "image_1": datasets.Image(),
                                     "image_2": datasets.Image(), "question": datasets.Value("string"),
                                     "answer": datasets.Value("string")}), out_dir / "tiny_multi_image.parquet")

    clips = []
    for i in range(docs // 2):
        order = [names[(i + j) % 4] for j in range(3)]
        frames = [colored_image(c, rng, (64, 64)) for c in order for _ in range(3)]
        name = f"clip{i}.mp4"
        write_video(frames, out_dir / "videos" / name)
        clips.append({"id": i, "video": f"videos/{name}", "question": "what color appeared first ?", "answer": order[0]})
    write_parquet(clips, datasets.Features({k: datasets.Value("int32" if k == "id" else "string") for k in clips[0]}),
           out_dir / "tiny_video.parquet")
    return out_dir
