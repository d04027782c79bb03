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
    python bench/appearance_probe.py ... --judge   # and the judge on swaps painted with the colours f gives

With --run, E_a is the one a DG-Net run trained jointly with G (its checkpoint, its config), to see whether
the reconstruction losses put garment colour into f.

With --judge, the identity judge rates what a decoder that paints exactly what a linear read-out of the code
finds could score: each of A's body parts (skin .. bag) gets the mean colour a ridge regression from A's
code predicts (fitted on the training images), flat on B's parts in the true swap; beside it, A's true part
colours painted the same way (swap_fidelity's "A's colours, B's parts") and the training mean. A ceiling for
swaps from this f as far as a read-out goes: a ridge and a small MLP (G's own MLPs are deeper).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
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


def load(meta: synthetic.SyntheticMetadata, records: list, size: tuple[int, int]
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [0, 1] (N, 3, H, W) and their part labels (N, H, W), each drawn once."""
    images = torch.stack([quality.load_unit(r.path, size) for r in records])
    return images, torch.stack([quality._true_parts(meta, r, r, size) for r in records])


def targets(images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """The upper/lower mean Lab colours of each image (N, 6); NaN where a part is hidden."""
    ys = []
    for img, parts in zip(images, labels):
        lab = quality.srgb_to_lab(img.permute(1, 2, 0))
        row = []
        for part in PARTS:
            where = parts == synthetic.PART_NAMES.index(part)
            row += lab[where].mean(0).tolist() if where.any() else [float("nan")] * 3
        ys.append(row)
    return np.array(ys)


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


def ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Ridge from standardized codes to y (rows with a NaN left out), lambda picked on a quarter of the
    training rows; the predictions for x_test."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    keep = ~np.isnan(y_train).any(1)
    xs, ys, xt = ((x_train - mu) / sd)[keep], y_train[keep], (x_test - mu) / sd
    cut = len(xs) * 3 // 4

    def fit(a: np.ndarray, b: np.ndarray, lam: float) -> np.ndarray:
        a1 = np.hstack([a, np.ones((len(a), 1))])
        if len(a1) < a1.shape[1]:  # fewer rows than code dimensions: the same ridge in its rows x rows form
            return a1.T @ np.linalg.solve(a1 @ a1.T + lam * np.eye(len(a1)), b)
        return np.linalg.solve(a1.T @ a1 + lam * np.eye(a1.shape[1]), a1.T @ b)

    def predict(w: np.ndarray, a: np.ndarray) -> np.ndarray:
        return np.hstack([a, np.ones((len(a), 1))]) @ w

    lams = [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]
    errors = [np.abs(predict(fit(xs[:cut], ys[:cut], lam), xs[cut:]) - ys[cut:]).mean() for lam in lams]
    return predict(fit(xs, ys, lams[int(np.argmin(errors))]), xt)


def ridge_mae(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Test MAE of `ridge_predict` over the test rows without a NaN."""
    keep = ~np.isnan(y_test).any(1)
    return float(np.abs(ridge_predict(x_train, y_train, x_test[keep]) - y_test[keep]).mean())


def mlp_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, epochs: int = 60) -> np.ndarray:
    """A one-hidden-layer MLP (512, LeakyReLU, input dropout) from standardized codes to y, L1 on the entries
    that are not NaN, AdamW; a nonlinear read-out beside the ridge's, closer to what G's MLPs can do."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x = torch.tensor((x_train - mu) / sd, dtype=torch.float32)
    y = torch.tensor(np.nan_to_num(y_train), dtype=torch.float32)
    seen = torch.tensor(~np.isnan(y_train), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(x.shape[1], 512), torch.nn.LeakyReLU(0.2),
                              torch.nn.Linear(512, y.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(128):
            loss = ((net(x[batch]) - y[batch]).abs() * seen[batch]).sum() / seen[batch].sum().clamp_min(1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return net.eval()(torch.tensor((x_test - mu) / sd, dtype=torch.float32)).numpy()


def part_rgb(images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """The mean RGB ([0, 1]) of every body part (skin .. bag) of each image, (N, P, 3); NaN where hidden."""
    body = range(1, synthetic.PART_NAMES.index("occluder"))
    out = np.full((len(images), len(body), 3), np.nan)
    for i, (img, parts) in enumerate(zip(images, labels)):
        for j, part in enumerate(body):
            where = parts == part
            if where.any():
                out[i, j] = img[:, where].mean(1).numpy()
    return out


def painted(canvas: torch.Tensor, parts: torch.Tensor, colours: np.ndarray) -> torch.Tensor:
    """`canvas` (N, 3, H, W) with each body part of `parts` (N, H, W) filled flat with `colours` (N, P, 3)."""
    out = canvas.clone()
    for i in range(len(out)):
        for j in range(colours.shape[1]):
            where = parts[i] == j + 1
            out[i][:, where] = torch.tensor(colours[i, j], dtype=out.dtype).clamp(0, 1)[:, None]
    return out


def paint_ceiling(cfg: dict, splits, read: dict[str, tuple[np.ndarray, Callable[[torch.Tensor], np.ndarray]]],
                  rgb_train: np.ndarray) -> dict:
    """The identity judge's verdict on the test pairs when each of A's body parts is painted, flat, on B's
    parts with the colour a ridge read-out of a code predicts from A's image: what a decoder that paints
    exactly the colour a linear read-out of f finds could score, and the same with a small MLP's read-out
    ("..., MLP"). Beside them: A's true part colours painted the same way (swap_fidelity's "A's colours, B's
    parts") and the training mean. `read`: name -> (the training images' codes, the code of images)."""
    data = quality.fidelity_set(cfg, splits)
    judge = quality.judge_set(cfg, splits)
    n, parts = len(data.pairs), rgb_train.shape[1]
    answers = {"true part colours": quality.part_colours(data.appearance, data.appearance_parts, data.target,
                                                         data.target_parts),
               "training mean": painted(data.target, data.target_parts,
                                        np.broadcast_to(np.nanmean(rgb_train, 0), (n, parts, 3)))}
    for name, (x_train, code) in read.items():
        x_a = code(data.appearance)
        colours = np.stack([ridge_predict(x_train, rgb_train[:, j], x_a) for j in range(parts)], 1)
        answers[name] = painted(data.target, data.target_parts, colours)
        colours = mlp_predict(x_train, rgb_train.reshape(len(rgb_train), -1), x_a).reshape(-1, parts, 3)
        answers[f"{name}, MLP"] = painted(data.target, data.target_parts, colours)
    verdicts = quality.identity_judge(answers, judge)
    return {"chance": verdicts["chance"],
            **{k: {m: verdicts[k][m] for m in ("top1", "top5", "as_structure", "chroma_top1", "chroma_top5")}
               for k in answers}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart/dgnet.yaml")
    p.add_argument("--json", default="bench/results/appearance_probe.json")
    p.add_argument("--run", help="E_a of this DG-Net run's checkpoint instead of one built from --config")
    p.add_argument("--output_path", default=".", help="with --run: runs are in OUTPUT_PATH/outputs")
    p.add_argument("--which_iter", default="last", help="with --run: the checkpoint")
    p.add_argument("--judge", action="store_true",
                   help="also judge the test pairs painted with the part colours read out of f (ridge, MLP)")
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
    img_tr, parts_tr = load(meta, train, size)
    img_te, parts_te = load(meta, test, size)
    y_tr, y_te = targets(img_tr, parts_tr), targets(img_te, parts_te)
    encoder = models.appearance_encoder if args.run else build_appearance_encoder(cfg, splits.num_classes).eval()
    rows = []
    baseline = float(np.nanmean(np.abs(y_te - np.nanmean(y_tr, 0))))
    rows.append({"code": "training mean (no code)", "dims": 0, "feature_map": None, "mae": baseline})
    f_train = {}
    for scale2 in (False, True):
        f_tr, fmap = codes(encoder, img_tr, scale2)
        f_te, _ = codes(encoder, img_te, scale2)
        f_train[scale2] = f_tr
        rows.append({"code": f"E_a's f, input {'2x (scale2)' if scale2 else 'native'}", "dims": f_tr.shape[1],
                     "feature_map": fmap, "mae": ridge_mae(f_tr, y_tr, f_te, y_te)})

    def thumbnail(images: torch.Tensor) -> np.ndarray:
        return F.adaptive_avg_pool2d(images, (8, 4)).flatten(1).numpy()

    oracle_tr, oracle_te = thumbnail(img_tr), thumbnail(img_te)
    rows.append({"code": "oracle: image pooled to 8x4", "dims": oracle_tr.shape[1], "feature_map": [8, 4],
                 "mae": ridge_mae(oracle_tr, y_tr, oracle_te, y_te)})
    print(f"upper/lower garment mean colour (CIELAB) from the code, ridge, {len(train)} training -> {len(test)} "
          f"test images at {size[0]}x{size[1]}; mean absolute error per channel (lower is better)")
    print(f"{'code':<34}{'dims':>6}  {'layer4 map':>10}  {'MAE':>7}")
    for r in rows:
        fmap = "x".join(map(str, r["feature_map"])) if r["feature_map"] else "-"
        print(f"{r['code']:<34}{r['dims']:>6}  {fmap:>10}  {r['mae']:7.3f}")
    ceiling = None
    if args.judge:
        own = encoder.scale2
        ceiling = paint_ceiling(cfg, splits, {"E_a's f": (f_train[own], lambda x: codes(encoder, x, own)[0]),
                                              "thumbnail 8x4": (oracle_tr, thumbnail)}, part_rgb(img_tr, parts_tr))
        print(f"\nthe test pairs painted on B's parts with A's part colours as read from a code (chance "
              f"{ceiling['chance']:.3f})")
        print(f"{'colours from':<22}{'top-1 A':>9}{'top-5 A':>9}{'judged B':>10}{'chroma top-1':>14}"
              f"{'chroma top-5':>14}")
        for k, v in ceiling.items():
            if k != "chance":
                print(f"{k:<22}{v['top1']:>9.3f}{v['top5']:>9.3f}{v['as_structure']:>10.3f}{v['chroma_top1']:>14.3f}"
                      f"{v['chroma_top5']:>14.3f}")
    result = {"benchmark": "appearance_probe", "date": date.today().isoformat(), "torch": torch.__version__,
              "config": args.config, "run": args.run and f"{args.run} at {models.iteration}",
              "pretrained": cfg["pretrained"], "size": list(size),
              "seconds": round(time.time() - start, 1), "rows": rows, "paint_ceiling": ceiling,
              "command": "python bench/appearance_probe.py " + " ".join(argv or sys.argv[1:])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
