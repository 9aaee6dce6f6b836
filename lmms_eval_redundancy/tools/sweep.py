"""Sweeps: models x methods x budgets x tasks, one ``lmms_eval`` run per cell, resumable.

A cell's folder is named by its settings. A cell is done when its ``cell.json`` (written last), every
results file it names and their ``*_tokens.json`` exist and parse; any other folder is redone from scratch
(``--dry-run`` tells ``todo``, ``failed`` and ``broken (why)`` apart). Every model gets the unpruned reference
(``method=none``) on every task entry. Folder names carry settings only: a file parameter (a codebook)
appears as its stem and content hash, never as a path.

The spec is checked whole before any cell runs, and every problem in it is reported at once:
``load_sweep`` checks its keys (an unknown key gets its close match), types, methods, their parameters,
budgets and files; ``check_with_lmms_eval`` checks the ``lmms_eval`` options with lmms-eval's own parser and
the task names with its task index. A failed cell's error is read from its log. A failure of the Python
environment (an import error, an unsupported version) stops the sweep at once: every cell would fail alike.

Locks. A sweep owns its output folder through ``<output>/.sweep.lock``: an ``flock`` held while it runs,
whose file records the owner's pid, host, start time and the process group of its running cell. The kernel
drops the lock when its owner dies, so the lock of a killed sweep is taken over (said on stderr), after the
process group it recorded is ended. A ``--cell N`` run (one task of a Slurm job array) holds the folder lock
shared, so that the array's tasks run side by side while a whole sweep is kept out, and holds the lock of its
own cell (``.<cell folder name>.lock`` beside the cell's folder) exclusively. Each cell's ``lmms_eval`` runs in
a process group of its own and gets SIGTERM when the sweep dies, even by SIGKILL (Linux parent-death signal);
SIGTERM or SIGINT to the sweep ends the cell's group and removes the locks.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import fcntl
import functools
import inspect
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import yaml
from tqdm import tqdm

from lmms_eval_redundancy.core.budget import BUDGET_KEYS, KEEP_ALL, parse_budget
from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.files import content_id, write_atomically
from lmms_eval_redundancy.core.registry import (
    UNPRUNED,
    available_methods,
    build_method,
    file_params,
    method_class,
    param_names,
)

TOP_KEYS = ("output", "models", "methods", "tasks", "include_path", "model_args", "lmms_eval", "accelerate", "slurm")
EXAMPLES = {
    "models": "models: [{pretrained: llava-hf/llava-1.5-7b-hf, name: llava15}]",
    "methods": "methods: [{method: random, budgets: {retention: [0.25, 0.5]}}]",
    "tasks": "tasks: [mme, [textvqa_val, gqa]]",
}
# model_args keys that each cell sets, or that belong elsewhere in the spec
PLACED_MODEL_ARGS = {
    "pretrained": "the checkpoint is set per model under 'models'",
    "method": "the method is set per entry under 'methods'",
    "output_dir": "each cell writes into its own folder",
    "batch_size": "the batch size is lmms-eval's option: set it under 'lmms_eval: {batch_size: N}'",
    **{kind: "budgets go under each method's 'budgets'" for kind in BUDGET_KEYS},
}
MODEL_OPTIONS = ("device", "max_batch_size")  # lmms_eval options it hands to the model besides its model_args
# lmms_eval options that each cell's command sets itself
PLACED_OPTIONS = {
    "model": "every cell runs llava_redundancy",
    "model_args": "set them under 'model_args' (all cells) or in a method entry",
    "tasks": "set them under 'tasks'",
    "output_path": "each cell writes into its own folder under 'output'",
    "include_path": "set it at the top level of the spec",
    "config": "the spec is the configuration",
}
# sbatch's long options (its manual), for the spec's ``slurm`` keys; ``array`` is the sweep's own
SBATCH_OPTIONS = """account acctg-freq batch bb bbf begin chdir cluster-constraint clusters comment constraint container
    container-id contiguous core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task deadline delay-boot dependency
    distribution error exclude exclusive export export-file extra extra-node-info get-user-env gid gpu-bind gpu-freq gpus
    gpus-per-node gpus-per-socket gpus-per-task gres gres-flags hint hold ignore-pbs input job-name kill-on-invalid-dep
    licenses mail-type mail-user mcs-label mem mem-bind mem-per-cpu mem-per-gpu mincpus network nice no-kill no-requeue
    nodefile nodelist nodes ntasks ntasks-per-core ntasks-per-gpu ntasks-per-node ntasks-per-socket open-mode output
    overcommit oversubscribe partition power prefer priority profile propagate qos reboot requeue reservation
    resv-ports segment signal sockets-per-node spread-job switches thread-spec threads-per-core time time-min tmp
    tres-bind tres-per-task uid use-min-nodes wait-all-nodes wckey""".split()

ENVIRONMENT_ERRORS = ("ImportError", "ModuleNotFoundError", "UnsupportedVersionError", "PackageNotFoundError")
ENVIRONMENT_FIX = ("reinstall with `bash scripts/setup.sh`, which installs the locked versions (requirements.lock), "
                   "then rerun; finished cells are kept")
SWEEP_LOCK = ".sweep.lock"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class SweepError(UserError):
    """The sweep spec is malformed, its folder is in use, or its environment cannot run cells."""


@dataclass(frozen=True)
class Cell:
    model: str  # label used in folder names
    pretrained: str
    method: str
    params: tuple[tuple[str, object], ...]  # method parameters, model_args of the entry and the budget, in spec order
    tasks: str  # an lmms-eval task list (tasks and groups, comma separated)
    folder: Path

    @property
    def label(self) -> str:
        return " | ".join([self.model, " ".join([self.method] + [f"{k}={v}" for k, v in self.params]), self.tasks])

    @property
    def state(self) -> str:
        return cell_state(self.folder)

    @property
    def done(self) -> bool:
        return self.state == "done"


@dataclass
class Sweep:
    cells: list[Cell]
    include_path: str | None
    model_args: dict
    lmms_eval: dict
    num_processes: int
    launch_args: list[str]
    spec_path: Path
    output: Path
    slurm: dict = field(default_factory=dict)


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(value)).strip("-")


def folder_name(method: str, params: tuple[tuple[str, object], ...]) -> str:
    """A cell folder's name: the method and its settings; a file parameter by its stem and content hash."""
    files = set(file_params(method))
    parts = [f"{_slug(k)}-{content_id(v) if k in files else _slug(v)}" for k, v in params]
    return "_".join([method] + parts)


