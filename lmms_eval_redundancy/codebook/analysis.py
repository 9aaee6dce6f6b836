"""The paper's analysis rules as pure functions: divergences, 3x3 windows, the low-information rule, DPC-KNN."""

from __future__ import annotations

import torch


def jsd_topk(p_logits: torch.Tensor, q_logits: torch.Tensor, k: int = 10) -> torch.Tensor:
    """The official divergence between two next-token distributions (``[..., V]`` logits -> ``[...]``).

    Take the top-``k`` vocabulary ids of ``p_logits``, gather the same ids from ``q_logits``, softmax
    each over those ``k`` -> P, Q; M = (P + Q) / 2; value = 0.5 * (mean M log(M/P) + mean M log(M/Q)).
    Note the mean (not sum) over the k entries and KL(M||P) rather than KL(P||M), as in the official code.
    """
    ids = p_logits.topk(k, dim=-1).indices
    p = p_logits.float().gather(-1, ids).softmax(dim=-1)
    q = q_logits.float().gather(-1, ids).softmax(dim=-1)
    m = (p + q) / 2
    return 0.5 * ((m * (m / p).log()).mean(dim=-1) + (m * (m / q).log()).mean(dim=-1))


def jsd(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """The standard Jensen-Shannon divergence (natural log) of the full softmax distributions."""
    p, q = p_logits.float().softmax(dim=-1), q_logits.float().softmax(dim=-1)
    m = (p + q) / 2
    kl = lambda a: torch.where(a > 0, a * (a / m).log(), torch.zeros_like(a)).sum(dim=-1)
    return 0.5 * (kl(p) + kl(q))


DIVERGENCES = {"jsd_topk": jsd_topk, "jsd": jsd}


def window_indices(rows: int, cols: int) -> torch.Tensor:
    """``[rows*cols, 9]``: for each grid position, the raster indices of its 3x3 window.

    The window is centred on the position and shifted inward at the borders, so it always holds 9
    tokens of the grid (raster order).
    """
    if rows < 3 or cols < 3:
        raise ValueError(f"a {rows}x{cols} token grid has no 3x3 windows")
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    top = (r - 1).clamp(0, rows - 3)
    left = (c - 1).clamp(0, cols - 3)
    offsets = torch.arange(3)
    window_rows = top[:, None, None] + offsets[None, :, None]
    window_cols = left[:, None, None] + offsets[None, None, :]
    return (window_rows * cols + window_cols).reshape(rows * cols, 9)


def low_information(p_max: torch.Tensor, j_context: torch.Tensor, j_global: torch.Tensor,
                    prob_thres: float, jsd_thres: float, context_weight: float = 1.0, global_weight: float = 16.0
                    ) -> torch.Tensor:
    """A token is low-information iff ``J = w_c J_context + w_g J_global < jsd_thres`` and ``p_max < prob_thres``."""
    return (context_weight * j_context + global_weight * j_global < jsd_thres) & (p_max < prob_thres)


def dpc_knn(x: torch.Tensor, n_clusters: int, k: int = 5, seed: int = 0) -> torch.Tensor:
    """Density-peaks clustering with k nearest neighbours; one cluster label (0..n_clusters-1) per row.

    dist = cdist / sqrt(C); density = exp(-mean squared distance to the k nearest neighbours, self
    included) plus seeded uniform noise in [0, 1e-6) to break ties; delta = distance to the nearest
    denser token (for the densest: the largest distance overall); the ``n_clusters`` tokens with the
    largest delta * density are centres (label = their rank); every token joins its nearest centre.
    """
    n = x.shape[0]
    if n <= n_clusters:
        return torch.arange(n)
    x = x.double()
    dist = torch.cdist(x, x) / x.shape[1] ** 0.5
    nearest = dist.topk(min(k, n), dim=1, largest=False).values
    noise = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e-6
    density = (-(nearest**2).mean(dim=1)).exp() + noise
    denser = density[None, :] > density[:, None]
    delta = torch.where(denser, dist, torch.full_like(dist, float("inf"))).min(dim=1).values
    delta = torch.where(torch.isinf(delta), dist.max(), delta)
    centres = (delta * density).topk(n_clusters).indices
    labels = dist[:, centres].argmin(dim=1)
    labels[centres] = torch.arange(n_clusters)
    return labels
