"""The library versions this project was verified against, checked at import."""

from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

SUPPORTED = {
    # The hook points used here (mm features, processor token counting, attention interfaces)
    # were verified on these releases; see docs in README "Supported versions".
    "transformers": SpecifierSet(">=5.23.0,<5.24"),
    "lmms-eval": SpecifierSet("==0.7.3"),
    # lmms-eval 0.7.3's evaluator imports filelock._api, which filelock 4.3 removed: every run would fail
    "filelock": SpecifierSet("<4.3"),
}


class UnsupportedVersionError(ImportError):
    """A dependency is installed in a version this project was not verified against."""


def check_versions() -> None:
    """Raise ``UnsupportedVersionError`` naming the package, the found and the supported version."""
    for package, spec in SUPPORTED.items():
        try:
            found = Version(version(package))
        except PackageNotFoundError as err:
            raise UnsupportedVersionError(
                f"{package} is not installed; lmms-eval-redundancy needs {package}{spec}. "
                f"Install it with: pip install '{package}{spec}'"
            ) from err
        if found not in spec:
            raise UnsupportedVersionError(
                f"{package} {found} is not supported; lmms-eval-redundancy was verified with {package}{spec}. "
                f"Install the locked versions with: bash scripts/setup.sh (in a checkout), or: pip install '{package}{spec}'"
            )


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide numerical results (for run records)."""
    return {package: version(package) for package in ("torch", "transformers", "lmms-eval")}