# ---- reading and checking a spec ---------------------------------------------------------------------


def _did_you_mean(word, known) -> str:
    """``did you mean 'x'?`` for the closest of ``known``, else the list of them."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(word), known, n=1)
    return f"did you mean '{close[0]}'?" if close else f"use one of: {', '.join(known)}"


@functools.cache
def model_arg_names() -> tuple[str, ...]:
    """The model_args keys of the ``llava_redundancy`` model itself (method parameters aside)."""
    from lmms_eval_redundancy.lmms.model import LlavaRedundancy

    parameters = inspect.signature(LlavaRedundancy.__init__).parameters.values()
    return tuple(p.name for p in parameters if p.name != "self" and p.kind is not p.VAR_KEYWORD)


class _Problems(list):
    """Every problem found in a spec, each naming where it is and how to fix it."""

    def unknown_keys(self, where: str, mapping: dict, known) -> bool:
        """Report the keys of ``mapping`` not in ``known`` (with the close match); True when there are none."""
        unknown = [key for key in mapping if key not in known]
        self.extend(f"{where}: unknown key '{key}'; {_did_you_mean(key, known)}" for key in unknown)
        return not unknown

    def non_empty_list(self, where: str, value) -> list:
        if isinstance(value, list) and value:
            return value
        what = ("is empty" if value is None else "is an empty list" if value == []
                else f"is {value!r} (a {type(value).__name__}), not a list")
        example = f"{where}: [{value}]" if isinstance(value, str) else EXAMPLES[where]
        self.append(f"'{where}' {what}; give a list with at least one entry, e.g. {example}")
        return []

    def mapping(self, where: str, value, example: str) -> dict:
        """An optional mapping (left empty: none)."""
        if value is None or isinstance(value, dict):
            return value or {}
        self.append(f"'{where}' is {value!r} (a {type(value).__name__}), not a mapping; write it as e.g. {example}")
        return {}


def _read_yaml(path: Path):
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise SweepError(f"sweep spec {path} {state}; give the path of a sweep YAML (see README, Sweeps)")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SweepError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}; "
                         "fix the YAML syntax there") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SweepError(f"cannot read the sweep spec {path}: {err}") from None


def _models(problems: _Problems, entries: list) -> list[tuple[str, str]]:
    """``(name, pretrained)`` of each model entry: a checkpoint, or ``{pretrained: ..., name: ...}``."""
    models = []
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if isinstance(entry, dict):
            if not problems.unknown_keys(where, entry, ("pretrained", "name")):
                continue
            pretrained, name = entry.get("pretrained"), entry.get("name")
        else:
            pretrained, name = entry, None
        if not isinstance(pretrained, str) or not pretrained:
            problems.append(f"{where} needs 'pretrained': a checkpoint folder, hub id or builtin:NAME, "
                            f"e.g. {EXAMPLES['models']}")
            continue
        if name is not None and not (isinstance(name, str) and _slug(name)):
            problems.append(f"{where}: name {name!r} is not a usable folder name; give a word, e.g. name: llava15")
            continue
        models.append((_slug(name or Path(pretrained).name), pretrained))
    names = [name for name, _ in models]
    problems.extend(f"models: the name '{name}' is given to {names.count(name)} models; give each its own name"
                    for name in dict.fromkeys(names) if names.count(name) > 1)
    return models


def _budget_values(problems: _Problems, where: str, name: str, budgets) -> list[tuple[str, object]]:
    """``(kind, value)`` of every budget of a method entry, each checked as model_args would check it."""
    if not isinstance(budgets, dict) or not budgets:
        problems.append(f"{where}: 'budgets' is {'empty' if not budgets else repr(budgets)}; give a mapping of budget lists, e.g. "
                        "budgets: {retention: [0.25, 0.5]}, or leave the key out to run the method without one")
        return []
    accepted = method_class(name).budgets
    values = []
    for kind, given in budgets.items():
        if kind not in BUDGET_KEYS:
            problems.append(f"{where}: unknown budget '{kind}'; {_did_you_mean(kind, BUDGET_KEYS)}")
        elif kind not in accepted:
            problems.append(f"{where}: method {name} takes no {kind} budget; it takes {', '.join(accepted) or 'none'}")
        elif given is None or given == []:
            problems.append(f"{where}: budgets.{kind} is empty; give values, e.g. {kind}: [{64 if kind == 'tokens' else 0.5}]")
        else:
            for value in given if isinstance(given, list) else [given]:
                try:
                    parse_budget(**{kind: value})
                    values.append((kind, value))
                except UserError as err:
                    problems.append(f"{where}: {err}")
    return values


def _method_variants(problems: _Problems, index: int, entry) -> list[tuple[str, tuple]]:
    """The ``(method, params)`` cells of one method entry, after checking its keys, budgets and parameters."""
    where = f"methods[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
        problems.append(f"{where} is {entry!r}; each method entry is a mapping with 'method', e.g. "
                        "{method: random, budgets: {retention: [0.5]}}")
        return []
    name = entry["method"]
    if name not in available_methods():
        problems.append(f"{where}: unknown method '{name}'; {_did_you_mean(name, available_methods())} "
                        f"(methods: {', '.join(available_methods())})")
        return []
    where = f"{where} ({name})"
    params = param_names(name)
    own = ["method", "budgets", *params]
    others = {key: value for key, value in entry.items() if key not in own}
    for key, value in others.items():
        if key in BUDGET_KEYS:
            problems.append(f"{where}: '{key}' is a budget; put it under budgets, e.g. budgets: {{{key}: [{value}]}}")
        elif key in PLACED_MODEL_ARGS:
            problems.append(f"{where}: '{key}' does not belong in a method entry: {PLACED_MODEL_ARGS[key]}")
        elif key not in model_arg_names():
            problems.append(f"{where}: unknown key '{key}'; {_did_you_mean(key, own + list(model_arg_names()))}")
    budgets = _budget_values(problems, where, name, entry["budgets"]) if "budgets" in entry else []
    method_params = {key: value for key, value in entry.items() if key in params}
    for checked in dict.fromkeys(parse_budget(**{kind: value}) for kind, value in budgets) or [KEEP_ALL]:
        try:
            build_method(name, checked, **method_params)
        except UserError as err:
            problems.append(f"{where}: {err}")
    fixed = tuple((key, value) for key, value in entry.items() if key not in ("method", "budgets"))
    return [(name, fixed + (budget,)) for budget in budgets] or [(name, fixed)]


def _task_entries(problems: _Problems, entries: list) -> list[str]:
    tasks = []
    for i, entry in enumerate(entries):
        names = entry if isinstance(entry, list) else [entry]
        if names and all(isinstance(n, str) and n.strip(" ,") for n in names):
            tasks.append(",".join(names))
        else:
            problems.append(f"tasks[{i}] is {entry!r}; each entry is a task or group name, or a list of names run "
                            f"together, e.g. {EXAMPLES['tasks']}")
    return tasks


def _model_args(problems: _Problems, model_args: dict) -> None:
    for key in model_args:
        owners = [name for name in available_methods() if key in param_names(name)]
        if key in PLACED_MODEL_ARGS:
            problems.append(f"model_args: '{key}' does not belong here: {PLACED_MODEL_ARGS[key]}")
        elif owners:
            problems.append(f"model_args: '{key}' is a parameter of method {', '.join(owners)}; set it in that "
                            "method's entry (model_args apply to every cell, the unpruned reference included)")
        elif key not in model_arg_names():
            problems.append(f"model_args: unknown key '{key}'; {_did_you_mean(key, model_arg_names())}")


def _accelerate(problems: _Problems, accelerate: dict) -> tuple[int, list[str]]:
    problems.unknown_keys("accelerate", accelerate, ("num_processes", "launch_args"))
    processes, launch_args = accelerate.get("num_processes", 1), accelerate.get("launch_args") or []
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        problems.append(f"accelerate.num_processes is {processes!r}; give a whole number >= 1 (processes per cell)")
    if not isinstance(launch_args, list) or any(isinstance(a, (dict, list)) for a in launch_args):
        problems.append(f"accelerate.launch_args is {launch_args!r}; give a list of accelerate launch arguments, "
                        "e.g. launch_args: [--num_machines, 2]")
        launch_args = []
    return processes, [str(a) for a in launch_args]


def _slurm(problems: _Problems, slurm: dict) -> None:
    for key, value in slurm.items():
        if key == "array":
            problems.append("slurm: 'array' is set by the sweep itself (one array task per cell); drop it")
        elif key not in SBATCH_OPTIONS:
            problems.append(f"slurm: unknown sbatch option '{key}'; {_did_you_mean(key, SBATCH_OPTIONS)}")
        elif isinstance(value, (dict, list)) or value is None:
            problems.append(f"slurm: '{key}' is {value!r}; give one value, e.g. {key}: ...")


def _raise_problems(path: Path, problems: _Problems) -> None:
    problems = list(dict.fromkeys(problems))
    if len(problems) == 1:
        raise SweepError(f"{path}: {problems[0]} (nothing was run)")
    if problems:
        raise SweepError(f"{path}: {len(problems)} problems (nothing was run):\n  - " + "\n  - ".join(problems))


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep spec (see README "Sweeps"), check it whole and expand it into cells."""
    path = Path(path)
    spec = _read_yaml(path)
    problems = _Problems()
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: the spec is {'empty' if spec is None else f'a {type(spec).__name__}'}; it must be a "
                         f"mapping with the keys output, models, methods and tasks (optional: {', '.join(TOP_KEYS[4:])})")
    problems.unknown_keys("the spec", spec, TOP_KEYS)
    meant = {match for key in spec if key not in TOP_KEYS for match in difflib.get_close_matches(str(key), TOP_KEYS, n=1)}
    problems.extend(f"the spec needs '{key}'" + (f", e.g. {EXAMPLES[key]}" if key in EXAMPLES else ": the folder of its cells")
                    for key in TOP_KEYS[:4] if key not in spec and key not in meant)
    output = spec.get("output")
    if "output" in spec and not (isinstance(output, str) and output):
        problems.append(f"'output' is {output!r}; give the folder the cells go to, e.g. output: runs/llava15")
    listed = {key: problems.non_empty_list(key, spec[key]) if key in spec else [] for key in ("models", "methods", "tasks")}
    models = _models(problems, listed["models"])
    variants = [(UNPRUNED, ())]
    for i, entry in enumerate(listed["methods"]):
        variants += _method_variants(problems, i, entry)
    task_entries = _task_entries(problems, listed["tasks"])
    include_path = spec.get("include_path")
    if include_path is not None and not isinstance(include_path, str):
        problems.append(f"'include_path' is {include_path!r}; give one folder of task YAMLs")
    model_args = problems.mapping("model_args", spec.get("model_args"), "model_args: {dtype: float16}")
    _model_args(problems, model_args)
    lmms_eval = problems.mapping("lmms_eval", spec.get("lmms_eval"), "lmms_eval: {batch_size: 4, log_samples: true}")
    given = set(model_args) | {key for _, params in variants for key, _ in params}
    problems.extend(f"'{key}' is given both as a model_arg and under lmms_eval (which hands it to the model); give it once"
                    for key in MODEL_OPTIONS if key in given and key in lmms_eval)
    processes, launch_args = _accelerate(problems, problems.mapping("accelerate", spec.get("accelerate"),
                                                                    "accelerate: {num_processes: 8}"))
    slurm = problems.mapping("slurm", spec.get("slurm"), "slurm: {partition: gpu, time: '04:00:00'}")
    _slurm(problems, slurm)
    _raise_problems(path, problems)
    output = Path(output).resolve()
    cells = [Cell(name, pretrained, method, params, tasks, output / name / folder_name(method, params) / _slug(tasks))
             for name, pretrained in models
             for (method, params), tasks in itertools.product(dict.fromkeys(variants), task_entries)]
    return Sweep(cells=cells, include_path=str(Path(include_path).resolve()) if include_path else None,
                 model_args=model_args, lmms_eval=lmms_eval, num_processes=processes, launch_args=launch_args,
                 spec_path=path, output=output, slurm=slurm)


