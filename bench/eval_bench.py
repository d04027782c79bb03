"""Evaluation speed and memory: our exact CPU path against a straightforward reference that sorts every row.

    python bench/eval_bench.py                 # Market and MSMT17 sizes, every case (minutes on 2 cores)
    python bench/eval_bench.py --quick         # small sizes, a smoke test
    python bench/eval_bench.py --cases market-distmat market-distmat-reference
    python bench/eval_bench.py --device cuda --dim 1024 --cases market-rerank msmt-features msmt-rerank
    python bench/eval_bench.py --cases market-features market-aqe    # alpha-query expansion's cost
    python bench/eval_bench.py --cases market-roc msmt-roc            # test.py --roc: TPR@FPR over all pairs

Each case runs in its own subprocess, so its peak resident memory (ru_maxrss) is its own: the figure
includes Python, torch and the synthetic features (`base` is the peak before the timed part). Features are
synthetic: identity centres plus per-image and per-camera noise, tuned to a realistic mAP; `worst` cases use
features without identity structure, where every negative can outrank the last good match. Prints a table
and writes JSON to bench/results/eval_bench.json (eval_bench_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluate import JUNK_PID, cosine_distance_chunks, evaluate_distmat, evaluate_features  # noqa: E402

# (queries, gallery, identities, cameras, distractors in the gallery)
SIZES = {"market": (3368, 15913, 751, 6, 2793), "msmt": (11659, 82161, 3060, 15, 0),
         "quick": (300, 1500, 60, 6, 200)}
CASES = {  # name: (size, what, method)
    "market-distmat": ("market", "distmat", "ours"),
    "market-distmat-reference": ("market", "distmat", "reference"),
    "market-distmat-worst": ("market", "distmat-worst", "ours"),
    "market-features": ("market", "features", "ours"),
    "market-rerank": ("market", "features", "rerank"),
    "market-aqe": ("market", "features", "aqe"),
    "market-roc": ("market", "features", "roc"),
    "msmt-features": ("msmt", "features", "ours"),
    "msmt-features-reference": ("msmt", "features", "reference"),
    "msmt-rerank": ("msmt", "features", "rerank"),
    "msmt-aqe": ("msmt", "features", "aqe"),
    "msmt-roc": ("msmt", "features", "roc"),
}
QUICK_CASES = {"quick-distmat": ("quick", "distmat", "ours"),
               "quick-distmat-reference": ("quick", "distmat", "reference"),
               "quick-features": ("quick", "features", "ours"), "quick-rerank": ("quick", "features", "rerank"),
               "quick-aqe": ("quick", "features", "aqe"), "quick-roc": ("quick", "features", "roc")}


def synthetic(size: str, dim: int, structured: bool = True, seed: int = 0):
    """Query and gallery features and labels at a dataset's size (float32, built in pieces to stay small)."""
    nq, ng, ids, cams, distractors = SIZES[size]
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids + 1, dim)).astype(np.float32)
    cam_bias = 0.5 * rng.normal(size=(cams + 1, dim)).astype(np.float32)
    q_pids = rng.integers(1, ids + 1, nq)
    g_pids = np.concatenate([rng.integers(1, ids + 1, ng - distractors), np.zeros(distractors, np.int64)])
    q_cams, g_cams = rng.integers(1, cams + 1, nq), rng.integers(1, cams + 1, ng)

    def features(pids, camids):
        out = np.empty((len(pids), dim), np.float32)
        for s in range(0, len(pids), 8192):
            noise = rng.normal(size=(len(pids[s:s + 8192]), dim)).astype(np.float32)
            if structured:
                noise = 1.8 * noise + centres[pids[s:s + 8192]] + cam_bias[camids[s:s + 8192]]
            out[s:s + 8192] = noise
        return torch.from_numpy(out)

    return features(q_pids, q_cams), features(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


def reference_distmat(distmat: np.ndarray, q_pids, g_pids, q_cams, g_cams, max_rank: int = 50) -> dict:
    """The straightforward way: a stable argsort of every row, then the labels in ranked order."""
    aps, inps, cmc, valid = [], [], np.zeros(max_rank), 0
    for s in range(0, len(distmat), 256):
        order = np.argsort(distmat[s:s + 256], axis=1, kind="stable")
        pid = g_pids[order]
        same = pid == q_pids[s:s + 256, None]
        junk = (pid == JUNK_PID) | (same & (g_cams[order] == q_cams[s:s + 256, None]))
        for row_good, row_junk in zip(same & ~junk, junk):
            hits = np.flatnonzero(row_good[~row_junk])
            if not len(hits):
                continue
            valid += 1
            i = np.arange(len(hits))
            precision = (i + 1) / (hits + 1)
            aps.append(np.mean((np.where(hits > 0, i / np.maximum(hits, 1), 1.0) + precision) / 2))
            inps.append(len(hits) / (hits[-1] + 1))
            cmc[hits[0]:] += 1
    return {"cmc": cmc / max(valid, 1), "mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)),
            "num_valid_queries": valid}


def reference_features(qf, gf, q_pids, g_pids, q_cams, g_cams) -> dict:
    parts = [reference_distmat(d.numpy(), q_pids[s:s + len(d)], g_pids, q_cams[s:s + len(d)], g_cams)
             for s, d in cosine_distance_chunks(qf, gf, 1024)]
    valid = sum(p["num_valid_queries"] for p in parts)
    return {"mAP": sum(p["mAP"] * p["num_valid_queries"] for p in parts) / valid,
            "cmc": sum(p["cmc"] * p["num_valid_queries"] for p in parts) / valid, "num_valid_queries": valid}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_case(name: str, dim: int, quick: bool, device: str = "cpu") -> dict:
    """One case, in this process: build its inputs, then time the evaluation alone; `device` is where the
    feature cases compute similarities (and re-ranking its N x N neighbour pass). On a GPU the features are
    copied there before the clock starts (as test.py's extracted features would be), and the first CUDA
    calls are made before it too."""
    size, what, method = (QUICK_CASES if quick else CASES)[name]
    qf, gf, q_pids, g_pids, q_cams, g_cams = synthetic(size, dim, structured=what != "distmat-worst")
    distmat = None
    if what.startswith("distmat"):
        distmat = torch.cat([d for _, d in cosine_distance_chunks(qf, gf)]).numpy()
    if device != "cpu":
        qf, gf = qf.to(device), gf.to(device)
        torch.ones(8, 8, device=device).matmul(torch.ones(8, 8, device=device)).sum().item()  # CUDA set up
    base = peak_mb()
    extra = {}
    start = time.perf_counter()
    if method == "rerank":
        from rerank import k_reciprocal_rerank
        distmat = k_reciprocal_rerank(qf, gf, device=device)
        result = evaluate_distmat(distmat, q_pids, g_pids, q_cams, g_cams)
    elif method == "aqe":  # test.py --aqe: both sides expanded (k 5, alpha 3), then ranked
        from expansion import alpha_query_expansion
        result = evaluate_features(*alpha_query_expansion(qf, gf, device=device), q_pids, g_pids, q_cams, g_cams,
                                   device=device)
    elif method == "reference":
        result = (reference_distmat(distmat, q_pids, g_pids, q_cams, g_cams) if distmat is not None
                  else reference_features(qf, gf, q_pids, g_pids, q_cams, g_cams))
    elif distmat is not None:
        result = evaluate_distmat(distmat, q_pids, g_pids, q_cams, g_cams)
    else:
        result = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, device=device)
    if method == "roc":  # test.py --roc: the ranking above, then TPR@FPR over every query-gallery pair
        from verification import verification_rates
        ranked = time.perf_counter()
        v = verification_rates(qf, gf, q_pids, g_pids, q_cams, g_cams, device=device)
        extra = {"roc_seconds": round(time.perf_counter() - ranked, 3),
                 "pairs": v["negative_pairs"] + v["positive_pairs"],
                 "tpr": {f: round(r["tpr"], 6) for f, r in v["rates"].items()}}
    seconds = time.perf_counter() - start
    return {"case": name, "size": size, "queries": len(qf), "gallery": len(gf), "dim": dim, "input": what,
            "method": method, "device": device, "seconds": round(seconds, 3), "peak_rss_mb": round(peak_mb()),
            "base_rss_mb": round(base), "mAP": round(float(result["mAP"]), 6), "R1": round(float(result["cmc"][0]), 6),
            "num_valid_queries": int(result["num_valid_queries"]), **extra}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--cases", nargs="*", help="which cases (default: all)")
    p.add_argument("--dim", type=int, default=512, help="feature width (DG-Net: 1024, its teacher: 512)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each case; the table shows the fastest")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the feature cases run")
    p.add_argument("--out", help="JSON file (default bench/results/eval_bench[_quick].json)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: CUDA is not available on this machine; use --device cpu",
              file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(run_case(args.one, args.dim, args.quick, args.device)))
        return 0
    table = QUICK_CASES if args.quick else CASES
    names = args.cases or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"error: unknown case {', '.join(unknown)}; known: {', '.join(table)}", file=sys.stderr)
        return 2
    rows, quick = [], (["--quick"] if args.quick else [])
    print(f"{'case':26} {'Q x G':>15} {'seconds':>8} {'peak MB':>8} {'base MB':>8} {'mAP':>8} {'R1':>8}")
    for name in names:
        runs = []
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "--one", name, "--dim", str(args.dim), "--device", args.device, *quick]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return 1
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = min(runs, key=lambda r: r["seconds"])
        row["all_seconds"] = [r["seconds"] for r in runs]
        rows.append(row)
        print(f"{name:26} {row['queries']:>6} x {row['gallery']:<6} {row['seconds']:8.2f} {row['peak_rss_mb']:8d} "
              f"{row['base_rss_mb']:8d} {row['mAP']:8.4f} {row['R1']:8.4f}", flush=True)
    default = ROOT / "bench" / "results" / f"eval_bench{'_quick' if args.quick else ''}.json"
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": date.today().isoformat(), "torch": torch.__version__, "numpy": np.__version__,
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
            "command": " ".join(["python", "bench/eval_bench.py", *(argv if argv is not None else sys.argv[1:])])}
    out.write_text(json.dumps({"meta": meta, "cases": rows}, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
