"""Verification rates over query–gallery pairs, for `test.py --roc`: the true-positive rate at a false-positive
rate (TPR@FPR), as face and re-ID verification report it.

Pairs are every query against every gallery image that its ranking keeps (evaluate.py's rules): a gallery
image of pid -1 (junk) and one of the query's pid from the query's camera are left out, and so is a query of
pid -1. A pair of the same pid is positive, any other negative. A pair is accepted when its score (cosine
similarity, or the negated re-ranked distance) is *above* a threshold; at a given FPR f the threshold is the
lowest one that accepts at most f of the negative pairs (floor(f N_neg)), so with ties the rate reached may
be below f, never above. TPR is the share of positive pairs it accepts. (fast-reid's TPR@FPR labels the
positives 0 and takes distances as scores, which makes it the share of negatives rejected at a given share
of rejected positives: a different number under the same name.)

Market-1501 has 54 million pairs and MSMT17 958 million, so nothing of that size is kept: a first pass over
the score chunks keeps the positive scores (few) and a histogram of the negative ones; the threshold's bin
is then read again in a second pass, whose few negative scores are sorted to find it exactly. The ROC curve
and its AUC come from the first pass's histograms alone (`roc_curve`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from evaluate import cosine_distance_chunks
from utils import UserError

DEFAULT_FPRS = (1e-4, 1e-3, 1e-2)
BINS = 1 << 16  # of the score range: the threshold's bin holds a few thousand negatives at MSMT17's size
CURVE_PER_DECADE = 10  # ROC points kept per decade of FPR

ScoreChunks = Callable[[], Iterable[tuple[int, torch.Tensor]]]  # (first query, (rows, G) scores), anew each call


def _pairs(q_pids: torch.Tensor, q_camids: torch.Tensor, g_pids: torch.Tensor, g_camids: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) masks of a chunk of queries against the gallery."""
    same = g_pids[None, :] == q_pids[:, None]
    kept = (g_pids != -1)[None, :] & ~(same & (g_camids[None, :] == q_camids[:, None])) & (q_pids != -1)[:, None]
    return same & kept, ~same & kept


def _at_or_above(histogram: torch.Tensor) -> torch.Tensor:
    """Per bin, the count in it or any higher bin."""
    return torch.flip(torch.cumsum(torch.flip(histogram, [0]), 0), [0])


def check_fprs(fprs: Sequence[float]) -> None:
    for f in fprs:
        if not 0 < f < 1:
            raise UserError(f"--roc: a false-positive rate must be above 0 and below 1, got {f}")


