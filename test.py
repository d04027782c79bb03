"""Evaluate a run (DG-Net or a teacher) on its dataset's query and gallery: R1/R5/R10, mAP, mINP.

    python test.py --name latest [--which_iter N|last|best] [--config FILE] [--data_root DIR] [--multi] [--rerank]
                   [--aqe [--aqe_k 5] [--aqe_alpha 3]] [--no-flip] [--ms 1,1.1] [--alpha 0.5]
                   [--ap market|precision] [--roc] [--ranklist K]
    python test.py --name latest --query DIR --gallery DIR [--topk 10]     # search folders of images
    python test.py --name latest --onnx FILE                               # an exported model (export.py)
    python test.py --name latest --which_iter all                          # every snapshot: curve.json
    python test.py --original DIR --data_root ../Market                    # the original release's files
    python test.py --features outputs/latest/results/features_00100000.npz --alpha 0.5,0,-1 --rerank  # again

Features follow DG-Net's protocol (the original's reid_eval/test_2label.py): each image and its horizontal
flip go through the model; for DG-Net each pass gives the primary and the fine-grained 512-d features, each
L2-normalized, the two passes are summed and each half normalized again; at query time the fine-grained half
is weighted by `--alpha` (0.5 is what DG-Net reports; -1, as in the original, the fine-grained half alone;
several, `--alpha 0.5,0,-1`, score every one from the same features, the first as the headline). A
teacher's feature is its 512-d bottleneck, flip-summed and normalized. `--ms 1,1.1` (multi-scale, as the
re-ID baseline DG-Net builds on) adds each image resized to 1.1 times its area to the sum. `--multi`
(Market-1501's gt_bbox/ or a multi-query/ folder) replaces each query by the mean feature of the multi-query
images of its identity and camera. `--aqe` expands queries and gallery with their nearest gallery images
(expansion.py); `--rerank` re-ranks (after --aqe when both are given).

Written to outputs/<name>/results/: <iteration>.json (the metrics), features_<iteration>.npz and
pytorch_result.mat (the original's layout, unweighted features; _noflip, _ms<scales> in their names when
extracted so), ranklist_<iteration>[<options>]/ (with --ranklist),
search_<iteration>_<query folder>-in-<gallery folder>[<options>].json (with --query/--gallery),
<iteration>_onnx[<options>].json (with --onnx).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.datasets import IMAGE_EXTENSIONS, Record, dataset_folder, is_image_name
from data.loaders import build_test_loader, image_size, load_splits, read_image
from evaluate import AP_CONVENTIONS, JUNK_PID, cosine_distance_chunks, evaluate_distmat, evaluate_features
from expansion import DEFAULT_ALPHA, DEFAULT_K, alpha_query_expansion, check_expansion
from features import (
    HALF,
    Progress,
    check_alpha,
    check_scales,
    extract_features,
    has_halves,
    load_model,
    load_run,
    weight_query,
    weighted_both_sides,
)
from utils import (
    NonFiniteState,
    UserError,
    add_run_arguments,
    check_once,
    find_checkpoint,
    list_checkpoints,
    listed,
    load_config,
    numbers,
    one_line,
    plain_warnings,
    run_folder,
    saved_config,
)
from verification import DEFAULT_FPRS, check_fprs, verification_rates

METRICS = ("R1", "R5", "R10", "mAP", "mINP")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, every_iteration=True, name_required=False)
    p.add_argument("--features", metavar="FILE",
                   help="score saved features again, with no model or images: a features_<it>.npz or "
                        "pytorch_result.mat (this project's or the original's); --alpha, --ap, --multi, --aqe, "
                        "--rerank, --roc apply")
    p.add_argument("--original", metavar="DIR",
                   help="the original release's files instead of a run: a DG-Net folder (config.yaml, gen_/id_"
                        "<iteration>.pt) or a baseline teacher (net_last.pth, opts.yaml); results go to "
                        "outputs/<--name or DIR's name>")
    p.add_argument("--config", help="config to use instead of the run's config.yaml (e.g. another dataset)")
    p.add_argument("--data_root", help="dataset folder, instead of the config's data_root")
    p.add_argument("--multi", action="store_true", help="Market-1501 multi-query (gt_bbox/ or multi-query/)")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3)")
    p.add_argument("--roc", nargs="?", type=numbers, const=list(DEFAULT_FPRS), metavar="F[,F...]",
                   help="verification too: the TPR at each false-positive rate F (default 1e-4,1e-3,1e-2) over "
                        "the query-gallery pairs, and the ROC curve and its AUC (in the JSON)")
    p.add_argument("--aqe", action="store_true",
                   help="alpha-query expansion: each query (and each gallery image) plus its --aqe_k nearest gallery "
                        "images, weighted by similarity to the power --aqe_alpha")
    p.add_argument("--aqe_k", type=int, metavar="K", help=f"--aqe neighbours (default {DEFAULT_K})")
    p.add_argument("--aqe_alpha", type=float, metavar="A",
                   help=f"--aqe similarity exponent (default {DEFAULT_ALPHA:g})")
    p.add_argument("--alpha", type=numbers, default=[0.5], metavar="A[,A...]",
                   help="weight of DG-Net's fine-grained half (default 0.5; -1: it alone); several, e.g. 0.5,0,-1 "
                        "(the original's three), are each scored from one extraction, the first as the headline")
    p.add_argument("--ap", default="market", choices=AP_CONVENTIONS, help="AP convention (default: market)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="do not add the flipped image's feature")
    p.add_argument("--ms", type=numbers, default=[1.0], metavar="S[,S...]",
                   help="multi-scale: add the features of each image resized to S times its area (each side "
                        "times sqrt(S), bicubic), e.g. 1,1.1 (the baseline's --ms); default 1")
    p.add_argument("--batch_size", type=int, default=128, help="images per inference batch")
    p.add_argument("--ranklist", type=int, default=0, metavar="K", help="write rank-list images with the top K")
    p.add_argument("--ranklist_queries", type=int, default=20, metavar="N",
                   help="how many queries get a rank list, evenly spread (default 20; 0 = all)")
    p.add_argument("--query", help="search: folder of query images (with --gallery)")
    p.add_argument("--gallery", help="search: folder of gallery images (with --query)")
    p.add_argument("--topk", type=int, help="search: matches per query (default 10)")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (e.g. data_root=...)")
    p.add_argument("--onnx", metavar="FILE", help="evaluate this exported model (export.py) with onnxruntime on "
                   "the run's dataset, instead of the run's checkpoint")
    p.set_defaults(which_iter=None)  # None: not given, so the options that take no checkpoint can refuse it
    args = p.parse_args(_alpha_joined(sys.argv[1:] if argv is None else argv))
    if not args.name and not args.original and not args.features:
        p.error("give --name RUN (or --original DIR for the original release's files, or --features FILE)")
    args.which_iter_given, args.which_iter = args.which_iter is not None, args.which_iter or "last"
    args.topk_given, args.topk = args.topk is not None, 10 if args.topk is None else args.topk
    args.alphas, args.alpha = args.alpha, args.alpha[0]  # the sweep, and its headline value
    return args


def _alpha_joined(argv: Sequence[str]) -> list[str]:
    """`--alpha -1,0.5` as `--alpha=-1,0.5`: argparse takes a value that starts with '-' and is not a plain
    number for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--alpha" and re.fullmatch(r"-[\d.,eE+-]+", arg):
            out[-1] = f"--alpha={arg}"
        else:
            out.append(arg)
    return out


