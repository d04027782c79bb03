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

How it is fast without sorting every row: every metric is a function of r_i, the positions of the good
matches, alone. r_i = i + (number of kept negatives that rank before the i-th good match), and only the
negatives closer than the query's farthest good match can do that. So each query sorts just those
negatives and looks its good matches up in them (`searchsorted`); equal distances are then settled by
gallery index, explicitly, for the few matches that tie with a negative. The GPU path (CUDA tensors)
instead sorts whole rows in batches, which GPUs do fast.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from utils import Notice, UserError

AP_CONVENTIONS = ("market", "precision")
JUNK_PID = -1
# rows ranked at once on a GPU: the batched sorts hold a few (rows, G) int64 tensors, about 0.7 GB each at
# MSMT17's 82,161 gallery images for 1,024 rows, so the similarities' chunks are ranked 256 rows at a time
RANK_ROWS = 256


class Protocol:
    """Gallery labels prepared once: good-match candidates grouped by pid, and which images count."""

    def __init__(self, g_pids: np.ndarray, g_camids: np.ndarray):
        self.g_pids = np.asarray(g_pids).astype(np.int64, copy=False)
        self.g_camids = np.asarray(g_camids).astype(np.int64, copy=False)
        self.kept = self.g_pids != JUNK_PID
        order = np.argsort(self.g_pids, kind="stable")  # gallery indices grouped by pid, ascending in each
        pids, starts = np.unique(self.g_pids[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        self._groups = {int(p): order[s:e] for p, s, e in zip(pids, starts, ends)}

    def good(self, q_pid: int, q_camid: int) -> np.ndarray:
        """Gallery indices (ascending) of the good matches of a query."""
        if q_pid == JUNK_PID:
            return np.empty(0, np.int64)
        same = self._groups.get(int(q_pid), np.empty(0, np.int64))
        return same[self.g_camids[same] != q_camid]


def _good_ranks(d: np.ndarray, good: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Positions r_i (ascending) of the good matches among kept images, for one query's distances `d`."""
    gd = d[good]
    order = np.lexsort((good, gd))  # good matches by (distance, index)
    good, gd = good[order], gd[order]
    closer = np.sort(d[negative & (d <= gd[-1])])  # the only negatives that can rank before a good match
    before = np.searchsorted(closer, gd, side="left")
    tied = np.flatnonzero(np.searchsorted(closer, gd, side="right") > before)
    for t in tied:  # equal distance: a negative with a smaller gallery index ranks first
        g = good[t]
        before[t] += np.count_nonzero(negative[:g] & (d[:g] == gd[t]))
    return np.arange(len(good)) + before


def _check_finite_order(d: np.ndarray | torch.Tensor) -> None:
    bad = torch.isnan(d).any() if isinstance(d, torch.Tensor) else np.isnan(d).any()
    if bad:
        raise UserError("the distances contain NaN, so there is no ranking; check the features (NaN in the "
                        "model output?)")


def _ranks_numpy(distmat: np.ndarray, q_pids: np.ndarray, q_camids: np.ndarray, protocol: Protocol,
                 rows: range) -> list[np.ndarray | None]:
    """Good-match positions of queries `rows`, one row of `distmat` (aligned with rows) at a time."""
    out: list[np.ndarray | None] = []
    for k, q in enumerate(rows):
        good = protocol.good(q_pids[q], q_camids[q])
        if len(good) == 0:
            out.append(None)
            continue
        negative = protocol.kept & (protocol.g_pids != q_pids[q])
        out.append(_good_ranks(distmat[k], good, negative))
    return out


def _ranks_torch(dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor, g_pids: torch.Tensor,
                 g_camids: torch.Tensor) -> list[np.ndarray | None]:
    """The same good-match positions for a chunk of rows, batched with whole-row sorts (for GPUs)."""
    same = g_pids[None, :] == q_pids[:, None]
    junk = (g_pids == JUNK_PID)[None, :] | (same & (g_camids[None, :] == q_camids[:, None]))
    good = same & ~junk
    negative = ~junk & ~same
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    negatives = torch.where(negative, dist, inf).sort(dim=1).values
    n_neg = negative.sum(1, keepdim=True)
    n_good = good.sum(1)
    width = max(int(n_good.max()), 1)
    # Good matches first, in (distance, index) order: a stable sort by distance, then a stable sort that
    # moves the non-good entries behind (a good match at distance inf must not fall behind padding).
    by_dist = torch.where(good, dist, inf).sort(dim=1, stable=True).indices
    goods_first = (~good.gather(1, by_dist)).to(torch.uint8).sort(dim=1, stable=True).indices
    gidx = by_dist.gather(1, goods_first)[:, :width].contiguous()  # a copy: the (rows, G) tensors can go
    del by_dist, goods_first
    gd = dist.gather(1, gidx).contiguous()
    before = torch.searchsorted(negatives, gd, side="left")
    after = torch.minimum(torch.searchsorted(negatives, gd, side="right"), n_neg)
    slot = torch.arange(width, device=dist.device)
    is_good = slot[None, :] < n_good[:, None]
    rows, cols = torch.nonzero(is_good & (after > before), as_tuple=True)
    index = torch.arange(dist.shape[1], device=dist.device)
    for s in range(0, len(rows), 256):  # ties: count negatives at the same distance with a smaller index
        r, c = rows[s:s + 256], cols[s:s + 256]
        g = gidx[r, c]
        hit = negative[r] & (dist[r] == gd[r, c][:, None]) & (index[None, :] < g[:, None])
        before[r, c] += hit.sum(1)
    ranks = (slot[None, :] + before).cpu().numpy()
    counts = n_good.cpu().numpy()
    return [ranks[k, :n] if n else None for k, n in enumerate(counts)]


def _metrics(ranks: list[np.ndarray | None], ap: str, max_rank: int) -> dict[str, Any]:
    """CMC, mAP and mINP from every query's good-match positions (None: no good match). `mAP` follows the
    `ap` convention; `mAP_market` and `mAP_precision` give both, from the same ranks."""
    valid = [r for r in ranks if r is not None]
    num_valid = len(valid)
    result: dict[str, Any] = {"cmc": np.zeros(max_rank), "mAP": 0.0, "mINP": 0.0, "num_valid_queries": num_valid,
                              "num_queries": len(ranks), **{f"mAP_{c}": 0.0 for c in AP_CONVENTIONS}}
    if not num_valid:
        return result
    counts = np.array([len(r) for r in valid])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    r = np.concatenate(valid).astype(np.float64)
    i = np.arange(len(r)) - np.repeat(starts, counts)
    precision = (i + 1) / (r + 1)
    contributions = {"market": ((np.where(r > 0, i / np.maximum(r, 1), 1.0)) + precision) / 2,
                     "precision": precision}
    for convention, contribution in contributions.items():
        ap_values = np.add.reduceat(contribution, starts) / counts
        result[f"mAP_{convention}"] = float(ap_values.sum() / num_valid)
    first = r[starts].astype(np.int64)
    last = r[starts + counts - 1]
    hist = np.bincount(np.minimum(first, max_rank), minlength=max_rank + 1)[:max_rank]
    result.update(cmc=np.cumsum(hist) / num_valid, mAP=result[f"mAP_{ap}"],
                  mINP=float((counts / (last + 1)).sum() / num_valid))
    return result


def _labels(*arrays: Any) -> list[np.ndarray]:
    return [np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a).astype(np.int64) for a in arrays]


def _check_args(ap: str, max_rank: int, shape: tuple[int, int], q_pids: np.ndarray, g_pids: np.ndarray,
                q_camids: np.ndarray, g_camids: np.ndarray) -> None:
    if ap not in AP_CONVENTIONS:
        raise ValueError(f"ap must be one of {AP_CONVENTIONS}, got {ap!r}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    if shape != (len(q_pids), len(g_pids)):
        raise UserError(f"the distances are {shape[0]} x {shape[1]} but there are {len(q_pids)} query and "
                        f"{len(g_pids)} gallery labels")
    if (len(q_camids), len(g_camids)) != (len(q_pids), len(g_pids)):
        raise UserError(f"there are {len(q_pids)} query and {len(g_pids)} gallery labels but {len(q_camids)} "
                        f"query and {len(g_camids)} gallery cameras: give one camera per image")


def evaluate_distmat(distmat: np.ndarray | torch.Tensor, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                     ap: str = "market", max_rank: int = 50, chunk: int = 256, backend: str = "auto"
                     ) -> dict[str, Any]:
    """CMC (length max_rank), mAP, mINP, num_valid_queries and num_queries from a (Q, G) distance matrix.

    backend "auto": a CUDA tensor is ranked on its GPU with batched sorts ("torch"), anything else on the
    CPU one query at a time ("numpy"); both give identical results, in the distances' own dtype.
    """
    q_pids, g_pids, q_camids, g_camids = _labels(q_pids, g_pids, q_camids, g_camids)
    _check_args(ap, max_rank, tuple(distmat.shape), q_pids, g_pids, q_camids, g_camids)
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be auto, numpy or torch, got {backend!r}")
    on_gpu = isinstance(distmat, torch.Tensor) and distmat.device.type != "cpu"
    ranks: list[np.ndarray | None] = []
    if backend == "torch" or (backend == "auto" and on_gpu):
        distmat = torch.as_tensor(distmat)
        if not distmat.is_floating_point():  # the batched ranking pads with inf, which needs a float dtype
            distmat = distmat.double()
        device = distmat.device
        labels = [torch.as_tensor(x, device=device) for x in (q_pids, q_camids, g_pids, g_camids)]
        for s in range(0, len(distmat), chunk):
            _check_finite_order(distmat[s:s + chunk])
            ranks += _ranks_torch(distmat[s:s + chunk], labels[0][s:s + chunk], labels[1][s:s + chunk], *labels[2:])
        return _metrics(ranks, ap, max_rank)
    distmat = distmat.cpu().numpy() if isinstance(distmat, torch.Tensor) else np.asarray(distmat)
    protocol = Protocol(g_pids, g_camids)
    for s in range(0, len(distmat), chunk):
        _check_finite_order(distmat[s:s + chunk])
        ranks += _ranks_numpy(distmat[s:s + chunk], q_pids, q_camids, protocol, range(s, min(s + chunk, len(distmat))))
    return _metrics(ranks, ap, max_rank)


def _normalized(x: Any, device: torch.device | None) -> torch.Tensor:
    x = torch.as_tensor(x)
    x = x.to(device or x.device, dtype=torch.float32)
    return torch.nn.functional.normalize(x, dim=1)


def cosine_distance_chunks(qf: Any, gf: Any, chunk: int = 1024, device: torch.device | str | None = None):
    """Yield (start, distances) for `chunk` queries at a time: the negated cosine similarity (float32).

    The negated similarity orders the gallery exactly as 1 - cos does, without the rounding that can make
    two different similarities equal; nothing larger than one chunk is ever materialized.
    """
    device = torch.device(device) if device is not None else None
    qf, gf = _normalized(qf, device), _normalized(gf, device)
    for s in range(0, len(qf), chunk):
        yield s, torch.mm(qf[s:s + chunk], gf.T).neg_()  # BLAS reads the transposed view without a copy


def evaluate_features(qf: Any, gf: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                      ap: str = "market", max_rank: int = 50, chunk: int = 1024,
                      device: torch.device | str | None = None, backend: str = "auto") -> dict[str, Any]:
    """Evaluate with the cosine distance of L2-normalized features, computed `chunk` queries at a time.

    `device` (default: where `qf` is) is where the similarities are computed; `backend` as in
    `evaluate_distmat` ("auto": ranked on the GPU when they are computed there, else one query at a time).
    """
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be auto, numpy or torch, got {backend!r}")
    q_pids, g_pids, q_camids, g_camids = _labels(q_pids, g_pids, q_camids, g_camids)
    _check_args(ap, max_rank, (len(qf), len(gf)), q_pids, g_pids, q_camids, g_camids)
    qf, gf = torch.as_tensor(qf), torch.as_tensor(gf)  # arrays or lists too, once
    q_shape, g_shape = tuple(qf.shape), tuple(gf.shape)
    if len(q_shape) != 2 or len(g_shape) != 2 or q_shape[1] != g_shape[1]:
        raise UserError(f"query features are {q_shape} and gallery features {g_shape}: both must be (images, "
                        "dimensions) with the same dimensions (from the same model)")
    for name, f in (("query", qf), ("gallery", gf)):
        zero = int((f.abs().sum(1) == 0).sum())
        if zero:  # normalized to 0, they tie with every image: a broken model or feature file, not a result
            warnings.warn(f"{zero} of the {len(f)} {name} features are all zero; their rankings are by gallery "
                          "order only", Notice, stacklevel=2)
    protocol = Protocol(g_pids, g_camids)
    labels = None
    ranks: list[np.ndarray | None] = []
    for s, dist in cosine_distance_chunks(qf, gf, chunk, device):
        _check_finite_order(dist)
        if backend == "numpy" or (backend == "auto" and dist.device.type == "cpu"):
            ranks += _ranks_numpy(dist.numpy(), q_pids, q_camids, protocol, range(s, s + len(dist)))
            continue
        if labels is None:
            labels = [torch.as_tensor(x, device=dist.device) for x in (q_pids, q_camids, g_pids, g_camids)]
        for r in range(0, len(dist), RANK_ROWS):  # the batched sorts hold several (rows, G) index tensors
            rows = slice(s + r, s + min(r + RANK_ROWS, len(dist)))
            ranks += _ranks_torch(dist[r:r + RANK_ROWS], labels[0][rows], labels[1][rows], *labels[2:])
    return _metrics(ranks, ap, max_rank)
