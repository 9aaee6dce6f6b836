"""Tables and plots from any folder of ``llava_redundancy`` results (sweep folders or hand-launched runs).

Every ``<date>_tokens.json`` found (with its ``<date>_results.json`` beside it) is one run. A row is one
complete set of effective settings as the run recorded them (model, method, budget, every parameter,
a codebook by its content hash, the anyres policy) and the lmms-eval options that change which documents
run or what they ask (``--limit``, ``--offset``, ``--num_fewshot``, ``--gen_kwargs``, from the results
file's ``config``): runs with different settings never share a row, runs with the same settings but other
tasks fill the same row, and a rerun of a task already in the row (same settings) is reported as a
duplicate, the newest run kept. A cell with no run stays empty: missing is never shown as zero.

Each row is measured against an unpruned run of the same model ("percent of unpruned", device prefill
speed-up, FLOPs ratio): the one with the same lmms-eval options, else one that ran the same documents, else
the first; a row whose documents (per task: how many ran, from which offset) differ from its reference's is
warned about on stderr and in the markdown notes. Timings come from the per-sample records after each run's
warm-up (its first batch of each request type, ``runtime.efficiency.after_warm_up``). The device prefill
speed-up (vision tower + selection + LLM prefill, host preparation left out) is the median of the
per-document ratios unpruned / pruned (the records of both runs, paired by task and document); its spread is
their interquartile range: the CSV holds it in ``speed-up spread`` (``"1.41-1.8"``, with `` unreliable``
appended when the range includes 1.0); markdown and LaTeX print the two together, ``1.62 (1.41-1.8)`` or
``0.9 (0.4-1.7) unreliable``. ``samples/s`` is end to end: documents over their summed wall time (host
preparation + device prefill + decode); the FLOPs ratio is analytic (vision + LLM prefill) and the KV-cache
bytes are measured after generation.

Run files that do not parse, or a results file that its tokens file names but that is gone, stop the
comparison with a message naming each file; an interrupted run (tokens but no results file recorded) is
left out with a warning.

Two token budgets are reported because papers use both: visual tokens after the last cut (FastV, DART; for
methods before the LLM, the tokens kept) and the mean over decoder layers of the visual tokens each layer
handles (PyramidDrop, SparseVLM). ``match`` places the runs of every method at equal layer-mean tokens or equal
FLOPs: the plot's x-axis, and a table of each curve's score at every run's value of that measure.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.files import figure_png, output_folder, write_atomically
from lmms_eval_redundancy.core.registry import PATHS_KEY, UNPRUNED
from lmms_eval_redundancy.runtime.efficiency import (
    Quartiles,
    after_warm_up,
    with_spread,
)

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


# lmms-eval options that change which documents run or what they ask, with their defaults (a run's row
# records those it set otherwise); ``num_fewshot`` is only among the resolved command-line arguments
EVAL_OPTIONS = {"limit": None, "offset": 0, "num_fewshot": None, "gen_kwargs": ""}
SPEED_UP = "device prefill speed-up"
SPREAD = "speed-up spread"
DEVICE_PREFILL = "device prefill s / sample"  # median after the warm-up: vision tower + selection + LLM prefill
SAMPLES_PER_SECOND = "samples/s"  # end to end: documents / (host preparation + device prefill + decode)
KV_CACHE = "KV-cache bytes / sample"
RERUN_FIX = ("rerun their cells (`lmms-eval-redundancy sweep SPEC` reruns a cell whose files do not parse) "
             "or move those run folders out of the folder you compare")


@dataclass
class Run:
    tokens_file: Path
    settings: dict  # the wrapper's recorded settings and the lmms-eval options set (``--limit`` ...)
    scores: dict[str, float]  # "task (metric)" -> value of the task's main metric
    tokens: dict
    metrics: dict[str, dict[str, float]]  # task -> every numeric metric ("metric,filter" keys as lmms-eval writes them)
    documents: dict[str, tuple[int, int]]  # task -> (documents run, offset of the first)


@dataclass
class Collected:
    """One row per distinct settings, the reruns left out as duplicates, and what was left out and why."""

    frame: pd.DataFrame
    duplicates: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class UnreadableRun(UserError):
    """A run's results or tokens file does not parse, or is gone."""


