"""The local lmms-eval tasks, written where the user asks: task files from the package, data generated.

``write_local_tasks(folder)`` copies the task YAMLs and their ``utils.py`` (``tasks/local``, shipped
inside the package) into ``folder`` and generates their data under ``folder/data``:
the tiny tasks and the shapes benchmark. ``folder`` is then the ``--include_path`` of an ``lmms_eval`` run.
Data written by another version of the generators (or with another size) is regenerated, never reused.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from lmms_eval_redundancy.core.files import product_folder
from lmms_eval_redundancy.embedded import localdata, shapes

TASK_FILES = product_folder("tasks") / "local"


def data_stamp(shapes_docs: int) -> str:
    """What the generated data depends on: the generators' source and the benchmark's size."""
    digest = hashlib.sha256(str(shapes_docs).encode())
    for module in (localdata, shapes):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def write_local_tasks(folder: str | Path, shapes_docs: int = 96) -> Path:
    """Task files into ``folder`` and their data into ``folder/data`` (generated once per ``data_stamp``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for entry in TASK_FILES.iterdir():
        if entry.name.endswith((".yaml", ".py")):
            (folder / entry.name).write_bytes(entry.read_bytes())
    data, stamp = folder / "data", data_stamp(shapes_docs)
    stamp_file = data / "stamp.txt"
    if not stamp_file.is_file() or stamp_file.read_text() != stamp:
        shutil.rmtree(data, ignore_errors=True)
        localdata.generate(data)
        shapes.generate(data / "shapes", docs=shapes_docs)
        stamp_file.write_text(stamp)  # last: an interrupted generation is redone
    return folder
