"""α-query expansion (αQE; Radenović, Tolias and Chum, TPAMI 2018) with database-side augmentation, for
`test.py --aqe`.

Every query feature is replaced by the normalized sum of itself and its k most similar gallery features,
each weighted by its cosine similarity to the power alpha (alpha 0: their plain sum, Chum et al.'s average
query expansion); a neighbour less similar than orthogonal weighs 0. Every gallery feature likewise, with
its k most similar *other* gallery features, so that query and gallery are compared in the same expanded
space. No label is used. Unlike fast-reid's AQE, queries never expand with other queries: a query set is
not something a deployed search has, and its identities would leak into each other.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils import UserError

DEFAULT_K, DEFAULT_ALPHA = 5, 3.0  # as fast-reid's TEST.AQE (QE_K 5, ALPHA 3), whose 5 include the feature
# itself: here it is itself and 5 others


def check_expansion(k: int, alpha: float, gallery_size: int | None = None) -> None:
    """One line for an expansion that cannot run: k below 1, a negative alpha, k not below the gallery size
    (a gallery image expands with k *other* gallery images)."""
    if k < 1:
        raise UserError(f"--aqe_k must be at least 1, got {k}")
    if not 0 <= alpha < math.inf:  # also NaN
        raise UserError(f"--aqe_alpha must be a finite number, 0 or more, got {alpha}")
    if gallery_size is not None and k >= gallery_size:
        raise UserError(f"--aqe_k {k} needs more than {k} gallery images; the gallery has {gallery_size}: "
                        "lower --aqe_k")


def _expanded(features: torch.Tensor, gallery: torch.Tensor, k: int, alpha: float, skip_self: bool,
              chunk: int) -> torch.Tensor:
    """Each row of (unit) `features` plus its k most similar rows of (unit) `gallery`, weighted by similarity
    to the power alpha (0 where it is not positive), normalized; `skip_self`: `features` is `gallery`, and a
    row is not its own neighbour."""
    out = torch.empty_like(features)
    for s in range(0, len(features), chunk):
        rows = features[s:s + chunk]
        sims = rows @ gallery.T
        if skip_self:
            sims[torch.arange(len(rows)), torch.arange(s, s + len(rows))] = -float("inf")
        top, index = sims.topk(k, dim=1)
        weights = torch.where(top > 0, top.clamp(min=0).pow(alpha), 0)  # clamp: no NaN from a negative power
        out[s:s + chunk] = rows + torch.einsum("qk,qkd->qd", weights, gallery[index])
    return F.normalize(out, dim=1)


def alpha_query_expansion(qf: torch.Tensor, gf: torch.Tensor, k: int = DEFAULT_K, alpha: float = DEFAULT_ALPHA,
                          device: torch.device | str | None = None, chunk: int = 1024
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The expanded (query, gallery) features, L2-normalized, float32, on `device` (default: where `qf` is).
    The input features are compared by cosine similarity (normalized first); weight them beforehand for
    another metric (test.py does, for DG-Net's alpha)."""
    check_expansion(k, alpha, len(gf))
    device = torch.device(device) if device is not None else qf.device
    q = F.normalize(qf.to(device, torch.float32), dim=1)
    g = F.normalize(gf.to(device, torch.float32), dim=1)
    return _expanded(q, g, k, alpha, False, chunk), _expanded(g, g, k, alpha, True, chunk)
