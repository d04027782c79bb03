"""TPR@FPR over query-gallery pairs (verification.py) against every pair written out in numpy."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from utils import UserError
from verification import tpr_at_fpr


def pair_scores(scores: np.ndarray, q_pids, g_pids, q_cams, g_cams) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) scores of every kept pair, listed one by one."""
    pos, neg = [], []
    for i in range(len(q_pids)):
        for j in range(len(g_pids)):
            if q_pids[i] == -1 or g_pids[j] == -1 or (q_pids[i] == g_pids[j] and q_cams[i] == g_cams[j]):
                continue
            (pos if q_pids[i] == g_pids[j] else neg).append(scores[i, j])
    return np.array(pos), np.array(neg)


def reference(scores: np.ndarray, q_pids, g_pids, q_cams, g_cams, fprs):
    """The threshold is the (k+1)-th highest negative score, k = floor(f N_neg) with f the rate as written
    (exact: 0.29 * 100 is 29, not the float product's 28.999...)."""
    pos, neg = pair_scores(scores, q_pids, g_pids, q_cams, g_cams)
    neg = np.sort(neg)[::-1]
    rates = {}
    for f in fprs:
        t = neg[math.floor(Fraction(repr(f)) * len(neg))]
        rates[f"{f:g}"] = {"tpr": float(np.mean(pos > t)), "fpr": float(np.mean(neg > t)), "threshold": float(t)}
    return len(pos), len(neg), rates


def chunks_of(scores: np.ndarray, chunk: int):
    t = torch.as_tensor(scores)
    return lambda: ((s, t[s:s + chunk]) for s in range(0, len(t), chunk))


def labels(rng, q: int, g: int, ids: int):
    q_pids, g_pids = rng.integers(0, ids, q), rng.integers(-1, ids, g)
    q_pids[0] = -1  # a junk query: none of its pairs count
    return q_pids, g_pids, rng.integers(0, 3, q), rng.integers(0, 3, g)


@pytest.mark.parametrize("bins, quantize", [(1 << 16, None), (4, None), (1 << 16, 20), (7, 5)])
def test_rates_equal_every_pair_sorted(bins, quantize):
    """Few bins put many negatives in the threshold's bin; quantized scores make ties at the threshold."""
    rng = np.random.default_rng(bins + (quantize or 0))
    q_pids, g_pids, q_cams, g_cams = labels(rng, 37, 211, 12)
    scores = rng.uniform(-1, 1, (37, 211)).astype(np.float32)
    scores += 0.6 * (q_pids[:, None] == g_pids[None, :])  # positives score higher, as a trained model's do
    if quantize:
        scores = np.round(scores * quantize) / quantize
    fprs = (1e-3, 0.01, 0.05, 0.3)
    n_pos, n_neg, rates = reference(scores, q_pids, g_pids, q_cams, g_cams, fprs)
    got = tpr_at_fpr(chunks_of(scores, 10), q_pids, g_pids, q_cams, g_cams, fprs, score_range=(-1, 1.6), bins=bins)
    assert (got["positive_pairs"], got["negative_pairs"]) == (n_pos, n_neg)
    for f, r in rates.items():
        assert got["rates"][f]["threshold"] == pytest.approx(r["threshold"], abs=0)
        assert got["rates"][f]["tpr"] == pytest.approx(r["tpr"], abs=1e-12)
        assert got["rates"][f]["fpr"] == pytest.approx(r["fpr"], abs=1e-12) and r["fpr"] <= float(f)
    if quantize:  # ties at the threshold leave the rate reached below the largest the negatives allow
        assert any(got["rates"][f]["fpr"] < math.floor(Fraction(f) * n_neg) / n_neg for f in got["rates"])


def test_scores_outside_the_range_are_still_exact():
    rng = np.random.default_rng(3)
    q_pids, g_pids, q_cams, g_cams = labels(rng, 20, 90, 6)
    scores = rng.normal(0, 5, (20, 90)).astype(np.float32)  # mostly outside (-1, 1): the end bins hold them
    _, _, rates = reference(scores, q_pids, g_pids, q_cams, g_cams, (0.01, 0.2))
    got = tpr_at_fpr(chunks_of(scores, 7), q_pids, g_pids, q_cams, g_cams, (0.01, 0.2), bins=64)
    assert {f: r["threshold"] for f, r in got["rates"].items()} == {f: r["threshold"] for f, r in rates.items()}


def test_the_rate_as_written():
    """FPR 0.29 of 100 negatives with distinct scores accepts 29 of them (the float 0.29 * 100 floors to 28)."""
    scores = np.array([np.arange(101, dtype=np.float32)])
    q_pids, g_pids, cams = np.array([0]), np.array([0] + [1] * 100), np.array([0] + [1] * 100)
    got = tpr_at_fpr(chunks_of(scores, 1), q_pids, g_pids, np.array([1]), cams, (0.29,), score_range=(0, 100))
    assert got["rates"]["0.29"]["fpr"] == 0.29 and got["rates"]["0.29"]["threshold"] == 71.0