# ---------------------------------------------------------------------------------------------------------
# Scoring features with the protocol (features.py extracts them)
# ---------------------------------------------------------------------------------------------------------

def check_alpha_applies(args: argparse.Namespace, halves: bool) -> None:
    """--alpha weights DG-Net's fine-grained half: refused (before any extraction where it can be) for a
    feature of one part, which it would leave as it is."""
    if not halves and args.alphas != [0.5]:
        raise UserError("--alpha weights DG-Net's fine-grained half; this feature (a teacher's) has one part: "
                        "leave --alpha out")


def reranked_distances(qf: torch.Tensor, gf: torch.Tensor, halves: bool = False, alpha: float = 1.0,
                       device: torch.device | str = "cpu") -> np.ndarray:
    """The k-reciprocal re-ranked (Q, G) distances (rerank.py's defaults) of unweighted features, alpha
    applied to both sides (`weighted_both_sides`), the N x N neighbour pass on `device`."""
    from rerank import k_reciprocal_rerank  # only re-ranking needs scipy.sparse

    return k_reciprocal_rerank(*weighted_both_sides(qf, gf, halves, alpha), device=device)


def labels_of(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([r.pid for r in records], np.int64), np.array([r.camid for r in records], np.int64)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """R1/R5/R10/R20, mAP (the chosen AP convention), mINP, the query counts, both conventions' mAP
    (`mAP_market`, `mAP_precision`: the second number papers differ by) and the whole CMC curve (ranks 1 to
    50) of an evaluate_* result (CMC padded when short)."""
    cmc = np.pad(result["cmc"], (0, max(0, 20 - len(result["cmc"]))), mode="edge")
    return {"R1": float(cmc[0]), "R5": float(cmc[4]), "R10": float(cmc[9]), "R20": float(cmc[19]),
            "mAP": float(result["mAP"]), "mINP": float(result["mINP"]), "num_queries": result["num_queries"],
            "num_valid_queries": result["num_valid_queries"],
            **{f"mAP_{c}": float(result[f"mAP_{c}"]) for c in AP_CONVENTIONS},
            "cmc": [float(x) for x in result["cmc"]]}


def score(qf: torch.Tensor, gf: torch.Tensor, query: Sequence[Record], gallery: Sequence[Record], *,
          ap: str = "market", distmat: np.ndarray | None = None, device: torch.device | None = None,
          roc: Sequence[float] | None = None) -> dict[str, Any]:
    """The protocol's metrics for (already weighted) query features against gallery features, or for a given
    (Q, G) distance matrix such as the re-ranked one; `roc` (false-positive rates): with the verification
    rates at them (`verification`)."""
    (q_pids, q_cams), (g_pids, g_cams) = labels_of(query), labels_of(gallery)
    if distmat is not None:
        out = summarize(evaluate_distmat(distmat, q_pids, g_pids, q_cams, g_cams, ap=ap))
    else:
        out = summarize(evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, ap=ap, device=device))
    if roc:
        out["verification"] = verification_rates(qf, gf, q_pids, g_pids, q_cams, g_cams, roc, distmat, device)
    return out


def evaluate_model(model: torch.nn.Module, cfg: dict[str, Any], query_records: Sequence[Record],
                   gallery_records: Sequence[Record], device: torch.device, *, flip: bool = True,
                   alpha: float = 0.5, ap: str = "market", batch_size: int = 128,
                   label: str | None = None) -> dict[str, Any]:
    """Metrics (R1, R5, R10, mAP, mINP, num_queries, num_valid_queries) of a ReID model on query and gallery.

    For validation during training: the model is put in eval mode and given back in the mode it came in.
    """
    if not query_records or not gallery_records:
        raise UserError("evaluation needs query and gallery images; the split given is empty")
    training = model.training
    model.eval()
    try:
        qf = extract_features(model, cfg, query_records, device, flip=flip, batch_size=batch_size,
                              label=label and f"{label} query")
        gf = extract_features(model, cfg, gallery_records, device, flip=flip, batch_size=batch_size,
                              label=label and f"{label} gallery")
    finally:
        model.train(training)
    if not (torch.isfinite(qf).all() and torch.isfinite(gf).all()):  # training's validation: a diverged model
        raise NonFiniteState("the model's features hold NaN or infinity: it has diverged")
    return score(weight_query(qf, has_halves(model), alpha), gf, query_records, gallery_records, ap=ap,
                 device=device)


