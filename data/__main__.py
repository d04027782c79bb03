"""`python -m data --config FILE [--opts k=v ...]`: read (or generate) a config's dataset, print its summary."""
from __future__ import annotations

import argparse
import sys

from data.loaders import load_splits
from utils import UserError, load_config, one_line, plain_warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config naming dataset and data_root")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.opts)
        splits = load_splits(cfg)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(splits.summary())
    return 0


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
