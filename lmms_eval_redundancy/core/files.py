"""Files: names that say what they hold (not where they are), and writes that are all or nothing."""

from __future__ import annotations

import hashlib
import io
import os
from importlib import resources
from pathlib import Path

from lmms_eval_redundancy.core.errors import UserError


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


def output_folder(out: str | Path) -> Path:
    """``out``, created if needed; ``UserError`` when it cannot be created or written (checked before any work)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {out} ({err}); give a writable folder") from err
    if not os.access(out, os.W_OK):
        raise UserError(f"the output folder {out} is not writable; give a writable folder")
    return out


def figure_png(fig, dpi: int = 120) -> bytes:
    """A matplotlib figure as PNG bytes (for ``write_atomically``: never a half-drawn plot); closes it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