def compared(qf: torch.Tensor, gf: torch.Tensor, halves: bool, alpha: float, args: argparse.Namespace,
             device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
    """The query and gallery features that the options score at `alpha`, and the re-ranked (Q, G) distances
    (None without --rerank). --aqe expands both sides in the alpha-weighted space that re-ranking uses
    (`weighted_both_sides`: every pair scores s_prim + alpha s_fine), then re-ranking, if asked, runs on the
    expanded features (fast-reid's order)."""
    if args.aqe:
        q, g = alpha_query_expansion(*weighted_both_sides(qf, gf, halves, alpha), *aqe_settings(args), device)
        return q, g, reranked_distances(q, g, device=device or "cpu") if args.rerank else None
    distmat = reranked_distances(qf, gf, halves, alpha, device or "cpu") if args.rerank else None
    return weight_query(qf, halves, alpha), gf, distmat


def scores_by_alpha(qf: torch.Tensor, gf: torch.Tensor, query: Sequence[Record], gallery: Sequence[Record],
                    alphas: Sequence[float], args: argparse.Namespace, device: torch.device | None = None
                    ) -> dict[str, dict[str, Any]]:
    """The metrics at each alpha of a sweep, from one extraction of DG-Net's (unweighted) features: the
    original's evaluation reports 0, 0.5 and -1 side by side."""
    out = {}
    for alpha in alphas:
        q, g, distmat = compared(qf, gf, True, alpha, args, device)
        out[f"{alpha:g}"] = score(q, g, query, gallery, ap=args.ap, distmat=distmat, device=device, roc=args.roc)
    return out


def multi_query_features(qf: torch.Tensor, query: Sequence[Record], mqf: torch.Tensor,
                         multi: Sequence[Record]) -> tuple[torch.Tensor, int]:
    """Each query replaced by the mean multi-query feature of its pid and camera; (features, how many kept
    their own feature because no multi-query image shares their pid and camera)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, r in enumerate(multi):
        groups[(r.pid, r.camid)].append(i)
    out, missing = qf.clone(), 0
    for i, r in enumerate(query):
        members = groups.get((r.pid, r.camid))
        if members:
            out[i] = mqf[members].mean(0)
        else:
            missing += 1
    return out, missing


# ---------------------------------------------------------------------------------------------------------
# Outputs: features, rank lists
# ---------------------------------------------------------------------------------------------------------

def extraction_suffix(args: argparse.Namespace) -> str:
    """The part of a file's name that the options of feature extraction make: `_noflip`, `_ms<s>[_<t>...]`
    (when not 1); "" for the defaults. Saved features carry it, so other features never replace the default
    ones."""
    ms = "_ms" + listed(args.ms, "_")
    return "".join(part for part, on in (("_noflip", not args.flip), (ms, args.ms != [1.0])) if on)


def options_suffix(args: argparse.Namespace, halves: bool) -> str:
    """The part of a results file's name that the options make: `extraction_suffix`'s, `_alpha<a>[_<b>...]`
    (DG-Net, when not the default 0.5), `_ap-precision`, `_multi`, `_aqe[<k>-<alpha>]` (the numbers when not 5
    and 3), `_rerank`; "" for the defaults. So results of other options are written beside the default ones,
    never over them."""
    alphas = "_alpha" + listed(args.alphas, "_") if halves and args.alphas != [0.5] else ""
    k, alpha = aqe_settings(args)
    aqe = "_aqe" + ("" if (k, alpha) == (DEFAULT_K, DEFAULT_ALPHA) else f"{k}-{alpha:g}")
    return extraction_suffix(args) + "".join(
        part for part, on in ((alphas, bool(alphas)), (f"_ap-{args.ap}", args.ap != "market"),
                              ("_multi", args.multi), (aqe, args.aqe), ("_rerank", args.rerank)) if on)


def option_fields(args: argparse.Namespace, halves: bool) -> dict[str, Any]:
    """The scoring options a results file records."""
    return {"ap": args.ap, "alpha": args.alpha if halves else None, "multi": args.multi, "rerank": args.rerank,
            "aqe": dict(zip(("k", "alpha"), aqe_settings(args))) if args.aqe else None}


def file_name_part(name: str) -> str:
    """A folder's name as part of a results file's name: runs of other characters than letters, digits and
    `._-` become one `-`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def other_data_tag(cfg: dict[str, Any], trained: dict[str, Any]) -> str:
    """"" when `cfg` evaluates on the data the run trained on, with its protocol, else what differs:
    "_on-<data_root's folder name>" (another dataset: cross-dataset evaluation), "_labeled" or "_detected"
    (CUHK03-NP's other boxes), "_samecam" or "_crosscam" (cross_camera off or on, against the run's). So such
    results are written beside the run's own instead of over them."""
    def where(c: dict[str, Any]) -> tuple[str, Path]:
        return c.get("dataset", ""), dataset_folder(c.get("dataset", ""), str(c.get("data_root", "")))

    tag = ""
    if where(cfg) != where(trained):
        tag = "_on-" + (file_name_part(where(cfg)[1].name) or cfg["dataset"])
    if cfg.get("dataset") == "cuhk03" and cfg.get("cuhk03_labeled", False) != trained.get("cuhk03_labeled", False):
        tag += "_labeled" if cfg.get("cuhk03_labeled") else "_detected"
    if cfg.get("cross_camera", True) != trained.get("cross_camera", True):
        tag += "_crosscam" if cfg.get("cross_camera", True) else "_samecam"
    return tag


def save_features(results: Path, stem: str, parts: dict[str, tuple[torch.Tensor, Sequence[Record]]],
                  tag: str = "") -> list[Path]:
    """features_<stem><tag>.npz (with paths; stem: the iteration, 8 digits) and pytorch_result<tag>.mat (the
    original's keys) from {"query": (features, records), "gallery": ..., optionally "mquery": ...}."""
    import scipy.io  # only here: saving .mat

    arrays: dict[str, np.ndarray] = {}
    for split, (f, records) in parts.items():
        pids, cams = labels_of(records)
        arrays.update({f"{split}_f": f.numpy(), f"{split}_label": pids, f"{split}_cam": cams})
    npz = results / f"features_{stem}{tag}.npz"
    paths = {f"{split}_path": np.array([r.path for r in records]) for split, (_, records) in parts.items()}
    np.savez(npz, **arrays, **paths)
    mat = results / f"pytorch_result{tag}.mat"
    scipy.io.savemat(mat, arrays)
    return [npz, mat]


def ranked_gallery(qf: torch.Tensor, gf: torch.Tensor, query: Sequence[Record], gallery: Sequence[Record],
                   rows: Sequence[int], k: int, distmat: np.ndarray | None = None) -> list[np.ndarray]:
    """For each query row, the top k gallery indices of the protocol's ranking (junk removed): by cosine
    distance, or by the rows of `distmat` (the re-ranked distances) when given."""
    if not rows:
        return []
    g_pids, g_cams = labels_of(gallery)
    if distmat is not None:
        dist_rows = np.asarray(distmat)[list(rows)]
    else:  # rows are the few queries a rank list shows: their distances fit in memory
        dist_rows = np.concatenate([d.cpu().numpy() for _, d in cosine_distance_chunks(qf[list(rows)], gf, chunk=256)])
    out = []
    for q, d in zip(rows, dist_rows):
        junk = (g_pids == JUNK_PID) | ((g_pids == query[q].pid) & (g_cams == query[q].camid))
        order = np.argsort(np.where(junk, np.inf, d), kind="stable")
        out.append(order[: min(k, int((~junk).sum()))])
    return out


def _tile(path: str, size: tuple[int, int], colour: tuple[int, int, int], border: int = 4):
    from PIL import ImageOps

    img = read_image(path).resize((size[1], size[0]))
    return ImageOps.expand(img, border=border, fill=colour)


def write_ranklists(out_dir: Path, qf: torch.Tensor, gf: torch.Tensor, query: Sequence[Record],
                    gallery: Sequence[Record], k: int, num_queries: int = 20,
                    size: tuple[int, int] = (128, 64), distmat: np.ndarray | None = None) -> list[Path]:
    """One image per query: the query (grey border), then its top k (green: same identity, red: not), ranked
    by `distmat` when given (the re-ranked distances), else by cosine distance."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    count = len(query) if num_queries <= 0 else min(num_queries, len(query))
    rows = sorted({int(i) for i in np.linspace(0, len(query) - 1, count)}) if count else []
    written = []
    for q, top in zip(rows, ranked_gallery(qf, gf, query, gallery, rows, k, distmat)):
        tiles = [_tile(query[q].path, size, (128, 128, 128))]
        tiles += [_tile(gallery[g].path, size, (0, 170, 0) if gallery[g].pid == query[q].pid else (210, 0, 0))
                  for g in top]
        w, h = tiles[0].size
        gap = 6  # between tiles; twice that after the query
        sheet = Image.new("RGB", (len(tiles) * (w + gap) + gap, h), (255, 255, 255))
        for i, t in enumerate(tiles):
            sheet.paste(t, (i * (w + gap) + (gap if i else 0), 0))
        path = out_dir / f"query{q:05d}_pid{query[q].pid}_c{query[q].camid}.jpg"
        sheet.save(path, quality=90)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------
# Search API
# ---------------------------------------------------------------------------------------------------------

class Predictor:
    """A trained run as an embedder and searcher of image files.

        p = Predictor.from_run("latest")
        hits = p.search(query_paths, gallery_paths, topk=10)   # [{"query": path, "matches": [...]}]
    """

    def __init__(self, model: torch.nn.Module, cfg: dict[str, Any], device: torch.device | None = None, *,
                 flip: bool = True, scales: Sequence[float] = (1.0,), alpha: float = 0.5, batch_size: int = 128,
                 iteration: int | None = None):
        check_scales(scales, image_size(cfg), cfg.get("scale2", False))
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.cfg, self.flip, self.scales, self.alpha, self.batch_size = cfg, flip, tuple(scales), alpha, batch_size
        self.iteration = iteration  # the checkpoint's, when loaded from a run

    @classmethod
    def from_run(cls, name: str, output_path: str = ".", which_iter: str = "last", **kwargs: Any) -> Predictor:
        state, cfg, _ = load_run(name, output_path, which_iter)
        device = kwargs.pop("device", None) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(load_model(state, cfg, device), cfg, device, iteration=state["iteration"], **kwargs)

    def embed(self, paths: Sequence[str], label: str | None = None) -> torch.Tensor:
        """Normalized features (N, D) of image files, as the evaluation computes them (query weighting aside)."""
        records = [Record(str(p), 0, 0) for p in paths]
        return extract_features(self.model, self.cfg, records, self.device, flip=self.flip, scales=self.scales,
                                batch_size=self.batch_size, label=label)

    def search(self, query: Sequence[str], gallery: Sequence[str], topk: int = 10,
               label: bool = False) -> list[dict[str, Any]]:
        """Per query, its top-k gallery images by cosine similarity (the query weighted by alpha for DG-Net)."""
        qf = weight_query(self.embed(query, "query" if label else None), has_halves(self.model), self.alpha)
        gf = self.embed(gallery, "gallery" if label else None)
        results = []
        for s, dist in cosine_distance_chunks(qf, gf, chunk=256):
            sim = -dist
            top = torch.topk(sim, min(topk, len(gallery)), dim=1)  # ties: any order among equal scores
            for j in range(len(sim)):
                matches = [{"path": str(gallery[g]), "score": round(float(v), 6)}
                           for v, g in zip(top.values[j].tolist(), top.indices[j].tolist())]
                results.append({"query": str(query[s + j]), "matches": matches})
        return results


def _folder_images(folder: str, what: str) -> list[str]:
    """Image files in `folder` and its subfolders (per-identity layouts), sorted."""
    if Path(folder).is_file():
        raise UserError(f"--{what} {folder} is a file: give the folder that holds the {what} images")
    if not Path(folder).is_dir():
        raise UserError(f"--{what} {folder}: no such folder")
    paths = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and is_image_name(p.name))
    if not paths:
        raise UserError(f"--{what} {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or its subfolders")
    return paths


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    if not (args.query and args.gallery):
        raise UserError("search needs both --query DIR and --gallery DIR")
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    if len(args.alphas) > 1:
        raise UserError("search ranks with one --alpha; give a single value (a sweep is for evaluation)")
    if args.multi or args.rerank or args.aqe or args.roc or args.ranklist or args.ap != "market":
        raise UserError("search ranks by cosine similarity: leave out --multi, --rerank, --aqe, --roc, --ranklist and "
                        "--ap (they are for evaluation on a dataset; a search's JSON lists each query's top --topk)")
    if args.config or args.data_root or args.opts:
        raise UserError("search ranks the --query and --gallery folders with the run's own model and config: leave "
                        "out --config, --data_root and --opts")
    query, gallery = _folder_images(args.query, "query"), _folder_images(args.gallery, "gallery")
    predictor = Predictor.from_run(args.name, args.output_path, args.which_iter, flip=args.flip, scales=args.ms,
                                   alpha=args.alpha, batch_size=args.batch_size)
    results = predictor.search(query, gallery, args.topk, label=True)
    # Named by what it searched and how (the evaluation options are refused above, so only the extraction's and
    # alpha name it), so another search is written beside it, never over it
    folders = "-in-".join(file_name_part(Path(f).resolve().name) for f in (args.query, args.gallery))
    halves = has_halves(predictor.model)
    out = (run_folder(args.output_path, args.name) / "results" /
           f"search_{predictor.iteration:08d}_{folders}{options_suffix(args, halves)}.json")

    def write() -> list[Path]:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"query": args.query, "gallery": args.gallery, "iteration": predictor.iteration,
                                   "topk": args.topk, "flip": args.flip, "ms": args.ms,
                                   **({"alpha": args.alpha} if halves else {}), "results": results}, indent=2) + "\n")
        return [out]

    return {"results": results, "write": write}


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------

def _check_args(args: argparse.Namespace) -> None:
    for alpha in args.alphas:
        check_alpha(alpha)
    check_once(args.alphas, "--alpha")
    check_scales(args.ms)
    if args.roc:
        check_fprs(args.roc)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.ranklist < 0:
        raise UserError(f"--ranklist K needs K >= 1, got {args.ranklist}")
    if not args.aqe and (args.aqe_k is not None or args.aqe_alpha is not None):
        raise UserError("--aqe_k and --aqe_alpha set the expansion of --aqe: add --aqe")
    if args.aqe:
        check_expansion(*aqe_settings(args))


def aqe_settings(args: argparse.Namespace) -> tuple[int, float]:
    """--aqe's (k, alpha): the ones given, else the defaults."""
    return (DEFAULT_K if args.aqe_k is None else args.aqe_k,
            DEFAULT_ALPHA if args.aqe_alpha is None else args.aqe_alpha)


@dataclass
class Evaluated:
    """The model under evaluation and where its results go."""

    kind: str  # DGNet or baseline
    iteration: int | None  # None: an original baseline teacher, which saved no iteration
    cfg: dict[str, Any]
    run_dir: Path  # results/ goes here
    model: torch.nn.Module
    trained_on: dict[str, Any]  # the run's own config (for other_data_tag); {} for original files, which do
    # not say what they trained on, so their results always name the data
    stem: str  # results' file names: <iteration, 8 digits> for a run, original_<...> for original files


def load_evaluated(args: argparse.Namespace, opts: list[str], device: torch.device) -> Evaluated:
    """A run of this project (--name), or the original release's files (--original DIR)."""
    if args.original:
        return load_original_model(args, opts, device)
    state, cfg, run_dir = load_run(args.name, args.output_path, args.which_iter, args.config, opts)
    return Evaluated(state["kind"], state["iteration"], cfg, run_dir, load_model(state, cfg, device),
                     saved_config(state["config"]), f"{state['iteration']:08d}")


def load_original_model(args: argparse.Namespace, opts: list[str], device: torch.device) -> Evaluated:
    """The original DG-Net's E_a (a folder with config.yaml, gen_/id_<iteration>.pt) or the original baseline
    teacher (net_last.pth and opts.yaml, or the .pth), evaluated on --data_root / --opts (the original's own
    data_root is its per-identity copy, `dataset: folder`); results go to outputs/<--name or its name>/."""
    import original

    path = Path(args.original).expanduser()
    if not path.exists():
        raise UserError(f"--original {path}: no such folder or file")
    if args.which_iter in ("all", "best"):
        raise UserError(f"--which_iter {args.which_iter} is for runs of this project; with --original give an "
                        "iteration number or last")
    # a folder by its name; a file (net_59.pth) by its folder's and its own, so two epochs' files stay apart
    default = path.resolve().name if path.is_dir() else f"{path.resolve().parent.name}_{path.stem}"
    run_dir = run_folder(args.output_path, args.name or default)
    if original.is_baseline(path):
        cfg = load_config(args.config, opts)  # the data and image size; the network is the file's
        model = original.baseline_teacher(path, cfg["scale2"])
        return Evaluated("baseline", None, cfg, run_dir, model.to(device).eval(), {}, "original_baseline")
    if args.config:
        raise UserError("--config does not apply to the original DG-Net's folder (its config.yaml sets the "
                        "networks); give the data with --data_root or --opts dataset=... data_root=...")
    config, checkpoints = original.locate(path)
    cfg = original.original_config(config, opts)
    iteration, _, id_path = original.checkpoint_files(checkpoints, args.which_iter)
    model = original.appearance_encoder(cfg, id_path)
    return Evaluated("DGNet", iteration, cfg, run_dir, model.to(device).eval(), {}, f"original_{iteration:08d}")


def evaluate_run(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[], list[Path]]]:
    """The metrics of a run, and the function that writes them with the features (and rank lists)."""
    _check_args(args)
    opts = list(args.opts) + ([f"data_root={args.data_root}"] if args.data_root else [])
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    evaluated = load_evaluated(args, opts, device)
    cfg, model = evaluated.cfg, evaluated.model
    splits = load_splits(cfg, evaluation_only=True)
    if not splits.query or not splits.gallery:
        raise UserError(f"{splits.name} at {cfg['data_root']} has no query or gallery images to evaluate on")
    check_scales(args.ms, image_size(cfg), cfg.get("scale2", False))  # before the features are extracted
    if args.aqe:
        check_expansion(*aqe_settings(args), len(splits.gallery))
    if args.multi and not cfg["cross_camera"]:
        raise UserError("--multi averages each query's identity and camera, which cross_camera: false leaves out; "
                        "evaluate without --multi")
    if args.multi and not splits.multi_query:
        raise UserError(f"--multi: {splits.name} at {splits.root} has no multi-query images (Market-1501's "
                        "gt_bbox/ or a multi-query/ folder in the per-identity layout); evaluate without --multi")
    halves = has_halves(model)
    check_alpha_applies(args, halves)

    def features(records: Sequence[Record], what: str) -> torch.Tensor:
        return extract_features(model, cfg, records, device, flip=args.flip, scales=args.ms,
                                batch_size=args.batch_size, label=what)

    qf, gf = features(splits.query, "query"), features(splits.gallery, "gallery")
    parts = {"query": (qf, splits.query), "gallery": (gf, splits.gallery)}
    summary: dict[str, Any] = {"run": evaluated.run_dir.name, "kind": evaluated.kind,
                               "iteration": evaluated.iteration, "original": args.original,
                               "dataset": splits.name, "variant": splits.variant or None,
                               "data_root": str(cfg["data_root"]), "flip": args.flip, "ms": args.ms,
                               **option_fields(args, halves),
                               "cross_camera": cfg["cross_camera"]}
    if args.multi:
        parts["mquery"] = (features(splits.multi_query, "multi-query"), splits.multi_query)
    scores, (query_f, gallery_f), distmat = protocol_scores(qf, gf, splits.query, splits.gallery, halves, args,
                                                            device, parts.get("mquery"))
    summary.update(scores)

    def write(results: Path) -> list[Path]:
        results.mkdir(parents=True, exist_ok=True)
        tag = other_data_tag(cfg, evaluated.trained_on)
        suffix = tag + options_suffix(args, halves)
        out = results / f"{evaluated.stem}{suffix}.json"
        out.write_text(json.dumps(summary, indent=2) + "\n")
        files = [out, *save_features(results, evaluated.stem, parts, tag + extraction_suffix(args))]
        if args.ranklist:
            files.append(results / f"ranklist_{evaluated.stem}{suffix}")
            write_ranklists(files[-1], query_f, gallery_f, splits.query, splits.gallery, args.ranklist,
                            args.ranklist_queries, distmat=distmat)
        return files

    return summary, lambda: write(evaluated.run_dir / "results")


