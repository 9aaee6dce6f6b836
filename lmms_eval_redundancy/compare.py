"""Tables and plots from any folder of ``llava_redundancy`` results (sweep folders or hand-launched runs).

Every ``<date>_tokens.json`` found (with its ``<date>_results.json`` beside it) is one run. Runs of the
same model and pruning settings are merged (their tasks become columns); the unpruned run of the same
model is the reference for "percent of unpruned", prefill speed-up and FLOPs ratio. A cell with no run
stays empty: missing is never shown as zero.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

SETTING_KEYS = ("variant", "fastv_k", "anyres", "seed")


def main_metric(task_results: dict) -> tuple[str, float] | None:
    """The first numeric metric of a task's results (lmms-eval lists the task's main metric first)."""
    for key, value in task_results.items():
        if key != "alias" and "stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return key.split(",")[0], float(value)
    return None


def run_label(settings: dict) -> str:
    extras = [f"{k}={settings[k]}" for k in SETTING_KEYS if k in settings and settings[k] not in ("", None, "full", 0)]
    budget = "" if settings["method"] == "none" else f" {settings['budget']}"
    return f"{settings['method']}{budget}" + (f" ({', '.join(extras)})" if extras else "")


def collect(folder: str | Path) -> pd.DataFrame:
    """One row per (model, method settings) with task scores, tokens and efficiency, merged over runs."""
    rows: dict[tuple[str, str], dict] = {}
    for tokens_file in sorted(Path(folder).rglob("*_tokens.json")):
        results_file = tokens_file.with_name(tokens_file.name.replace("_tokens.json", "_results.json"))
        if not results_file.is_file():
            continue  # an interrupted run: tokens without results are not a result
        tokens = json.loads(tokens_file.read_text())
        results = json.loads(results_file.read_text())["results"]
        settings = tokens["settings"]
        key = (settings["pretrained"], run_label(settings))
        row = rows.setdefault(key, {"model": Path(settings["pretrained"]).name, "pretrained": settings["pretrained"],
                                    "run": key[1], "method": settings["method"], "budget": settings["budget"],
                                    "_before": 0, "_after": 0, "_samples": 0, "_eff": []})
        for task, task_results in results.items():
            metric = main_metric(task_results)
            if metric:
                row[f"{task} ({metric[0]})"] = metric[1]
        row["_before"] += tokens["visual_tokens_before"]
        row["_after"] += tokens["visual_tokens_after"]
        row["_samples"] += tokens["samples_with_visuals"]
        efficiency = tokens.get("efficiency", {})
        row["_eff"].append((tokens["samples"], efficiency.get("generate_until") or efficiency.get("loglikelihood") or {}))
    table = []
    for row in rows.values():
        weights = [(n, e) for n, e in row.pop("_eff") if e]
        total = sum(n for n, _ in weights)
        mean = lambda key: sum(n * e.get(key, 0) for n, e in weights) / total if total else math.nan  # noqa: E731
        before, after, samples = row.pop("_before"), row.pop("_after"), row.pop("_samples")
        row["retained tokens / sample"] = after / samples if samples else math.nan
        row["achieved retention"] = after / before if before else math.nan
        row["prefill s / sample"] = mean("prefill_seconds_per_sample")
        row["flops / sample"] = mean("llm_prefill_flops_per_sample") + mean("vision_flops_per_sample")
        table.append(row)
    return pd.DataFrame(table)


def task_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.endswith(")") and "(" in c]


def compare_table(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model: rows = method x budget, with % of unpruned, speed-up and FLOPs ratio."""
    tables = {}
    for model, group in frame.groupby("pretrained", sort=True):
        group = group.copy()
        tasks = [c for c in task_columns(group) if group[c].notna().any()]
        reference = group[group["method"] == "none"]
        ref = reference.iloc[0] if len(reference) else None
        if ref is not None:
            percent = pd.DataFrame({t: 100 * group[t] / ref[t] for t in tasks if pd.notna(ref[t]) and ref[t]})
            group["% of unpruned (mean)"] = percent.mean(axis=1, skipna=True) if len(percent.columns) else math.nan
            group["prefill speed-up"] = ref["prefill s / sample"] / group["prefill s / sample"]
            group["FLOPs ratio"] = group["flops / sample"] / ref["flops / sample"]
        order = ["run"] + tasks + [c for c in ("% of unpruned (mean)", "retained tokens / sample", "achieved retention",
                                                "prefill speed-up", "FLOPs ratio") if c in group]
        group = group.assign(pruned=group["method"] != "none").sort_values(
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
        base = out / stem
        base.with_suffix(".md").write_text(markdown(table) + "\n")
        table.to_csv(base.with_suffix(".csv"), index=False)
        base.with_suffix(".tex").write_text(table.to_latex(index=False, float_format="%.4g", na_rep="—"))
        written += [base.with_suffix(s) for s in (".md", ".csv", ".tex")]
        if "% of unpruned (mean)" not in table:
            continue
        rows = frame[frame["pretrained"].map(lambda p: Path(p).name) == model].merge(table[["run", "% of unpruned (mean)"]], on="run")
        for x_column, name, label in (("retained tokens / sample", "score_vs_tokens", "visual tokens per sample"),
                                      ("prefill s / sample", "pareto_prefill", "prefill seconds per sample")):
            fig, ax = plt.subplots(figsize=(5.5, 4))
            for method, points in rows.groupby("method"):
                points = points.sort_values(x_column)
                ax.plot(points[x_column], points["% of unpruned (mean)"], marker="o", label=method)
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


def compare(results_dir: str | Path, out: str | Path | None = None) -> dict[str, pd.DataFrame]:
    frame = collect(results_dir)
    if frame.empty:
        raise FileNotFoundError(f"no llava_redundancy runs (<date>_tokens.json next to <date>_results.json) under {results_dir}")
    tables = compare_table(frame)
    write_outputs(tables, frame, out or Path(results_dir) / "compare")
    return tables
