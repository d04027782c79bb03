"""rerank.py against a slow, dense re-implementation of the published k-reciprocal re-ranking."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rerank
from evaluate import evaluate_distmat
from rerank import k_reciprocal_rerank
from utils import UserError


def published(qf, gf, k1, k2, lam):
    """Dense, step by step as the paper's code does it: N x N arrays, a full argsort, loops."""
    feats = np.concatenate([qf, gf]).astype(np.float32)
    q, n = len(qf), len(feats)
    sim = (torch.from_numpy(feats) @ torch.from_numpy(feats).T).numpy()
    dist = (2 - 2 * sim) ** 2
    dist = (dist / dist.max(axis=0)).T  # columns by their maximum, then transposed (= rows: dist is symmetric)
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = rank[i, :k + 1]
        return np.array([j for j in forward if i in rank[j, :k + 1]], dtype=np.int64)

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = r
        for c in r:
            rc = reciprocal(c, int(np.around(k1 / 2)))
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expansion = np.append(expansion, rc)
        expansion = np.unique(expansion)
        w = np.exp(-dist[i, expansion])
        v[i, expansion] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.zeros((q, n))
    for i in range(q):
        m = np.minimum(v[i][None, :], v).sum(axis=1)
        jaccard[i] = 1 - m / (2 - m)
    final = (1 - lam) * jaccard + lam * dist[:q]
    return final[:, q:]


def features(seed, q=12, g=50, dim=8, ids=6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    q_pids, g_pids = rng.integers(0, ids, q), rng.integers(0, ids, g)
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return norm(centres[q_pids] + rng.normal(size=(q, dim))), norm(centres[g_pids] + rng.normal(size=(g, dim))), \
        q_pids, g_pids


@pytest.mark.parametrize("seed,k1,k2,lam", [(0, 20, 6, 0.3), (1, 20, 6, 0.3), (2, 5, 1, 0.3), (3, 7, 3, 0.5),
                                            (4, 3, 2, 0.0)])
def test_matches_the_published_method(seed, k1, k2, lam):
    qf, gf, _, _ = features(seed)
    want = published(qf, gf, k1, k2, lam)
    got = k_reciprocal_rerank(qf, gf, k1=k1, k2=k2, lambda_value=lam)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_chunked_neighbour_pass_is_the_same(monkeypatch):
    qf, gf, _, _ = features(5, q=20, g=70)
    whole = k_reciprocal_rerank(qf, gf)
    monkeypatch.setattr(rerank, "_row_chunk", lambda n: 7)  # many small row chunks
    # The same neighbours and weights; only float32 rounding may differ, because a multithreaded BLAS
    # splits a matrix product differently for different row counts (seen with 2 threads: 1 ulp).
    np.testing.assert_allclose(k_reciprocal_rerank(qf, gf), whole, rtol=1e-6, atol=1e-7)


def test_metrics_equal_to_the_published_ranking():
    qf, gf, q_pids, g_pids = features(6, q=15, g=80)
    q_cams, g_cams = np.ones(15, int), np.full(80, 2)
    got = evaluate_distmat(k_reciprocal_rerank(qf, gf), q_pids + 1, g_pids + 1, q_cams, g_cams, max_rank=10)
    want = evaluate_distmat(published(qf, gf, 20, 6, 0.3), q_pids + 1, g_pids + 1, q_cams, g_cams, max_rank=10)
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-12)
    np.testing.assert_array_equal(got["cmc"], want["cmc"])


def test_too_large_is_refused_before_starting(monkeypatch):
    monkeypatch.setattr(rerank, "available_memory", lambda: 2 * 1024 ** 3)
    with pytest.raises(UserError, match=r"11659 queries x 82161 gallery images needs about [\d.]+ GiB"):
        rerank.check_memory(11659, 82161, 1024)
    rerank.check_memory(100, 1000, 512)  # small: fine


def test_bad_parameters():
    qf, gf, _, _ = features(0)
    with pytest.raises(UserError, match="k1 >= 1"):
        k_reciprocal_rerank(qf, gf, k1=0)


def test_nearest_neighbours_are_ordered_by_value_then_index_under_ties():
    rng = np.random.default_rng(0)
    d = torch.from_numpy(rng.integers(0, 4, size=(40, 30)).astype(np.float32))  # many tied values
    for k in (1, 5, 29, 30):
        want = np.argsort(d.numpy(), axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(rerank._stable_topk(d, k).numpy(), want)


def test_duplicate_images_rank_as_the_published_method_does():
    qf, gf, _, _ = features(7, q=10, g=40)
    gf = np.concatenate([gf, gf[:10], qf[:3]])  # exact duplicates: tied distances in every neighbour list
    np.testing.assert_allclose(k_reciprocal_rerank(qf, gf, device="cpu"), published(qf, gf, 20, 6, 0.3),
                               rtol=0, atol=2e-6)
