"""Tables and plots from any folder of ``llava_redundancy`` results (sweep folders or hand-launched runs).

Every ``<date>_tokens.json`` found (with its ``<date>_results.json`` beside it) is one run. A row is one
complete set of effective settings as the run recorded them (model, method, budget, every parameter,
a codebook by its content hash, the anyres policy): runs with different settings never share a row,
runs with the same settings but other tasks fill the same row, and a rerun of a task already in the
row (same settings) is reported as a duplicate, the newest run kept. The unpruned run of the same model
is the reference for "percent of unpruned", prefill speed-up and FLOPs ratio. A cell with no run stays
empty: missing is never shown as zero.

Two token budgets are reported because papers use both: visual tokens after the last cut (FastV, DART; for
methods before the LLM, the tokens kept) and the mean over decoder layers of the visual tokens each layer
handles (PyramidDrop, SparseVLM). ``match`` places the runs of every method at equal layer-mean tokens or equal
FLOPs: the plot's x-axis, and a table of each curve's score at every run's value of that measure.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lmms_eval_redundancy.core.registry import PATHS_KEY, UNPRUNED

LABEL_OMITS = ("method", "budget", "stage", "pretrained", "family")  # shown elsewhere, or implied by the row's model
AFTER_CUT = "tokens after last cut / sample"
LAYER_MEAN = "layer-mean tokens / sample"
MATCH_AXES = {  # match -> (column, plot axis label)
    "tokens": (AFTER_CUT, "visual tokens per sample after the last cut"),
    "layer_mean": (LAYER_MEAN, "visual tokens per sample, mean over decoder layers"),
    "flops": ("FLOPs ratio", "prefill FLOPs / unpruned"),
}


def main_metric(task_results: dict) -> tuple[str, float] | None:
    """The first numeric metric of a task's results (lmms-eval lists the task's main metric first)."""
    for key, value in task_results.items():
        if key != "alias" and "stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return key.split(",")[0], float(value)
    return None


def settings_key(settings: dict) -> str:
    """The identity of a run's settings: everything it recorded except where its files lie."""
    return json.dumps({k: v for k, v in settings.items() if k != PATHS_KEY}, sort_keys=True, default=str)


def run_labels(settings: list[dict]) -> list[tuple[str, str]]:
    """Per run: its row label ``method budget (k=v, ...)``, naming every setting besides the budget that differs
    between runs of the same model and method, and its plot curve ``method (k=v, ...)`` (shared across budgets)."""
    labels = []
    for one in settings:
        peers = [other for other in settings if other["pretrained"] == one["pretrained"] and other["method"] == one["method"]]
        keys = sorted({k for other in peers for k in other} - set(LABEL_OMITS) - {PATHS_KEY})
        varying = [f"{k}={one.get(k)}" for k in keys if len({json.dumps(other.get(k), default=str) for other in peers}) > 1]
        extras = f" ({', '.join(varying)})" if varying else ""
        budget = "" if one["method"] == UNPRUNED else f" {one['budget']}"
        labels.append((f"{one['method']}{budget}{extras}", f"{one['method']}{extras}"))
    return labels


@dataclass
class Run:
    tokens_file: Path
    settings: dict
    scores: dict[str, float]  # "task (metric)" -> value of the task's main metric
    tokens: dict
    metrics: dict[str, dict[str, float]]  # task -> every numeric metric ("metric,filter" keys as lmms-eval writes them)


@dataclass
class Collected:
    """One row per distinct settings, and the reruns left out as duplicates."""

    frame: pd.DataFrame
    duplicates: list[dict] = field(default_factory=list)


