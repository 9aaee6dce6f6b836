"""The package outside the repository: a pasted method file, and a wheel install used from an empty folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO, run_lmms_eval


def readme_method() -> tuple[str, str]:
    """The file name and code of the README's "Adding a method" example."""
    section = (REPO / "README.md").read_text().split("## Adding a method", 1)[1]
    name = re.search(r"methods/(\w+\.py)`", section).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return name, code


def test_the_readme_method_pasted_into_methods_runs_through_lmms_eval(tiny_models, local_tasks, tmp_path):
    """Exactly what a reader does: the package (a copy here) plus the README's file in ``methods/``, no other edit."""
    copy = tmp_path / "site"
    shutil.copytree(REPO / "lmms_eval_redundancy", copy / "lmms_eval_redundancy",
                    ignore=shutil.ignore_patterns("__pycache__", "builtin"))
    file_name, code = readme_method()
    (copy / "lmms_eval_redundancy" / "methods" / file_name).write_text(code)
    method = file_name.removesuffix(".py")
    env = {"PYTHONPATH": os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")])}
    results, tokens, _ = run_lmms_eval(f"pretrained={tiny_models['llava']},method={method},retention=0.5,power=1",
                                       tmp_path / "out", local_tasks, tasks="tiny_image", env=env, cwd=tmp_path)
    assert "tiny_image" in results["results"]
    assert tokens["settings"]["method"] == method and tokens["settings"]["power"] == 1.0
    assert 0.45 < tokens["achieved_retention"] < 0.55


def test_a_wheel_install_runs_the_builtin_model_on_tasks_it_writes_into_an_empty_folder(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("builtin/shapes/model.safetensors", "builtin/shapes_codebook/codebook.safetensors",
                 "tasks/local/shapes_image.yaml", "tasks/local/utils.py", "tasks/paper/redundancy_video.yaml",
                 "codebook/presets/llava15.yaml", "published/llava_published.csv", "published/lmms_eval_tasks.csv"):
        assert f"lmms_eval_redundancy/{data}" in names, data
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import lmms_eval_redundancy; print(lmms_eval_redundancy.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))
    subprocess.run([sys.executable, "-m", "lmms_eval_redundancy.cli", "make-local-data", "--out", "tasks"], cwd=empty,
                   env=env, check=True, capture_output=True, timeout=600)
    results, tokens, _ = run_lmms_eval("pretrained=builtin:shapes", empty / "out", empty / "tasks", tasks="shapes_image",
                                       limit=8, env={"PYTHONPATH": str(site)}, cwd=empty)
    assert results["results"]["shapes_image"]["exact_match,none"] >= 0.5
    assert tokens["settings"]["pretrained"] == "builtin:shapes"
    assert sorted(p.name for p in empty.iterdir()) == ["out", "tasks"]  # it wrote only where it was pointed
