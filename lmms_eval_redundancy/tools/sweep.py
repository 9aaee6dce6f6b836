"""Sweeps: models x methods x budgets x tasks, one ``lmms_eval`` run per cell, resumable.

A cell's folder is named by its settings. ``cell.json`` is written only after its run finished and
left a results file; a folder without it is a half-written cell and is redone from scratch. Every
model gets the unpruned reference (``method=none``) on every task entry. Folder names carry settings only:
a file parameter (a codebook) appears as its stem and content hash, never as a path.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm

from lmms_eval_redundancy.core.budget import BUDGET_KEYS
from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.files import content_id
from lmms_eval_redundancy.core.registry import UNPRUNED, file_params, method_class


class SweepError(UserError):
    """The sweep spec is malformed."""


@dataclass(frozen=True)
class Cell:
    model: str  # label used in folder names
    pretrained: str
    method: str
    params: tuple[tuple[str, object], ...]  # method parameters and the budget, in spec order
    tasks: str  # an lmms-eval task list (tasks and groups, comma separated)
    folder: Path

    @property
    def label(self) -> str:
        return " | ".join([self.model, " ".join([self.method] + [f"{k}={v}" for k, v in self.params]), self.tasks])

    @property
    def done(self) -> bool:
        return (self.folder / "cell.json").is_file()


@dataclass
class Sweep:
    cells: list[Cell]
    include_path: str | None
    model_args: dict
    lmms_eval: dict
    num_processes: int
    launch_args: list[str]
    spec_path: Path
    slurm: dict = field(default_factory=dict)


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(value)).strip("-")


def folder_name(method: str, params: tuple[tuple[str, object], ...]) -> str:
    """A cell folder's name: the method and its settings; a file parameter by its stem and content hash."""
    method_class(method)  # unknown methods are refused here, before anything runs
    files = set(file_params(method))
    parts = [f"{_slug(k)}-{content_id(v) if k in files else _slug(v)}" for k, v in params]
    return "_".join([method] + parts)


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep spec (see README "Sweeps") and expand it into cells."""
    path = Path(path)
    spec = yaml.safe_load(path.read_text()) or {}
    for key in ("output", "models", "methods", "tasks"):
        if key not in spec:
            raise SweepError(f"{path}: the sweep spec needs '{key}'")
    known = {"output", "models", "methods", "tasks", "include_path", "model_args", "lmms_eval", "accelerate", "slurm"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    output = Path(spec["output"]).resolve()
    task_entries = [t if isinstance(t, str) else ",".join(t) for t in spec["tasks"]]
    cells = []
    for model in spec["models"]:
        pretrained = model["pretrained"] if isinstance(model, dict) else model
        name = _slug(model.get("name", Path(pretrained).name) if isinstance(model, dict) else Path(pretrained).name)
        variants = [(UNPRUNED, ())]
        for method in spec["methods"]:
            method = dict(method)
            name_of_method = method.pop("method")
            budgets = method.pop("budgets", {}) or {}
            bad = sorted(set(budgets) - set(BUDGET_KEYS))
            if bad:
                raise SweepError(f"{path}: budgets of {name_of_method} use {', '.join(bad)}; use {', '.join(BUDGET_KEYS)}")
            fixed = tuple(method.items())
            budget_values = [(kind, value) for kind, values in budgets.items() for value in (values if isinstance(values, list) else [values])]
            variants += [(name_of_method, fixed + ((kind, value),)) for kind, value in budget_values] or [(name_of_method, fixed)]
        for (method_name, params), tasks in itertools.product(dict.fromkeys(variants), task_entries):
            folder = output / name / folder_name(method_name, params) / _slug(tasks)
            cells.append(Cell(name, str(pretrained), method_name, params, tasks, folder))
    accelerate = spec.get("accelerate", {}) or {}
    include_path = spec.get("include_path")
    return Sweep(cells=cells, include_path=str(Path(include_path).resolve()) if include_path else None, model_args=spec.get("model_args", {}) or {},
                 lmms_eval=spec.get("lmms_eval", {}) or {}, num_processes=int(accelerate.get("num_processes", 1)),
                 launch_args=[str(a) for a in accelerate.get("launch_args", [])], spec_path=path,
                 slurm=spec.get("slurm", {}) or {})


def command(sweep: Sweep, cell: Cell) -> list[str]:
    """The ``lmms_eval`` command line of one cell."""
    model_args = {"pretrained": cell.pretrained, "method": cell.method, **sweep.model_args, **dict(cell.params)}
    arguments = ["-m", "lmms_eval", "--model", "llava_redundancy",
                 "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
                 "--tasks", cell.tasks, "--output_path", str(cell.folder)]
    if sweep.include_path:
        arguments += ["--include_path", str(sweep.include_path)]
    for key, value in sweep.lmms_eval.items():
        if value is True:
            arguments.append(f"--{key}")
        elif value not in (False, None):
            arguments += [f"--{key}", str(value)]
    if sweep.num_processes > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(sweep.num_processes), *sweep.launch_args] + arguments
    return [sys.executable] + arguments


def write_atomically(path: Path, record: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def run_cell(sweep: Sweep, cell: Cell, env: dict | None = None) -> str:
    """Run one cell unless it is done: ``"done"`` (already), ``"ran"`` or ``"failed"``.

    A half-written or failed folder is cleared first. A failure leaves ``failed.json`` (exit code, log) and
    the cell's log; a rerun of the sweep tries the cell again.
    """
    if cell.done:
        return "done"
    if cell.folder.exists():
        shutil.rmtree(cell.folder)
    cell.folder.mkdir(parents=True)
    line = command(sweep, cell)
    record = {"model": cell.model, "pretrained": cell.pretrained, "method": cell.method, "params": dict(cell.params),
              "tasks": cell.tasks, "command": shlex.join(line)}
    with open(cell.folder / "log.txt", "w") as log:
        done = subprocess.run(line, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    results = sorted(cell.folder.glob("*/*_results.json"))
    if done.returncode != 0 or not results:
        write_atomically(cell.folder / "failed.json", {**record, "returncode": done.returncode, "log": "log.txt"})
        return "failed"
    write_atomically(cell.folder / "cell.json", {**record, "results": [str(r.relative_to(cell.folder)) for r in results]})
    return "ran"


def run_sweep(sweep: Sweep, only: int | None = None, env: dict | None = None) -> dict:
    """Run every missing cell (or cell number ``only``) with a progress bar, going on past failures.

    Returns ``{"ran": n, "already_done": n, "failed": [cell, ...]}``.
    """
    cells = sweep.cells if only is None else [sweep.cells[only]]
    counts = {"ran": 0, "already_done": 0, "failed": []}
    progress = tqdm(cells, desc="sweep cells", unit="cell")
    for cell in progress:
        progress.set_postfix_str(cell.label[-60:])
        status = run_cell(sweep, cell, env)
        if status == "failed":
            counts["failed"].append(cell)
            progress.write(f"cell failed: {cell.label}; see {cell.folder / 'log.txt'}")
        else:
            counts["ran" if status == "ran" else "already_done"] += 1
    return counts


def failure_report(failed: list[Cell]) -> str:
    """What to print when cells failed: each cell and its log."""
    return f"{len(failed)} cell(s) failed:\n" + "\n".join(f"  {c.label}: {c.folder / 'log.txt'}" for c in failed)


def dry_run(sweep: Sweep) -> str:
    """One line per cell: its number, status and command."""
    return "\n".join(f"[{i}] {'done' if c.done else 'todo'}  {c.label}\n    {shlex.join(command(sweep, c))}"
                     for i, c in enumerate(sweep.cells))


def slurm_script(sweep: Sweep) -> str:
    """A Slurm job array running one cell per array task (``#SBATCH`` lines from the spec's ``slurm``)."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={_slug(sweep.spec_path.stem)}", f"#SBATCH --array=0-{len(sweep.cells) - 1}"]
    lines += [f"#SBATCH --{key}={value}" for key, value in sweep.slurm.items()]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}",
              f"{shlex.quote(sys.executable)} -m lmms_eval_redundancy.cli sweep {shlex.quote(str(sweep.spec_path.resolve()))} "
              "--cell \"$SLURM_ARRAY_TASK_ID\""]
    return "\n".join(lines) + "\n"
