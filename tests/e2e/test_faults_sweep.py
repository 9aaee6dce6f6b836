"""Bad sweep specs and sweep faults, through the real ``lmms-eval-redundancy sweep`` and ``demo`` commands.

Each refused spec exits 2 with ``lmms-eval-redundancy sweep: error: <message>`` (no traceback) before any
cell runs, and creates no output folder; the cases run through the command's ``main`` in this process (the
running sweeps below are real processes and show the same message at the process boundary). Then the faults
of running sweeps:
a second sweep on a folder in use is refused, a SIGKILLed sweep's ``lmms_eval`` child dies with it, a
stale lock is taken over (and the cell processes it recorded are ended), and a main job whose every cell
would fail for an import error stops after the first with the error and the fix.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from string import Template

import pytest
import yaml
from conftest import REPO, cli_in_process

from lmms_eval_redundancy.core.registry import available_methods, param_names

HEAD = "output: $out\nmodels: [{pretrained: tiny/llava, name: tiny}]\n"
METHODS = "methods: [{method: random, budgets: {retention: [0.5]}}]\n"
TASKS = "tasks: [tiny_image]\n"

# case id -> (spec text (None: no spec file), extra arguments, message excerpt), with $root (the case's folder), $out
# (the output folder it names) and $tasks (the local tasks)
SEEDED = [name for name in available_methods() if "seed" in param_names(name)]  # methods taking a seed=
CASES = {
    "top_level_key_typo": ("output: $out\nmodles: [tiny/llava]\n" + METHODS + TASKS, [],
                           "unknown key 'modles'; did you mean 'models'?"),
    "model_key_typo": ("output: $out\nmodels: [{pretrianed: tiny/llava}]\n" + METHODS + TASKS, [],
                       "models[0]: unknown key 'pretrianed'; did you mean 'pretrained'?"),
    "method_key_typo": (HEAD + "methods: [{method: random, budgts: {retention: [0.5]}}]\n" + TASKS, [],
                        "methods[0] (random): unknown key 'budgts'; did you mean 'budgets'?"),
    "methods_left_empty": (HEAD + "methods:\n" + TASKS, [], "'methods' is empty; give a list with at least one entry"),
    "methods_empty_list": (HEAD + "methods: []\n" + TASKS, [], "'methods' is an empty list"),
    "tasks_empty_list": (HEAD + METHODS + "tasks: []\n", [], "'tasks' is an empty list"),
    "models_empty_list": ("output: $out\nmodels: []\n" + METHODS + TASKS, [], "'models' is an empty list"),
    "tasks_not_a_list": (HEAD + METHODS + "tasks: tiny_image\n", [],
                         "'tasks' is 'tiny_image' (a str), not a list; give a list with at least one entry, e.g. tasks: [tiny_image]"),
    "unknown_method": (HEAD + "methods: [{method: randon}]\n" + TASKS, [], "unknown method 'randon'; did you mean 'random'?"),
    "unknown_method_parameter": (HEAD + "methods: [{method: fastv, fastv_kk: 2, budgets: {tokens: [4]}}]\n" + TASKS, [],
                                 "methods[0] (fastv): unknown key 'fastv_kk'; did you mean 'fastv_k'?"),
    "budget_out_of_range": (HEAD + "methods: [{method: random, budgets: {retention: [0.5, 1.5]}}]\n" + TASKS, [],
                            "retention=1.5 is out of range"),
    "codebook_file_missing": (HEAD + "methods: [{method: codebook, codebook: $root/cb.safetensors, budgets: {threshold: [0.5]}}]\n"
                              + TASKS, [], "codebook file not found: $root/cb.safetensors"),
    "five_problems_at_once": (HEAD + "methods: [{method: random, seed: abc, budgets: {threshold: [0.5]}}]\n" + TASKS
                              + "model_args: {seed: 3, dtyp: float32}\nslurm: {partiton: gpu}\n", ["--slurm", "$root/job.sh"],
                              "5 problems (nothing was run):\n"
                              "  - methods[0] (random): method random takes no threshold budget; it takes retention, tokens\n"
                              "  - methods[0] (random): seed='abc' is not a whole number\n"
                              f"  - model_args: 'seed' is a parameter of method {', '.join(SEEDED)}; set it in that method's entry "
                              "(model_args apply to every cell, the unpruned reference included)\n"
                              "  - model_args: unknown key 'dtyp'; did you mean 'dtype'?\n"
                              "  - slurm: unknown sbatch option 'partiton'; did you mean 'partition'?"),
    "yaml_syntax_error": (HEAD + "methods: [{method: random\n" + TASKS, [], "not valid YAML at line 4, column 6: expected ',' or '}'"),
    "spec_file_missing": (None, [], "sweep spec $root/spec.yaml does not exist"),
    "cell_out_of_range": (HEAD + METHODS + TASKS, ["--cell", "2"], "--cell 2 is out of range: $root/spec.yaml has 2 cells, "
                                                                   "numbered 0 to 1"),
    "output_under_a_file": ("output: $root/file/out\nmodels: [tiny/llava]\n" + METHODS + TASKS, [],
                            "cannot write the sweep's output folder $root/file/out: $root/file is not a folder"),
    "unknown_task_and_lmms_eval_option": (HEAD + METHODS + "tasks: [tiny_imag]\ninclude_path: $tasks\n"
                                          "lmms_eval: {batch_sise: 2}\n", [],
                                          "2 problems (nothing was run):\n  - lmms_eval: unknown option 'batch_sise'; did you "
                                          "mean 'batch_size'?\n  - tasks: lmms-eval knows no task or group 'tiny_imag' (did "
                                          "you mean 'tiny_image'?)"),
}


def sweep_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmms_eval_redundancy.cli", "sweep", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def refused(local_tasks, tmp_path_factory):
    """Every case run once: ``case -> (completed command, the case's folder)``."""
    base = tmp_path_factory.mktemp("sweep_faults")
    done = {}
    for case, (text, arguments, _) in CASES.items():
        root = base / case
        root.mkdir()
        (root / "file").write_text("a file where a folder should be")
        places = {"out": root / "out", "root": root, "tasks": local_tasks}
        if text is not None:
            (root / "spec.yaml").write_text(Template(text).substitute(places))
        done[case] = cli_in_process("sweep", root / "spec.yaml", *(Template(a).substitute(places) for a in arguments)), root
    return done


@pytest.mark.parametrize("case", CASES)
def test_a_bad_spec_is_refused_before_any_cell_runs(refused, case):
    done, root = refused[case]
    message = Template(CASES[case][2]).substitute(root=root)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "lmms-eval-redundancy sweep: error: " in done.stderr and message in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == sorted(["file"] + (["spec.yaml"] if CASES[case][0] else []))
    assert (root / "file").read_text() == "a file where a folder should be"


# ---- running sweeps: a folder in use, a killed sweep, a stale lock -----------------------------------


def group_running(group: int) -> bool:
    """Whether a process of process group ``group`` is alive (a zombie waiting to be reaped is not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(pgrp) == group and state not in "ZX":
            return True
    return False


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def lock_record(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="module")
def killed(tiny_models, local_tasks, tmp_path_factory):
    """Sweep A runs; sweep B starts on its folder while A runs cell 0; A is SIGKILLed while it runs cell 1.

    Returns ``(spec, A's pid, B's completed process, the process group of A's cell at its death)``.
    """
    root = tmp_path_factory.mktemp("killed")
    spec = {"output": str(root / "out"), "models": [{"pretrained": str(tiny_models["llava"]), "name": "tiny"}],
            "methods": [{"method": "random", "budgets": {"retention": [0.25, 0.5, 0.75]}}], "tasks": ["tiny_image"],
            "include_path": str(local_tasks), "model_args": {"dtype": "float32"}, "lmms_eval": {"batch_size": 2, "limit": 2}}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    lock = root / "out" / ".sweep.lock"
    first = subprocess.Popen([sys.executable, "-m", "lmms_eval_redundancy.cli", "sweep", str(root / "spec.yaml")], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: lock_record(lock).get("cell_group"), 300, "sweep A to start its first cell")
        second = sweep_cli(root / "spec.yaml")
        done_cell = root / "out" / "tiny" / "none" / "tiny_image" / "cell.json"
        wait_for(lambda: done_cell.is_file() and lock_record(lock).get("cell_group"), 300, "sweep A to start its second cell")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
        first.wait()
    return root / "spec.yaml", first.pid, second, lock_record(lock)["cell_group"]


def test_a_second_sweep_on_a_folder_in_use_is_refused(killed):
    spec, pid, second, _ = killed
    lock = spec.parent / "out" / ".sweep.lock"
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another sweep: pid {pid} on {socket.gethostname()}" in second.stderr, second.stderr[-3000:]
    assert f"(lock file {lock})" in second.stderr and "Traceback" not in second.stderr


def test_a_killed_sweeps_lmms_eval_child_dies_with_it(killed):
    _, _, _, group = killed
    wait_for(lambda: not group_running(group), 15, f"the killed sweep's cell (process group {group}) to end")


def test_a_stale_lock_is_taken_over_and_the_cell_processes_it_recorded_are_ended(killed):
    spec, pid, _, _ = killed
    lock = spec.parent / "out" / ".sweep.lock"
    left_running = subprocess.Popen(["sleep", "300"], start_new_session=True)  # as if the dead sweep's cell lived on
    lock.write_text(json.dumps({**lock_record(lock), "cell_group": left_running.pid}))
    try:
        done = sweep_cli(spec, "--cell", "0")  # cell 0 finished before the kill: nothing to run
        assert left_running.wait(timeout=15) == -signal.SIGKILL
    finally:
        left_running.kill()
        left_running.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sweep: taking over the stale lock {lock} of pid {pid}" in done.stderr
    assert f"ending the processes of the cell it was running (process group {left_running.pid})" in done.stderr
    assert "sweep: ran 0 cells, 1 were already done" in done.stdout
    assert not lock.exists()


# ---- the main job in an environment where every cell fails ------------------------------------------

BLOCK_IN_LMMS_EVAL = '''"""Test shim: in a `python -m lmms_eval` process, importing the module named by BLOCKED_IMPORT fails."""
import os
import sys


class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["BLOCKED_IMPORT"]:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


with open("/proc/self/cmdline", "rb") as cmdline:
    if cmdline.read().split(b"\\0")[1:3] == [b"-m", b"lmms_eval"]:
        sys.meta_path.insert(0, Blocked())
'''


def test_the_main_job_stops_at_the_first_cell_failing_for_an_import_error_with_the_error_and_the_fix(tmp_path):
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "sitecustomize.py").write_text(BLOCK_IN_LMMS_EVAL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "shim"), os.environ.get("PYTHONPATH")])),
           "BLOCKED_IMPORT": "lmms_eval_redundancy.lmms.model"}
    done = subprocess.run([sys.executable, "-m", "lmms_eval_redundancy.cli", "demo", "--out", str(tmp_path / "results")],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "lmms-eval-redundancy demo: error: cell 0 (shapes | none | " in done.stderr, done.stderr[-3000:]
    assert "failed because of the Python environment, not its settings, so the sweep stopped" in done.stderr
    assert "ModuleNotFoundError: No module named 'lmms_eval_redundancy.lmms.model'" in done.stderr
    assert "fix: reinstall with `bash scripts/setup.sh`, which installs the locked versions" in done.stderr
    assert "Traceback" not in done.stderr
    (log,) = (tmp_path / "results" / "runs").glob("*/*/*/*/log.txt")  # one cell ran, then the job stopped
    failed = json.loads((log.parent / "failed.json").read_text())
    assert failed["environment"] is True and failed["returncode"] == 0  # lmms-eval exits 0 when the model raised
    assert not (tmp_path / "results" / "compare").exists()
