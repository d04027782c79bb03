"""Evaluate a run (DG-Net or a teacher) on its dataset's query and gallery: R1/R5/R10, mAP, mINP.

    python test.py --name latest [--which_iter N|last] [--alpha 0.5] [--ap market|precision] [--no-flip]

Features follow DG-Net's protocol (reference/dgnet.md §6): each image and its horizontal flip go through
the model; for DG-Net each pass gives the primary and the fine-grained 512-d features, each L2-normalized,
the two passes are summed and each half normalized again; at query time the fine-grained half is weighted
by `--alpha` (0.5 is what DG-Net reports). A teacher's feature is its 512-d bottleneck, flip-summed and
normalized. Results are printed and written to `outputs/<name>/results/<iteration>.json`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data.loaders import build_test_loader, load_splits
from evaluate import AP_CONVENTIONS, evaluate_features
from reIDmodel import AppearanceEncoder, build_appearance_encoder, build_teacher
from utils import UserError, checkpoint_path, latest_checkpoint, load_checkpoint, load_config, one_line

HALF = 512  # each head's bottleneck width


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="run name: outputs/NAME")
    p.add_argument("--output_path", default=".", help="the runs are in OUTPUT_PATH/outputs (default: .)")
    p.add_argument("--which_iter", default="last", help="checkpoint iteration, or last (default)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of DG-Net's fine-grained half (default 0.5)")
    p.add_argument("--ap", default="market", choices=AP_CONVENTIONS, help="AP convention (default: market)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="do not add the flipped image's feature")
    p.add_argument("--batch_size", type=int, default=128, help="images per inference batch")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (e.g. data_root=...)")
    return p.parse_args(argv)


def load_model(state: dict[str, Any], cfg: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The run's ReID model: E_a of a DG-Net run, or the teacher of a baseline run, in eval mode."""
    models = state["trainer"]["models"]
    if state["kind"] == "baseline":
        weights = models["teacher"]
        model = build_teacher(cfg, weights["classifier.classifier.0.weight"].shape[0], pretrained="none")
    else:
        weights = models["id"]
        model = build_appearance_encoder(cfg, weights["classifier1.classifier.0.weight"].shape[0],
                                         pretrained="none")
    model.load_state_dict(weights)
    return model.to(device).eval()


@torch.no_grad()
def extract(model: torch.nn.Module, loader: Any, device: torch.device, flip: bool) -> torch.Tensor:
    """Flip-summed, normalized features of every image in loader order."""
    feats = []
    halves = isinstance(model, AppearanceEncoder)
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        views = [x, x.flip(3)] if flip else [x]
        total = 0
        for view in views:
            f = model.features(view).float()
            total = total + (torch.cat([F.normalize(h, dim=1) for h in f.split(HALF, dim=1)], 1) if halves else f)
        if halves:
            total = torch.cat([F.normalize(h, dim=1) for h in total.split(HALF, dim=1)], dim=1)
        else:
            total = F.normalize(total, dim=1)
        feats.append(total.cpu())
    return torch.cat(feats)


def evaluate_run(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(args.output_path) / "outputs" / args.name
    if args.which_iter == "last":
        path = latest_checkpoint(run_dir)
        if path is None:
            raise UserError(f"no checkpoint in {run_dir / 'checkpoints'}; check --name and --output_path")
    else:
        path = checkpoint_path(run_dir, int(args.which_iter))
    state = load_checkpoint(path)
    cfg = load_config(run_dir / "config.yaml", args.opts) if (run_dir / "config.yaml").is_file() else state["config"]
    splits = load_splits(cfg)
    if not splits.query or not splits.gallery:
        raise UserError(f"{splits.name} at {cfg['data_root']} has no query or gallery images to evaluate on")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = load_model(state, cfg, device)
    qf = extract(model, build_test_loader(cfg, splits.query, args.batch_size), device, args.flip)
    gf = extract(model, build_test_loader(cfg, splits.gallery, args.batch_size), device, args.flip)
    if isinstance(model, AppearanceEncoder):
        qf[:, HALF:] *= args.alpha  # the query's fine-grained half, weighted as DG-Net reports
    q = [np.array([getattr(r, k) for r in splits.query]) for k in ("pid", "camid")]
    g = [np.array([getattr(r, k) for r in splits.gallery]) for k in ("pid", "camid")]
    result = evaluate_features(qf, gf, q[0], g[0], q[1], g[1], ap=args.ap)
    summary = {"run": args.name, "kind": state["kind"], "iteration": state["iteration"], "dataset": splits.name,
               "ap": args.ap, "flip": args.flip, "alpha": args.alpha if state["kind"] != "baseline" else None,
               "R1": float(result["cmc"][0]), "R5": float(result["cmc"][4]), "R10": float(result["cmc"][9]),
               "mAP": float(result["mAP"]), "mINP": float(result["mINP"]),
               "num_queries": result["num_queries"], "num_valid_queries": result["num_valid_queries"]}
    out = run_dir / "results" / f"{state['iteration']:08d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    summary["file"] = str(out)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        s = evaluate_run(args)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"{s['run']} ({s['kind']}, iteration {s['iteration']}) on {s['dataset']}: "
          f"{s['num_valid_queries']}/{s['num_queries']} queries, AP convention {s['ap']}")
    print("   R1     R5    R10    mAP   mINP")
    print(" ".join(f"{100 * s[k]:6.2f}" for k in ("R1", "R5", "R10", "mAP", "mINP")))
    print(f"written to {s['file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
