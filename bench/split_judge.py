"""The identity judge on training identities beside the test split: does G put A's clothes on B's body for the
people it trained on, and for unseen ones?

    python bench/split_judge.py --name RUN [--output_path P] [--which_iter N ...] [--json FILE]

Synthetic data only. The test figures are `visualize.py metrics`'s (the seeded test pairs, every test identity
drawn in B's structure). The training figures use the same judge on as many training identities as the test
split has (the first ones by pid, every image of them), with pairs drawn from another seed: with a few dozen
training identities a decoder can learn each one's colours from its grey structure alone, which shows as
swaps that carry A's clothes on training pairs but not on test pairs. Beside each swap, B's own reconstruction
G(s_B, f_B) judged as B: how well G reproduces the clothes of the image it encoded, a ceiling for the swap.
Several --which_iter values trace both over a run. Prints a table; writes JSON (default
bench/results/split_judge_<run>.json).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from judge_cli import run_over_checkpoints  # noqa: E402

import quality  # noqa: E402
from data.datasets import DatasetSplits  # noqa: E402

TRAIN_SEED = 1  # the training pairs' seed: its own judge cache file beside the test split's (seed 0)


def training_view(splits: DatasetSplits) -> DatasetSplits:
    """The splits with the first training identities (as many as the test split has) in place of the test
    split: what quality's fidelity set and judge read. Its root differs, so their in-memory caches keep the
    two apart."""
    n_test = len({r.pid for r in quality._test_people(splits)})
    pids = sorted({r.pid for r in splits.train})[:n_test]
    people = [r for r in splits.train if r.pid in set(pids)]
    return dataclasses.replace(splits, root=f"{splits.root}#train", query=people, gallery=[])


def judge_row(models: Any, splits: DatasetSplits, seed: int) -> dict[str, Any]:
    fidelity = quality.swap_fidelity(models.generator, models.appearance_encoder, models.cfg, splits, seed=seed)
    judge = fidelity["identity_judge"]
    return {"identities": judge["identities"], "chance": judge["chance"], "swap": judge["swap"],
            "reconstruction": judge["reconstruction"], "appearance_image": judge["appearance_image"],
            "structure_image": judge["structure_image"], "person_l1": fidelity["swap"]["person_l1"]}


def judge_checkpoint(models: Any, splits: DatasetSplits) -> list[dict[str, Any]]:
    return [{"iteration": models.iteration, "split": split, **judge_row(models, view, seed)}
            for split, view, seed in (("test", splits, 0), ("train", training_view(splits), TRAIN_SEED))]


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'iteration':>9} {'split':<6} {'ids':>4} {'A top-1':>8} {'A top-5':>8} {'B':>6} {'chroma A':>9} "
          f"{'chroma B':>9} {'rebuilt B':>10} {'chroma':>7} {'appearance image A':>19}")
    for r in rows:
        s = r["swap"]
        print(f"{r['iteration']:>9} {r['split']:<6} {r['identities']:>4} {s['top1']:>8.3f} {s['top5']:>8.3f} "
              f"{s['as_structure']:>6.3f} {s['chroma_top1']:>9.3f} {s['chroma_as_structure']:>9.3f} "
              f"{r['reconstruction']['as_structure']:>10.3f} {r['reconstruction']['chroma_as_structure']:>7.3f} "
              f"{r['appearance_image']['top1']:>19.3f}")


def main(argv: list[str] | None = None) -> int:
    return run_over_checkpoints(argv, __doc__, "split_judge", "rows", judge_checkpoint, print_table)


if __name__ == "__main__":
    sys.exit(main())