def read_runs(folder: str | Path) -> list[Run]:
    """Every finished run under ``folder``, newest first (an interrupted run has tokens but no results)."""
    runs = []
    for tokens_file in Path(folder).rglob("*_tokens.json"):
        results_file = tokens_file.with_name(tokens_file.name.replace("_tokens.json", "_results.json"))
        if not results_file.is_file():
            continue
        tokens = json.loads(tokens_file.read_text())
        results = json.loads(results_file.read_text())["results"]
        scores = {f"{task} ({metric[0]})": metric[1] for task, task_results in results.items()
                  if (metric := main_metric(task_results))}
        metrics = {task: {k: v for k, v in task_results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                   for task, task_results in results.items()}
        runs.append(Run(tokens_file, tokens["settings"], scores, tokens, metrics))
    return sorted(runs, key=lambda run: (run.tokens_file.name, str(run.tokens_file)), reverse=True)


def collect(folder: str | Path) -> Collected:
    """One row per distinct settings with task scores, tokens and efficiency, merged over that row's runs."""
    grouped: dict[str, list[Run]] = {}
    duplicates = []
    for run in read_runs(folder):
        taken = grouped.setdefault(settings_key(run.settings), [])
        covered = {task for other in taken for task in other.scores}
        clash = sorted(covered & set(run.scores))
        if clash:
            duplicates.append({"run": str(run.tokens_file), "tasks": clash,
                               "kept": [str(o.tokens_file) for o in taken if set(o.scores) & set(clash)]})
            continue
        taken.append(run)
    rows = []
    firsts = [runs[0].settings for runs in grouped.values()]
    for runs, (label, curve) in zip(grouped.values(), run_labels(firsts)):
        settings = runs[0].settings
        row = {"model": Path(settings["pretrained"]).name, "pretrained": settings["pretrained"], "run": label,
               "curve": curve, "method": settings["method"], "budget": settings["budget"], "metrics": {}}
        for run in runs:
            row.update(run.scores)
            row["metrics"].update(run.metrics)
        before = sum(run.tokens["visual_tokens_before"] for run in runs)
        after = sum(run.tokens["visual_tokens_after"] for run in runs)
        samples = sum(run.tokens["samples_with_visuals"] for run in runs)
        weights = [(run.tokens["samples"], efficiency_of(run.tokens)) for run in runs]
        weights = [(n, e) for n, e in weights if e]
        total = sum(n for n, _ in weights)
        mean = lambda key: sum(n * e.get(key, 0) for n, e in weights) / total if total else math.nan  # noqa: E731
        layer_mean = sum(run.tokens.get("visual_tokens_layer_mean", run.tokens["visual_tokens_after"]) for run in runs)
        row[AFTER_CUT] = after / samples if samples else math.nan
        row[LAYER_MEAN] = layer_mean / samples if samples else math.nan
        row["achieved retention"] = after / before if before else math.nan
        row["prefill s / sample"] = mean("prefill_seconds_per_sample")
        row["flops / sample"] = mean("llm_prefill_flops_per_sample") + mean("vision_flops_per_sample")
        rows.append(row)
    return Collected(pd.DataFrame(rows), duplicates)


def efficiency_of(tokens: dict) -> dict:
    efficiency = tokens.get("efficiency", {})
    return efficiency.get("generate_until") or efficiency.get("loglikelihood") or {}


def task_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.endswith(")") and "(" in c]