def protocol_scores(qf: torch.Tensor, gf: torch.Tensor, query: Sequence[Record], gallery: Sequence[Record],
                    halves: bool, args: argparse.Namespace, device: torch.device,
                    mquery: tuple[torch.Tensor, Sequence[Record]] | None = None
                    ) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor], np.ndarray | None]:
    """The metrics of (unweighted) query against gallery features as the options ask: `mquery` (--multi's
    images) replaces each query by its identity and camera's mean, --aqe, --rerank, --alpha (a sweep in
    `by_alpha`). Returns (metrics, the (query, gallery) features scored, the re-ranked distances or None),
    the last two for the rank lists, which share them."""
    out: dict[str, Any] = {}
    if mquery is not None:
        qf, out["multi_query_missing"] = multi_query_features(qf, query, *mquery)
    others = scores_by_alpha(qf, gf, query, gallery, args.alphas[1:], args, device) if halves else {}
    q, g, distmat = compared(qf, gf, halves, args.alpha, args, device)
    metrics = score(q, g, query, gallery, ap=args.ap, distmat=distmat, device=device, roc=args.roc)
    out.update(metrics)
    if others:
        out["by_alpha"] = {f"{args.alpha:g}": metrics, **others}
    return out, (q, g), distmat


def _saved_arrays(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".mat":
            import scipy.io

            return scipy.io.loadmat(path)
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as err:  # a truncated zip, a text file, a pickled array: whatever numpy and scipy raise
        raise UserError(f"--features {path}: not a readable .npz or .mat ({one_line(err)[:120]})") from None


def load_saved_features(path: Path) -> dict[str, tuple[torch.Tensor, list[Record]]]:
    """{"query": (features, records), "gallery": ..., "mquery": ... when present} from test.py's
    features_<it>.npz or a pytorch_result.mat (this project's or the original's: the same keys, labels and
    cameras as 1 x N rows; the original wrote its multi-query features to a multi_query.mat beside it, read
    too). Records carry the saved paths where there are any, else ""."""
    if not path.is_file():
        raise UserError(f"--features {path}: no such file")
    if path.suffix not in (".npz", ".mat"):
        raise UserError(f"--features {path}: give saved features, a features_<iteration>.npz or a "
                        "pytorch_result.mat (results/ holds them)")
    arrays = _saved_arrays(path)
    beside = path.with_name("multi_query.mat")
    if "mquery_f" not in arrays and path.suffix == ".mat" and beside.is_file():
        arrays = {**_saved_arrays(beside), **arrays}
    parts = {}
    for split in ("query", "gallery", "mquery"):
        keys = [f"{split}_f", f"{split}_label", f"{split}_cam"]
        if not all(k in arrays for k in keys):
            continue
        f = torch.as_tensor(np.asarray(arrays[keys[0]], np.float32))
        pids, cams = (np.asarray(arrays[k]).ravel().astype(np.int64) for k in keys[1:])
        paths = [str(x).strip() for x in np.asarray(arrays.get(f"{split}_path", [""] * len(pids))).ravel()]
        if f.ndim != 2 or not len(f) == len(pids) == len(cams) == len(paths):
            raise UserError(f"--features {path}: {split}_f, _label and _cam do not describe the same images")
        parts[split] = (f, [Record(p, int(pid), int(cam)) for p, pid, cam in zip(paths, pids, cams)])
    if "query" not in parts or "gallery" not in parts:
        raise UserError(f"--features {path}: needs query_f, query_label, query_cam and the same for gallery "
                        "(as test.py writes them)")
    widths = {split: f.shape[1] for split, (f, _) in parts.items()}
    if len(set(widths.values())) > 1:
        raise UserError(f"--features {path}: the features differ in width ({widths}); they must come from one model")
    return parts


def evaluate_saved(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[], list[Path]]]:
    """`--features FILE`: saved features scored again, with other options and no model or images (a 1,024-d
    feature is DG-Net's two halves); the metrics go beside the file as <stem>_scores<options_suffix>.json."""
    _check_args(args)
    if not args.flip or args.ms != [1.0]:
        raise UserError("--features scores features extracted already: leave out --no-flip and --ms (they choose "
                        "how test.py extracts them)")
    path = Path(args.features)
    parts = load_saved_features(path)
    if args.multi and "mquery" not in parts:
        raise UserError(f"--multi: {path} holds no multi-query features (mquery_*); evaluate without --multi")
    (qf, query), (gf, gallery) = parts["query"], parts["gallery"]
    halves = qf.shape[1] == 2 * HALF
    check_alpha_applies(args, halves)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    scores, _, _ = protocol_scores(qf, gf, query, gallery, halves, args, device,
                                   parts.get("mquery") if args.multi else None)
    summary = {"features": str(path), "kind": "DGNet" if halves else f"{qf.shape[1]}-d features",
               **option_fields(args, halves), **scores}

    def write() -> list[Path]:
        suffix = options_suffix(args, halves)
        out = path.with_name(f"{path.stem}_scores{suffix}.json")
        out.write_text(json.dumps(summary, indent=2) + "\n")
        return [out]

    return summary, write


