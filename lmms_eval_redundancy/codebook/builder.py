"""Build a redundancy codebook for a checkpoint from training images (the paper's analysis pipeline).

Per image (sharded over processes, each result cached so an interrupted build resumes):
1. probe every visual token alone with the paper's prompt -> p_max of the first answer token;
2. leave-one-out divergences: the token's 3x3 window with and without the token (J_context), and all
   tokens with and without the window (J_global).
Then, once every image is done (rank 0): the low-information rule, per-image DPC-KNN filtering and
the global DPC-KNN prototype selection; every member of a selected cluster becomes a codebook row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
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
from lmms_eval_redundancy.core.registry import UNPRUNED, build_method
from lmms_eval_redundancy.runtime.engine import PruningEngine
from lmms_eval_redundancy.runtime.loading import load, process_layout

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"}


class BuildError(RuntimeError):
    """The build cannot produce a codebook (and says which setting to change)."""


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
        if self.divergence not in DIVERGENCES:
            raise BuildError(f"divergence={self.divergence!r} is unknown; choose one of {', '.join(DIVERGENCES)}")
        self.articles = tuple(self.articles)


def load_settings(path_or_preset: str | Path, **overrides) -> BuildSettings:
    """Settings from a YAML file (which may name a ``preset:`` to start from) or a preset name."""
    values: dict = {}
    source = str(path_or_preset)
    if Path(source).is_file():
        values = yaml.safe_load(Path(source).read_text()) or {}
        source = values.pop("preset", None)
    if source:
        preset = resources.files("lmms_eval_redundancy.codebook") / "presets" / f"{source}.yaml"
        if not preset.is_file():
            names = sorted(p.name.removesuffix(".yaml") for p in (resources.files("lmms_eval_redundancy.codebook") / "presets").iterdir())
            raise BuildError(f"no settings file or preset named {source!r}; presets: {', '.join(names)}")
        values = {**yaml.safe_load(preset.read_text()), **values}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(BuildSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BuildError(f"unknown build setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return BuildSettings(**values)
    except TypeError as err:
        raise BuildError(f"incomplete build settings ({err}); start from a preset: preset: llava15") from err


def list_images(source: str | Path, limit: int | None = None) -> list[tuple[str, object]]:
    """``(image id, loader)`` pairs from a folder of images or a dataset saved with ``save_to_disk``."""
    source = Path(source)
    if (source / "dataset_info.json").is_file() or (source / "dataset_dict.json").is_file():
        import datasets

        data = datasets.load_from_disk(str(source))
        if isinstance(data, datasets.DatasetDict):
            data = data["train"] if "train" in data else next(iter(data.values()))
        ids = data["id"] if "id" in data.column_names else list(range(len(data)))
        items = [(str(i), lambda row=row: data[row]["image"]) for row, i in enumerate(ids)]
    elif source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        items = [(p.stem, lambda p=p: Image.open(p)) for p in files]
    else:
        raise BuildError(f"{source} is neither a folder of images nor a dataset saved with save_to_disk")
    return items[:limit] if limit else items


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


def _write_atomically(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def probe_images(pretrained: str, images: list, cache: Path, settings: BuildSettings, rank: int = 0,
                 world_size: int = 1, device: str | None = None) -> dict:
    """Probe this process's share of ``images`` into ``cache``, skipping images already there."""
    cache.mkdir(parents=True, exist_ok=True)
    mine = [(i, image_id, load) for i, (image_id, load) in enumerate(images) if i % world_size == rank]
    todo = [item for item in mine if not (cache / f"{item[1]}.pt").is_file() and not (cache / f"{item[1]}.skip").is_file()]
    stats = {"assigned": len(mine), "probed": 0, "skipped_unreadable": 0, "seconds": 0.0, "forward_passes": 0}
    if not todo:
        return stats
    loaded = load(pretrained, device=device)
    prober = Prober(loaded.model, loaded.processor, loaded.family, settings)
    start = time.perf_counter()
    for _, image_id, read in tqdm(todo, desc=f"probing (rank {rank})", disable=rank != 0 and world_size > 1):
        try:
            image = read()
            image.load()
        except (OSError, UnidentifiedImageError, ValueError) as err:
            (cache / f"{image_id}.skip").write_text(f"unreadable: {err}\n")
            stats["skipped_unreadable"] += 1
            continue
        tokens, grid = prober.visual_tokens(image)
        result = prober.probe(tokens, grid)
        _write_atomically({**result, "features": tokens.cpu(), "grid": grid}, cache / f"{image_id}.pt")
        stats["probed"] += 1
    stats["seconds"] = time.perf_counter() - start
    stats["forward_passes"] = prober.forward_passes
    return stats


def wait_for(cache: Path, image_ids: list[str], timeout: float, poll: float = 2.0) -> None:
    """Block until every image has a result or an unreadable marker (other ranks may still be probing)."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [i for i in image_ids if not (cache / f"{i}.pt").is_file() and not (cache / f"{i}.skip").is_file()]
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
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(j.numpy(), p_max.numpy(), s=4, alpha=0.5)
    ax.axvline(settings.jsd_thres, color="red", linestyle="--", label=f"jsd_thres {settings.jsd_thres:g}")
    ax.axhline(settings.prob_thres, color="orange", linestyle="--", label=f"prob_thres {settings.prob_thres:g}")
    ax.set_xlabel("J = w_c J_context + w_g J_global")
    ax.set_ylabel("p_max (single-token probe)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out_dir / "report_scatter.png", dpi=120)
    plt.close(fig)
    counts = report.get("prototypes_per_cluster", {})
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([str(c) for c in counts], list(counts.values()))
    ax.set_xlabel("selected global cluster")
    ax.set_ylabel("prototypes")
    fig.tight_layout()
    fig.savefig(out_dir / "report_clusters.png", dpi=120)
    plt.close(fig)


def build_codebook(pretrained: str, images: str | Path, out_dir: str | Path, settings: BuildSettings,
                   limit: int | None = None, device: str | None = None, wait_timeout: float = 86400.0) -> Path | None:
    """Probe (sharded by ``RANK``/``WORLD_SIZE``), then on rank 0 select prototypes and write the codebook.

    Returns the codebook path on rank 0, ``None`` on other ranks.
    """
    out_dir = Path(out_dir)
    cache = out_dir / "probes"
    layout = process_layout()
    rank, world_size = layout.rank, layout.world_size
    items = list_images(images, limit)
    if not items:
        raise BuildError(f"no images found in {images}")
    stats = probe_images(pretrained, items, cache, settings, rank, world_size, device)
    (out_dir / f"probe_stats_rank{rank}.json").write_text(json.dumps(stats, indent=2))
    if rank != 0:
        return None
    ids = [image_id for image_id, _ in items]
    wait_for(cache, ids, wait_timeout)
    results = {i: torch.load(cache / f"{i}.pt", weights_only=True) for i in ids if (cache / f"{i}.pt").is_file()}
    prototypes, image_ids, report = select_prototypes(results, settings)
    report.update(images=len(ids), unreadable=len(ids) - len(results), settings=dataclasses.asdict(settings))
    meta = {"model": pretrained, "source": "build-codebook", "settings": json.dumps(dataclasses.asdict(settings), sort_keys=True),
            "image_ids": json.dumps(image_ids)}
    path = save_codebook(Codebook(prototypes.contiguous(), meta), out_dir / "codebook.safetensors")
    write_report(out_dir, report, results, settings)
    return path