def read_record(path: Path, what: str, key: str) -> dict:
    """A run's JSON file, which must hold ``key``; ``UnreadableRun`` naming the file otherwise."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UnreadableRun(f"{path}: the {what} file is truncated or not JSON ({err})") from err
    if not isinstance(record, dict) or key not in record:
        raise UnreadableRun(f"{path}: not a {what} file (no {key!r} entry)")
    return record


def eval_options(config: dict) -> dict:
    """``{"--limit": 8, ...}``: the lmms-eval options a run set to other than their defaults."""
    resolved = config.get("resolved_cli_args") or {}
    values = {name: config.get(name, resolved.get(name, default)) for name, default in EVAL_OPTIONS.items()}
    return {f"--{name}": value for name, value in values.items() if value not in (EVAL_OPTIONS[name], None)}


def read_run(tokens_file: Path) -> Run | None:
    """The run recorded by ``tokens_file``; ``None`` for an interrupted run (no results file recorded)."""
    tokens = read_record(tokens_file, "token summary", "settings")
    results_name = tokens.get("results_file", tokens_file.name.replace("_tokens.json", "_results.json"))
    results_file = tokens_file.with_name(results_name) if results_name else None
    if results_file is None or not results_file.is_file():
        if tokens.get("results_file"):
            raise UnreadableRun(f"{tokens_file}: its results file {results_file.name} is gone")
        return None
    record = read_record(results_file, "results", "results")
    results = record["results"]
    scores = {f"{task} ({metric[0]})": metric[1] for task, task_results in results.items()
              if (metric := main_metric(task_results))}
    metrics = {task: {k: v for k, v in task_results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for task, task_results in results.items()}
    config = record.get("config") or {}
    offset = int(config.get("offset") or 0)
    documents = {task: (counts["effective"], offset) for task, counts in (record.get("n-samples") or {}).items()
                 if isinstance(counts, dict) and "effective" in counts}
    return Run(tokens_file, {**tokens["settings"], **eval_options(config)}, scores, tokens, metrics, documents)


def read_runs(folder: str | Path) -> tuple[list[Run], list[str]]:
    """Every finished run under ``folder``, newest first, and warnings for the interrupted runs left out.

    Raises ``UserError`` naming every run file that does not parse (nothing is compared then).
    """
    runs, warnings, unreadable = [], [], []
    for tokens_file in Path(folder).rglob("*_tokens.json"):
        try:
            run = read_run(tokens_file)
        except UnreadableRun as err:
            unreadable.append(str(err))
            continue
        if run is None:
            warnings.append(f"left out {tokens_file}: an interrupted run (no results file beside it)")
        else:
            runs.append(run)
    if unreadable:
        raise UserError(f"{len(unreadable)} run file(s) under {folder} cannot be read:\n  " + "\n  ".join(sorted(unreadable))
                        + f"\n{RERUN_FIX}")
    return sorted(runs, key=lambda run: (run.tokens_file.name, str(run.tokens_file)), reverse=True), warnings


def timings_by_document(runs: list[Run]) -> dict[tuple, tuple[float, float]]:
    """Per ``(request, task, split, doc_id)`` after the warm-up: (device prefill seconds, wall seconds = host
    preparation + device prefill + decode), from the runs' per-sample records."""
    timings = {}
    for run in runs:
        for sample in after_warm_up(run.tokens.get("per_sample", [])):
            efficiency = sample["efficiency"]
            if "device_prefill_seconds" in efficiency:
                key = (sample["request"], sample["task"], sample["split"], sample["doc_id"])
                timings[key] = (efficiency["device_prefill_seconds"], efficiency["host_seconds"]
                                + efficiency["device_prefill_seconds"] + efficiency["decode_seconds"])
    return timings


def collect(folder: str | Path) -> Collected:
    """One row per distinct settings with task scores, tokens and efficiency, merged over that row's runs."""
    grouped: dict[str, list[Run]] = {}
    duplicates = []
    runs, warnings = read_runs(folder)
    for run in runs:
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
               "curve": curve, "method": settings["method"], "budget": settings["budget"], "metrics": {},
               "options": {k: v for k, v in settings.items() if k.startswith("--")}, "documents": {},
               "timings by document": timings_by_document(runs)}
        for run in runs:
            row.update(run.scores)
            row["metrics"].update(run.metrics)
            row["documents"].update(run.documents)
        before = sum(run.tokens["visual_tokens_before"] for run in runs)
        after = sum(run.tokens["visual_tokens_after"] for run in runs)
        samples = sum(run.tokens["samples_with_visuals"] for run in runs)
        layer_mean = sum(run.tokens.get("visual_tokens_layer_mean", run.tokens["visual_tokens_after"]) for run in runs)
        row[AFTER_CUT] = after / samples if samples else math.nan
        row[LAYER_MEAN] = layer_mean / samples if samples else math.nan
        row["achieved retention"] = after / before if before else math.nan
        timings = row["timings by document"].values()
        row[DEVICE_PREFILL] = Quartiles.of(device for device, _ in timings).median if timings else math.nan
        row[SAMPLES_PER_SECOND] = len(timings) / sum(wall for _, wall in timings) if timings else math.nan
        row["flops / sample"] = (per_sample_mean(runs, "llm_prefill_flops_per_sample")
                                 + per_sample_mean(runs, "vision_flops_per_sample"))
        row[KV_CACHE] = per_sample_mean(runs, "kv_cache_bytes_per_sample")
        rows.append(row)
    return Collected(pd.DataFrame(rows), duplicates, warnings)


