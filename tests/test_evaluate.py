"""evaluate.py against a slow, obviously-correct reference, on random and adversarial cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import evaluate
from evaluate import evaluate_distmat, evaluate_features
from utils import UserError


def reference(distmat, q_pids, g_pids, q_camids, g_camids, ap, max_rank):
    """One query at a time, written the way the protocol is described."""
    cmc_sum, aps, inps, valid = np.zeros(max_rank), [], [], 0
    for q in range(len(distmat)):
        ranked = sorted(range(len(g_pids)), key=lambda g: (distmat[q][g], g))
        kept = [g for g in ranked if g_pids[g] != -1 and not (g_pids[g] == q_pids[q] and g_camids[g] == q_camids[q])]
        hits = [r for r, g in enumerate(kept) if g_pids[g] == q_pids[q]]
        if not hits:
            continue
        valid += 1
        cmc_sum[hits[0]:] += 1
        total = 0.0
        for i, r in enumerate(hits):
            precision = (i + 1) / (r + 1)
            if ap == "market":
                old = i / r if r > 0 else 1.0
                total += (old + precision) / 2
            else:
                total += precision
        aps.append(total / len(hits))
        inps.append(len(hits) / (hits[-1] + 1))
    return cmc_sum / max(valid, 1), float(np.mean(aps)) if aps else 0.0, float(np.mean(inps)) if inps else 0.0, valid


def check(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10):
    """Both backends (the per-query CPU one and the batched torch one, here on the CPU) equal the reference."""
    for ap in ("market", "precision"):
        cmc, m_ap, m_inp, valid = reference(distmat, q_pids, g_pids, q_camids, g_camids, ap, max_rank)
        for backend in ("numpy", "torch"):
            got = evaluate_distmat(distmat, q_pids, g_pids, q_camids, g_camids, ap=ap, max_rank=max_rank, chunk=3,
                                   backend=backend)
            assert got["num_valid_queries"] == valid
            assert got["num_queries"] == len(q_pids)
            np.testing.assert_allclose(got["cmc"], cmc, rtol=0, atol=1e-12)
            assert got["mAP"] == pytest.approx(m_ap, abs=1e-12)
            assert got["mINP"] == pytest.approx(m_inp, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_random_cases_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    q, g = 7, 40
    g_pids = rng.integers(-1, 6, g)  # junk, distractors and real identities
    q_pids = rng.integers(1, 6, q)
    check(rng.random((q, g)), q_pids, g_pids, rng.integers(1, 4, q), rng.integers(1, 4, g))


def test_ties_are_broken_by_gallery_index():
    distmat = np.zeros((2, 6))  # every distance equal: the gallery order decides
    g_pids = np.array([3, 1, 1, 0, 1, 3])
    check(distmat, np.array([1, 3]), g_pids, np.array([1, 1]), np.array([2, 2, 2, 2, 2, 2]))
    got = evaluate_distmat(distmat[:1], np.array([1]), g_pids, np.array([1]), np.full(6, 2), max_rank=3)
    assert got["cmc"].tolist() == [0.0, 1.0, 1.0]  # index 0 (pid 3) ranks first, index 1 second


def test_no_match_queries_are_left_out_and_counted():
    distmat = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    g_pids, g_cams = np.array([5, -1, 7]), np.array([1, 1, 1])
    got = evaluate_distmat(distmat, np.array([5, 9]), g_pids, np.array([2, 2]), g_cams, max_rank=3)
    assert got["num_valid_queries"] == 1 and got["num_queries"] == 2
    assert got["mAP"] == 1.0 and got["cmc"].tolist() == [1.0, 1.0, 1.0]
    check(distmat, np.array([5, 9]), g_pids, np.array([2, 2]), g_cams, max_rank=3)


def test_junk_only_and_same_camera_galleries():
    distmat = np.array([[0.1, 0.2, 0.3]])
    got = evaluate_distmat(distmat, np.array([4]), np.array([-1, 4, -1]), np.array([1]), np.array([1, 1, 1]))
    assert got["num_valid_queries"] == 0 and got["mAP"] == 0.0


def test_market_ap_by_hand():
    # The good matches sit at positions 1 and 3 after junk removal.
    distmat = np.array([[0.0, 0.1, 0.2, 0.3]])
    g_pids = np.array([0, 2, 0, 2])
    got = evaluate_distmat(distmat, np.array([2]), g_pids, np.array([1]), np.array([2, 2, 2, 2]), max_rank=4)
    # i=0, r=1: p=1/2, p_old=0 -> 1/4; i=1, r=3: p=2/4, p_old=1/3 -> 5/12; AP = (1/4 + 5/12)/2 = 1/3
    assert got["mAP"] == pytest.approx(1 / 3)
    precision = evaluate_distmat(distmat, np.array([2]), g_pids, np.array([1]), np.array([2, 2, 2, 2]),
                                 ap="precision")
    assert precision["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    # both conventions come with either choice, from the same ranks
    assert got["mAP_market"] == precision["mAP_market"] == got["mAP"]
    assert got["mAP_precision"] == precision["mAP_precision"] == precision["mAP"]
    assert got["mINP"] == pytest.approx(2 / 4)
    assert got["cmc"].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_features_use_cosine_similarity():
    rng = np.random.default_rng(3)
    gf = torch.tensor(rng.normal(size=(30, 8)), dtype=torch.float32)
    qf = gf[:5] * 3 + 0.01  # scaled copies: cosine similarity ignores the scale
    g_pids, q_pids = np.arange(30) + 1, np.arange(5) + 1
    got = evaluate_features(qf, gf, q_pids, g_pids, np.ones(5, int), np.full(30, 2), max_rank=5)
    assert got["cmc"][0] == 1.0 and got["mAP"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
def test_heavy_ties_match_the_reference(seed):
    # Few distinct distance values: most good matches tie with negatives, junk and each other.
    rng = np.random.default_rng(100 + seed)
    q, g = 9, 60
    distmat = rng.integers(0, 4, (q, g)).astype(np.float32) / 4
    check(distmat, rng.integers(-1, 5, q), rng.integers(-1, 5, g), rng.integers(1, 3, q), rng.integers(1, 3, g))


def test_infinite_distances_and_float64():
    rng = np.random.default_rng(7)
    distmat = rng.random((6, 30))
    distmat[rng.random((6, 30)) < 0.3] = np.inf  # masked pairs rank last, still by gallery index
    check(distmat, rng.integers(1, 4, 6), rng.integers(-1, 4, 30), rng.integers(1, 3, 6), rng.integers(1, 3, 30))


def test_distractors_and_junk_queries():
    rng = np.random.default_rng(11)
    g_pids = np.array([0, 0, 1, 1, 2, -1, 0, 2, 1, 0])
    g_cams = np.array([1, 2, 1, 2, 1, 2, 1, 2, 1, 2])
    q_pids = np.array([1, 2, 0, -1, 3])  # distractor and junk queries never have good matches
    check(rng.random((5, 10)), q_pids, g_pids, np.array([1, 1, 1, 1, 1]), g_cams)


def test_larger_random_case_with_features_path(monkeypatch):
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(12, 16))
    g_pids = rng.integers(0, 12, 300)
    q_pids = rng.integers(1, 12, 40)
    gf = centers[g_pids] + rng.normal(size=(300, 16))
    qf = centers[q_pids] + rng.normal(size=(40, 16))
    g_cams, q_cams = rng.integers(1, 5, 300), rng.integers(1, 5, 40)
    sim = torch.nn.functional.normalize(torch.tensor(qf, dtype=torch.float32), dim=1) @ \
        torch.nn.functional.normalize(torch.tensor(gf, dtype=torch.float32), dim=1).T
    distmat = (-sim).numpy()
    check(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    got = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=20, chunk=7)
    cmc, m_ap, _, valid = reference(distmat, q_pids, g_pids, q_cams, g_cams, "market", 20)
    assert got["num_valid_queries"] == valid and got["mAP"] == pytest.approx(m_ap, abs=1e-12)
    np.testing.assert_allclose(got["cmc"], cmc, rtol=0, atol=1e-12)
    # the batched ranking a GPU uses, its similarity chunks ranked a few rows at a time
    monkeypatch.setattr(evaluate, "RANK_ROWS", 3)
    batched = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=20, chunk=7, backend="torch")
    assert batched["num_valid_queries"] == valid and batched["mAP"] == pytest.approx(m_ap, abs=1e-6)
    np.testing.assert_allclose(batched["cmc"], cmc, rtol=0, atol=1e-12)


def test_bad_input_is_one_clear_error():
    with pytest.raises(UserError, match="NaN"):
        evaluate_distmat(np.array([[np.nan, 1.0]]), [1], [1, 2], [1], [2, 2])
    with pytest.raises(UserError, match="2 x 2 but there are 1 query"):
        evaluate_distmat(np.zeros((2, 2)), [1], [1, 2], [1], [2, 2])
    with pytest.raises(UserError, match="give one camera per image"):
        evaluate_distmat(np.zeros((1, 2)), [1], [1, 2], [], [2, 2])
    with pytest.raises(UserError, match="the same dimensions"):
        evaluate_features(np.ones((1, 4)), np.ones((2, 3)), [1], [1, 2], [1], [2, 2])


def test_integer_distances_on_the_batched_ranking():
    rng = np.random.default_rng(3)
    distmat = rng.integers(0, 5, (6, 20))  # integer distances with many ties
    q_pids, g_pids = rng.integers(1, 4, 6), rng.integers(-1, 4, 20)
    q_cams, g_cams = rng.integers(1, 3, 6), rng.integers(1, 3, 20)
    want = evaluate_distmat(distmat.astype(np.float64), q_pids, g_pids, q_cams, g_cams, backend="numpy")
    got = evaluate_distmat(torch.as_tensor(distmat), q_pids, g_pids, q_cams, g_cams, backend="torch")
    assert got["mAP"] == pytest.approx(want["mAP"]) and np.array_equal(got["cmc"], want["cmc"])


def test_all_zero_features_are_warned_about():
    qf, gf = np.zeros((2, 4)), np.eye(4)
    qf[0, 0] = 1
    with pytest.warns(UserWarning, match="1 of the 2 query features are all zero"):
        evaluate_features(qf, gf, [1, 2], [1, 2, 3, 4], [1, 1], [2, 2, 2, 2])


def test_empty_query_set():
    got = evaluate_distmat(np.zeros((0, 3)), [], [1, 2, 3], [], [1, 1, 1], max_rank=3)
    assert got["num_queries"] == 0 and got["mAP"] == 0.0 and got["cmc"].tolist() == [0.0, 0.0, 0.0]
