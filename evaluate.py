"""The re-ID evaluation protocol as pure functions: CMC, mAP and mINP under the Market-1501 rules.

Rules (Market-1501, what DG-Net reports): for a query, gallery images with pid -1 (junk) and images of
the same pid taken by the same camera are removed from its ranking; pid 0 (distractors) stays, as an
ordinary negative. Good matches are the remaining images of the query's pid. The gallery is ranked by
ascending distance; ties are broken by gallery index (a stable sort), so results never depend on the
sort implementation.

AP conventions (`ap=`):
- "market": the trapezoid rule of the official Market-1501 code and of DG-Net's evaluate_gpu.py: with
  the i-th good match (0-based) at position r_i after junk removal, AP = mean_i (p_old_i + p_i) / 2,
  p_i = (i+1)/(r_i+1), p_old_i = i/r_i (1 when r_i = 0).
- "precision": the mean of p_i over the good matches (fast-reid, torchreid).
mINP (Ye et al.): the number of good matches divided by the position (1-based) of the last one.

Queries with no good match in the gallery cannot be scored. They are left out of every average, and
their count is reported (`num_valid_queries`); DG-Net's script instead divided by all queries, which is
the same on Market-1501, where every query has a match.
"""
from __future__ import annotations

import numpy as np
import torch

AP_CONVENTIONS = ("market", "precision")
JUNK_PID = -1


def _rank_chunk(order: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                g_camids: np.ndarray, ap: str, max_rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                         np.ndarray]:
    """Scores of a chunk of queries whose gallery order (ascending distance) is `order` (Q, G)."""
    pid = g_pids[order]
    same = pid == q_pids[:, None]
    junk = (pid == JUNK_PID) | (same & (g_camids[order] == q_camids[:, None]))
    good = same & ~junk
    position = np.cumsum(~junk, axis=1) - 1  # 0-based rank among the images that count
    nth_good = np.cumsum(good, axis=1) - 1  # i of each good match
    n_good = good.sum(axis=1)
    valid = n_good > 0
    r = position.astype(np.float64)
    i = nth_good.astype(np.float64)
    precision = (i + 1) / np.maximum(r + 1, 1)  # r is -1 before the first kept image; masked by `good`
    if ap == "market":
        previous = np.where(r > 0, i / np.maximum(r, 1), 1.0)
        contribution = (previous + precision) / 2
    else:
        contribution = precision
    ap_values = np.where(good, contribution, 0.0).sum(axis=1) / np.maximum(n_good, 1)
    first = np.where(valid, np.argmax(good, axis=1), 0)
    first_rank = position[np.arange(len(order)), first]
    last = good.shape[1] - 1 - np.argmax(good[:, ::-1], axis=1)
    inp = n_good / np.maximum(position[np.arange(len(order)), last] + 1, 1)
    cmc = (np.arange(max_rank)[None, :] >= first_rank[:, None]) & valid[:, None]
    return cmc, ap_values, inp, valid


def evaluate_distmat(distmat: np.ndarray | torch.Tensor, q_pids: np.ndarray, g_pids: np.ndarray,
                     q_camids: np.ndarray, g_camids: np.ndarray, ap: str = "market", max_rank: int = 50,
                     chunk: int = 256) -> dict:
    """CMC (length max_rank), mAP, mINP and num_valid_queries from a (Q, G) distance matrix."""
    if ap not in AP_CONVENTIONS:
        raise ValueError(f"ap must be one of {AP_CONVENTIONS}, got {ap!r}")
    distmat = distmat.cpu().numpy() if isinstance(distmat, torch.Tensor) else np.asarray(distmat)
    q_pids, g_pids, q_camids, g_camids = (np.asarray(x) for x in (q_pids, g_pids, q_camids, g_camids))
    cmc_sum = np.zeros(max_rank)
    ap_sum = inp_sum = 0.0
    num_valid = 0
    for start in range(0, len(distmat), chunk):
        rows = slice(start, start + chunk)
        order = np.argsort(distmat[rows], axis=1, kind="stable")
        cmc, ap_values, inp, valid = _rank_chunk(order, q_pids[rows], g_pids, q_camids[rows], g_camids, ap,
                                                 max_rank)
        cmc_sum += cmc.sum(axis=0)
        ap_sum += ap_values[valid].sum()
        inp_sum += inp[valid].sum()
        num_valid += int(valid.sum())
    denom = max(num_valid, 1)
    return {"cmc": cmc_sum / denom, "mAP": ap_sum / denom, "mINP": inp_sum / denom,
            "num_valid_queries": num_valid, "num_queries": len(distmat)}


def evaluate_features(qf: torch.Tensor, gf: torch.Tensor, q_pids: np.ndarray, g_pids: np.ndarray,
                      q_camids: np.ndarray, g_camids: np.ndarray, ap: str = "market", max_rank: int = 50,
                      chunk: int = 1024) -> dict:
    """Evaluate with the distance 1 - cosine similarity of L2-normalized features, computed in chunks."""
    qf = torch.nn.functional.normalize(torch.as_tensor(qf, dtype=torch.float32), dim=1)
    gf = torch.nn.functional.normalize(torch.as_tensor(gf, dtype=torch.float32), dim=1)
    parts = [1 - qf[i:i + chunk] @ gf.T for i in range(0, len(qf), chunk)]
    distmat = torch.cat(parts) if parts else torch.empty(0, len(gf))
    return evaluate_distmat(distmat, q_pids, g_pids, q_camids, g_camids, ap=ap, max_rank=max_rank)
