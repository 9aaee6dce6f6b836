"""Names for files that say what they hold, not where they are."""

from __future__ import annotations

import hashlib
from pathlib import Path


def content_id(path: str | Path, length: int = 10) -> str:
    """``<file stem>-<first hex digits of its SHA-256>``: the same for the same bytes wherever the file lies."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return f"{path.stem}-{digest.hexdigest()[:length]}"
