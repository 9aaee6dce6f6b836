"""Exit non-zero unless every installed distribution has the version ``requirements.lock`` pins.

Run with the environment's own Python: ``.venv/bin/python scripts/check_lock.py [LOCK]``. Distributions the
lock names but that are not installed (platform-specific wheels) are listed, not errors.
"""

from __future__ import annotations

import sys
from importlib.metadata import distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "lmms-eval-redundancy"
TOOLING = {"pip", "setuptools", "wheel"}  # the venv's own installers, which pip freeze leaves out too


def pinned(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def main(lock: Path) -> int:
    pins = pinned(lock)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
    wrong = [f"{name} {version} installed, {lock.name} pins {pins.get(name, 'nothing')}"
             for name, version in sorted(installed.items())
             if name not in TOOLING | {PROJECT} and pins.get(name) != version]
    absent = sorted(set(pins) - set(installed))
    if absent:
        print(f"not installed on this platform (pinned in {lock.name}): {', '.join(absent)}")
    if wrong:
        print(f"the environment differs from {lock}:\n  " + "\n  ".join(wrong)
              + "\nreinstall with: bash scripts/setup.sh (or refresh the lock: bash scripts/refresh-lock.sh)")
        return 1
    print(f"{len(installed) - len(TOOLING & set(installed)) - 1} installed distributions match {lock.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent / "requirements.lock")))
