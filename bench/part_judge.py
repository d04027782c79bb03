"""Where a swap loses A's clothes, body part by body part: which parts keep the identity judge's chroma figure
down, and whether a part's colour comes from A's code, from B's structure image, or from neither.

    python bench/part_judge.py --name RUN [--output_path P] [--which_iter N ...] [--json FILE]

Synthetic data only; the seeded test pairs and candidates of `visualize.py metrics`. For each body part (skin,
hair, upper, lower, shoes, bag), over the pairs whose true swap shows it:

- share: the part's share of the true swap's person pixels (the judge weights each part by its candidate's);
- from A: the least-squares slope of the swap's mean a*b* on the true swap's (A's colour in B's light), and
  their correlation. 1 and 1 is a swap that wears A's colour; a slope under 1 with a high correlation is the
  right hue, washed out towards the average;
- from B: in one joint fit of the swap's a*b* on A's and on B's own colour of that part (B's structure image
  through B's own part labels), B's coefficient: colour that leaks from the structure image. E_s sees only
  its grey levels, so anything here is read from B's shapes and shading;
- error: the mean a*b* distance (Delta E, chroma only) between the swap's and the true swap's part colour,
  and the same for B's own reconstruction G(s_B, f_B) against B: what G does with the code of the image
  it encoded;
- judge counterfactuals: the chroma top-1 with only this part replaced by the true swap's pixels (the rest
  as G drew it), and with only this part as G drew it (the rest true). The first says how much fixing this
  part alone would gain; the second how much this part alone costs.

Prints a table per checkpoint; writes JSON (default bench/results/part_judge_<run>.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import quality  # noqa: E402
from data import synthetic  # noqa: E402
from data.loaders import load_splits  # noqa: E402
from utils import UserError, one_line, run_folder  # noqa: E402
from visualize import load_run  # noqa: E402

PARTS = synthetic.PART_NAMES[1:synthetic.PART_NAMES.index("occluder")]
MIN_PIXELS = 5  # a part smaller than this in a pair's true swap is left out of that pair's fits


def part_ab(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean a*b* of each body part, (N, P, 2), and its pixel count (N, P), for images (N, 3, H, W) in [0, 1]
    read through part labels (N, H, W)."""
    means, counts = quality.part_means_lab(images, labels[:, None])
    return means[:, 0, :, 1:], counts[:, 0]


def slope_and_correlation(target: torch.Tensor, output: torch.Tensor) -> tuple[float, float]:
    """Least-squares slope of output on target and their correlation, both (n, 2), over the pairs and both
    chroma channels, each channel centred on its own mean."""
    t, o = target - target.mean(0), output - output.mean(0)
    return float((t * o).sum() / (t * t).sum().clamp_min(1e-12)), \
        float((t * o).sum() / (t.norm() * o.norm()).clamp_min(1e-12))


def joint_fit(a: torch.Tensor, b: torch.Tensor, output: torch.Tensor) -> tuple[float, float]:
    """Coefficients (on A, on B) of output ~ α·a + β·b + c per channel, one α and β for both channels."""
    centred = [x - x.mean(0) for x in (a, b, output)]
    design = torch.stack([centred[0].flatten(), centred[1].flatten()], 1).double()
    alpha, beta = torch.linalg.lstsq(design, centred[2].flatten()[:, None].double()).solution.flatten().tolist()
    return alpha, beta


def chroma_top1(images: torch.Tensor, judge: quality.JudgeSet) -> float:
    return quality.identity_judge({"x": images}, judge)["x"]["chroma_top1"]


def structure_parts(cfg: dict[str, Any], splits: Any, n_pairs: int, seed: int) -> torch.Tensor:
    """B's own part labels (N, H, W) for fidelity_set's pairs: where B's own colours are in its image."""
    meta = synthetic.load_metadata(cfg["data_root"])
    size = quality.image_size(cfg)
    pairs = quality._pairs(quality._test_people(splits), n_pairs, seed)
    return torch.stack([quality._true_parts(meta, b, b, size) for _, b in pairs])


