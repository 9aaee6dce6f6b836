"""The local lmms-eval tasks, written where the user asks: task files from the package, data generated.

``write_local_tasks(folder)`` copies the task YAMLs and their ``utils.py`` (package data,
``lmms_eval_redundancy/tasks/local``) into ``folder`` and generates their data under ``folder/data``:
the tiny tasks and the shapes benchmark. ``folder`` is then the ``--include_path`` of an ``lmms_eval`` run.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from lmms_eval_redundancy.embedded import localdata, shapes

TASK_FILES = resources.files("lmms_eval_redundancy") / "tasks" / "local"


def write_local_tasks(folder: str | Path, shapes_docs: int = 96) -> Path:
    """Task files into ``folder`` and their data into ``folder/data`` (generated once; same seed, same bytes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for entry in TASK_FILES.iterdir():
        if entry.name.endswith((".yaml", ".py")):
            (folder / entry.name).write_bytes(entry.read_bytes())
    data = folder / "data"
    if not (data / "tiny_video.parquet").is_file():
        localdata.generate(data)
    if not (data / "shapes" / "shapes_video.parquet").is_file():
        shutil.rmtree(data / "shapes", ignore_errors=True)
        shapes.generate(data / "shapes", docs=shapes_docs)
    return folder
