"""Build a redundancy codebook for a checkpoint from training images (the paper's analysis pipeline).

Per image (sharded over processes, each result cached so an interrupted build resumes):
1. probe every visual token alone with the paper's prompt -> p_max of the first answer token;
2. leave-one-out divergences: the token's 3x3 window with and without the token (J_context), and all
   tokens with and without the window (J_global).
Then, once every image is done (rank 0): the low-information rule, per-image DPC-KNN filtering and
the global DPC-KNN prototype selection; every member of a selected cluster becomes a codebook row.

An image that cannot be read leaves a skip marker in the cache recording the file's size and modification
time (a dataset's fingerprint for dataset rows); a rerun probes the image again once it has changed, so a
replaced image is never skipped for good. The images that stay unreadable are listed in ``report.json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import math
import os
import time
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import yaml
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from lmms_eval_redundancy.codebook.analysis import (
    DIVERGENCES,
    dpc_knn,
    low_information,
    window_indices,
)
from lmms_eval_redundancy.codebook.store import Codebook, save_codebook
from lmms_eval_redundancy.core.budget import KEEP_ALL
from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.files import figure_png, output_folder, write_atomically
from lmms_eval_redundancy.core.registry import UNPRUNED, build_method
from lmms_eval_redundancy.runtime.engine import PruningEngine
from lmms_eval_redundancy.runtime.loading import load, process_layout

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
PRESETS = resources.files("lmms_eval_redundancy.codebook") / "presets"
# settings that count something: whole numbers >= 1 (min_images may be 0)
COUNTS = ("per_image_clusters", "per_image_max_size", "global_clusters", "divergence_topk", "probe_topk", "knn", "batch_size")


class BuildError(UserError):
    """The build cannot produce a codebook (and says what to change)."""


@dataclass
class BuildSettings:
    """Everything that decides a build; presets in ``codebook/presets/*.yaml`` hold the released values."""

    prob_thres: float
    jsd_thres: float
    per_image_clusters: int
    per_image_max_size: int
    global_clusters: int
    min_images: int
    prompt: str = "What does this image show? You must provide a single word that best describes the image."
    # the exact probe text, "<image>" where the visual tokens go; unset: ``prompt`` in the checkpoint's chat template
    prompt_text: str | None = None
    divergence: str = "jsd_topk"  # or "jsd" (standard Jensen-Shannon)
    divergence_topk: int = 10
    probe_topk: int = 50
    context_weight: float = 1.0
    global_weight: float = 16.0
    # when the first answer token is an article, read the next token's distribution instead (every probe kind);
    # articles are matched with or without the tokenizer's word-start marker ("A" and "▁A")
    skip_article: bool = False
    articles: tuple[str, ...] = ("A",)
    pad_token_id: int | None = None  # whose input embedding stands in for removed tokens; unset: the tokenizer's pad
    knn: int = 5
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self):
        for name, kind in typing.get_type_hints(BuildSettings).items():
            setattr(self, name, checked_setting(name, getattr(self, name), kind))
        if self.divergence not in DIVERGENCES:
            raise BuildError(f"divergence={self.divergence!r} is unknown; choose one of {', '.join(DIVERGENCES)}")
        self.articles = tuple(self.articles)


def checked_setting(name: str, value, kind):
    """``value`` if it is of the setting's type (a count: a whole number >= 1), else ``BuildError``.

    A number YAML read as a string (``2e-3``: YAML 1.1 wants ``2.0e-3``) is taken as the number."""
    if value is None and type(None) in typing.get_args(kind):
        return value
    expected = next(t for t in (tuple, bool, int, float, str) if t in (kind, typing.get_origin(kind), *typing.get_args(kind)))
    if expected is float:
        try:
            value = float(value) if isinstance(value, str) else value
        except ValueError:
            pass
        valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif expected is int:
        valid = isinstance(value, int) and not isinstance(value, bool) and (value >= 1 if name in COUNTS else value >= 0)
    elif expected is tuple:
        valid = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    else:
        valid = isinstance(value, expected)
    if not valid:
        what = {float: "a finite number", str: "a string", bool: "true or false", tuple: "a list of strings",
                int: "a whole number >= 1" if name in COUNTS else "a whole number >= 0"}[expected]
        raise BuildError(f"build setting {name}={value!r} is not {what}")
    return value


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def read_settings_file(path: Path) -> dict:
    """The mapping of a build-settings YAML; ``BuildError`` naming the file if it is not one."""
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise BuildError(f"cannot read build settings {path}: {err}") from err
    if not isinstance(values, (dict, type(None))):
        raise BuildError(f"build settings {path} must be a mapping of setting: value, not a {type(values).__name__}")
    return values or {}


def load_settings(path_or_preset: str | Path, **overrides) -> BuildSettings:
    """Settings from a YAML file (which may name a ``preset:`` to start from) or a preset name."""
    values: dict = {}
    source = str(path_or_preset)
    if Path(source).is_file():
        values = read_settings_file(Path(source))
        source = values.pop("preset", None)
    elif Path(source).suffix in (".yaml", ".yml") or os.sep in source:
        raise BuildError(f"settings file {source} not found; give an existing YAML or a preset name")
    if source:
        names = sorted(p.name.removesuffix(".yaml") for p in PRESETS.iterdir() if p.name.endswith(".yaml"))
        if source not in names:
            raise BuildError(f"no settings file or preset named {source!r}{did_you_mean(str(source), names)}; "
                             f"presets: {', '.join(names)}")
        values = {**yaml.safe_load((PRESETS / f"{source}.yaml").read_text()), **values}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(BuildSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BuildError(f"unknown build setting(s) {', '.join(k + did_you_mean(k, known) for k in unknown)} in "
                         f"{path_or_preset}; known: {', '.join(sorted(known))}")
    try:
        return BuildSettings(**values)
    except TypeError as err:
        raise BuildError(f"incomplete build settings ({err}); start from a preset: preset: llava15") from err


@dataclass
class TrainingImage:
    """One image to probe, read on demand."""

    id: str
    read: typing.Callable[[], Image.Image]
    where: str  # the file, or the dataset row (for messages)
    version: str  # changes when the image does: a file's size and modification time, a dataset's fingerprint


def list_images(source: str | Path, limit: int | None = None) -> list[TrainingImage]:
    """The images of a folder or of a dataset saved with ``save_to_disk`` (the first ``limit``); ``BuildError``
    when there are none."""
    source = Path(source)
    if limit is not None and limit < 1:
        raise BuildError(f"limit={limit}: give a whole number >= 1 of images to use, or no limit for all")
    if (source / "dataset_info.json").is_file() or (source / "dataset_dict.json").is_file():
        import datasets

        data = datasets.load_from_disk(str(source))
        if isinstance(data, datasets.DatasetDict):
            data = data["train"] if "train" in data else next(iter(data.values()))
        ids = data["id"] if "id" in data.column_names else list(range(len(data)))
        items = [TrainingImage(str(i), lambda row=row: data[row]["image"], f"{source} row {row}", data._fingerprint)
                 for row, i in enumerate(ids)]
    elif source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        items = [TrainingImage(p.stem, lambda p=p: Image.open(p), str(p), f"{p.stat().st_size}-{p.stat().st_mtime_ns}")
                 for p in files]
    else:
        what = "does not exist" if not source.exists() else "is not a folder"
        raise BuildError(f"images folder {source} {what}; give a folder of images ({', '.join(IMAGE_SUFFIXES)}) or a "
                         "dataset saved with datasets' save_to_disk (column 'image')")
    if not items:
        raise BuildError(f"no images in {source} (files ending {', '.join(IMAGE_SUFFIXES)}, or a dataset saved with "
                         "save_to_disk); put the training images there or give the folder that holds them")
    return items[:limit]


WORD_START_MARKERS = ("\u2581", "\u0120")  # sentencepiece "▁", byte-level BPE "Ġ"


def article_ids(tokenizer, articles: tuple[str, ...]) -> list[int]:
    """Vocabulary ids of the tokens that are one of ``articles``, with or without a word-start marker."""
    def bare(token: str) -> str:
        for marker in WORD_START_MARKERS:
            token = token.removeprefix(marker)
        return token

    return sorted(i for token, i in tokenizer.get_vocab().items() if bare(token) in articles)


def probe_text(processor, settings: BuildSettings) -> str:
    """The text a probe feeds the model, the processor's image token where the visual tokens go."""
    image_token = getattr(processor, "image_token", "<image>")
    if settings.prompt_text is not None:
        if settings.prompt_text.count("<image>") != 1:
            raise BuildError("prompt_text must contain <image> exactly once (where the visual tokens go)")
        return settings.prompt_text.replace("<image>", image_token)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": settings.prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class Prober:
    """Runs the probes of one image through one LLaVA-family model, batched."""

    def __init__(self, model, processor, family, settings: BuildSettings):
        self.model, self.processor, self.family, self.settings = model, processor, family, settings
        self.embed = model.get_input_embeddings()
        self.device = next(model.parameters()).device
        tokenizer = processor.tokenizer
        before, _, after = probe_text(processor, settings).partition(getattr(processor, "image_token", "<image>"))
        # as the processor tokenizes the whole prompt: special tokens (e.g. BOS) at the start only
        prefix = tokenizer(before).input_ids
        suffix = tokenizer(after, add_special_tokens=False).input_ids
        pad_id = tokenizer.pad_token_id if settings.pad_token_id is None else settings.pad_token_id
        with torch.no_grad():
            self.prefix = self.embed(torch.tensor(prefix, device=self.device))[None]
            self.suffix = self.embed(torch.tensor(suffix, device=self.device))[None]
            self.pad = self.embed(torch.tensor([pad_id], device=self.device))[0]
        self.article_ids = article_ids(tokenizer, settings.articles)
        self.forward_passes = 0
        self.engine = PruningEngine(model, processor, family, build_method(UNPRUNED, KEEP_ALL), anyres="base_only")

    def visual_tokens(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Post-projector tokens of the image's base view ``[N, D]`` and their grid (the pipeline, unpruned)."""
        inputs = self.engine.processor_inputs([self.processor.image_token], [[image.convert("RGB")]], [])
        pruned = self.engine.pipeline(inputs, [1], [0], ["probe"])
        (positions,) = pruned.unit_positions[0]
        side = self.family.patch_grid
        return pruned.visuals[0][0].features[positions], (side, side)

    @torch.no_grad()
    def first_token_logits(self, visual: torch.Tensor, skip_article: bool = False) -> torch.Tensor:
        """Logits of the first answer token for each row of ``visual [B, m, D]`` (batched)."""
        logits = []
        for batch in visual.split(self.settings.batch_size):
            embeds = torch.cat([self.prefix.expand(batch.shape[0], -1, -1), batch.to(self.prefix.dtype),
                                self.suffix.expand(batch.shape[0], -1, -1)], dim=1)
            out = self.model(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1]
            self.forward_passes += 1
            if skip_article:
                article = torch.isin(out.argmax(-1), torch.tensor(self.article_ids, device=out.device))
                if article.any():
                    extended = torch.cat([embeds[article], self.embed(out[article].argmax(-1))[:, None]], dim=1)
                    out[article] = self.model(inputs_embeds=extended, logits_to_keep=1).logits[:, -1]
                    self.forward_passes += 1
            logits.append(out.float())
        return torch.cat(logits)

    def probe(self, tokens: torch.Tensor, grid: tuple[int, int]) -> dict:
        """p_max, J_context and J_global of every token of one image."""
        s = self.settings
        divergence = DIVERGENCES[s.divergence]
        compare = (lambda p, q: divergence(p, q, s.divergence_topk)) if s.divergence == "jsd_topk" else divergence
        single = self.first_token_logits(tokens[:, None], skip_article=s.skip_article)
        p_max = single.topk(s.probe_topk, dim=-1).values.softmax(dim=-1).max(dim=-1).values
        windows = window_indices(*grid).to(tokens.device)  # [N, 9]
        centre = (windows == torch.arange(len(tokens), device=tokens.device)[:, None]).float().argmax(dim=1)
        context = tokens[windows]  # [N, 9, D]
        without_centre = context.clone()
        without_centre[torch.arange(len(tokens)), centre] = self.pad
        context_logits = self.first_token_logits(torch.cat([context, without_centre]), skip_article=s.skip_article)
        j_context = compare(context_logits[: len(tokens)], context_logits[len(tokens):])
        full = self.first_token_logits(tokens[None], skip_article=s.skip_article)
        masked = tokens[None].repeat(len(tokens), 1, 1)
        masked[torch.arange(len(tokens))[:, None], windows] = self.pad
        j_global = compare(full.expand(len(tokens), -1), self.first_token_logits(masked, skip_article=s.skip_article))
        return {"p_max": p_max.cpu(), "j_context": j_context.cpu(), "j_global": j_global.cpu()}


def skip_marker(cache: Path, image: TrainingImage) -> Path:
    return cache / f"{image.id}.skip"


def unreadable_reason(cache: Path, image: TrainingImage) -> str | None:
    """Why ``image`` could not be read, if a skip marker says so for its current version (else ``None``: a
    marker of an older version of the image, or of an older format, does not count)."""
    try:
        marker = json.loads(skip_marker(cache, image).read_text())
    except (OSError, ValueError):
        return None
    return marker.get("error") if isinstance(marker, dict) and marker.get("version") == image.version else None


def settled(cache: Path, image: TrainingImage) -> bool:
    """Probed, or found unreadable in its current version."""
    return (cache / f"{image.id}.pt").is_file() or unreadable_reason(cache, image) is not None


def probe_images(pretrained: str, images: list[TrainingImage], cache: Path, settings: BuildSettings, rank: int = 0,
                 world_size: int = 1, device: str | None = None) -> dict:
    """Probe this process's share of ``images`` into ``cache``, skipping images already settled there.

    The model is loaded at the first readable image: a share of only unreadable images loads nothing.
    """
    cache.mkdir(parents=True, exist_ok=True)
    mine = [image for i, image in enumerate(images) if i % world_size == rank]
    todo = [image for image in mine if not settled(cache, image)]
    stats = {"assigned": len(mine), "probed": 0, "skipped_unreadable": 0, "seconds": 0.0, "forward_passes": 0}
    prober, start = None, time.perf_counter()
    for image in tqdm(todo, desc=f"probing (rank {rank})", disable=rank != 0 and world_size > 1):
        try:
            pixels = image.read()
            pixels.load()
        except (OSError, UnidentifiedImageError, ValueError) as err:
            write_atomically(skip_marker(cache, image), json.dumps({"version": image.version, "where": image.where,
                                                                    "error": str(err)}))
            stats["skipped_unreadable"] += 1
            continue
        if prober is None:
            loaded = load(pretrained, device=device)
            prober, start = Prober(loaded.model, loaded.processor, loaded.family, settings), time.perf_counter()
        tokens, grid = prober.visual_tokens(pixels)
        result = prober.probe(tokens, grid)
        probe_file = io.BytesIO()
        torch.save({**result, "features": tokens.cpu(), "grid": grid}, probe_file)
        write_atomically(cache / f"{image.id}.pt", probe_file.getvalue())
        skip_marker(cache, image).unlink(missing_ok=True)
        stats["probed"] += 1
    if prober:
        stats.update(seconds=time.perf_counter() - start, forward_passes=prober.forward_passes)
    return stats


def wait_for(cache: Path, images: list[TrainingImage], timeout: float, poll: float = 2.0) -> None:
    """Block until every image is settled (other ranks may still be probing)."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [image.id for image in images if not settled(cache, image)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise BuildError(f"{len(missing)} images still have no probe result after {timeout:.0f} s (first: {missing[0]})")
        time.sleep(poll)


def select_prototypes(results: dict[str, dict], settings: BuildSettings) -> tuple[torch.Tensor, list[str], dict]:
    """Low-information rule, per-image DPC-KNN filtering, global DPC-KNN selection -> rows, image ids, report."""
    s = settings
    kept_features, kept_images, report = [], [], {"probed_tokens": 0, "low_information": 0, "kept_per_image": {}}
    for image_id, result in results.items():
        low = low_information(result["p_max"], result["j_context"], result["j_global"], s.prob_thres, s.jsd_thres,
                              s.context_weight, s.global_weight)
        labels = dpc_knn(result["features"].float(), s.per_image_clusters, s.knn, s.seed)
        sizes = torch.bincount(labels)
        keep = low & (sizes[labels] <= s.per_image_max_size)
        report["probed_tokens"] += len(low)
        report["low_information"] += int(low.sum())
        report["kept_per_image"][image_id] = int(keep.sum())
        kept_features.append(result["features"][keep])
        kept_images += [image_id] * int(keep.sum())
    if not kept_images:
        raise BuildError(
            f"no token passed the low-information rule and the per-image cluster filter "
            f"({report['low_information']} of {report['probed_tokens']} passed the rule alone): relax prob_thres "
            f"(now {s.prob_thres}) or jsd_thres (now {s.jsd_thres}), or raise per_image_max_size (now {s.per_image_max_size})"
        )
    candidates = torch.cat(kept_features)
    labels = dpc_knn(candidates.float(), s.global_clusters, s.knn, s.seed)
    clusters = {}
    for cluster in labels.unique().tolist():
        members = torch.nonzero(labels == cluster).flatten().tolist()
        distinct = len({kept_images[m] for m in members})
        clusters[cluster] = {"members": len(members), "distinct_images": distinct, "selected": distinct > s.min_images}
    selected = [m for m in range(len(kept_images)) if clusters[int(labels[m])]["selected"]]
    report.update(candidates=len(kept_images), clusters=clusters)
    if not selected:
        best = max(c["distinct_images"] for c in clusters.values())
        raise BuildError(f"no global cluster has members from more than min_images={s.min_images} images (best: {best}); "
                         "lower min_images or global_clusters, or add images")
    report["prototypes"] = len(selected)
    report["prototypes_per_cluster"] = {c: sum(int(labels[m]) == c for m in selected) for c in clusters if clusters[c]["selected"]}
    return candidates[selected], [kept_images[m] for m in selected], report


def write_report(out_dir: Path, report: dict, results: dict[str, dict], settings: BuildSettings) -> None:
    """``report.json`` (with the medians of p_max and J, to set the thresholds from) and two plots: p_max vs J with
    the thresholds, prototypes per selected cluster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p_max = torch.cat([r["p_max"] for r in results.values()])
    j = torch.cat([settings.context_weight * r["j_context"] + settings.global_weight * r["j_global"] for r in results.values()])
    report = {**report, "probe_medians": {"p_max": round(float(p_max.median()), 4), "J": float(f"{float(j.median()):.3g}")}}
    write_atomically(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(j.numpy(), p_max.numpy(), s=4, alpha=0.5)
    ax.axvline(settings.jsd_thres, color="red", linestyle="--", label=f"jsd_thres {settings.jsd_thres:g}")
    ax.axhline(settings.prob_thres, color="orange", linestyle="--", label=f"prob_thres {settings.prob_thres:g}")
    ax.set_xlabel("J = w_c J_context + w_g J_global")
    ax.set_ylabel("p_max (single-token probe)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    write_atomically(out_dir / "report_scatter.png", figure_png(fig))
    counts = report.get("prototypes_per_cluster", {})
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([str(c) for c in counts], list(counts.values()))
    ax.set_xlabel("selected global cluster")
    ax.set_ylabel("prototypes")
    fig.tight_layout()
    write_atomically(out_dir / "report_clusters.png", figure_png(fig))


def unreadable_images(cache: Path, images: list[TrainingImage]) -> list[dict]:
    """The images without a probe result, each with where it is and why it could not be read."""
    return [{"id": image.id, "where": image.where, "error": unreadable_reason(cache, image)}
            for image in images if not (cache / f"{image.id}.pt").is_file()]


def build_codebook(pretrained: str, images: str | Path, out_dir: str | Path, settings: BuildSettings,
                   limit: int | None = None, device: str | None = None, wait_timeout: float = 86400.0) -> Path | None:
    """Probe (sharded by ``RANK``/``WORLD_SIZE``), then on rank 0 select prototypes and write the codebook.

    Returns the codebook path on rank 0, ``None`` on other ranks. Images that cannot be read are left out
    (listed in ``report.json``); if none can be read, ``BuildError`` names them.
    """
    items = list_images(images, limit)
    out_dir = output_folder(out_dir)
    cache = out_dir / "probes"
    layout = process_layout()
    rank, world_size = layout.rank, layout.world_size
    stats = probe_images(pretrained, items, cache, settings, rank, world_size, device)
    write_atomically(out_dir / f"probe_stats_rank{rank}.json", json.dumps(stats, indent=2))
    if rank != 0:
        return None
    wait_for(cache, items, wait_timeout)
    unreadable = unreadable_images(cache, items)
    shown = "".join(f"\n  {u['where']}: {u['error']}" for u in unreadable[:10]) + (
        f"\n  ... and {len(unreadable) - 10} more" if len(unreadable) > 10 else "")
    if len(unreadable) == len(items):
        raise BuildError(f"none of the {len(items)} images could be read:{shown}\nreplace them with readable images "
                         "(or give the right folder); a rerun probes replaced images again")
    ids = [image.id for image in items]
    results = {i: torch.load(cache / f"{i}.pt", weights_only=True) for i in ids if (cache / f"{i}.pt").is_file()}
    try:
        prototypes, image_ids, report = select_prototypes(results, settings)
    except BuildError as err:
        if not unreadable:
            raise
        raise BuildError(f"{err}\n{len(unreadable)} of the {len(items)} images could not be read and were left out:"
                         f"{shown}\nremove or replace them") from err
    report.update(images=len(ids), unreadable=len(unreadable), unreadable_images=unreadable,
                  settings=dataclasses.asdict(settings))
    meta = {"model": pretrained, "source": "build-codebook", "settings": json.dumps(dataclasses.asdict(settings), sort_keys=True),
            "image_ids": json.dumps(image_ids)}
    path = save_codebook(Codebook(prototypes.contiguous(), meta), out_dir / "codebook.safetensors")
    write_report(out_dir, report, results, settings)
    return path