def efficiency_of(tokens: dict) -> dict:
    efficiency = tokens.get("efficiency", {})
    return efficiency.get("generate_until") or efficiency.get("loglikelihood") or {}


def per_sample_mean(runs: list[Run], key: str) -> float:
    """The runs' per-sample efficiency ``key``, weighted by their samples (NaN where none recorded it)."""
    weights = [(run.tokens["samples"], efficiency[key]) for run in runs if key in (efficiency := efficiency_of(run.tokens))]
    total = sum(n for n, _ in weights)
    return sum(n * value for n, value in weights) / total if total else math.nan


def task_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.endswith(")") and "(" in c]


def document_differences(row: pd.Series, reference: pd.Series) -> list[str]:
    """Per task both ran: ``"tiny_image: 8 documents from 0 vs 4 from 0"`` where the documents differ."""
    return [f"{task}: {count} documents from {offset} vs {reference['documents'][task][0]} from "
            f"{reference['documents'][task][1]}"
            for task, (count, offset) in sorted(row["documents"].items())
            if task in reference["documents"] and reference["documents"][task] != (count, offset)]


def reference_for(row: pd.Series, references: pd.DataFrame) -> pd.Series:
    """The unpruned row ``row`` is measured against: the same lmms-eval options, else the same documents, else
    the first."""
    candidates = [ref for _, ref in references.iterrows()]
    same_options = [ref for ref in candidates if ref["options"] == row["options"]]
    same_documents = [ref for ref in candidates if not document_differences(row, ref)]
    return (same_options + same_documents + candidates)[0]


def device_prefill_speed_up(row: pd.Series, reference: pd.Series) -> Quartiles | None:
    """Median and quartiles of the per-document device prefill speed-ups (reference / row, documents both ran
    after their warm-up); None without such records."""
    ours, theirs = row["timings by document"], reference["timings by document"]
    ratios = [theirs[key][0] / ours[key][0] for key in ours.keys() & theirs.keys() if ours[key][0] > 0]
    return Quartiles.of(ratios) if ratios else None


def measured(row: pd.Series, ref: pd.Series, tasks: list[str]) -> dict:
    """``row`` against its unpruned reference: % of unpruned (mean over tasks), device prefill speed-up and
    spread, FLOPs ratio."""
    percents = [100 * row[t] / ref[t] for t in tasks if pd.notna(ref[t]) and ref[t] and pd.notna(row[t])]
    speed_up = device_prefill_speed_up(row, ref)
    return {"% of unpruned (mean)": sum(percents) / len(percents) if percents else math.nan,
            SPEED_UP: math.nan if speed_up is None else speed_up.median,
            SPREAD: math.nan if speed_up is None or ref.name == row.name else speed_up.spread(),
            "FLOPs ratio": row["flops / sample"] / ref["flops / sample"]}


