"""Every evaluation test.py has written, of every run, as one table: the ablations of a study side by side.

    python results.py                                  # every run under ./outputs
    python results.py --runs teacher-market latest     # these runs only
    python results.py --last --sort mAP                # each run's newest iteration, best mAP first
    python results.py --csv results.csv                # also as CSV, for a spreadsheet or pandas

A row is one results file (`outputs/<run>/results/*.json` holding R1 and mAP): a snapshot with the options it
was scored with, which its file name carries as test.py names them (`_rerank`, `_ap-precision`, `_multi`,
`_alpha0_-1`, `_on-<data>` for another dataset, `_onnx`, ...; empty for DG-Net's protocol on the run's own
data). Nothing is evaluated here: what is not in the table, test.py has not scored yet.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

from utils import UserError, one_line, run_folder, write_text_atomic

METRICS = ("R1", "R5", "R10", "mAP", "mINP")
# a results file's name: what was evaluated (an iteration, the original release's files), then its options
EVALUATED = re.compile(r"^(\d{8}|original_(?:baseline|\d{8}))(.*)$")
RESCORED = re.compile(r"^(.*)_scores(.*)$")  # saved features scored again (test.py --features FILE)


def options_of(stem: str) -> str:
    """The options a results file's name carries, as test.py wrote them (without the leading `_`); for saved
    features scored again, which file they came from."""
    evaluated, rescored = EVALUATED.match(stem), RESCORED.match(stem)
    if evaluated:
        return evaluated.group(2).lstrip("_")
    if rescored:
        return " ".join(filter(None, (f"scores of {rescored.group(1)}", rescored.group(2).lstrip("_"))))
    return stem


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_path", default=".", help="runs are read from OUTPUT_PATH/outputs/ (default: .)")
    p.add_argument("--runs", nargs="+", metavar="NAME", help="only these runs (default: every run with results)")
    p.add_argument("--last", action="store_true", help="only each run's newest evaluated iteration")
    p.add_argument("--sort", choices=METRICS, help="best first by this metric (default: by run, then iteration)")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV, with every metric unrounded")
    return p.parse_args(argv)


def read_results(run_dir: Path) -> list[dict[str, Any]]:
    """A run's results files as rows: run, kind, iteration, options (from the file name), data, the metrics."""
    rows = []
    for path in sorted((run_dir / "results").glob("*.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # half written by a run killed mid-write, or not ours: not a result to show
        if not isinstance(summary, dict) or not all(isinstance(summary.get(m), (int, float)) for m in METRICS):
            continue  # curve.json, search results: no metrics of their own
        dataset = summary.get("dataset") or ""
        iteration = summary.get("iteration")
        if iteration is None and (digits := re.search(r"\d{8}", path.stem)):  # features_<iteration> scored again
            iteration = int(digits.group())
        rows.append({"run": run_dir.name, "kind": summary.get("kind") or "", "iteration": iteration,
                     "options": options_of(path.stem),
                     "data": f"{dataset} ({summary['variant']})" if summary.get("variant") else dataset,
                     **{m: float(summary[m]) for m in METRICS}, "file": str(path)})
    return rows


def collect(output_path: str, runs: list[str] | None, last: bool) -> list[dict[str, Any]]:
    outputs = Path(output_path) / "outputs"
    if runs:
        folders = [run_folder(output_path, name) for name in runs]
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing:
            raise UserError(f"no run folder {', '.join(missing)}: check the names and --output_path")
    elif outputs.is_dir():
        folders = sorted(p for p in outputs.iterdir() if p.is_dir())
    else:
        raise UserError(f"no runs under {outputs}: train one (python train.py), or give --output_path")
    rows = [row for folder in folders for row in read_results(folder)]
    if not rows:
        raise UserError(f"no results in {', '.join(str(f) for f in folders) or outputs} yet: python test.py "
                        "--name RUN evaluates a run and writes them")
    if last:
        newest = {}
        for row in rows:
            newest[row["run"]] = max(newest.get(row["run"], -1), row["iteration"] or 0)
        rows = [row for row in rows if (row["iteration"] or 0) == newest[row["run"]]]
    return rows


def ordered(rows: list[dict[str, Any]], sort: str | None) -> list[dict[str, Any]]:
    if sort:
        return sorted(rows, key=lambda r: -r[sort])
    return sorted(rows, key=lambda r: (r["run"], r["iteration"] or 0, r["options"]))


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as markdown, metrics in percent."""
    head = ["run", "kind", "iteration", "options", "data", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h in head[:5] else "---:" for h in head) + "|"]
    for r in rows:
        cells = [r["run"], r["kind"], "" if r["iteration"] is None else f"{r['iteration']:,}", r["options"] or "-",
                 r["data"], *(f"{100 * r[m]:.2f}" for m in METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def as_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["run", "kind", "iteration", "options", "data", *METRICS, "file"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = ordered(collect(args.output_path, args.runs, args.last), args.sort)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(markdown(rows), flush=True)
    if args.csv:
        try:
            write_text_atomic(args.csv, as_csv(rows))
        except OSError as err:
            print(f"error: could not write {args.csv} ({err.strerror or err})", file=sys.stderr)
            return 2
        print(f"written: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
