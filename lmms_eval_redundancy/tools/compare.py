"""Tables and plots from any folder of ``llava_redundancy`` results (sweep folders or hand-launched runs).

Every ``<date>_tokens.json`` found (with its ``<date>_results.json`` beside it) is one run. A row is one
complete set of effective settings as the run recorded them (model, method, budget, every parameter,
a codebook by its content hash, the anyres policy): runs with different settings never share a row,
runs with the same settings but other tasks fill the same row, and a rerun of a task already in the
row (same settings) is reported as a duplicate, the newest run kept. The unpruned run of the same model
is the reference for "percent of unpruned", prefill speed-up and FLOPs ratio. A cell with no run stays
empty: missing is never shown as zero.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lmms_eval_redundancy.core.registry import PATHS_KEY, UNPRUNED

LABEL_OMITS = ("method", "budget", "stage", "pretrained", "family")  # shown elsewhere, or implied by the row's model


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
        row["retained tokens / sample"] = after / samples if samples else math.nan
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
        order = ["run"] + tasks + [c for c in ("% of unpruned (mean)", "retained tokens / sample", "achieved retention",
                                                "prefill speed-up", "FLOPs ratio") if c in group]
        group = group.assign(pruned=group["method"] != UNPRUNED).sort_values(
            ["pruned", "method", "retained tokens / sample"], ascending=[True, True, False])
        tables[Path(model).name] = group[order].reset_index(drop=True)
    return tables


def markdown(table: pd.DataFrame) -> str:
    """The table as GitHub markdown, missing values as an em dash."""
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".4g", missingval="—")


def write_outputs(tables: dict[str, pd.DataFrame], frame: pd.DataFrame, out: str | Path) -> list[Path]:
    """Markdown, CSV and LaTeX per model, plus the two plots; returns the files written."""
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
        rows = frame[frame["pretrained"].map(lambda p: Path(p).name) == model].merge(table[["run", "% of unpruned (mean)"]], on="run")
        for x_column, name, label in (("retained tokens / sample", "score_vs_tokens", "visual tokens per sample"),
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


def compare(results_dir: str | Path, out: str | Path | None = None) -> tuple[dict[str, pd.DataFrame], list[dict]]:
    """Per-model tables written (with plots) to ``out``; also the reruns left out as duplicates."""
    collected = collect(results_dir)
    if collected.frame.empty:
        raise FileNotFoundError(f"no llava_redundancy runs (<date>_tokens.json next to <date>_results.json) under {results_dir}")
    tables = compare_table(collected.frame)
    write_outputs(tables, collected.frame, out or Path(results_dir) / "compare")
    return tables, collected.duplicates