@functools.cache
def _lmms_eval_parser():
    """lmms-eval's own command-line parser; its errors raise ``SweepError``."""
    from lmms_eval.__main__ import parse_eval_args

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        parser, _ = parse_eval_args()
    finally:
        sys.argv = argv

    def refuse(message):
        raise SweepError(message)

    parser.error = refuse
    return parser


@functools.cache
def _known_tasks(include_path: str | None) -> tuple[str, ...]:
    """Every task, group and tag lmms-eval knows, with the tasks under ``include_path``."""
    from lmms_eval.tasks import TaskManager
    from loguru import logger

    logger.disable("lmms_eval")  # its task index logs every file it skips
    try:
        return tuple(TaskManager(include_path=include_path).all_tasks)
    finally:
        logger.enable("lmms_eval")


def lmms_eval_arguments(options: dict) -> list[str]:
    """``lmms_eval`` command-line options from the spec's ``lmms_eval`` mapping (``true``: a bare switch)."""
    arguments = []
    for key, value in options.items():
        if value is True:
            arguments.append(f"--{key}")
        elif value not in (False, None):
            arguments += [f"--{key}", str(value)]
    return arguments


def check_with_lmms_eval(sweep: Sweep) -> None:
    """Check the spec's ``lmms_eval`` options with lmms-eval's parser and its task names with lmms-eval's task
    index (groups and tags count; so do task YAML files and wildcards that match)."""
    problems = _Problems()
    parser = _lmms_eval_parser()
    actions = {option[2:]: action for action in parser._actions for option in action.option_strings
               if option.startswith("--") and option != "--help"}
    for key, value in sweep.lmms_eval.items():
        if key in PLACED_OPTIONS:
            problems.append(f"lmms_eval: '{key}' is set by the sweep for each cell: {PLACED_OPTIONS[key]}")
        elif key not in actions:
            problems.append(f"lmms_eval: unknown option '{key}'; {_did_you_mean(key, actions)}")
        elif actions[key].nargs == 0 and not isinstance(value, bool):
            problems.append(f"lmms_eval: '{key}' is a switch; give true or false, not {value!r}")
        elif isinstance(value, (dict, list)):
            problems.append(f"lmms_eval: '{key}' is {value!r}; give one value")
    if not problems:
        try:
            parser.parse_args(["--model", "llava_redundancy", *lmms_eval_arguments(sweep.lmms_eval)])
        except SweepError as err:
            problems.append(f"lmms_eval: lmms-eval refuses the options: {err}")
    if sweep.include_path and not Path(sweep.include_path).is_dir():
        problems.append(f"include_path {sweep.include_path} is not a folder; give the folder of your task YAMLs")
    else:
        known = _known_tasks(sweep.include_path)
        listing = "python -m lmms_eval --tasks list" + (f" --include_path {sweep.include_path}" if sweep.include_path else "")
        for entry in dict.fromkeys(cell.tasks for cell in sweep.cells):
            for name in filter(None, (n.strip() for n in entry.split(","))):
                if name in known or Path(name).is_file() or ("*" in name and any(fnmatch(t, name) for t in known)):
                    continue
                close = difflib.get_close_matches(name, known, n=1)
                problems.append(f"tasks: lmms-eval knows no task or group '{name}'"
                                f"{f' (did you mean {close[0]!r}?)' if close else ''}; list them with `{listing}`")
    _raise_problems(sweep.spec_path, problems)