def write_results(write: Callable[[], list[Path]]) -> list[Path] | None:
    """Run the deferred writes of `evaluate_run` after the metrics were printed; say what was written (and
    return it) or, in one line, what could not be (None: the metrics on the screen are the work that remains)."""
    try:
        files = write()
    except OSError as err:
        where = err.filename or "the results folder"
        print(f"error: could not write {where} ({err.strerror or err}); the metrics above were not saved: make the "
              "run's results/ folder writable and run test.py again", file=sys.stderr)
        return None
    for f in files:
        print(f"written: {f}")
    return files


CURVE_METRICS = ("R1", "R5", "R10", "mAP", "mINP", "mAP_market", "mAP_precision")


def evaluate_every_checkpoint(args: argparse.Namespace) -> int:
    """`--which_iter all`: each snapshot of the run in turn, evaluated and written as `--which_iter N` would
    be, then the metrics over iterations as a table and `results/curve[...].json` (with the suffix the
    per-iteration results carry: `_on-<folder>` and the options', as `options_suffix` names them)."""
    run_dir = run_folder(args.output_path, args.name)
    iterations = [it for it, _ in list_checkpoints(run_dir)]
    if not iterations:
        find_checkpoint(run_dir, "last")  # says why there is none
    rows, written = [], None
    for it in iterations:
        summary, write = evaluate_run(argparse.Namespace(**{**vars(args), "which_iter": str(it)}))
        print_summary(summary)
        written = write_results(write)
        if written is None:
            return 2
        rows.append({"iteration": it, **{k: summary[k] for k in CURVE_METRICS}})
    print("| iteration | " + " | ".join(f"{m:>6}" for m in METRICS) + " |")
    print("|-----------|" + "|".join("-" * 8 for _ in METRICS) + "|")
    for r in rows:
        print(f"| {r['iteration']:>9} | " + " | ".join(f"{100 * r[m]:6.2f}" for m in METRICS) + " |")
    suffix = written[0].name[8:-len(".json")]  # the metrics file is <iteration, 8 digits><suffix>.json
    curve = written[0].parent / f"curve{suffix}.json"
    try:
        options = {k: summary[k] for k in ("flip", "ms", "ap", "alpha", "multi", "rerank", "aqe")}
        curve.write_text(json.dumps({"run": args.name, **options, "rows": rows}, indent=2) + "\n")
    except OSError as err:
        print(f"error: could not write {curve} ({err.strerror or err})", file=sys.stderr)
        return 2
    print(f"written: {curve}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# An exported model
# ---------------------------------------------------------------------------------------------------------

def onnx_features(exported: Any, cfg: dict[str, Any], records: Sequence[Record], *, batch_size: int = 128,
                  label: str | None = None) -> torch.Tensor:
    """The features an exported model (export.OnnxReID) gives for `records`, fed by test.py's loader."""
    loader = build_test_loader(cfg, records, batch_size)
    progress = Progress(len(records), label)
    feats = []
    for batch in loader:
        feats.append(torch.from_numpy(exported.features(batch["image"])))
        progress.update(len(batch["image"]))
    return torch.cat(feats) if feats else torch.empty(0, int(exported.metadata["feature_dim"]))


def evaluate_onnx(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[], list[Path]]]:
    """test.py's protocol on an exported model instead of the run's checkpoint: the dataset comes from the
    run's config (or --config, --data_root, --opts), the input size, flip, scales and feature from the file.
    Results: <iteration>_onnx[_on-<data>][<options>].json, the file's flip and scales among the options."""
    from export import OnnxReID  # onnxruntime is optional: only --onnx needs it

    _check_args(args)
    if args.multi or args.rerank or args.aqe or args.ranklist or args.query or args.gallery:
        raise UserError("--onnx evaluates query against gallery at the exported size: leave out --multi, --rerank, "
                        "--aqe, --ranklist, --query and --gallery")
    exported = OnnxReID(args.onnx)
    if exported.metadata.get("run") != args.name:  # its results would be filed under another run
        raise UserError(f"{args.onnx} was exported from run {exported.metadata.get('run')!r}, not {args.name!r}: "
                        f"evaluate it with --name {exported.metadata.get('run')}")
    if not args.flip and exported.flip:
        raise UserError(f"--no-flip: {args.onnx} computes the flipped image in its graph; export with "
                        "python export.py --no-flip for that feature")
    if args.ms != [1.0] and args.ms != exported.scales:
        raise UserError(f"--ms: {args.onnx} sums the scales {listed(exported.scales)} in its "
                        "graph; export with python export.py --ms for other scales")
    args.flip, args.ms = exported.flip, exported.scales  # what the file computes names the results
    check_alpha_applies(args, exported.halves)
    run_dir = run_folder(args.output_path, args.name)
    own_file = run_dir / "config.yaml"
    cfg_file = Path(args.config) if args.config else own_file
    if not cfg_file.is_file():
        raise UserError(f"no config {cfg_file}: give the run the file was exported from (--name) or --config")
    opts = list(args.opts) + ([f"data_root={args.data_root}"] if args.data_root else [])
    cfg = load_config(cfg_file, opts)
    # against the data the run trained on (unknown without its config.yaml: then tagged, never written over)
    tag = other_data_tag(cfg, load_config(own_file, []) if own_file.is_file() else {})
    cfg["crop_image_height"], cfg["crop_image_width"] = exported.size  # the size the graph takes
    splits = load_splits(cfg, evaluation_only=True)
    if not splits.query or not splits.gallery:
        raise UserError(f"{splits.name} at {cfg['data_root']} has no query or gallery images to evaluate on")
    qf = onnx_features(exported, cfg, splits.query, batch_size=args.batch_size, label="query")
    gf = onnx_features(exported, cfg, splits.gallery, batch_size=args.batch_size, label="gallery")
    meta = exported.metadata
    iteration = int(meta["iteration"])
    summary: dict[str, Any] = {"run": args.name, "kind": meta["kind"], "iteration": iteration, "onnx": args.onnx,
                               "dataset": splits.name, "variant": splits.variant or None,
                               "data_root": str(cfg["data_root"]), "flip": exported.flip, "ms": exported.scales,
                               **option_fields(args, exported.halves), "cross_camera": cfg["cross_camera"]}
    summary.update(protocol_scores(qf, gf, splits.query, splits.gallery, exported.halves, args,
                                   torch.device("cpu"))[0])

    def write() -> list[Path]:
        out = run_dir / "results" / f"{iteration:08d}_onnx{tag}{options_suffix(args, exported.halves)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        return [out]

    return summary, write