def compare_table(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model: rows = method x budget, with % of unpruned, device prefill speed-up (and its spread),
    end-to-end samples/s, FLOPs ratio and KV-cache bytes.

    Each table's ``attrs["notes"]`` holds the warnings about its rows (documents that differ from their
    reference's, no unpruned reference).
    """
    tables = {}
    for model, group in frame.groupby("pretrained", sort=True):
        tasks = [c for c in task_columns(group) if group[c].notna().any()]
        references = group[group["method"] == UNPRUNED]
        notes = [] if len(references) else [(f"no unpruned run of {model}: nothing to measure the rows against; "
                                             "run it with method=none on the same tasks")]
        if len(references):
            rows = []
            for _, row in group.iterrows():
                ref = reference_for(row, references)
                differences = document_differences(row, ref)
                if differences:
                    notes.append(f"{row['run']}: its documents differ from those of its unpruned reference {ref['run']} "
                                 f"({'; '.join(differences)}): its % of unpruned and speed-up compare different "
                                 "documents; run the unpruned model with the same --limit and --offset")
                rows.append(measured(row, ref, tasks))
            group = pd.concat([group, pd.DataFrame(rows, index=group.index)], axis=1)
        order = ["run"] + tasks + [c for c in ("% of unpruned (mean)", AFTER_CUT, LAYER_MEAN,
                                                "achieved retention", SPEED_UP, SPREAD, SAMPLES_PER_SECOND, "FLOPs ratio",
                                                KV_CACHE) if c in group]
        group = group.assign(pruned=group["method"] != UNPRUNED).sort_values(
            ["pruned", "method", AFTER_CUT], ascending=[True, True, False])
        table = group[order].reset_index(drop=True)
        table.attrs["notes"] = notes
        tables[Path(model).name] = table
    return tables


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """The table as people read it: each speed-up with its spread in one cell, ``0.9 (0.4-1.7) unreliable``."""
    if SPREAD not in table:
        return table

    def cell(value: float, spread) -> str | float:
        if pd.isna(value) or pd.isna(spread):
            return value if pd.isna(value) else f"{value:.4g}"
        return with_spread(value, spread)

    speed_up = [cell(value, spread) for value, spread in zip(table[SPEED_UP], table[SPREAD])]
    return table.drop(columns=SPREAD).assign(**{SPEED_UP: pd.Series(speed_up, index=table.index, dtype=object)})


def markdown(table: pd.DataFrame, notes: bool = False) -> str:
    """The table as GitHub markdown (speed-up with its spread), missing values as an em dash; ``notes``: its
    warnings below it."""
    shown = readable(table)
    text = shown.astype(object).where(shown.notna(), None).to_markdown(index=False, floatfmt=".4g", missingval="—")
    warnings = [f"- warning: {note}" for note in table.attrs.get("notes", [])] if notes else []
    return f"{text}\n\n" + "\n".join(warnings) if warnings else text


def model_rows(table: pd.DataFrame, frame: pd.DataFrame, model: str) -> pd.DataFrame:
    """A model's table with each run's method, plot curve and device prefill time."""
    runs = frame[frame["pretrained"].map(lambda p: Path(p).name) == model]
    return table.merge(runs[["run", "method", "curve", DEVICE_PREFILL]], on="run")


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
    """Markdown (with the table's notes), CSV and LaTeX per table, plus two plots per model (score against
    ``match``'s measure, and against device prefill time); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = output_folder(out)
    written = []
    for model, table in tables.items():
        stem = re.sub(r"[^\w.-]+", "_", model)  # e.g. builtin:shapes -> builtin_shapes
        write_atomically(out / f"{stem}.md", markdown(table, notes=True) + "\n")
        write_atomically(out / f"{stem}.csv", table.to_csv(index=False))
        write_atomically(out / f"{stem}.tex", readable(table).to_latex(index=False, float_format="%.4g", na_rep="—"))
        written += [out / f"{stem}{suffix}" for suffix in (".md", ".csv", ".tex")]
        if "% of unpruned (mean)" not in table:
            continue
        rows = model_rows(table, frame, model)
        for x_column, name, label in ((MATCH_AXES[match][0], f"score_vs_{match}", MATCH_AXES[match][1]),
                                      (DEVICE_PREFILL, "pareto_prefill", "device prefill seconds per sample (median)")):
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
            write_atomically(path, figure_png(fig))
            written.append(path)
    return written


def no_runs_error(results_dir: Path) -> UserError:
    what = "does not exist" if not results_dir.exists() else "is not a folder" if not results_dir.is_dir() else \
        "holds no llava_redundancy runs (no <date>_tokens.json beside a <date>_results.json)"
    return UserError(f"{results_dir} {what}; give the output folder of a sweep (its `output:`) or the --output_path of "
                     "`python -m lmms_eval --model llava_redundancy ...` runs, or make runs first "
                     "(`lmms-eval-redundancy sweep SPEC`)")


def warn(message: str) -> None:
    print(f"compare: warning: {message}", file=sys.stderr)


def compare(results_dir: str | Path, out: str | Path | None = None,
            match: str = "tokens") -> tuple[dict[str, pd.DataFrame], list[dict]]:
    """Per-model tables written (with plots) to ``out``; also the reruns left out as duplicates.

    ``match`` (``tokens``: after the last cut, ``layer_mean`` or ``flops``) is the plot's x-axis; other than
    ``tokens`` it also adds, per model, ``"<model> at equal <match>"``: the curves side by side (``matched_table``).
    Warnings (interrupted runs left out, documents that differ from the reference's) go to stderr.
    """
    if match not in MATCH_AXES:
        raise UserError(f"match={match!r} is not one of {', '.join(MATCH_AXES)}")
    results_dir = Path(results_dir)
    collected = collect(results_dir) if results_dir.is_dir() else None
    if collected is None or collected.frame.empty:
        raise no_runs_error(results_dir)
    tables = compare_table(collected.frame)
    for message in collected.warnings + [note for table in tables.values() for note in table.attrs["notes"]]:
        warn(message)
    if match != "tokens":
        for model, table in list(tables.items()):
            if "% of unpruned (mean)" in table:
                tables[f"{model} at equal {match}"] = matched_table(model_rows(table, collected.frame, model), MATCH_AXES[match][0])
    write_outputs(tables, collected.frame, out or results_dir / "compare", match)
    return tables, collected.duplicates