# ---- cells: state, command, run ---------------------------------------------------------------------


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _outputs_problem(results: list[Path]) -> str | None:
    """What is wrong with a run's results files and their token files (missing, unreadable), or None."""
    if not results:
        return "no results file"
    for path in results:
        tokens = path.with_name(path.name.removesuffix("_results.json") + "_tokens.json")
        for kind, file in (("results", path), ("tokens", tokens)):
            if not file.is_file():
                return f"{kind} file missing"
            if _json_or_none(file) is None:
                return f"{kind} file unreadable"
    return None


def cell_state(folder: Path) -> str:
    """``done``, ``todo`` (not run, or half-written), ``failed`` or ``broken (why)``: done once, its files now
    missing or unreadable."""
    if not (folder / "cell.json").is_file():
        return "failed" if (folder / "failed.json").is_file() else "todo"
    record = _json_or_none(folder / "cell.json")
    if not isinstance(record, dict) or not isinstance(record.get("results"), list):
        return "broken (cell.json unreadable)"
    problem = _outputs_problem([folder / name for name in record["results"]])
    return f"broken ({problem})" if problem else "done"


def failure(cell: Cell) -> dict:
    """The record of a failed cell (``failed.json``): its ``error`` and whether the ``environment`` caused it."""
    record = _json_or_none(cell.folder / "failed.json")
    return record if isinstance(record, dict) else {"error": f"see {cell.folder / 'log.txt'}", "environment": False}


