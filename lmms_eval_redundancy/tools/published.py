"""Our runs of real checkpoints beside published numbers for the same model, method, budget and benchmark.

The shipped data (``lmms_eval_redundancy/published/``): ``llava_published.csv``, published LLaVA-1.5-7B and
LLaVA-NeXT-7B results of the unpruned models and of the methods this project implements, one number per
row with its source and notes; ``lmms_eval_tasks.csv``, each benchmark's lmms-eval task, metric key and the
conventions papers use. Published rows are separate rows marked ``published`` with their source; they are
never merged into our rows. A column is one benchmark under one reporting convention (MME perception only
and MME perception + cognition are two columns); the notes say where papers and lmms-eval differ.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pandas as pd

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.registry import UNPRUNED, available_methods

DATA = resources.files("lmms_eval_redundancy") / "published"
PUBLISHED = Path(str(DATA / "llava_published.csv"))
TASKS = Path(str(DATA / "lmms_eval_tasks.csv"))
# the published model names and the checkpoint names they correspond to (matched in our runs' ``pretrained``)
CHECKPOINTS = {"LLaVA-1.5-7B": "llava-1.5-7b", "LLaVA-NeXT-7B": "llava-v1.6-vicuna-7b"}
RAW_SCALE = ("CIDEr", "score")  # metrics published as raw values (MME scores, CIDEr, GPT scores); others are percent


def published_model(pretrained: str) -> str | None:
    """The published model name a checkpoint corresponds to, if any."""
    return next((name for name, key in CHECKPOINTS.items() if key in str(pretrained).lower()), None)


def our_method(published_method: str) -> str | None:
    """Our method name for a published one (the unpruned model for "vanilla" rows), if we implement it."""
    if "(vanilla)" in published_method:
        return UNPRUNED
    name = published_method.split()[0].lower()
    return name if name in available_methods() else None


def metric_keys(key_spec: str, published_metric: str) -> list[str]:
    """lmms-eval metric keys whose sum is comparable with ``published_metric``.

    ``key_spec`` is the task map's entry (``"a + b"`` for sums, ``"a (also b)"`` for alternatives). A metric
    named after one part of a sum (MME "perception score") takes only the keys with that part's name.
    """
    keys = [k.strip() for k in re.sub(r"\(also[^)]*\)", "", key_spec).split("+")]
    words = [w for w in ("perception", "cognition") if w in published_metric]
    if len(words) == 1:
        keys = [k for k in keys if words[0] in k] or keys
    return keys


def our_value(metrics: dict[str, dict[str, float]], task: str, keys: list[str], published_metric: str) -> float | None:
    """Our run's value on a published column (fractions shown as percent, as papers print them)."""
    results = metrics.get(task)
    if not results:
        return None
    found = [next((v for k, v in results.items() if k.split(",")[0] == key), None) for key in keys]
    if any(v is None for v in found):
        return None
    value = sum(found)
    raw = any(word in published_metric for word in RAW_SCALE)
    return value if raw else 100 * value


PUBLISHED_COLUMNS = ("model", "method", "retained_tokens", "benchmark", "metric", "value", "source")


def load_published(path: str | Path = PUBLISHED) -> pd.DataFrame:
    """Published numbers from a CSV laid out as the shipped ``llava_published.csv``; ``UserError`` if it is not."""
    try:
        data = pd.read_csv(path, dtype={"retained_tokens": "Int64"})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise UserError(f"cannot read published numbers from {path} ({err}); give a CSV laid out as {PUBLISHED}, "
                        "or --published alone for the shipped one") from err
    missing = [c for c in PUBLISHED_COLUMNS if c not in data.columns]
    if missing:
        raise UserError(f"{path} has no column(s) {', '.join(missing)}; lay it out as {PUBLISHED}")
    data["our_method"] = data["method"].map(our_method)
    return data[data["our_method"].notna()]


def task_map(path: str | Path = TASKS) -> pd.DataFrame:
    tasks = pd.read_csv(path)
    tasks["task"] = tasks["lmms_eval_0.7.3_task"].str.split().str[0]
    return tasks.set_index("benchmark")


def column(benchmark: str, metric: str) -> str:
    return f"{benchmark} ({metric})"