def print_summary(s: dict[str, Any]) -> None:
    aqe = s.get("aqe")
    ms = s.get("ms", [1.0])
    extras = [x for x, on in (("no flip", not s.get("flip", True)),
                              (f"multi-scale ({listed(ms, ', ')})", ms != [1.0]),
                              ("multi-query", s["multi"]),
                              (aqe and f"alpha-query-expanded (k {aqe['k']}, alpha {aqe['alpha']:g})", aqe),
                              ("re-ranked", s["rerank"]),
                              ("same-camera matches counted (cross_camera: false)", not s.get("cross_camera", True)))
              if on]
    on = f"{s.get('dataset')} ({s['variant']})" if s.get("variant") else s.get("dataset")
    if s.get("features"):
        head = f"the features in {s['features']} ({s['kind']})"
    else:
        what = f"iteration {s['iteration']}" if s["iteration"] is not None else "its net_last.pth"
        source = f", the original's files in {s['original']}" if s.get("original") else ""
        head = f"{s['run']} ({s['kind']}, {what}{source}) on {on}"
    print(f"{head}: {s['num_valid_queries']}/{s['num_queries']} queries with a match, AP convention {s['ap']}"
          + (f", {', '.join(extras)}" if extras else ""))
    print("| " + " | ".join(f"{m:>6}" for m in METRICS) + " |")
    print("|" + "|".join("-" * 8 for _ in METRICS) + "|")
    print("| " + " | ".join(f"{100 * s[m]:6.2f}" for m in METRICS) + " |")
    other = next(c for c in AP_CONVENTIONS if c != s["ap"])
    print(f"mAP under the other AP convention ({other}): {100 * s[f'mAP_{other}']:.2f}; R20 {100 * s['R20']:.2f}")
    if s.get("verification"):
        print(verification_line(s["verification"]))
    if s.get("by_alpha"):
        print("by alpha (the fine-grained half's weight on the query; -1: that half alone):")
        print("| alpha  | " + " | ".join(f"{m:>6}" for m in METRICS) + " |")
        print("|" + "|".join("-" * 8 for _ in range(len(METRICS) + 1)) + "|")
        for alpha, m in s["by_alpha"].items():
            print(f"| {alpha:>6} | " + " | ".join(f"{100 * m[metric]:6.2f}" for metric in METRICS) + " |")
    if s.get("multi_query_missing"):
        print(f"{s['multi_query_missing']} queries had no multi-query image of their identity and camera and "
              "kept their own feature")