def test_separable_and_reversed_scores():
    q_pids, g_pids = np.array([1, 2]), np.array([1, 1, 2, 3, 3])
    q_cams, g_cams = np.array([0, 0]), np.array([1, 2, 1, 1, 1])
    same = (q_pids[:, None] == g_pids[None, :]).astype(np.float32)
    good = tpr_at_fpr(chunks_of(same, 1), q_pids, g_pids, q_cams, g_cams, (0.1,))
    assert good["positive_pairs"] == 3 and good["negative_pairs"] == 7 and good["rates"]["0.1"]["tpr"] == 1.0
    bad = tpr_at_fpr(chunks_of(-same, 1), q_pids, g_pids, q_cams, g_cams, (0.1,))
    assert bad["rates"]["0.1"]["tpr"] == 0.0


def test_no_positive_pair_has_no_rate_and_nan_is_one_line():
    q_pids, g_pids, cams = np.array([1]), np.array([2, 3]), np.array([0, 0])
    got = tpr_at_fpr(chunks_of(np.zeros((1, 2), np.float32), 1), q_pids, g_pids, cams[:1], cams, (0.1,))
    assert got["rates"] == {"0.1": None} and got["negative_pairs"] == 2
    with pytest.raises(UserError, match="NaN"):
        tpr_at_fpr(chunks_of(np.full((1, 2), np.nan, np.float32), 1), q_pids, g_pids, cams[:1], cams)
    with pytest.raises(UserError, match="above 0 and below 1"):
        tpr_at_fpr(chunks_of(np.zeros((1, 2), np.float32), 1), q_pids, g_pids, cams[:1], cams, (1.0,))


def every_operating_point(scores: np.ndarray, q_pids, g_pids, q_cams, g_cams):
    """(FPR, TPR) of 'accept a pair scoring t or more' for every score t, and the exact AUC (ties half)."""
    pos, neg = pair_scores(scores, q_pids, g_pids, q_cams, g_cams)
    points = {(float(np.mean(neg >= t)), float(np.mean(pos >= t))) for t in np.concatenate([pos, neg])}
    auc = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    return points | {(0.0, 0.0)}, float(auc), len(neg)


@pytest.mark.parametrize("bins, quantize", [(1 << 16, None), (1 << 16, 20), (9, None)])
def test_curve_points_are_operating_points_and_the_auc_is_within_its_bound(bins, quantize):
    """Every point of the curve is one that a threshold on the scores gives; where no bin holds two different
    scores, the kept points are the best TPR at or below each FPR of the grid, and the AUC is exact."""
    rng = np.random.default_rng(11 + bins)
    q_pids, g_pids, q_cams, g_cams = labels(rng, 29, 173, 9)
    raw = rng.uniform(-1, 1, (29, 173)) + 0.5 * (q_pids[:, None] == g_pids[None, :])
    if quantize:  # ties
        scores = (np.round(raw * quantize) / quantize).astype(np.float32)
    elif bins > raw.size:  # the same order, each score at the centre of a bin of its own
        codes = np.sort(rng.choice(bins, raw.size, replace=False))[np.argsort(np.argsort(raw, axis=None))]
        scores = (-1 + (codes.reshape(raw.shape) + 0.5) * 2.5 / bins).astype(np.float32)
    else:
        scores = raw.astype(np.float32)
    points, auc, n_neg = every_operating_point(scores, q_pids, g_pids, q_cams, g_cams)
    curve = tpr_at_fpr(chunks_of(scores, 8), q_pids, g_pids, q_cams, g_cams, (0.01,), score_range=(-1, 1.5),
                       bins=bins)["curve"]
    got = list(zip(curve["fpr"], curve["tpr"]))
    assert all(p in points for p in got)
    assert got == sorted(got) and curve["bin_edge"] == sorted(curve["bin_edge"], reverse=True)
    assert abs(curve["auc"] - auc) <= curve["auc_within"] + 1e-12 and got[-1] == (1.0, 1.0)
    if bins == 1 << 16:
        assert curve["auc"] == pytest.approx(auc, abs=1e-12)
        decades = math.ceil(math.log10(n_neg))
        for step in range(decades * 10 + 1):
            target = 10 ** (step / 10 - decades)
            best = max(tpr for fpr, tpr in points if fpr <= target + 1e-12)
            assert any(tpr == best and fpr <= target + 1e-12 for fpr, tpr in got)
    else:  # few bins: many pairs share one, and the bound says how far the AUC can be off
        assert curve["auc_within"] > 0.01
