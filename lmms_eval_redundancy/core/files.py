"""Files: names that say what they hold (not where they are), and writes that are all or nothing."""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path


def product_folder(name: str) -> Path:
    """A top-level folder of the product (``tasks``, ``codebooks``): inside the installed package, where the
    wheel maps it, else at the top of the source checkout (an editable install)."""
    installed = Path(str(resources.files("lmms_eval_redundancy") / name))
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / name


def content_id(path: str | Path, length: int = 10) -> str:
    """``<file stem>-<first hex digits of its SHA-256>``: the same for the same bytes wherever the file lies."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return f"{path.stem}-{digest.hexdigest()[:length]}"


def write_atomically(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it: readers see the old file or the
    whole new one, never a part (a full disk or a kill leaves no truncated record)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
