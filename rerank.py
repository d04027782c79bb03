"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in bounded memory.

The published method, on all N = Q + G images:
1. original distance d = (2 - 2 cos)^2 of the features as given (the published code's conversion from
   a cosine similarity), each row divided by its maximum;
2. R(i, k): the k-reciprocal neighbours of i, the j among i's k+1 nearest whose k+1 nearest contain i;
3. the expansion of R(i, k1): every R(c, round(k1/2)) of a c in R(i, k1) that shares more than 2/3 of its
   members with R(i, k1) is added;
4. V[i, j] = exp(-d[i, j]) normalized over i's expanded set, then averaged over i's k2 nearest
   (local query expansion);
5. Jaccard distance 1 - m / (2 - m), with m = sum_k min(V[q, k], V[g, k]);
6. final = (1 - lambda) Jaccard + lambda d.
Published implementations keep several dense N x N arrays (and a full N x N argsort); here only the
k1 + 1 nearest neighbours of each image are kept (found `chunk` rows at a time), V is sparse, the Jaccard
term is gathered through V's non-zeros, and the one dense array is the Q x G result. Nearest neighbours
are ordered by distance, then index (a stable sort).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from utils import UserError

GIB = 1024 ** 3


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _row_chunk(n: int, budget: int = 256 * 1024 ** 2) -> int:
    """Rows per chunk of the N x N pass: a few float32 copies of a chunk fit in `budget` bytes."""
    return max(1, min(n, budget // (4 * 3 * max(n, 1))))


GPU_CHUNK_BYTES = 2 * 1024 ** 3  # on a GPU the N x N pass takes larger row chunks (fewer launches and copies)


def memory_needed(num_query: int, num_gallery: int, dim: int, k1: int = 20) -> int:
    """Estimated peak bytes: the Q x G result, the features, one N x N row chunk, the sparse V (generous)."""
    n = num_query + num_gallery
    result = 4 * num_query * num_gallery
    features = 2 * 4 * n * dim
    chunk = 3 * 4 * _row_chunk(n) * n
    sparse = 3 * n * (10 * k1) * 16  # V and its expansion: up to ~10 k1 non-zeros a row, index + value
    return result + features + chunk + sparse


def check_memory(num_query: int, num_gallery: int, dim: int, k1: int = 20) -> None:
    """Refuse, before any work, a re-ranking that would not fit in the memory available now."""
    need, have = memory_needed(num_query, num_gallery, dim, k1), available_memory()
    if have is not None and need > have:
        raise UserError(f"re-ranking {num_query} queries x {num_gallery} gallery images needs about "
                        f"{need / GIB:.1f} GiB of memory but {have / GIB:.1f} GiB is available; evaluate without "
                        "--rerank, or on a machine with more memory")


def _stable_topk(d: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest entries of each row, ordered by (value, index), on d's device.

    torch.topk orders equal values arbitrarily, so rows where a tie touches the first k (two equal values
    among them, or the k-th equal to the next) are redone exactly: every candidate up to the k-th value, in
    index order, stably sorted by value. Ties are rare (duplicate images), so nearly every row is topk's."""
    n = d.shape[1]
    if k >= n:
        return torch.sort(d, dim=1, stable=True).indices
    vals, idx = torch.topk(d, k + 1, dim=1, largest=False, sorted=True)
    tied = (vals[:, 1:] == vals[:, :-1]).any(1)  # over the k + 1: a tie inside the k or at their edge
    out = idx[:, :k].clone()
    for r in tied.nonzero().squeeze(1).tolist():
        cand = (d[r] <= vals[r, k - 1]).nonzero().squeeze(1)
        out[r] = cand[torch.sort(d[r, cand], stable=True).indices[:k]]
    return out


def _original_distance(rows: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """(2 - 2 <f_i, f_j>)^2 for a chunk of rows against all images, float32."""
    sim = rows @ feats.T
    return sim.mul_(-2).add_(2).square_()


def _neighbours(feats: torch.Tensor, k: int, num_query: int, out: np.ndarray,
                device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Each image's k nearest (N, k) and its row maximum; the queries' normalized rows go into `out`.
    The N x N distances exist only a chunk of rows at a time, on `device`."""
    n = len(feats)
    nearest = np.empty((n, k), np.int64)
    row_max = np.empty(n, np.float32)
    on_device = feats.to(device)
    step = _row_chunk(n, GPU_CHUNK_BYTES) if device.type == "cuda" else _row_chunk(n)
    for s in range(0, n, step):
        d = _original_distance(on_device[s:s + step], on_device)
        biggest = d.max(1).values
        d /= biggest[:, None]
        row_max[s:s + len(d)] = biggest.cpu().numpy()
        nearest[s:s + len(d)] = _stable_topk(d, k).cpu().numpy()
        if s < num_query:
            q = slice(s, min(s + len(d), num_query))
            out[q] = d[: q.stop - s, num_query:].cpu().numpy()
    return nearest, row_max


def _reciprocal(nearest: np.ndarray, k: int) -> list[np.ndarray]:
    """R(i, k): the members of i's k+1 nearest that have i among their own k+1 nearest."""
    forward = nearest[:, :k + 1]
    back = (forward[forward] == np.arange(len(nearest))[:, None, None]).any(-1)
    return [forward[i][back[i]] for i in range(len(nearest))]


def _expanded_sets(nearest: np.ndarray, k1: int) -> list[np.ndarray]:
    """R(i, k1) grown by every strongly overlapping R(c, round(k1/2)) of its members, sorted."""
    full = _reciprocal(nearest, k1)
    half = [set(r.tolist()) for r in _reciprocal(nearest, int(round(k1 / 2)))]
    sets = []
    for members in full:
        base = set(members.tolist())
        grown = set(base)
        for c in members.tolist():
            h = half[c]
            if len(h & base) > 2 / 3 * len(h):
                grown |= h
        sets.append(np.array(sorted(grown), np.int64))
    return sets


def _pair_distance(feats: np.ndarray, row_max: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Normalized original distances of listed (row, col) pairs, in cache-sized pieces."""
    out = np.empty(len(rows), np.float64)
    for s in range(0, len(rows), 4096):
        r, c = rows[s:s + 4096], cols[s:s + 4096]
        sim = np.einsum("ij,ij->i", feats[r], feats[c])
        out[s:s + len(r)] = (2 - 2 * sim.astype(np.float64)) ** 2 / row_max[r]
    return out


def _encoding(feats: torch.Tensor, nearest: np.ndarray, row_max: np.ndarray, k1: int, k2: int) -> sp.csr_matrix:
    """V after local query expansion, sparse (N x N)."""
    n = len(feats)
    sets = _expanded_sets(nearest, k1)
    counts = np.array([len(x) for x in sets])
    rows = np.repeat(np.arange(n), counts)
    cols = np.concatenate(sets)
    weight = np.exp(-_pair_distance(feats.numpy(), row_max, rows, cols))
    weight /= np.add.reduceat(weight, np.concatenate([[0], np.cumsum(counts)[:-1]]))[np.repeat(np.arange(n), counts)]
    v = sp.csr_matrix((weight, (rows, cols)), shape=(n, n))
    if k2 == 1:
        return v
    mean = sp.csr_matrix((np.full(n * k2, 1 / k2), (np.repeat(np.arange(n), k2), nearest[:, :k2].ravel())),
                         shape=(n, n))
    return (mean @ v).tocsr()


def _jaccard_into(v: sp.csr_matrix, num_query: int, out: np.ndarray, lam: float, chunk: int = 32) -> None:
    """out[q] = (1 - lam) Jaccard(q, gallery) + lam out[q], with m = sum_k min(V[q, k], V[g, k])."""
    num_gallery = out.shape[1]
    by_feature = v[num_query:].tocsc()  # for each k, the gallery images g with V[g, k] > 0
    vq = v[:num_query]
    for s in range(0, num_query, chunk):
        part = vq[s:s + chunk].tocoo()
        starts = by_feature.indptr[part.col]
        lens = by_feature.indptr[part.col + 1] - starts
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
        pos = offsets + np.arange(lens.sum())
        key = np.repeat(part.row, lens) * num_gallery + by_feature.indices[pos]
        mins = np.minimum(np.repeat(part.data, lens), by_feature.data[pos])
        m = np.bincount(key, mins, minlength=part.shape[0] * num_gallery).reshape(part.shape[0], num_gallery)
        rows = slice(s, s + part.shape[0])
        out[rows] = (1 - lam) * (1 - m / (2 - m)) + lam * out[rows]


def k_reciprocal_rerank(qf: Any, gf: Any, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                        device: torch.device | str = "cpu") -> np.ndarray:
    """The re-ranked (Q, G) float32 distance matrix of query and gallery features (L2-normalized first).

    `device` runs the N x N neighbour pass (the one part that grows with N^2 x dim: about 9e12 operations
    at MSMT17's size) there; the sparse rest stays on the CPU. A GPU's matrix product rounds differently
    from the CPU's, so its distances may differ in the last float32 bits (and a near tie among a
    neighbour list's last members may then fall the other way)."""
    if k1 < 1 or k2 < 1 or not 0 <= lambda_value <= 1:
        raise UserError(f"re-ranking needs k1 >= 1, k2 >= 1 and 0 <= lambda <= 1; got {k1}, {k2}, {lambda_value}")
    # Normalized here because the distance conversion assumes unit features; for DG-Net's alpha-weighted
    # queries this keeps each query's gallery order and puts every image on the same scale.
    qf = torch.nn.functional.normalize(torch.as_tensor(qf).detach().float().cpu(), dim=1)
    gf = torch.nn.functional.normalize(torch.as_tensor(gf).detach().float().cpu(), dim=1)
    num_query = len(qf)
    check_memory(num_query, len(gf), qf.shape[1], k1)
    feats = torch.cat([qf, gf])
    out = np.empty((num_query, len(gf)), np.float32)
    nearest, row_max = _neighbours(feats, min(k1 + 1, len(feats)), num_query, out, torch.device(device))
    v = _encoding(feats, nearest, row_max, k1, min(k2, nearest.shape[1]))
    _jaccard_into(v, num_query, out, lambda_value)
    return out
