"""Write a raw re-ID dataset as the per-identity folders of the original DG-Net tools.

    python prepare.py --dataset market1501 --src ../Market-1501-v15.09.15 --dst ../Market/pytorch

writes `DST/{train_all, train, val, query, gallery, multi-query}/<pid>/<original file name>`:
`train_all` is every training image, `val` the first image (by name) of each training identity and
`train` the rest, `multi-query` Market-1501's gt_bbox/. Pid folders are `%04d` (`-1` for junk,
`0000` for distractors); MSMT17 pids are shifted by +1 as in `data/datasets.py`. This code does not
need the result (it reads the raw folders directly); it is for users of the original tools, and
`--dataset folder` reads it back.

The folder layout reads cameras from file names, so `--dataset list` prefixes a name with
`<pid>_c<camera>_` when the camera its list gives is not already in it. An image that a list gives
without a camera keeps its name, and test images without one read back with `cross_camera: false`
only (the summary says so).

Files are hard links by default (no extra disk space), copies when linking fails (another
device) or with `--copy`. Nothing is ever deleted or overwritten: a target that already holds the
same file is skipped, so the script can be re-run; a target holding a different file is an error,
found before anything is written.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from data.datasets import DATASETS, DatasetSplits, Record, camera_from_name, read_dataset
from utils import UserError, plain_warnings

RAW_DATASETS = tuple(d for d in DATASETS if d != "folder")


def pid_folder(pid: int) -> str:
    """Folder name of an identity: `%04d`, except junk, which is `-1` as in the original tools."""
    return "-1" if pid == -1 else f"{pid:04d}"


def target_name(record: Record) -> str:
    """The file name in the per-identity layout: the original one when the `folder` reader finds the record's
    camera in it (every raw dataset's names), else prefixed with `<pid>_c<camera>_` (a list's camera column)."""
    name = os.path.basename(record.path)
    # the reader's own rule, so that what is written here reads back with the same camera
    if record.camid == -1 or camera_from_name(name) == record.camid:
        return name
    return f"{pid_folder(record.pid)}_c{record.camid}_{name}"


def split_train_val(train: list[Record]) -> tuple[list[Record], list[Record]]:
    """(train, val): val holds the first image (by file name) of each identity, train the rest."""
    by_pid: dict[int, list[Record]] = defaultdict(list)
    for r in train:
        by_pid[r.pid].append(r)
    rest, val = [], []
    for records in by_pid.values():
        first, *others = sorted(records, key=lambda r: os.path.basename(r.path))
        val.append(first)
        rest.extend(others)
    return rest, val


def plan(data: DatasetSplits, dst: Path) -> dict[str, list[tuple[str, Path]]]:
    """Per output split, the (source file, target path) pairs to write."""
    rest, val = split_train_val(data.train)
    splits = {"train_all": data.train, "train": rest, "val": val}
    splits.update(query=data.query, gallery=data.gallery)
    if data.multi_query is not None:
        splits["multi-query"] = data.multi_query
    return {
        split: [(r.path, dst / split / pid_folder(r.pid) / target_name(r)) for r in records]
        for split, records in splits.items()
    }


def _same_file(src: str, target: Path) -> bool:
    return target.is_file() and (os.path.samefile(src, target) or filecmp.cmp(src, target, shallow=False))


def pending(pairs: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """The pairs still to write; an existing different file, or two sources for one target, is an error."""
    source_of: dict[Path, str] = {}
    todo = []
    for src, target in pairs:
        if target in source_of:  # a list may name one image twice: written once
            if source_of[target] != src:
                raise UserError(f"prepare: {source_of[target]} and {src} would both be written to {target}")
            continue
        source_of[target] = src
        if target.exists() or target.is_symlink():
            if not _same_file(src, target):
                raise UserError(
                    f"prepare: {target} already exists and differs from {src}; "
                    "nothing was written: choose an empty --dst"
                )
            continue
        todo.append((src, target))
    return todo


def place(src: str, target: Path, copy: bool) -> bool:
    """Hard-link (or copy) src to target, never replacing a file; True when it was linked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            os.link(src, target)
            return True
        except FileExistsError:
            raise
        except OSError:
            pass  # another device, or a file system without hard links: copy instead
    with open(src, "rb") as source, open(target, "xb") as out:  # "x": fail rather than overwrite
        shutil.copyfileobj(source, out)
    shutil.copystat(src, target)
    return False