def part_rows(models: Any, splits: Any, n_pairs: int = 64, seed: int = 0) -> dict[str, Any]:
    data = quality.fidelity_set(models.cfg, splits, n_pairs, seed)
    judge = quality.judge_set(models.cfg, splits, n_pairs, seed)
    with quality.eval_mode(models.generator, models.appearance_encoder):
        swaps = quality.swap(models.generator, models.appearance_encoder, quality.normalize(data.structure),
                             quality.normalize(data.appearance))
        rebuilt = quality.swap(models.generator, models.appearance_encoder, quality.normalize(data.structure),
                               quality.normalize(data.structure))
    b_labels = structure_parts(models.cfg, splits, n_pairs, seed)
    target_ab, counts = part_ab(data.target, data.target_parts)
    swap_ab, _ = part_ab(swaps, data.target_parts)
    b_ab, b_counts = part_ab(data.structure, b_labels)
    rebuilt_ab, _ = part_ab(rebuilt, b_labels)
    share = counts / counts.sum(1, keepdim=True).clamp_min(1)
    rows = []
    for k, name in enumerate(PARTS):
        shown = (counts[:, k] >= MIN_PIXELS) & (b_counts[:, k] >= MIN_PIXELS)
        mask = (data.target_parts == k + 1)[:, None]
        row: dict[str, Any] = {"part": name, "pairs": int(shown.sum()), "share": float(share[:, k].mean()),
                               "true_part": chroma_top1(torch.where(mask, data.target, swaps), judge),
                               "only_part_drawn": chroma_top1(torch.where(mask, swaps, data.target), judge)}
        if int(shown.sum()) >= 3:
            a, s, b = target_ab[shown, k], swap_ab[shown, k], b_ab[shown, k]
            row["slope_a"], row["correlation_a"] = slope_and_correlation(a, s)
            row["joint_a"], row["joint_b"] = joint_fit(a, b, s)
            row["error"] = float((s - a).norm(dim=1).mean())
            row["rebuilt_error"] = float((rebuilt_ab[shown, k] - b).norm(dim=1).mean())
        rows.append(row)
    return {"iteration": models.iteration, "chroma_top1": chroma_top1(swaps, judge),
            "chance": 1 / len(judge.pids), "parts": rows}


def print_table(result: dict[str, Any]) -> None:
    print(f"iteration {result['iteration']}: swap chroma top-1 {result['chroma_top1']:.3f} "
          f"(chance {result['chance']:.3f})")
    print(f"{'part':<6} {'pairs':>5} {'share':>6} {'slope A':>8} {'corr A':>7} {'joint A':>8} {'joint B':>8} "
          f"{'error':>6} {'rebuilt':>8} {'true part':>10} {'only part':>10}")
    for r in result["parts"]:
        fits = (f"{r['slope_a']:>8.2f} {r['correlation_a']:>7.2f} {r['joint_a']:>8.2f} {r['joint_b']:>8.2f} "
                f"{r['error']:>6.1f} {r['rebuilt_error']:>8.1f}") if "error" in r else f"{'(too few pairs)':>52}"
        print(f"{r['part']:<6} {r['pairs']:>5} {r['share']:>6.2f} {fits} {r['true_part']:>10.3f} "
              f"{r['only_part_drawn']:>10.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="a DG-Net run on the synthetic dataset")
    p.add_argument("--output_path", default=".", help="runs are in OUTPUT_PATH/outputs")
    p.add_argument("--which_iter", nargs="+", default=["last"], help="checkpoints to read (iterations or last)")
    p.add_argument("--json", type=Path, help="output (default bench/results/part_judge_<run>.json)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    results = []
    try:
        run_dir = run_folder(args.output_path, args.name)
        for which in args.which_iter:
            models = load_run(run_dir, which, [], torch.device("cpu"))
            results.append(part_rows(models, load_splits(models.cfg)))
            print_table(results[-1])
    except UserError as err:  # a missing run or checkpoint, or not the synthetic data: one line
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    out = args.json or REPO / "bench" / "results" / f"part_judge_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": args.name, "checkpoints": results}, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