def command(sweep: Sweep, cell: Cell) -> list[str]:
    """The ``lmms_eval`` command line of one cell."""
    model_args = {"pretrained": cell.pretrained, "method": cell.method, **sweep.model_args, **dict(cell.params)}
    arguments = ["-m", "lmms_eval", "--model", "llava_redundancy",
                 "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
                 "--tasks", cell.tasks, "--output_path", str(cell.folder)]
    if sweep.include_path:
        arguments += ["--include_path", str(sweep.include_path)]
    arguments += lmms_eval_arguments(sweep.lmms_eval)
    if sweep.num_processes > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(sweep.num_processes), *sweep.launch_args] + arguments
    return [sys.executable] + arguments


ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))(?::|$)")
EVALUATION_ERROR = re.compile(r"Error during evaluation: (.*?)(?:\. Please set `--verbosity=DEBUG`.*)?$")
ARGPARSE_ERROR = re.compile(r"^[\w.-]+: error: .+")


def error_from_log(text: str) -> tuple[str | None, bool]:
    """The error that ended a run, read from its log, and whether the Python environment caused it.

    In order: our plugin's ``llava_redundancy: error: ...`` line; the exception line ending the last traceback;
    lmms-eval's ``Error during evaluation: ...``; an argument parser's ``...: error: ...`` line.
    """
    lines = [ANSI_COLOUR.sub("", line).rstrip() for line in text.splitlines()]
    ours = [line for line in lines if line.startswith("llava_redundancy: error:")]
    if ours:
        return ours[-1], False
    exception = None
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            exception = next((after for after in lines[i + 1:] if EXCEPTION_LINE.match(after)), exception)
    if exception:
        return exception, EXCEPTION_LINE.match(exception).group(1) in ENVIRONMENT_ERRORS
    for pattern in (EVALUATION_ERROR, ARGPARSE_ERROR):
        found = [match.group(match.lastindex or 0) for line in lines if (match := pattern.search(line))]
        if found:
            return found[-1], False
    return None, False