def verification_line(v: dict[str, Any]) -> str:
    """--roc's rates in one line: TPR at each FPR, the AUC, and the pairs they count."""
    rates = ", ".join(f"{100 * r['tpr']:.2f} % at FPR {f}" if r else f"none at FPR {f}"
                      for f, r in v["rates"].items())
    auc = f", AUC {100 * v['curve']['auc']:.2f} %" if v.get("curve") else ""
    return (f"verification: TPR {rates}{auc} ({v['positive_pairs']:,} positive and {v['negative_pairs']:,} "
            "negative query-gallery pairs)")


def report(summary: dict[str, Any], write: Callable[[], list[Path]]) -> int:
    """Print the metrics, then write them (first the screen: the metrics are not lost when the results folder
    cannot be written); the exit code."""
    print_summary(summary)
    sys.stdout.flush()
    return 0 if write_results(write) is not None else 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.which_iter_given and (args.onnx or args.features):
            raise UserError(f"{'--onnx' if args.onnx else '--features'} holds the iteration it was made from: "
                            "leave out --which_iter")
        if args.topk_given and not (args.query or args.gallery):
            raise UserError("--topk is for search (--query DIR --gallery DIR); for rank-list images of the "
                            "dataset's queries, --ranklist K")
        if args.features:
            if (args.original or args.onnx or args.query or args.gallery or args.ranklist or args.config
                    or args.data_root or args.opts):
                raise UserError("--features scores saved features alone: leave out --original, --onnx, --query, "
                                "--gallery, --ranklist, --config, --data_root and --opts")
            return report(*evaluate_saved(args))
        if args.original and (args.onnx or args.query or args.gallery or args.which_iter == "all"):
            raise UserError("--original evaluates the original's files on the data's query and gallery: leave out "
                            "--onnx, --query, --gallery and --which_iter all")
        if args.onnx:
            summary, write = evaluate_onnx(args)
            print(f"exported model {args.onnx}, run by onnxruntime on the CPU")
            return report(summary, write)
        if args.query or args.gallery:
            found = run_search(args)
            for r in found["results"]:
                print(r["query"])
                for m in r["matches"]:
                    print(f"  {m['score']:.4f}  {m['path']}")
            sys.stdout.flush()
            return 0 if write_results(found["write"]) is not None else 2
        if args.which_iter == "all":
            return evaluate_every_checkpoint(args)
        return report(*evaluate_run(args))
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
