"""The package's layers point one way, and the repository carries no machine-specific paths."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lmms_eval_redundancy"
NAME = PACKAGE.name
# what each layer may import from the package (besides itself); ``cli`` sits on top and may use everything
ALLOWED = {
    "core": set(),
    "families": {"core"},
    "codebook.store": {"core"},
    "codebook.analysis": {"core"},
    "methods": {"core", "codebook.store"},
    "runtime": {"core", "families"},
    "codebook.builder": {"core", "families", "runtime", "codebook.store", "codebook.analysis"},
    "lmms": {"core", "families", "methods", "runtime"},
    "tools": {"core", "families", "methods", "runtime", "codebook", "lmms"},
    "embedded": {"core", "families", "methods", "runtime", "codebook", "lmms", "tools"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Package modules that ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name.removeprefix(f"{NAME}.") for name in names if name.startswith(f"{NAME}.")}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py") if "tasks" not in p.relative_to(PACKAGE).parts}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def layer(module: str) -> str:
    return next((key for key in sorted(ALLOWED, key=len, reverse=True) if module == key or module.startswith(key + ".")),
                module.split(".")[0])


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in edges[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(trail + [nxt])
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])


def test_every_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, targets in graph().items():
        mine = layer(module)
        if mine not in ALLOWED:
            continue  # the package root and cli
        wrong += [f"{module} -> {t}" for t in targets if layer(t) != mine and layer(t) not in ALLOWED[mine]
                  and not any(layer(t).startswith(a + ".") or a.startswith(layer(t) + ".") for a in ALLOWED[mine])]
    assert not wrong, wrong


def test_methods_import_nothing_family_specific():
    for path in (PACKAGE / "methods").glob("*.py"):
        source = path.read_text()
        assert "transformers" not in source and "families" not in imports_of(path), path.name


def test_the_lmms_eval_model_loads_without_tools_or_embedded():
    code = ("import sys, lmms_eval_redundancy.lmms.model; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] == 'lmms_eval_redundancy' and m.split('.')[1:2] in (['tools'], ['embedded'])))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def tracked_files() -> list[Path]:
    listing = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    return [REPO / line for line in listing.splitlines()]


def test_the_top_level_shows_the_product():
    top = {p.relative_to(REPO).parts[0] for p in tracked_files()}
    assert {"lmms_eval_redundancy", "tasks", "codebooks", "results", "scripts", "tests", "setup.cfg"} <= top
    assert (REPO / "tasks" / "local" / "shapes_image.yaml").is_file() and (REPO / "tasks" / "paper").is_dir()
    assert (REPO / "codebooks" / "shapes" / "codebook.safetensors").is_file()
    assert not (PACKAGE / "tasks").exists() and not (PACKAGE / "codebooks").exists()


def test_results_hold_only_the_main_jobs_comparison():
    results = [p.relative_to(REPO) for p in tracked_files() if p.relative_to(REPO).parts[0] == "results"]
    assert results and all(p.parts[:2] == ("results", "compare") and p.stem.startswith("builtin_shapes") for p in results)


def test_no_tracked_file_names_an_absolute_machine_path():
    pattern = re.compile(r"(?<![\w.])/(?:work|home|root|Users|private|tmp/pytest-|var/folders)/")
    offenders = []
    for path in tracked_files():
        if path.suffix in {".safetensors", ".png", ".pt"} or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        if pattern.search(text) and path != Path(__file__):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders


def calls_in(path: Path) -> list[str]:
    """``splice`` and ``<...>family.encode`` calls in a module's source."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            function = node.func
            if isinstance(function, ast.Name) and function.id == "splice":
                found.append("splice(")
            if isinstance(function, ast.Attribute) and function.attr == "encode" and ast.unparse(function.value).endswith("family"):
                found.append("family.encode(")
    return found


def test_splice_and_family_encode_are_called_from_one_module():
    callers = {}
    for path in PACKAGE.rglob("*.py"):
        for call in calls_in(path):
            callers.setdefault(call, set()).add(module_name(path))
    assert callers == {"splice(": {"runtime.engine"}, "family.encode(": {"runtime.engine"}}