def _die_with_parent(parent: int):
    """A ``preexec_fn``: the child gets SIGTERM when ``parent`` dies, even by SIGKILL (Linux only)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None  # looked up before the fork

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)


def _run_in_own_group(line: list[str], log, env: dict, owner: Lock | None) -> int:
    """Run ``line`` in a new session (its own process group) recorded in ``owner``'s lock; if this process is
    interrupted or killed, the group ends too. Returns the exit status."""
    process = subprocess.Popen(line, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                               preexec_fn=_die_with_parent(os.getpid()))
    if owner:
        owner.record(cell_group=process.pid)
    try:
        return process.wait()
    finally:
        if process.poll() is None:  # interrupted: end the run, gently first
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_group(process.pid)
                process.wait()
        _kill_group(process.pid)  # whatever the run left behind in its group
        if owner:
            owner.record(cell_group=None)


def run_cell(sweep: Sweep, cell: Cell, env: dict | None = None, owner: Lock | None = None) -> str:
    """Run one cell unless it is done: ``"done"`` (already), ``"ran"`` or ``"failed"``.

    A half-written, broken or failed folder is cleared first. A failure leaves ``failed.json`` (exit status,
    the error read from the log) and the cell's log; a rerun of the sweep tries the cell again.
    """
    if cell.done:
        return "done"
    if cell.folder.exists():
        shutil.rmtree(cell.folder)
    cell.folder.mkdir(parents=True)
    line = command(sweep, cell)
    record = {"model": cell.model, "pretrained": cell.pretrained, "method": cell.method, "params": dict(cell.params),
              "tasks": cell.tasks, "command": shlex.join(line)}
    with open(cell.folder / "log.txt", "wb") as log:
        returncode = _run_in_own_group(line, log, {**os.environ, **(env or {})}, owner)
    results = sorted(cell.folder.glob("*/*_results.json"))
    problem = _outputs_problem(results)
    if returncode != 0 or problem:
        error, environment = error_from_log((cell.folder / "log.txt").read_text(errors="replace"))
        if error is None:
            ended = f"was killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with status {returncode}"
            error = f"lmms_eval {ended}" + (f" and left {problem}" if problem else "")
        failed = {**record, "returncode": returncode, "error": error, "environment": environment, "log": "log.txt"}
        write_atomically(cell.folder / "failed.json", json.dumps(failed, indent=2))
        return "failed"
    write_atomically(cell.folder / "cell.json",
                     json.dumps({**record, "results": [str(r.relative_to(cell.folder)) for r in results]}, indent=2))
    return "ran"


# ---- locks ------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """An ``flock`` on ``path`` (shared or exclusive) whose file records its exclusive owner: pid, host, start
    time and the process group of the cell it runs. The kernel releases it when its owner dies."""

    def __init__(self, path: Path, what: str, shared: bool = False):
        self.path, self.what, self.shared, self.fd = path, what, shared, None
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cell_group": None}

    def __enter__(self) -> Lock:
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise SweepError(f"cannot write the lock file {self.path}: {err.strerror}; the sweep's output "
                                 "folder must be writable") from None
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise SweepError(self._in_use(holder)) from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                self.fd = fd
            else:  # its owner removed the file as this process opened it: open the new one
                os.close(fd)
        self._take_over(self._read(self.fd))
        if not self.shared:
            self.record()
        return self

    def __exit__(self, *exc) -> None:
        if self.shared:  # the last holder of a shared lock removes the file
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                self.fd = None
                return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def record(self, **changes) -> None:
        """Update the owner's record in the lock file (an exclusive lock's; a shared one records nothing)."""
        if self.shared:
            return
        self.owner.update(changes)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(self.owner).encode(), 0)

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            record = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
        except ValueError:
            return None
        return record if isinstance(record, dict) and record.get("pid") else None

    def _in_use(self, holder: dict | None) -> str:
        if holder and (holder.get("host") != socket.gethostname() or _alive(holder["pid"])):
            pid = holder["pid"]
            return (f"{self.what} is in use by another sweep: pid {pid} on {holder.get('host')}, started "
                    f"{holder.get('started')} (lock file {self.path}); wait for it to finish or stop it (kill {pid}): "
                    "two sweeps in one folder would mix their files")
        return (f"{self.what} is in use by `sweep --cell` runs of this sweep (e.g. a Slurm job array; lock file "
                f"{self.path}); wait for them to finish")

    def _take_over(self, stale: dict | None) -> None:
        """The lock was left by a process that died: say so, and end the cell it was running."""
        if not stale:
            return
        print(f"sweep: taking over the stale lock {self.path} of pid {stale['pid']} on {stale.get('host')} "
              f"(started {stale.get('started')}), which is no longer running", file=sys.stderr)
        group = stale.get("cell_group")
        if group and stale.get("host") == socket.gethostname():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, 0)
                print(f"sweep: ending the processes of the cell it was running (process group {group})", file=sys.stderr)
                _kill_group(group)
        if self.shared:
            os.ftruncate(self.fd, 0)


@contextlib.contextmanager
def _stopped_by_signals():
    """SIGTERM and SIGINT end the sweep with status 128 + signal: ``finally`` blocks end the running cell's process
    group and release the locks."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        print(f"sweep: stopped by {signal.Signals(signum).name}; rerun it to finish the remaining cells", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _check_writable(folder: Path, spec_path: Path) -> None:
    """Refuse an output folder that cannot be created or written (before anything is created)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SweepError(f"cannot write the sweep's output folder {folder}: {existing} is "
                         f"{'not writable' if existing.is_dir() else 'not a folder'}; set 'output' in {spec_path} "
                         "to a folder you can write")


def _environment_failure(index: int, cell: Cell, error: str) -> SweepError:
    return SweepError(f"cell {index} ({cell.label}) failed because of the Python environment, not its settings, so "
                      f"the sweep stopped (every cell would fail alike): {error}\nfix: {ENVIRONMENT_FIX}\n"
                      f"log: {cell.folder / 'log.txt'}")


def run_sweep(sweep: Sweep, only: int | None = None, env: dict | None = None) -> dict:
    """Run every missing cell (or cell number ``only``) with a progress bar, going on past failures (but not
    past a failure of the environment: ``SweepError``). Checks the spec with lmms-eval and locks the folder first.

    Returns ``{"ran": n, "already_done": n, "failed": [cell, ...]}``.
    """
    if only is not None and not 0 <= only < len(sweep.cells):
        raise SweepError(f"--cell {only} is out of range: {sweep.spec_path} has {len(sweep.cells)} cells, numbered "
                         f"0 to {len(sweep.cells) - 1} (list them with --dry-run)")
    _check_writable(sweep.output, sweep.spec_path)
    check_with_lmms_eval(sweep)
    sweep.output.mkdir(parents=True, exist_ok=True)
    numbered = list(enumerate(sweep.cells)) if only is None else [(only, sweep.cells[only])]
    counts = {"ran": 0, "already_done": 0, "failed": []}
    folder_lock = Lock(sweep.output / SWEEP_LOCK, f"the sweep folder {sweep.output}", shared=only is not None)
    with folder_lock, _stopped_by_signals():
        if only is None:
            cell_lock = contextlib.nullcontext(folder_lock)
        else:
            numbered[0][1].folder.parent.mkdir(parents=True, exist_ok=True)
            folder = numbered[0][1].folder
            cell_lock = Lock(folder.with_name(f".{folder.name}.lock"), f"cell {only} ({folder})")
        with cell_lock as owner:
            progress = tqdm(numbered, desc="sweep cells", unit="cell")
            for index, cell in progress:
                progress.set_postfix_str(cell.label[-60:])
                status = run_cell(sweep, cell, env, owner)
                if status == "failed":
                    counts["failed"].append(cell)
                    error = failure(cell)
                    if error.get("environment"):
                        progress.close()
                        raise _environment_failure(index, cell, error["error"])
                    progress.write(f"cell {index} failed: {cell.label}: {error['error']} (log: {cell.folder / 'log.txt'})")
                else:
                    counts["ran" if status == "ran" else "already_done"] += 1
    return counts


def failure_report(failed: list[Cell]) -> str:
    """What to print when cells failed: each cell, its error and its log."""
    return f"{len(failed)} cell(s) failed:\n" + "\n".join(
        f"  {c.label}: {failure(c)['error']}\n    log: {c.folder / 'log.txt'}" for c in failed)


def dry_run(sweep: Sweep) -> str:
    """One line per cell: its number, state and command."""
    lines = []
    for i, cell in enumerate(sweep.cells):
        state = cell.state
        if state == "failed":
            state = f"failed ({failure(cell)['error']})"
        lines.append(f"[{i}] {state}  {cell.label}\n    {shlex.join(command(sweep, cell))}")
    return "\n".join(lines)


def slurm_script(sweep: Sweep) -> str:
    """A Slurm job array running one cell per array task (``#SBATCH`` lines from the spec's ``slurm``)."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={_slug(sweep.spec_path.stem)}", f"#SBATCH --array=0-{len(sweep.cells) - 1}"]
    lines += [f"#SBATCH --{key}={value}" for key, value in sweep.slurm.items()]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}",
              f"{shlex.quote(sys.executable)} -m lmms_eval_redundancy.cli sweep {shlex.quote(str(sweep.spec_path.resolve()))} "
              "--cell \"$SLURM_ARRAY_TASK_ID\""]
    return "\n".join(lines) + "\n"
