"""How fast the synthetic pedestrian dataset is generated, on one CPU core.

    python bench/synthetic_bench.py [--ids 120] [--images-per-id 12] [--height 128] [--width 64]
                                    [--difficulty 0.5] [--json bench/results/synthetic_bench.json]

Generates a dataset (the default size unless told otherwise) into a temporary folder, in this one
process, pinned to a single core where the OS allows it; then draws every image again without encoding
or writing it. Prints a table and writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pin_to_one_core() -> str:
    """Run on one core, so the figure is per core whatever the machine; says which (or why not)."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity on this OS)"
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"pinned to core {core}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=120)
    parser.add_argument("--images-per-id", type=int, default=12)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--difficulty", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "synthetic_bench.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # run as a script from anywhere; imported late for that reason
    synthetic = importlib.import_module("data.synthetic")
    pinning = pin_to_one_core()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "synthetic"
        start = time.perf_counter()
        summary = synthetic.generate(out, ids=args.ids, images_per_id=args.images_per_id, height=args.height,
                                     width=args.width, difficulty=args.difficulty)
        generate_s = time.perf_counter() - start
        entries = list(synthetic.load_metadata(out))
        start = time.perf_counter()
        for entry in entries:
            synthetic.render(entry, entry)
        render_s = time.perf_counter() - start

    images = summary["images"]
    rows = [("generate (draw, JPEG, write)", generate_s), ("draw only (render)", render_s)]
    print(f"synthetic dataset, {args.height}x{args.width}, difficulty {args.difficulty}, one process, {pinning}")
    print(f"{'step':<30} {'images':>7} {'seconds':>8} {'images/s':>9}  size")
    for name, seconds in rows:
        print(f"{name:<30} {images:>7} {seconds:>8.2f} {images / seconds:>9.0f}  {args.height}x{args.width}")

    result = {
        "benchmark": "synthetic_generation",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "images": images,
        "height": args.height,
        "width": args.width,
        "ids": args.ids,
        "images_per_id": args.images_per_id,
        "difficulty": args.difficulty,
        "generate_seconds": round(generate_s, 3),
        "generate_images_per_s": round(images / generate_s, 1),
        "render_seconds": round(render_s, 3),
        "render_images_per_s": round(images / render_s, 1),
        "cpu": pinning,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": importlib.import_module("numpy").__version__,
        "pillow": importlib.import_module("PIL").__version__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
