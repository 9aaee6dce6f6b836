"""The embedded default model: a small LLaVA-OneVision-architecture model trained on the shapes benchmark.

``train`` builds it from scratch (CLIP tower with a [CLS] token, Qwen2 text tower, the word tokenizer of
``families/tiny.py``) and trains it on data drawn from the shapes generator with a seed the benchmark does not use.
The trained weights ship in ``lmms_eval_redundancy/builtin/shapes`` with their ``training_record.json``;
``pretrained=builtin:shapes`` resolves to that folder. Training writes where it is told, never there
unless that folder is named explicitly.

Loss: cross-entropy on the answer word and the end-of-turn token, plus the auxiliary losses of
``VisionProbe`` on freshly generated, fully labelled scenes (a stand-in for the pretraining of a real
vision tower). Token dropout: in a share of the steps a random fraction (up to ``max_dropout``) of the
visual tokens is dropped before the LLM, exactly as the ``random`` method drops them at inference (the
kept tokens stay in their original order), so the model learns to answer from partial token sets as
real LLaVA models empirically do.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

TASKS = ("shapes_image", "shapes_multi_image", "shapes_video")


@dataclass
class TrainSettings:
    """Everything that decides the trained weights (recorded in ``training_record.json``)."""

    seed: int = 0
    data_seed: int = 1  # the benchmark itself is generated with seed 0
    docs: int = 3600  # per task (the video task gets half as many clips)
    steps: int = 2400
    batch_size: int = 32
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    vision_weight: float = 0.3
    probe_scenes: int = 32
    canvas: int = 128  # side of the generated scenes in pixels (anyres tiles them for the tower)
    image_size: int = 64  # the vision tower's input side
    patch_size: int = 8
    vision: dict = field(default_factory=lambda: {"hidden": 64, "layers": 4})
    text: dict = field(default_factory=lambda: {"hidden": 128, "layers": 4})
    eval_docs: int = 96
    eval_every: int = 300
    threads: int = 2
    task_weights: tuple[int, ...] = (1, 1, 1)  # steps per cycle given to each of TASKS, in order
    init_from: str | None = None  # continue from a saved model (its record is kept as "previous")
    dropout_steps: float = 0.5  # share of steps that drop visual tokens
    max_dropout: float = 0.9  # a dropping step drops a fraction drawn uniformly from [0, max_dropout]


def build_untrained(settings: TrainSettings):
    """A randomly initialised model and its processor (OneVision architecture, CLIP tower)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from lmms_eval_redundancy.families import family_of
    from lmms_eval_redundancy.families.tiny import build_tokenizer

    family = family_of("llava_onevision")
    tokenizer = build_tokenizer()
    config = family.tiny_config(tokenizer, settings.image_size, settings.patch_size, tower="clip",
                                vision=settings.vision, text=settings.text)
    torch.manual_seed(settings.seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = family.tiny_processor(tokenizer, settings.image_size, settings.patch_size, tower="clip")
    return model, processor


def load_split(folder: Path) -> dict[str, list[dict]]:
    """The generated docs of the three tasks with decoded visuals (images as PIL, videos as frame arrays)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from lmms_eval_redundancy.runtime.prompts import load_video_frames

    def image(cell):
        return Image.open(io.BytesIO(cell["bytes"])).convert("RGB")

    split = {}
    for task in TASKS:
        rows = pq.read_table(folder / f"{task}.parquet").to_pylist()
        for row in rows:
            if task == "shapes_image":
                row["images"], row["videos"] = [image(row["image"])], []
            elif task == "shapes_multi_image":
                row["images"], row["videos"] = [image(row["image_1"]), image(row["image_2"])], []
            else:
                row["images"], row["videos"] = [], [load_video_frames(str(folder.parent / row["video"]), 8)]
        split[task] = rows
    return split


def encode(processor, docs: list[dict], with_answer: bool):
    """Processor inputs for ``docs``, prompts built exactly as the lmms-eval wrapper builds them.

    With ``with_answer`` every row ends with ``answer </s>`` (left padding keeps them last).
    """
    from lmms_eval_redundancy.runtime.prompts import chat_prompt

    texts = []
    for doc in docs:
        prompt = chat_prompt(processor, processor.chat_template, doc["question"], len(doc["images"]), len(doc["videos"]))
        texts.append(prompt + f"{doc['answer']} </s>" if with_answer else prompt)
    images = [doc["images"] for doc in docs if doc["images"]]
    videos = [video for doc in docs for video in doc["videos"]]
    return processor(text=texts, images=images or None, videos=videos or None, padding=True, return_tensors="pt")


class VisionProbe(torch.nn.Module):
    """Auxiliary heads that teach the vision tower what the shapes generator draws.

    Each step it sees freshly generated scenes whose contents are known: every patch predicts its colour
    (or background, read from the pixels), the shape it belongs to and its column; the [CLS] output
    predicts the scene's shape, colour, object count and side. A stand-in for the image-level pretraining
    a real CLIP tower has (and what makes its [CLS] attention point at the objects).
    """

    def __init__(self, hidden: int, image_size: int, patch_size: int, image_mean, image_std, canvas: int) -> None:
        super().__init__()
        from lmms_eval_redundancy.embedded.localdata import COLORS
        from lmms_eval_redundancy.embedded.shapes import COUNTS, SHAPES

        self.grid, self.patch_size, self.canvas = image_size // patch_size, patch_size, canvas
        self.colour_names, self.shape_names = list(COLORS), list(SHAPES)
        self.patch_colour = torch.nn.Linear(hidden, len(COLORS) + 1)
        self.patch_shape = torch.nn.Linear(hidden, len(SHAPES))
        self.patch_column = torch.nn.Linear(hidden, self.grid)
        self.scene_heads = torch.nn.ModuleDict({"shape": torch.nn.Linear(hidden, len(SHAPES)),
                                                "colour": torch.nn.Linear(hidden, len(COLORS)),
                                                "count": torch.nn.Linear(hidden, len(COUNTS)),
                                                "side": torch.nn.Linear(hidden, 2)})
        self.register_buffer("colours", torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255)
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1))

    def scenes(self, rng: np.random.Generator, n: int):
        """``n`` scenes (PIL, ``canvas`` pixels; the loss sees their base views) and their labels: shape, colour, count - 1, side (-100 when anywhere)."""
        from lmms_eval_redundancy.embedded.shapes import scene

        images, labels = [], []
        for _ in range(n):
            shape, colour = int(rng.integers(len(self.shape_names))), int(rng.integers(len(self.colour_names)))
            count, side = int(rng.integers(1, 5)), int(rng.integers(-1, 2))
            region = ("any", "left", "right")[side + 1] if count == 1 else "any"
            objects = [(self.shape_names[shape], self.colour_names[colour])] * count
            images.append(scene(rng, self.canvas, objects, region))
            labels.append((shape, colour, count - 1, side if region != "any" else -100))
        return images, torch.tensor(labels)

    def patch_labels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[V, grid*grid]``: 0 for background, 1 + colour index for patches with a fifth or more of a colour."""
        rgb = (pixels * self.std + self.mean).permute(0, 2, 3, 1)
        near = (rgb[..., None, :] - self.colours).norm(dim=-1) < 0.2  # [V, H, W, colours]
        share = torch.nn.functional.avg_pool2d(near.float().permute(0, 3, 1, 2), self.patch_size)  # [V, C, g, g]
        best = share.max(dim=1)
        return torch.where(best.values >= 0.2, best.indices + 1, 0).flatten(1)

    def loss(self, vision_tower, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy
        out = vision_tower(pixel_values=pixels)
        patches, cls = out.last_hidden_state[:, 1:], out.pooler_output
        colour = self.patch_labels(pixels)
        shape = torch.where(colour > 0, labels[:, :1], -100)
        column = torch.arange(self.grid, device=pixels.device).repeat(self.grid).expand_as(colour)
        loss = (ce(self.patch_colour(patches).flatten(0, 1), colour.flatten())
                + ce(self.patch_shape(patches).flatten(0, 1), shape.flatten(), ignore_index=-100)
                + ce(self.patch_column(patches).flatten(0, 1), column.flatten()))
        for i, head in enumerate(self.scene_heads.values()):
            if (labels[:, i] >= 0).any():
                loss = loss + ce(head(cls), labels[:, i], ignore_index=-100)
        return loss


def answer_logits(model, processor, family, docs: list[dict], inputs, dropout: float = 0.0, key: str = "train"):
    """Logits at the answer word and ``</s>`` of ``inputs`` (encoded ``docs``), a ``dropout`` fraction of each
    image's and frame's visual tokens dropped by the ``random`` method: the inference path, with gradients."""
    from lmms_eval_redundancy.core.budget import KEEP_ALL, Budget
    from lmms_eval_redundancy.core.registry import UNPRUNED, build_method
    from lmms_eval_redundancy.runtime.engine import PruningEngine

    method = build_method("random", Budget("retention", 1 - dropout)) if dropout > 0 else build_method(UNPRUNED, KEEP_ALL)
    engine = PruningEngine(model, processor, family, method)
    batch = engine.pipeline(inputs, [len(d["images"]) for d in docs], [len(d["videos"]) for d in docs],
                            [f"{key}/{i}" for i in range(len(docs))], grad=True).batch
    return model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, logits_to_keep=3).logits[:, :2]


def answer_accuracy(model, processor, docs: list[dict], batch_size: int = 32) -> float:
    """Share of docs whose greedy answer is the answer word followed by ``</s>`` (teacher-forced)."""
    eos = processor.tokenizer.eos_token_id
    right = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(docs), batch_size):
            inputs = encode(processor, docs[start:start + batch_size], with_answer=True)
            logits = model(**inputs, logits_to_keep=3).logits
            predicted = logits[:, :2].argmax(-1)
            answer = inputs["input_ids"][:, -2]
            right += int(((predicted[:, 0] == answer) & (predicted[:, 1] == eos)).sum())
    model.train()
    return right / len(docs)