def compare_table(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model: rows = method x budget, with % of unpruned, speed-up and FLOPs ratio."""
    tables = {}
    for model, group in frame.groupby("pretrained", sort=True):
        group = group.copy()
        tasks = [c for c in task_columns(group) if group[c].notna().any()]
        reference = group[group["method"] == UNPRUNED]
        ref = reference.iloc[0] if len(reference) else None
        if ref is not None:
            percent = pd.DataFrame({t: 100 * group[t] / ref[t] for t in tasks if pd.notna(ref[t]) and ref[t]})
            group["% of unpruned (mean)"] = percent.mean(axis=1, skipna=True) if len(percent.columns) else math.nan
            group["prefill speed-up"] = ref["prefill s / sample"] / group["prefill s / sample"]
            group["FLOPs ratio"] = group["flops / sample"] / ref["flops / sample"]
        order = ["run"] + tasks + [c for c in ("% of unpruned (mean)", AFTER_CUT, LAYER_MEAN, "achieved retention",
                                                "prefill speed-up", "FLOPs ratio") if c in group]
        group = group.assign(pruned=group["method"] != UNPRUNED).sort_values(
            ["pruned", "method", AFTER_CUT], ascending=[True, True, False])
        tables[Path(model).name] = group[order].reset_index(drop=True)
    return tables


def markdown(table: pd.DataFrame) -> str:
    """The table as GitHub markdown, missing values as an em dash."""
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".4g", missingval="—")


def model_rows(table: pd.DataFrame, frame: pd.DataFrame, model: str) -> pd.DataFrame:
    """A model's table with each run's method, plot curve and prefill time."""
    runs = frame[frame["pretrained"].map(lambda p: Path(p).name) == model]
    return table.merge(runs[["run", "method", "curve", "prefill s / sample"]], on="run")


def matched_table(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """Every pruned curve's mean % of unpruned at each pruned run's value of ``column`` (rows, ascending): linear
    between the curve's two neighbouring runs, a run's own value at its own point, empty outside the curve's range."""
    pruned = rows[rows["method"] != UNPRUNED].dropna(subset=[column, "% of unpruned (mean)"])
    levels = sorted(set(pruned[column]))
    matched = {column: levels}
    for curve, points in pruned.groupby("curve"):
        points = points.sort_values(column)
        xs, ys = points[column].to_numpy(), points["% of unpruned (mean)"].to_numpy()
        matched[curve] = [float(np.interp(x, xs, ys)) if xs[0] <= x <= xs[-1] else math.nan for x in levels]
    return pd.DataFrame(matched)


def write_outputs(tables: dict[str, pd.DataFrame], frame: pd.DataFrame, out: str | Path, match: str = "tokens") -> list[Path]:
    """Markdown, CSV and LaTeX per table, plus two plots per model (score against ``match``'s measure, and against
    prefill time); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model, table in tables.items():
        stem = re.sub(r"[^\w.-]+", "_", model)  # e.g. builtin:shapes -> builtin_shapes
        (out / f"{stem}.md").write_text(markdown(table) + "\n")
        table.to_csv(out / f"{stem}.csv", index=False)
        (out / f"{stem}.tex").write_text(table.to_latex(index=False, float_format="%.4g", na_rep="—"))
        written += [out / f"{stem}{suffix}" for suffix in (".md", ".csv", ".tex")]
        if "% of unpruned (mean)" not in table:
            continue
        rows = model_rows(table, frame, model)
        for x_column, name, label in ((MATCH_AXES[match][0], f"score_vs_{match}", MATCH_AXES[match][1]),
                                      ("prefill s / sample", "pareto_prefill", "prefill seconds per sample")):
            fig, ax = plt.subplots(figsize=(5.5, 4))
            for curve, points in rows.groupby("curve"):
                points = points.sort_values(x_column)
                ax.plot(points[x_column], points["% of unpruned (mean)"], marker="o", label=curve)
            ax.set_xlabel(label)
            ax.set_ylabel("mean % of unpruned score")
            ax.set_title(model)
            ax.legend()
            fig.tight_layout()
            path = out / f"{stem}_{name}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def compare(results_dir: str | Path, out: str | Path | None = None,
            match: str = "tokens") -> tuple[dict[str, pd.DataFrame], list[dict]]:
    """Per-model tables written (with plots) to ``out``; also the reruns left out as duplicates.

    ``match`` (``tokens``: after the last cut, ``layer_mean`` or ``flops``) is the plot's x-axis; other than
    ``tokens`` it also adds, per model, ``"<model> at equal <match>"``: the curves side by side (``matched_table``).
    """
    if match not in MATCH_AXES:
        raise ValueError(f"match={match!r} is not one of {', '.join(MATCH_AXES)}")
    collected = collect(results_dir)
    if collected.frame.empty:
        raise FileNotFoundError(f"no llava_redundancy runs (<date>_tokens.json next to <date>_results.json) under {results_dir}")
    tables = compare_table(collected.frame)
    if match != "tokens":
        for model, table in list(tables.items()):
            if "% of unpruned (mean)" in table:
                tables[f"{model} at equal {match}"] = matched_table(model_rows(table, collected.frame, model), MATCH_AXES[match][0])
    write_outputs(tables, collected.frame, out or Path(results_dir) / "compare", match)
    return tables, collected.duplicates