def tpr_at_fpr(scores: ScoreChunks, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
               fprs: Sequence[float] = DEFAULT_FPRS, score_range: tuple[float, float] = (-1.0, 1.0),
               bins: int = BINS) -> dict[str, Any]:
    """{"positive_pairs", "negative_pairs", "rates": {"<fpr:g>": {"tpr", "fpr", "threshold"}}}: per asked
    FPR, the TPR, the FPR the threshold actually gives, and the threshold (a score; pairs above it are
    accepted). `scores()` yields the score chunks, and is called twice. `score_range` only spreads the
    histogram (scores outside it fall into its end bins, still exactly counted); cosine similarities lie in
    [-1, 1]. Rates are None where there is no positive or no negative pair."""
    check_fprs(fprs)
    labels: list[torch.Tensor] | None = None
    low, high = score_range
    if not (math.isfinite(low) and math.isfinite(high)):  # e.g. an inf in given distances: any range is exact
        low, high = -1.0, 1.0
    scale = bins / (high - low) if high > low else 0.0

    def bin_of(scores: torch.Tensor) -> torch.Tensor:
        """Each score's bin: the same float32 arithmetic in both passes, so a score is read back from the bin
        it was counted in; clamped to be non-negative first, the conversion's truncation is the floor (so
        the bin never falls as the score rises)."""
        return scores.sub(low).mul_(scale).clamp_(0, bins - 1).long()

    def negative_bins(chunk: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """The negative pairs' bins, `bins` (one past the last) for the others."""
        return torch.where(negative, bin_of(chunk), bins)

    def chunks() -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        nonlocal labels
        for s, chunk in scores():
            chunk = chunk.float()
            if torch.isnan(chunk).any():
                raise UserError("the scores contain NaN; check the features (NaN in the model output?)")
            if labels is None or labels[0].device != chunk.device:
                labels = [torch.as_tensor(np.asarray(x, np.int64), device=chunk.device)
                          for x in (q_pids, q_camids, g_pids, g_camids)]
            rows = slice(s, s + len(chunk))
            positive, negative = _pairs(labels[0][rows], labels[1][rows], *labels[2:])
            yield chunk, positive, negative

    positives, histogram = [], torch.zeros(bins, dtype=torch.long)
    for chunk, positive, negative in chunks():
        positives.append(chunk[positive].cpu())
        histogram += torch.bincount(negative_bins(chunk, negative).flatten(), minlength=bins + 1)[:bins].cpu()
    n_neg = int(histogram.sum())
    pos = torch.cat(positives) if positives else torch.empty(0)
    out: dict[str, Any] = {"positive_pairs": len(pos), "negative_pairs": n_neg,
                           "rates": {f"{f:g}": None for f in fprs}, "curve": None}
    if not len(pos) or not n_neg:
        return out
    out["curve"] = roc_curve(torch.bincount(bin_of(pos), minlength=bins), histogram, low, scale)
    # per FPR: the bin holding the (k+1)-th highest negative score, k = floor(f N_neg) the negatives allowed
    # above the threshold, and how many lie in higher bins
    above = _at_or_above(histogram)
    wanted = {}
    for f in fprs:
        k = math.floor(Fraction(repr(f)) * n_neg)  # the rate as written: 0.29 * 100 is 28.999... in floats
        b = int(torch.nonzero(above > k).max())
        wanted[f] = (b, k - (int(above[b + 1]) if b + 1 < bins else 0))
    in_bins: dict[int, list[torch.Tensor]] = {b: [] for b, _ in wanted.values()}
    for chunk, _, negative in chunks():
        idx = negative_bins(chunk, negative)
        for b in in_bins:
            in_bins[b].append(chunk[idx == b].cpu())
    for f, (b, j) in wanted.items():
        values = torch.cat(in_bins[b])
        if len(values) != int(histogram[b]):
            raise UserError("the similarities came out differently when computed again (a nondeterministic "
                            "kernel?); run the evaluation on the CPU for --roc")
        threshold = values.sort(descending=True).values[j]
        accepted = int(above[b]) - int((values <= threshold).sum())  # higher bins hold only higher scores
        out["rates"][f"{f:g}"] = {"tpr": int((pos > threshold).sum()) / len(pos), "fpr": accepted / n_neg,
                                  "threshold": float(threshold)}
    return out


def roc_curve(positive_histogram: torch.Tensor, negative_histogram: torch.Tensor, low: float, scale: float,
              per_decade: int = CURVE_PER_DECADE) -> dict[str, Any]:
    """The ROC from the first pass's histograms, without reading a pair again. Accepting every pair whose
    score falls in bin i or higher is an operating point that a threshold on the score gives (the bin never
    falls as the score rises), so each bin edge is an exact point of the curve; of these, the one with the
    largest FPR at or below each of `per_decade` log-spaced rates per decade, from 1/N_neg to 1, is kept:
    `fpr`, `tpr` and `bin_edge`, the score at the bin's lower edge (pairs from about there up are accepted).
    `auc` is the area under all the bin edges' points: pairs in one bin count as ties (half), which is off
    the exact AUC by at most `auc_within`, half the share of positive–negative pairs in the same bin."""
    n_pos, n_neg = int(positive_histogram.sum()), int(negative_histogram.sum())
    pos_above, neg_above = _at_or_above(positive_histogram), _at_or_above(negative_histogram)
    pos_higher = pos_above - positive_histogram  # in a higher bin than i
    pairs = float(n_pos) * n_neg
    auc = float((negative_histogram.double() * (pos_higher.double() + positive_histogram.double() / 2)).sum()) / pairs
    within = float((negative_histogram.double() * positive_histogram.double()).sum()) / pairs / 2
    decades = math.ceil(math.log10(n_neg))
    kept: list[int] = []
    for step in range(decades * per_decade + 1):
        allowed = math.floor(n_neg * 10 ** (step / per_decade - decades) + 1e-9)  # negatives accepted at most
        # the lowest bin whose pairs from there up hold at most `allowed` negatives (-neg_above rises with i)
        i = int(torch.searchsorted(-neg_above, torch.tensor(-allowed)))
        if i < len(neg_above) and (not kept or kept[-1] != i):
            kept.append(i)
    return {"fpr": [int(neg_above[i]) / n_neg for i in kept], "tpr": [int(pos_above[i]) / n_pos for i in kept],
            "bin_edge": [low + i / scale if scale else low for i in kept], "auc": auc, "auc_within": within}


def verification_rates(qf: torch.Tensor, gf: torch.Tensor, q_pids: Any, g_pids: Any, q_camids: Any,
                       g_camids: Any, fprs: Sequence[float] = DEFAULT_FPRS, distmat: np.ndarray | None = None,
                       device: torch.device | str | None = None, chunk: int = 256) -> dict[str, Any]:
    """`tpr_at_fpr` of the cosine similarities of query and gallery features (computed on `device`, `chunk`
    queries at a time), or of the negated (Q, G) distances `distmat` when given (the re-ranked ones)."""
    if distmat is not None:
        d = torch.as_tensor(distmat)
        return tpr_at_fpr(lambda: ((s, -d[s:s + chunk]) for s in range(0, len(d), chunk)), q_pids, g_pids,
                          q_camids, g_camids, fprs, score_range=(-float(d.max()), -float(d.min())))
    return tpr_at_fpr(lambda: ((s, -dist) for s, dist in cosine_distance_chunks(qf, gf, chunk, device)), q_pids,
                      g_pids, q_camids, g_camids, fprs)