def train(out_dir: str | Path, settings: TrainSettings | None = None, progress: bool = True) -> dict:
    """Train the shapes model from scratch and save it (weights, processor, training record) to ``out_dir``."""
    from tqdm import tqdm

    from lmms_eval_redundancy.core.timing import cpu_threads
    from lmms_eval_redundancy.core.versions import library_versions
    from lmms_eval_redundancy.embedded import shapes
    from lmms_eval_redundancy.families import family_of

    settings = settings or TrainSettings()
    with cpu_threads(settings.threads):
        started = time.time()
        model, processor = build_untrained(settings)
        previous = None
        if settings.init_from:
            from lmms_eval_redundancy.runtime.loading import load

            start = load(settings.init_from, device="cpu")
            model = start.model
            previous = json.loads((Path(start.path) / "training_record.json").read_text())
        family = family_of(model.config.model_type)(model, processor)
        with tempfile.TemporaryDirectory() as scratch:
            train_dir = shapes.generate(Path(scratch) / "train" / "shapes", docs=settings.docs, size=settings.canvas,
                                        seed=settings.data_seed)
            eval_dir = shapes.generate(Path(scratch) / "eval" / "shapes", docs=settings.eval_docs,
                                       size=settings.canvas, seed=settings.data_seed + 1)
            train_docs, eval_docs = load_split(train_dir), load_split(eval_dir)
        unknown = {w for docs in train_docs.values() for d in docs for w in (d["question"] + " " + d["answer"]).split()
                   if processor.tokenizer.convert_tokens_to_ids(w) == processor.tokenizer.unk_token_id}
        if unknown:
            raise ValueError(f"words missing from the tokenizer vocabulary: {sorted(unknown)}")

        probe = VisionProbe(settings.vision["hidden"], settings.image_size, settings.patch_size,
                            processor.image_processor.image_mean, processor.image_processor.image_std, settings.canvas)
        probe_rng = np.random.default_rng([settings.seed, 1])
        params = list(model.parameters()) + list(probe.parameters())
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)

        def lr_at(step: int) -> float:
            if step < settings.warmup:
                return (step + 1) / settings.warmup
            done = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
            return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
        rng = np.random.default_rng(settings.seed)
        schedule = [task for task, weight in zip(TASKS, settings.task_weights) for _ in range(weight)]
        log, evals = [], []
        model.train()
        bar = tqdm(range(settings.steps), desc="train shapes model", disable=not progress)
        for step in bar:
            task = schedule[step % len(schedule)]
            docs = train_docs[task]
            batch = [docs[i] for i in rng.choice(len(docs), size=settings.batch_size, replace=False)]
            inputs = encode(processor, batch, with_answer=True)
            dropout = float(rng.uniform(0, settings.max_dropout)) if rng.uniform() < settings.dropout_steps else 0.0
            logits = answer_logits(model, processor, family, batch, inputs, dropout, key=f"step{step}")
            answer_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs["input_ids"][:, -2:].flatten())
            scenes, labels = probe.scenes(probe_rng, settings.probe_scenes)
            pixels = processor.image_processor(scenes, return_tensors="pt")["pixel_values"][:, 0]  # base views
            vision_loss = probe.loss(model.model.vision_tower, pixels, labels)
            loss = answer_loss + settings.vision_weight * vision_loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            log.append({"step": step, "task": task, "dropout": round(dropout, 3), "answer_loss": round(answer_loss.item(), 4),
                        "vision_loss": round(vision_loss.item(), 4)})
            bar.set_postfix(task=task[7:], loss=f"{answer_loss.item():.3f}")
            if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
                accuracy = {t: round(answer_accuracy(model, processor, eval_docs[t]), 4) for t in TASKS}
                evals.append({"step": step + 1, "accuracy": accuracy})
                bar.write(f"step {step + 1}: held-out answer accuracy {accuracy}")
        model.eval()

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        record = {
            "settings": asdict(settings),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_docs": {t: len(d) for t, d in train_docs.items()},
            "held_out_accuracy": evals,
            "loss_every_50_steps": log[::50] + log[-1:],
            "seconds": round(time.time() - started, 1),
            "previous": previous,
            "machine": {"platform": platform.platform(), "threads": settings.threads},
            "versions": library_versions(),
        }
        (out_dir / "training_record.json").write_text(json.dumps(record, indent=1) + "\n")
        return record