def side_by_side(frame: pd.DataFrame, published: pd.DataFrame, tasks: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, list[str]]]:
    """Per published model with runs of ours: (table of our rows then published rows, notes)."""
    out = {}
    for model, checkpoint_runs in frame.groupby(frame["pretrained"].map(published_model)):
        theirs = published[(published["model"] == model) & published["our_method"].isin(set(checkpoint_runs["method"]))]
        theirs = theirs[theirs["benchmark"].isin(tasks.index)]
        columns = {(b, m): tasks.loc[b, "task"] for b, m in theirs[["benchmark", "metric"]].drop_duplicates().itertuples(index=False)}
        ours = []
        for run in checkpoint_runs.to_dict("records"):
            row = {"kind": "ours", "run": run["run"], "method": run["method"], "visual tokens": run["tokens after last cut / sample"]}
            for (benchmark, metric), task in columns.items():
                keys = metric_keys(tasks.loc[benchmark, "metric_key"], metric)
                row[column(benchmark, metric)] = our_value(run["metrics"], task, keys, metric)
            ours.append(row)
        ours = [row for row in ours if any(pd.notna(row[column(*c)]) for c in columns)]
        if not ours:
            continue
        order = lambda r: (r["method"] != UNPRUNED, r["method"], -r["visual tokens"])
        sources = {source: i + 1 for i, source in enumerate(dict.fromkeys(theirs["source"]))}
        rows = {}
        for entry in theirs.itertuples(index=False):
            key = (entry.method, int(entry.retained_tokens), sources[entry.source])
            row = rows.setdefault(key, {"kind": "published", "run": f"{entry.method} @{entry.retained_tokens} [{key[2]}]",
                                        "method": entry.our_method, "visual tokens": float(entry.retained_tokens)})
            row[column(entry.benchmark, entry.metric)] = float(entry.value)
        table = pd.DataFrame(sorted(ours, key=order) + sorted(rows.values(), key=order))
        table = table[["kind", "run", "visual tokens"] + [column(*c) for c in columns]]
        notes = [f"[{i}] {source}" for source, i in sources.items()]
        notes += [f"{benchmark}: lmms-eval task {tasks.loc[benchmark, 'lmms_eval_0.7.3_task']}, papers report "
                  f"{tasks.loc[benchmark, 'what_papers_usually_report']}"
                  + (f"; {tasks.loc[benchmark, 'caveat']}" if pd.notna(tasks.loc[benchmark, "caveat"]) else "")
                  for benchmark in dict.fromkeys(b for b, _ in columns)]
        out[model] = (table, notes)
    return out


def write_published(tables: dict[str, tuple[pd.DataFrame, list[str]]], out: str | Path) -> list[Path]:
    """``<model>_published.{md,csv}`` and a plot per model: our points filled, published points hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmms_eval_redundancy.core.files import (
        figure_png,
        output_folder,
        write_atomically,
    )
    from lmms_eval_redundancy.tools.compare import markdown

    out = output_folder(out)
    written = []
    for model, (table, notes) in tables.items():
        stem = re.sub(r"[^\w.-]+", "_", model) + "_published"
        write_atomically(out / f"{stem}.md", markdown(table) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
        write_atomically(out / f"{stem}.csv", table.to_csv(index=False))
        values = [c for c in table.columns[3:] if table.loc[table["kind"] == "ours", c].notna().any()]
        fig, axes = plt.subplots(1, len(values), figsize=(4.5 * len(values), 3.8), squeeze=False)
        for ax, name in zip(axes[0], values):
            for (kind, method), points in table.assign(method=table["run"].str.split().str[0]).groupby(["kind", "method"]):
                points = points.dropna(subset=[name]).sort_values("visual tokens")
                if len(points):
                    ax.plot(points["visual tokens"], points[name], marker="o", linestyle="-" if kind == "ours" else ":",
                            markerfacecolor=None if kind == "ours" else "none", label=f"{kind}: {method}")
            ax.set_xlabel("visual tokens")
            ax.set_title(name, fontsize=9)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{model}: our runs (filled) and published numbers (hollow)")
        fig.tight_layout()
        write_atomically(out / f"{stem}.png", figure_png(fig, dpi=110))
        written += [out / f"{stem}{suffix}" for suffix in (".md", ".csv", ".png")]
    return written
