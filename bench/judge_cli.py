"""The command line that the judge tools over a run's checkpoints share (bench/split_judge.py,
bench/part_judge.py): --name, --output_path, several --which_iter, --json; a missing run or checkpoint, or a
dataset without true swaps, is one line with exit code 2; the results go to one JSON file."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.loaders import load_splits  # noqa: E402
from utils import UserError, one_line, run_folder  # noqa: E402
from visualize import Models, load_run  # noqa: E402


def judged_checkpoints(args: argparse.Namespace, judge: Callable[[Models, Any], list[dict[str, Any]]]
                       ) -> list[dict[str, Any]]:
    run_dir = run_folder(args.output_path, args.name)
    results: list[dict[str, Any]] = []
    for which in args.which_iter:
        models = load_run(run_dir, which, [], torch.device("cpu"))
        results += judge(models, load_splits(models.cfg))
    return results


def run_over_checkpoints(argv: list[str] | None, doc: str, tool: str, key: str,
                         judge: Callable[[Models, Any], list[dict[str, Any]]],
                         show: Callable[[list[dict[str, Any]]], None]) -> int:
    """Parse the shared arguments, call `judge(models, splits)` for each checkpoint (its results are appended
    under `key`), `show` the results, write {"run": NAME, key: results} to --json (default
    bench/results/<tool>_<run>.json). Returns the exit code."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="a DG-Net run on the synthetic dataset")
    p.add_argument("--output_path", default=".", help="runs are in OUTPUT_PATH/outputs")
    p.add_argument("--which_iter", nargs="+", default=["last"], help="checkpoints to judge (iterations or last)")
    p.add_argument("--json", type=Path, help=f"output (default bench/results/{tool}_<run>.json)")
    args = p.parse_args(argv)
    try:
        with torch.no_grad():  # not set_grad_enabled: main() may be called by another program (the tests do)
            results = judged_checkpoints(args, judge)
    except UserError as err:  # as the project's commands print it: one line
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    show(results)
    out = args.json or REPO / "bench" / "results" / f"{tool}_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": args.name, key: results}, indent=2) + "\n")
    print(f"written {out}")
    return 0
