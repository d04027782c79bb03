"""α-query expansion (expansion.py): the definition, chunking, what it is for, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluate import evaluate_features
from expansion import alpha_query_expansion
from utils import UserError


def expanded_by_definition(rows: np.ndarray, gallery: np.ndarray, k: int, alpha: float, skip_self: bool
                           ) -> np.ndarray:
    """Each unit row plus its k most similar unit gallery rows (itself left out), weighted sim^alpha (0 where
    sim <= 0)."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    rows, gallery = unit(rows.astype(np.float64)), unit(gallery.astype(np.float64))
    out = []
    for i, r in enumerate(rows):
        sims = gallery @ r
        if skip_self:
            sims[i] = -np.inf
        top = np.argsort(-sims, kind="stable")[:k]
        weights = np.where(sims[top] > 0, np.maximum(sims[top], 0) ** alpha, 0)
        out.append(r + weights @ gallery[top])
    return unit(np.array(out))


@pytest.mark.parametrize("k, alpha", [(1, 0.0), (3, 3.0), (5, 1.5)])
def test_each_feature_gains_its_nearest_gallery_features(k, alpha):
    gen = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(7, 16, generator=gen), torch.randn(12, 16, generator=gen)
    q, g = alpha_query_expansion(qf, gf, k, alpha, chunk=4)  # chunks of 4 rows: the self-skip crosses them
    np.testing.assert_allclose(q.numpy(), expanded_by_definition(qf.numpy(), gf.numpy(), k, alpha, False), atol=1e-5)
    np.testing.assert_allclose(g.numpy(), expanded_by_definition(gf.numpy(), gf.numpy(), k, alpha, True), atol=1e-5)
    assert q.dtype == g.dtype == torch.float32
    # the scale of a feature does not matter: cosine similarity throughout
    q2, g2 = alpha_query_expansion(qf * 3, gf * torch.rand(12, 1, generator=gen).add(0.5), k, alpha)
    torch.testing.assert_close((q2, g2), (q, g))


def test_expansion_pulls_a_query_towards_its_identity():
    """Identities as tight clusters, each query a noisy view of its own: expanding with the nearest gallery
    images (its identity's) raises mAP; what αQE is for."""
    gen = torch.Generator().manual_seed(1)
    ids, per_id, dim = 20, 6, 32
    centres = torch.randn(ids, dim, generator=gen)
    gf = centres.repeat_interleave(per_id, 0) + 0.6 * torch.randn(ids * per_id, dim, generator=gen)
    qf = centres + 2.0 * torch.randn(ids, dim, generator=gen)
    g_pids, q_pids = np.repeat(np.arange(ids), per_id), np.arange(ids)
    q_cams, g_cams = np.zeros(ids, np.int64), np.ones(ids * per_id, np.int64)
    plain = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams)["mAP"]
    expanded = evaluate_features(*alpha_query_expansion(qf, gf, k=4, alpha=3.0), q_pids, g_pids, q_cams, g_cams)
    assert expanded["mAP"] > plain + 0.05, (plain, expanded["mAP"])


def test_bad_expansions_say_what_to_change():
    qf, gf = torch.randn(2, 4), torch.randn(3, 4)
    for k, alpha, words in ((0, 3.0, "at least 1"), (2, -1.0, "0 or more"), (2, float("nan"), "0 or more"),
                            (2, float("inf"), "finite"),
                            (3, 3.0, "lower --aqe_k")):
        with pytest.raises(UserError, match=words):
            alpha_query_expansion(qf, gf, k, alpha)
