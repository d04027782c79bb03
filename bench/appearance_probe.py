"""How much clothing colour the appearance code f holds, with and without the original's `scale2`.

The original DG-Net doubles the input of E_a and the teacher (nearest neighbour) when the image height is
128 or less, so at 64x32 its ResNet sees 128x64 and f is pooled from a feature map 4x larger. This probe
builds E_a as the quickstart does (the quickstart teacher's backbone, `ID_stride` 1, max-pooled 4 stripes),
computes f on the synthetic training and test images at the native size and at 2x, and fits a ridge
regression from f to the mean CIELAB colour of the upper and lower garments (the synthetic data's part
labels), on training identities, scored on test identities: mean absolute error in Delta E units per
channel, beside predicting the training mean and an oracle code (the image average-pooled to 8x4).

    python bench/appearance_probe.py [--config configs/quickstart/dgnet.yaml] [--json bench/results/probe.json]
    python bench/appearance_probe.py --run RUN [--output_path P] [--which_iter N]  # E_a of a DG-Net checkpoint

With --run, E_a is the one a DG-Net run trained jointly with G (its checkpoint, its config), to see whether
the reconstruction losses put garment colour into f.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import quality  # noqa: E402
from data import synthetic  # noqa: E402
from data.loaders import image_size, load_splits  # noqa: E402
from reIDmodel import AppearanceEncoder, build_appearance_encoder  # noqa: E402
from utils import load_config, run_folder  # noqa: E402
from visualize import load_run  # noqa: E402

PARTS = ("upper", "lower")


def targets(meta: synthetic.SyntheticMetadata, records: list, size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """Images [0, 1] (N, 3, H, W) and their upper/lower mean Lab colours (N, 6); NaN where a part is hidden."""
    images = torch.stack([quality.load_unit(r.path, size) for r in records])
    ys = []
    for r, img in zip(records, images):
        labels = quality._true_parts(meta, r, r, size)
        lab = quality.srgb_to_lab(img.permute(1, 2, 0))
        row = []
        for part in PARTS:
            where = labels == synthetic.PART_NAMES.index(part)
            row += lab[where].mean(0).tolist() if where.any() else [float("nan")] * 3
        ys.append(row)
    return images, np.array(ys)


@torch.no_grad()
def codes(encoder: AppearanceEncoder, images: torch.Tensor, scale2: bool) -> tuple[np.ndarray, list[int]]:
    """f of every image, with E_a's input doubled or not (whatever its config says), and its map's size."""
    x = quality.normalize(images)
    saved, encoder.scale2 = encoder.scale2, scale2
    try:
        fmap_shape = list(encoder.feature_map(x[:1]).shape[2:])
        return torch.cat([encoder(x[i:i + 64])[0] for i in range(0, len(x), 64)]).numpy(), fmap_shape
    finally:
        encoder.scale2 = saved


def ridge_mae(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Ridge from standardized codes, lambda picked on a quarter of the training rows; test MAE."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xs, xt = (x_train - mu) / sd, (x_test - mu) / sd
    keep_tr, keep_te = ~np.isnan(y_train).any(1), ~np.isnan(y_test).any(1)
    xs, ys, xt, yt = xs[keep_tr], y_train[keep_tr], xt[keep_te], y_test[keep_te]
    cut = len(xs) * 3 // 4

    def fit(a: np.ndarray, b: np.ndarray, lam: float) -> np.ndarray:
        a1 = np.hstack([a, np.ones((len(a), 1))])
        return np.linalg.solve(a1.T @ a1 + lam * np.eye(a1.shape[1]), a1.T @ b)

    def predict(w: np.ndarray, a: np.ndarray) -> np.ndarray:
        return np.hstack([a, np.ones((len(a), 1))]) @ w

    lams = [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]
    errors = [np.abs(predict(fit(xs[:cut], ys[:cut], lam), xs[cut:]) - ys[cut:]).mean() for lam in lams]
    best = lams[int(np.argmin(errors))]
    return float(np.abs(predict(fit(xs, ys, best), xt) - yt).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart/dgnet.yaml")
    p.add_argument("--json", default="bench/results/appearance_probe.json")
    p.add_argument("--run", help="E_a of this DG-Net run's checkpoint instead of one built from --config")
    p.add_argument("--output_path", default=".", help="with --run: runs are in OUTPUT_PATH/outputs")
    p.add_argument("--which_iter", default="last", help="with --run: the checkpoint")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    start = time.time()
    if args.run:
        models = load_run(run_folder(args.output_path, args.run), args.which_iter, [], torch.device("cpu"))
        cfg = models.cfg
    else:
        cfg = load_config(args.config)
    splits = load_splits(cfg)
    size = image_size(cfg)
    meta = synthetic.load_metadata(cfg["data_root"])
    train = sorted((r for r in splits.train if r.pid > 0), key=lambda r: r.path)
    test = quality._test_people(splits)
    img_tr, y_tr = targets(meta, train, size)
    img_te, y_te = targets(meta, test, size)
    encoder = models.appearance_encoder if args.run else build_appearance_encoder(cfg, splits.num_classes).eval()
    rows = []
    baseline = float(np.nanmean(np.abs(y_te - np.nanmean(y_tr, 0))))
    rows.append({"code": "training mean (no code)", "dims": 0, "feature_map": None, "mae": baseline})
    for scale2 in (False, True):
        f_tr, fmap = codes(encoder, img_tr, scale2)
        f_te, _ = codes(encoder, img_te, scale2)
        rows.append({"code": f"E_a's f, input {'2x (scale2)' if scale2 else 'native'}", "dims": f_tr.shape[1],
                     "feature_map": fmap, "mae": ridge_mae(f_tr, y_tr, f_te, y_te)})
    oracle_tr = F.adaptive_avg_pool2d(img_tr, (8, 4)).flatten(1).numpy()
    oracle_te = F.adaptive_avg_pool2d(img_te, (8, 4)).flatten(1).numpy()
    rows.append({"code": "oracle: image pooled to 8x4", "dims": oracle_tr.shape[1], "feature_map": [8, 4],
                 "mae": ridge_mae(oracle_tr, y_tr, oracle_te, y_te)})
    print(f"upper/lower garment mean colour (CIELAB) from the code, ridge, {len(train)} training -> {len(test)} "
          f"test images at {size[0]}x{size[1]}; mean absolute error per channel (lower is better)")
    print(f"{'code':<34}{'dims':>6}  {'layer4 map':>10}  {'MAE':>7}")
    for r in rows:
        fmap = "x".join(map(str, r["feature_map"])) if r["feature_map"] else "-"
        print(f"{r['code']:<34}{r['dims']:>6}  {fmap:>10}  {r['mae']:7.3f}")
    result = {"benchmark": "appearance_probe", "date": date.today().isoformat(), "torch": torch.__version__,
              "config": args.config, "run": args.run and f"{args.run} at {models.iteration}",
              "pretrained": cfg["pretrained"], "size": list(size),
              "seconds": round(time.time() - start, 1), "rows": rows,
              "command": "python bench/appearance_probe.py " + " ".join(argv or sys.argv[1:])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