def prepare(dataset: str, src: str | os.PathLike, dst: str | os.PathLike, *, copy: bool = False,
            cuhk03_labeled: bool = False) -> str:
    """Write the per-identity layout of `dataset` read from `src` into `dst`; returns a summary."""
    if dataset not in RAW_DATASETS:
        raise UserError(f"prepare: --dataset must be one of {', '.join(RAW_DATASETS)}, not {dataset!r}")
    try:
        # test_cameras off: a list without cameras is still prepared (only `list` reads it; see the summary)
        data = read_dataset(dataset, src, cuhk03_labeled=cuhk03_labeled, test_cameras=False)
    except UserError as error:  # the readers name the config's keys; here the same settings are options
        message = str(error).replace("data_root", "--src").replace("data root", "--src")
        # a folder prepare.py wrote already: nothing to prepare, and the config reads it as it is
        message = message.replace("set dataset: folder to read it, or --src to the raw dataset",
                                  "it is prepared already (a config reads it with dataset: folder), or set --src to "
                                  "the raw dataset")
        raise UserError(message.replace("cuhk03_labeled", "--cuhk03-labeled")) from None
    dst = Path(os.path.abspath(os.path.expanduser(dst)))
    if dst.exists() and not dst.is_dir():
        raise UserError(f"prepare: --dst {dst} is a file; give a folder (it is created when missing)")
    source = Path(os.path.abspath(data.root))
    if dst in (source, Path(os.path.abspath(os.path.expanduser(src)))) or source in dst.parents:
        raise UserError(f"prepare: --dst {dst} overlaps the raw dataset at {source}; give a folder outside it "
                        "(the raw layout is left as it is)")
    splits = plan(data, dst)
    todo = pending([pair for pairs in splits.values() for pair in pairs])
    try:
        linked = sum(place(src_file, target, copy) for src_file, target in todo)
    except OSError as error:
        raise UserError(f"prepare: cannot write under {dst}: {error}") from error
    lines = [f"prepare: {data.title} from {data.root} -> {dst}"]
    for split, pairs in splits.items():
        ids = len({target.parent.name for _, target in pairs})
        lines.append(f"  {split:<12}{len(pairs):>7} images {ids:>6} identity folders")
    lines.append(f"  {linked} linked, {len(todo) - linked} copied, "
                 f"{len({target for pairs in splits.values() for _, target in pairs}) - len(todo)} already there")
    if unknown := sum(r.camid == -1 for r in data.query + data.gallery + (data.multi_query or [])):
        lines.append(f"  {unknown} test images have no camera (none in the list nor the name): read {dst} with "
                     "cross_camera: false")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, choices=RAW_DATASETS)
    parser.add_argument("--src", required=True,
                        help="the raw dataset folder or a folder holding it (cuhk03: cuhk03-np/, or its detected/ "
                        "or labeled/)")
    parser.add_argument("--dst", required=True, help="output folder, e.g. ../Market/pytorch")
    parser.add_argument("--copy", action="store_true", help="copy files instead of hard-linking them")
    parser.add_argument("--cuhk03-labeled", action="store_true",
                        help="cuhk03: the hand-labeled boxes instead of the detected ones")
    args = parser.parse_args(argv)
    try:
        print(prepare(args.dataset, args.src, args.dst, copy=args.copy, cuhk03_labeled=args.cuhk03_labeled))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
