"""Visual-token pruning for LLaVA-family models under lmms-eval."""

from lmms_eval_redundancy.core.versions import check_versions

__version__ = "0.1.0"

check_versions()
