"""Redundancy codebooks: the file format (``store``), the analysis rules (``analysis``) and the builder."""

from lmms_eval_redundancy.codebook.analysis import (
    dpc_knn,
    jsd,
    jsd_topk,
    low_information,
    window_indices,
)

__all__ = ["dpc_knn", "jsd", "jsd_topk", "low_information", "window_indices"]
