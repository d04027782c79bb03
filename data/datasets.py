"""Dataset readers: turn a dataset folder into lists of (path, pid, camid) records.

Readers only list files; images are opened later by the loaders. Every reader returns a
`DatasetSplits` with `train`, `query`, `gallery` and an optional `multi_query` split. Identities
follow the Market-1501 protocol everywhere: pid -1 is junk (ignored in evaluation, dropped from
training), pid 0 is a distractor (a true negative in the gallery), every real person has another
integer. Camera ids are the numbers written in the file names (Market c1..c6 -> 1..6).

Layouts (`read_dataset(name, root)`). `root` may be the dataset folder itself or a folder holding it
one or two levels down (torchreid's `reid-data/market1501/Market-1501-v15.09.15` works from
`reid-data`); when several dataset folders are found there, the one with a usual name (e.g.
`Market-1501-v15.09.15` for market1501) is taken, and several of those is an error. A `root` inside
the dataset folder (`Market-1501-v15.09.15/bounding_box_train`) is an error naming the folder to use.

market1501
    `bounding_box_train/`, `bounding_box_test/` (gallery), `query/`, optional `gt_bbox/`
    (hand-drawn boxes, used as multi-query). Names `0002_c1s1_000451_03.jpg`: pid, `c<camera>`,
    `s<sequence>`, frame, box. `-1_...` is junk, `0000_...` a distractor.
dukemtmc
    `DukeMTMC-reID/{bounding_box_train, bounding_box_test, query}`, names `0001_c2_f0046182.jpg`
    (8 cameras); no multi-query.
cuhk03
    CUHK03-NP (the 767/700 protocol): `cuhk03-np/{detected, labeled}/{bounding_box_train,
    bounding_box_test, query}`, names `0001_c1_1.png`; `cuhk03_labeled` picks `labeled/`. `root` may
    also be `detected/` or `labeled/` itself (each has the Market layout): those boxes are read, and
    `cuhk03_labeled` with `detected/` is an error. `variant` says which boxes were read.
msmt17
    V1: `MSMT17_V1/{train/, test/, list_train.txt, list_val.txt, list_query.txt, list_gallery.txt}`;
    V2: the same with `mask_train_v2/` and `mask_test_v2/`. List lines are `<relative path> <pid>`,
    relative to the train folder (train and val lists) or the test folder (query and gallery lists).
    Training = list_train + list_val (the val images are training images of training identities;
    duplicates are dropped). The camera is the third field of the file name
    (`0000_000_01_0303morning_0015_0.jpg` -> camera 1, cameras 1..15). MSMT17 numbers people from 0,
    which our protocol reserves for distractors, so **every MSMT17 pid is shifted by +1**: list pid
    0 is pid 1 here (and in the folders `prepare.py` writes).
folder
    The per-identity layout of the original DG-Net tools (and of `prepare.py`):
    `root/{train_all, query, gallery, multi-query}/<ID>/<image>`; `root` may also be the parent of
    a `pytorch/` folder holding it. Only `train_all/` is required, so a user can train on their
    own data before having a test set; missing `query/`/`gallery/` give empty splits and a missing
    `multi-query/` gives None. The pid is the folder name: `-1` junk, `0000` distractor, `0002` pid 2.
    In `train_all/` folder names may also be arbitrary (`alice`, `bob`): if any name is not an
    integer, every identity folder is numbered by its sorted name from 1 (`-1` stays junk), which is
    the order torchvision's ImageFolder uses. In the test folders names must be integers. The camera
    comes from the file name, Market/Duke/CUHK style `<pid>_c<camera>...` or MSMT style
    `<pid>_<n>_<camera>_...`; a training image without one gets camid -1 (training does not use
    cameras), a test image without one is an error, since evaluation needs it (unless the config says
    `cross_camera: false`).
list
    `root/train.txt` and, for testing, `query.txt` and `gallery.txt` (`multi_query.txt` optional): one
    image per line, `<image path> <pid> [<camera>]`, the path relative to `root` (or absolute), pid and
    camera integers (-1 junk, 0 distractor); without a camera field the camera is read from the file name
    as for `folder`. Blank lines and `#` comments are skipped. Any list a tool writes (a CSV made
    space-separated, triplet-reid's style) becomes a dataset without copying images.

Non-image files (`Thumbs.db`, `.DS_Store`, hidden files such as macOS `._*`) are skipped; any image
whose name does not follow its layout is an error naming the file.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from utils import UserError

DATASETS = ("market1501", "dukemtmc", "msmt17", "cuhk03", "folder", "list")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

JUNK_PID = -1
DISTRACTOR_PID = 0


class Record(NamedTuple):
    path: str  # absolute path to the image file
    pid: int  # identity as in the dataset; -1 = junk, 0 = distractor
    camid: int  # camera number (file name or list); -1 = unknown (training, or tests with cross_camera false)


@dataclass
class DatasetSplits:
    name: str
    root: str
    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    multi_query: list[Record] | None = None
    variant: str = ""  # which version of the dataset was read, when it has several: "detected boxes" (CUHK03-NP)
    # held-out training identities for validation during training (`val_ids`): never trained on
    val_query: list[Record] = field(default_factory=list)
    val_gallery: list[Record] = field(default_factory=list)
    every_match: bool = False  # cross_camera false: the test cameras are stand-ins (loaders.every_match_counts)
    extra_sets: list[str] = field(default_factory=list)  # extra_train's sets, described, already in `train`

    @property
    def train_pids(self) -> list[int]:
        """Sorted distinct training pids (raw, as in the dataset)."""
        return sorted({r.pid for r in self.train})

    @property
    def num_classes(self) -> int:
        """Number of training identities, the classifier's C."""
        return len(self.train_pids)

    @property
    def train_labels(self) -> list[int]:
        """Per training record, its class label in 0..C-1 (rank of its pid among train_pids)."""
        label_of = {pid: i for i, pid in enumerate(self.train_pids)}
        return [label_of[r.pid] for r in self.train]

    @property
    def title(self) -> str:
        """The name with the variant, for messages: `cuhk03 (labeled boxes)`."""
        return f"{self.name} ({self.variant})" if self.variant else self.name

    def summary(self) -> str:
        splits = [("train", self.train), ("query", self.query), ("gallery", self.gallery)]
        if self.multi_query is not None:
            splits.append(("multi-query", self.multi_query))
        lines = [f"{self.title} at {self.root}"]
        if self.val_query:
            splits += [("val query", self.val_query), ("val gallery", self.val_gallery)]
        lines += [_split_line(label, records, label == "train", cameras=label == "train" or not self.every_match)
                  for label, records in splits]
        lines += [f"  (train includes {extra})" for extra in self.extra_sets]
        if self.every_match:
            lines.append("  cross_camera false: every match counts, whatever the cameras")
        return "\n".join(lines)


def hold_out_validation(splits: DatasetSplits, num_ids: int, seed: int) -> None:
    """Move `num_ids` training identities (seeded choice among those seen by 2 or more cameras) out of the
    training split into a validation query/gallery: per identity and camera, the first image is a query,
    the others are gallery; then a query with no gallery image of its identity in another camera (which the
    Market rules would leave without a match) joins the gallery instead. So every query has a match in
    another camera and every held identity keeps at least one query (once the first camera's query has
    moved, the next one has its match). The remaining identities are relabelled 0..C-1 (labels follow the
    training pids)."""
    cameras: dict[int, set[int]] = {}
    for r in splits.train:
        cameras.setdefault(r.pid, set()).add(r.camid)
    eligible = sorted(pid for pid, cams in cameras.items() if len(cams) >= 2 and pid not in (JUNK_PID,))
    if all(r.camid < 0 for r in splits.train):
        raise UserError(f"val_ids is {num_ids} but no training image has a camera in its name (<pid>_c<camera>_..."
                        "), and validation holds identities out by camera, as the protocol matches; set val_ids: 0, "
                        "or name the images with their cameras")
    if num_ids > len(cameras) - 2:
        raise UserError(f"val_ids is {num_ids} but the training split has {len(cameras)} identities, and training "
                        "needs at least 2 left; lower val_ids")
    if num_ids > len(eligible):
        raise UserError(f"val_ids is {num_ids} but only {len(eligible)} of the {len(cameras)} training identities "
                        "appear in 2 or more cameras; lower val_ids")
    held = {int(p) for p in np.random.default_rng([seed, 0x7A1]).choice(eligible, size=num_ids, replace=False)}
    first_seen: set[tuple[int, int]] = set()
    queries: list[Record] = []
    for r in sorted((r for r in splits.train if r.pid in held), key=lambda r: r.path):
        key = (r.pid, r.camid)
        (splits.val_gallery if key in first_seen else queries).append(r)
        first_seen.add(key)
    gallery_cameras: dict[int, set[int]] = {}
    for r in splits.val_gallery:
        gallery_cameras.setdefault(r.pid, set()).add(r.camid)
    for q in queries:  # the gallery only grows, so a query kept stays matched
        if gallery_cameras.get(q.pid, set()) - {q.camid}:
            splits.val_query.append(q)
        else:
            splits.val_gallery.append(q)
            gallery_cameras.setdefault(q.pid, set()).add(q.camid)
    splits.train = [r for r in splits.train if r.pid not in held]


def _split_line(label: str, records: list[Record], is_train: bool, cameras: bool = True) -> str:
    # In training pid 0 is an ordinary class (see _read_folder); in test splits it is a distractor.
    special = {JUNK_PID} if is_train else {JUNK_PID, DISTRACTOR_PID}
    ids = len({r.pid for r in records} - special)
    line = f"  {label:<12}{len(records):>7} images {ids:>6} identities"
    if cameras:
        line += f" {len({r.camid for r in records} - {-1}):>3} cameras"
    extra = []
    if not is_train:
        if n := sum(r.pid == DISTRACTOR_PID for r in records):
            extra.append(f"{n} distractor")
        if n := sum(r.pid == JUNK_PID for r in records):
            extra.append(f"{n} junk")
    if cameras and (n := sum(r.camid == -1 for r in records)):
        extra.append(f"{n} without camera")
    return line + (f" ({', '.join(extra)})" if extra else "")


def is_image_name(name: str) -> bool:
    """True for a visible file name with an image extension (so Thumbs.db, ._x.jpg are not)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | os.PathLike) -> list[str]:
    """Paths of the image files directly in `folder`, sorted by name; other files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"no folder {folder}; expected a folder of images")
    names = sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_name(e.name))
    return [str(folder / n) for n in names]


PARTS = ("all", "train", "test")


def read_dataset(name: str, root: str | os.PathLike, *, cuhk03_labeled: bool = False,
                 test_cameras: bool = True, part: str = "all") -> DatasetSplits:
    """Read dataset `name` (one of DATASETS) from `root`; `cuhk03_labeled` only matters for cuhk03;
    `test_cameras: False` lets the folder and list layouts' test images have no camera (camid -1).
    `part`: "train" (an extra training set) or "test" (evaluation) reads and requires only that part of
    the `folder` and `list` layouts, so one's own test set needs no training images; the public datasets,
    which always have both, are read whole."""
    if part not in PARTS:
        raise ValueError(f"part is {part!r}; one of {PARTS}")
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown dataset {name!r}; {hint}known datasets: {', '.join(DATASETS)}")
    root = Path(os.path.abspath(os.path.expanduser(root)))
    if name == "market1501":
        return _read_market(root)
    if name == "dukemtmc":
        return _read_duke(root)
    if name == "cuhk03":
        return _read_cuhk03(root, cuhk03_labeled)
    if name == "msmt17":
        return _read_msmt17(root)
    if name == "list":
        return _read_lists(root, test_cameras, part)
    return _read_folder(root, test_cameras, part)


# ---------------------------------------------------------------------------------------------
# Finding the dataset folder


class _Layout(NamedTuple):
    name: str  # dataset name, the prefix of every message
    marker: str  # a sub-path that only the dataset folder itself has
    folder_names: tuple[str, ...]  # usual names of the dataset folder, compared case-insensitively
    expected: str  # what the folder should contain, for messages


_MARKET = _Layout(
    "market1501", "bounding_box_train", ("market-1501-v15.09.15", "market-1501", "market1501", "market"),
    "the raw Market-1501 folder with bounding_box_train/, bounding_box_test/, query/ and optionally "
    "gt_bbox/, or its parent",
)
_DUKE = _Layout(
    "dukemtmc", "bounding_box_train", ("dukemtmc-reid", "dukemtmc_reid", "dukemtmc"),
    "the DukeMTMC-reID folder with bounding_box_train/, bounding_box_test/, query/, or its parent",
)
_CUHK03_EXPECTED = (
    "the CUHK03-NP folder (cuhk03-np/) with detected/ and labeled/, each holding bounding_box_train/, "
    "bounding_box_test/, query/, or its parent, or detected/ or labeled/ itself"
)
_MSMT_EXPECTED = (
    "the MSMT17_V1 folder with train/, test/, list_train.txt, list_val.txt, list_query.txt, "
    "list_gallery.txt (or MSMT17_V2 with mask_train_v2/, mask_test_v2/ and the same lists), or its parent"
)
_MSMT = _Layout("msmt17", "list_train.txt", ("msmt17_v1", "msmt17_v2", "msmt17"), _MSMT_EXPECTED)
_FOLDER = _Layout(
    "folder", "train_all", ("pytorch",),
    "a per-identity folder with train_all/<ID>/ images and optionally query/, gallery/, multi-query/ "
    "(as prepare.py writes)",
)
_CUHK03_NAMES = ("cuhk03-np", "cuhk03_np", "cuhk03np", "cuhk03")
_CUHK03_BOXES = ("detected", "labeled")
# Every dataset's usual folder names, so that a search for one never takes another's folder
_CUHK03 = _Layout("cuhk03", "detected", _CUHK03_NAMES, _CUHK03_EXPECTED)  # read: detected/ or labeled/ (_read_cuhk03)
_LAYOUTS = (_MARKET, _DUKE, _MSMT, _FOLDER, _CUHK03)


def _marker_name(layout: _Layout) -> str:
    return layout.marker + ("" if "." in layout.marker else "/")


def _missing(layout: _Layout, what: str, where: Path) -> UserError:
    return UserError(
        f"{layout.name}: no {what} under {where} (expected {layout.expected}); set data_root to it"
    )


def _inside(layout: _Layout, root: Path, dataset_folder: Path, what: str = "") -> UserError:
    return UserError(f"{layout.name}: no {what or _marker_name(layout)} under {root}: it is a folder inside the "
                     f"dataset; set data_root to {dataset_folder}")


def _holds(layout: _Layout, folder: Path) -> bool:
    return (folder / layout.marker).exists()


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError:  # an unreadable folder holds nothing we can read
        return []


def _other_datasets_names(layout: _Layout) -> set[str]:
    """The usual names of the other datasets with the same marker (Market-1501's and DukeMTMC-reID's)."""
    return {n for other in _LAYOUTS if other.name != layout.name and other.marker == layout.marker
            for n in other.folder_names}


def _locate(layout: _Layout, root: Path) -> Path:
    """The dataset folder: `root` itself, or the one dataset folder one or two levels below it.

    A `root` one or two levels inside the dataset folder is an error naming the folder to use: reading a
    split folder (bounding_box_train/) as the whole dataset would be wrong, and going up silently would
    hide which data is read.
    """
    if root.is_file():
        raise UserError(f"{layout.name}: data root {root} is a file, not a folder; extract it if it is an archive "
                        f"and set data_root to {layout.expected}")
    if not root.is_dir():
        raise UserError(
            f"{layout.name}: data root {root} does not exist; set data_root to {layout.expected}"
        )
    if _holds(layout, root):
        return root
    for above in (root.parent, root.parent.parent):
        if above != root and _holds(layout, above):
            raise _inside(layout, root, above)
    # Below: one level, then two; another dataset's usual folder (DukeMTMC-reID for market1501, which has
    # the same marker) is never taken.
    others = _other_datasets_names(layout)
    level = [root]
    for _ in range(2):
        level = [sub for folder in level for sub in _subfolders(folder)]
        found = [f for f in level if _holds(layout, f) and f.name.lower() not in others]
        if len(found) > 1:  # e.g. Market-1501-v15.09.15 next to a copy: the usual name decides
            usual = [f for f in found if f.name.lower() in layout.folder_names]
            if len(usual) == 1:
                return usual[0]
            names = ", ".join(str(f.relative_to(root)) for f in (usual or found))
            raise UserError(f"{layout.name}: {root} holds several dataset folders ({names}); "
                            "set data_root to one of them")
        if found:
            return found[0]
    raw, prepared = _holds(_MARKET, root), _holds(_FOLDER, root)
    if layout is _FOLDER and raw:
        raise UserError(f"folder: {root} holds bounding_box_train/, a raw dataset, not per-identity folders; set "
                        "dataset to market1501, dukemtmc or cuhk03 to read it, or run prepare.py on it")
    if layout is not _FOLDER and prepared:
        raise UserError(f"{layout.name}: {root} holds train_all/, the per-identity layout prepare.py writes; set "
                        "dataset: folder to read it, or data_root to the raw dataset")
    raise _missing(layout, _marker_name(layout), root)


def dataset_folder(name: str, root: str | os.PathLike) -> Path:
    """The folder read_dataset reads for `root` (the dataset folder below a parent, symbolic links
    resolved), so two data_roots naming the same data compare equal; `root` itself, resolved, where it
    holds no such dataset here (e.g. a run's data_root on another machine)."""
    root = Path(os.path.abspath(os.path.expanduser(root)))
    layout = {"market1501": _MARKET, "synthetic": _MARKET, "dukemtmc": _DUKE, "msmt17": _MSMT,
              "folder": _FOLDER, "cuhk03": _CUHK03}.get(name)
    try:
        return (_locate(layout, root) if layout else root).resolve()
    except UserError:
        return root.resolve()


def _require_dir(layout: _Layout, folder: Path, sub: str) -> Path:
    path = folder / sub
    if not path.is_dir():
        raise _missing(layout, f"{sub}/", folder)
    return path


# ---------------------------------------------------------------------------------------------
# Market-1501, DukeMTMC-reID, CUHK03-NP: one folder per split, pid and camera in the file name

# `<pid>_c<camera>` then `s<sequence>_` (Market) or `_` (Duke, CUHK03-NP); cameras may have two digits.
_BOX_NAME = re.compile(r"^(-?\d+)_c(\d+)(?:s\d+)?_")
_BOX_EXAMPLES = {
    "market1501": "0002_c1s1_000451_03.jpg",
    "dukemtmc": "0001_c2_f0046182.jpg",
    "cuhk03": "0001_c1_1.png",
}


def _read_box_folder(dataset: str, folder: Path) -> list[Record]:
    records = []
    for path in list_images(folder):
        match = _BOX_NAME.match(os.path.basename(path))
        pid = int(match.group(1)) if match else None
        if pid is None or pid < JUNK_PID:
            raise UserError(
                f"{dataset}: cannot read identity and camera from file name {path} (expected names like "
                f"{_BOX_EXAMPLES[dataset]}: <pid>_c<camera>_...); remove or rename the file"
            )
        records.append(Record(path, pid, int(match.group(2))))
    return records


def _read_box_layout(layout: _Layout, folder: Path, multi_query: str | None = None,
                     variant: str = "") -> DatasetSplits:
    def split(sub: str) -> list[Record]:
        return _read_box_folder(layout.name, folder / sub)

    for sub in ("bounding_box_train", "bounding_box_test", "query"):  # all folders checked before any file
        _require_dir(layout, folder, sub)
    train = [r for r in split("bounding_box_train") if r.pid != JUNK_PID]
    if not train:
        raise UserError(f"{layout.name}: no training images in {folder / 'bounding_box_train'}; "
                        "check that the dataset was extracted completely")
    query, gallery = split("query"), split("bounding_box_test")
    multi = split(multi_query) if multi_query and (folder / multi_query).is_dir() else None
    return DatasetSplits(layout.name, str(folder), train, query, gallery, multi, variant=variant)


def _read_market(root: Path) -> DatasetSplits:
    return _read_box_layout(_MARKET, _locate(_MARKET, root), multi_query="gt_bbox")


def _read_duke(root: Path) -> DatasetSplits:
    return _read_box_layout(_DUKE, _locate(_DUKE, root))


def _read_cuhk03(root: Path, labeled: bool) -> DatasetSplits:
    split = "labeled" if labeled else "detected"
    layout = _Layout("cuhk03", split, _CUHK03_NAMES, _CUHK03_EXPECTED)
    if (root / "bounding_box_train").is_dir() and not (root / split).is_dir():
        # root is detected/ or labeled/ itself, which has the Market layout: its boxes are read
        boxes = next((b for b in _CUHK03_BOXES if b in root.name.lower()), None)
        if labeled and boxes == "detected":
            raise UserError(f"cuhk03: the labeled boxes were asked for (cuhk03_labeled) but {root} holds the "
                            f"detected ones; set data_root to {root.parent / 'labeled'} or to {root.parent}")
        return _read_box_layout(layout, root, variant=f"{boxes or root.name + '/'} boxes")
    if root.is_dir() and (root.parent / "bounding_box_train").is_dir():  # e.g. cuhk03-np/detected/query
        raise _inside(layout, root, root.parent, "bounding_box_train/")
    folder = _locate(layout, root)
    return _read_box_layout(layout, _require_dir(layout, folder, split), variant=f"{split} boxes")


# ---------------------------------------------------------------------------------------------
# MSMT17: list files name the images and their pids

_MSMT_NAME = re.compile(r"^\d+_\d+_(\d+)_")  # <pid>_<index>_<camera>_<day+time>_<frame>_<n>.jpg


def _msmt_camera(path: str) -> int:
    match = _MSMT_NAME.match(os.path.basename(path))
    if not match:
        raise UserError(
            f"msmt17: cannot read the camera from file name {path} (expected names like "
            "0000_000_01_0303morning_0015_0.jpg: <pid>_<index>_<camera>_...); remove it from the list"
        )
    return int(match.group(1))


def _read_msmt_list(list_file: Path, image_dir: Path) -> list[Record]:
    records = []
    for number, line in enumerate(_text_lines(list_file), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not re.fullmatch(r"\d+", fields[1]):
            raise UserError(
                f"msmt17: line {number} of {list_file} is {line.strip()!r}; expected '<relative path> <pid>'"
            )
        path = str(image_dir / fields[0])
        # +1: MSMT17 numbers people from 0, which the evaluation protocol reserves for distractors.
        records.append(Record(path, int(fields[1]) + 1, _msmt_camera(path)))
    return records


LIST_FILES = {"train": "train.txt", "query": "query.txt", "gallery": "gallery.txt", "multi_query": "multi_query.txt"}


# `<image path> <pid> [<camera>]`: the numbers are read from the right, so a path may hold spaces
_LIST_LINE = re.compile(r"(?P<path>\S.*?)\s+(?P<pid>-?\d+)(?:\s+(?P<camera>-?\d+))?")


def _text_lines(path: Path) -> list[str]:
    """A list file's lines: UTF-8, with or without the byte-order mark spreadsheets write."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (UTF-16, as Windows PowerShell's > writes?): save it as "
                        "UTF-8") from None


def _read_list_file(path: Path, root: Path, is_train: bool, cameras: bool) -> list[Record]:
    """`<image path> <pid> [<camera>]` per line (paths relative to the list's folder, or absolute); without a
    camera field, the camera is read from the file name as for `folder`."""
    records = []
    for number, line in enumerate(_text_lines(path), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = _LIST_LINE.fullmatch(line.strip())
        if fields is None:
            raise UserError(f"list: line {number} of {path} is {line.strip()!r}; expected '<image path> <pid> "
                            "[<camera>]' (integers; pid -1 junk, 0 distractor)")
        if int(fields["pid"]) < JUNK_PID or (fields["camera"] and int(fields["camera"]) < 0):
            raise UserError(f"list: line {number} of {path} is {line.strip()!r}; the pid must be -1 (junk), 0 "
                            "(distractor) or a person's number, and the camera 0 or more")
        image = root / fields["path"]
        camid = int(fields["camera"]) if fields["camera"] else _camera_or_unknown(
            image.name, is_train, cameras, f"list: line {number} of {path} gives no camera and {image.name} has "
            "none in its name; add a third field (the camera)")
        records.append(Record(str(image), int(fields["pid"]), camid))
    _check_exist(records, str(path), "list", f"paths are relative to {root}")
    return records


def _read_lists(root: Path, test_cameras: bool = True, part: str = "all") -> DatasetSplits:
    """`list`: data_root holds train.txt and, for testing, query.txt and gallery.txt (multi_query.txt
    optional), one image per line; `part` as read_dataset's."""
    if part != "test" and not (root / LIST_FILES["train"]).is_file():
        raise UserError(f"list: no {LIST_FILES['train']} in {root}; it lists the training images, one "
                        "'<image path> <pid> [<camera>]' per line (see docs/data.md)")
    if part == "test" and not any((root / LIST_FILES[s]).is_file() for s in ("query", "gallery")):
        raise UserError(f"list: no {LIST_FILES['query']} nor {LIST_FILES['gallery']} in {root}; they list the "
                        "test images, one '<image path> <pid> [<camera>]' per line (see docs/data.md)")

    def read(split: str) -> list[Record] | None:
        path = root / LIST_FILES[split]
        wanted = part == "all" or (split == "train") == (part == "train")
        return _read_list_file(path, root, split == "train", test_cameras) if wanted and path.is_file() else None

    train = [r for r in read("train") or [] if r.pid != JUNK_PID]
    if not train and part != "test":
        raise UserError(f"list: {root / LIST_FILES['train']} names no training image")
    return DatasetSplits("list", str(root), train, read("query") or [], read("gallery") or [], read("multi_query"))


def _check_exist(records: Iterable[Record], list_files: str, layout: str = "msmt17",
                 hint: str = "check that the dataset was extracted completely") -> None:
    missing = [r.path for r in records if not os.path.isfile(r.path)]
    if missing:
        raise UserError(f"{layout}: {len(missing)} images named in {list_files} do not exist, e.g. {missing[0]}; "
                        f"{hint}")


def _read_msmt17(root: Path) -> DatasetSplits:
    folder = _locate(_MSMT, root)
    versions = [v for v in (("train", "test"), ("mask_train_v2", "mask_test_v2")) if (folder / v[0]).is_dir()]
    if len(versions) != 1:
        what = "both train/ and mask_train_v2/" if versions else "train/ (V1) or mask_train_v2/ (V2)"
        raise UserError(f"msmt17: found {what} under {folder} (expected {_MSMT_EXPECTED}); "
                        "set data_root to a folder holding exactly one version")
    train_dir, test_dir = folder / versions[0][0], _require_dir(_MSMT, folder, versions[0][1])

    def read(list_name: str, image_dir: Path) -> list[Record]:
        list_file = folder / list_name
        if not list_file.is_file():
            raise _missing(_MSMT, list_name, folder)
        return _read_msmt_list(list_file, image_dir)

    train: dict[str, Record] = {}
    for r in read("list_train.txt", train_dir) + read("list_val.txt", train_dir):
        if train.setdefault(r.path, r).pid != r.pid:
            raise UserError(f"msmt17: {r.path} has two different pids in list_train.txt and list_val.txt")
    query, gallery = read("list_query.txt", test_dir), read("list_gallery.txt", test_dir)
    _check_exist(train.values(), "list_train.txt/list_val.txt")
    _check_exist(query + gallery, "list_query.txt/list_gallery.txt")
    if not train:
        raise UserError(f"msmt17: list_train.txt under {folder} names no images; "
                        "check that the dataset was extracted completely")
    return DatasetSplits("msmt17", str(folder), sorted(train.values()), sorted(query), sorted(gallery))


# ---------------------------------------------------------------------------------------------
# Per-identity folders (the original DG-Net tools' layout)

_INTEGER = re.compile(r"^-?\d+$")
_FOLDER_CAMERA = (_BOX_NAME, re.compile(r"^-?\d+_\d+_(\d+)_"))  # Market/Duke/CUHK style, MSMT style


def camera_from_name(name: str) -> int | None:
    for pattern in _FOLDER_CAMERA:
        if match := pattern.match(name):
            return int(match.groups()[-1])
    return None


def _camera_or_unknown(name: str, is_train: bool, cameras: bool, missing: str) -> int:
    """The camera in a file name; -1 (unknown) for a training image, or a test image when `cameras` is off
    (cross_camera: false); otherwise `missing` as the error."""
    camid = camera_from_name(name)
    if camid is not None:
        return camid
    if not is_train and cameras:
        raise UserError(f"{missing}, or set cross_camera: false (every match then counts, same camera or not)")
    return -1


def _identity_folders(split_dir: Path) -> list[Path]:
    folders = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            folders.append(Path(entry.path))
        elif entry.is_file() and is_image_name(entry.name):
            raise UserError(
                f"folder: image {entry.path} lies directly in {split_dir.name}/; "
                f"images belong in per-identity folders {split_dir.name}/<ID>/<image>"
            )
    return folders


def _folder_pids(split_dir: Path, folders: list[Path], is_train: bool) -> list[int]:
    names = [f.name for f in folders]
    if not all(_INTEGER.match(n) for n in names):
        if not is_train:
            bad = next(n for n in names if not _INTEGER.match(n))
            raise UserError(
                f"folder: identity folder {split_dir / bad} is not a number; test folders must be named "
                "by integer pid (-1 junk, 0000 distractor, 0002 ...)"
            )
        # Arbitrary names: number identities by sorted name from 1, so no real one becomes 0 or -1.
        rank = {n: i for i, n in enumerate((n for n in names if n != str(JUNK_PID)), 1)}
        return [rank.get(n, JUNK_PID) for n in names]
    pids = [int(n) for n in names]
    seen: dict[int, str] = {}
    for name, pid in zip(names, pids, strict=True):
        if pid < JUNK_PID:
            raise UserError(f"folder: identity folder {split_dir / name} is negative; only -1 (junk) may be")
        if (other := seen.setdefault(pid, name)) != name:
            raise UserError(f"folder: {split_dir / other} and {split_dir / name} are the same identity "
                            f"{pid}; merge them")
    return pids


def _read_identity_split(root: Path, split: str, is_train: bool, cameras: bool = True) -> list[Record]:
    split_dir = root / split
    folders = _identity_folders(split_dir)
    records = []
    for folder, pid in zip(folders, _folder_pids(split_dir, folders, is_train), strict=True):
        nested = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        if nested:  # its images would be left out without a word
            raise UserError(f"folder: {folder / nested[0]} is a folder inside identity folder {split}/{folder.name}/; "
                            f"put that identity's images directly in {split}/{folder.name}/ (sub-folders are not read)")
        for path in list_images(folder):
            camid = _camera_or_unknown(
                os.path.basename(path), is_train, cameras, f"folder: cannot read the camera from file name {path}; "
                "test images need names like 0002_c1s1_000451_03.jpg (<pid>_c<camera>_...) or "
                "0000_000_01_0303morning_0015_0.jpg (MSMT17)")
            records.append(Record(path, pid, camid))
    return records


def _read_folder(root: Path, test_cameras: bool = True, part: str = "all") -> DatasetSplits:
    """The per-identity layout (prepare.py's); `part` as read_dataset's: a test set alone is a folder with
    query/ and gallery/."""
    if part == "test" and not (root / "train_all").is_dir() and (root / "query").is_dir():
        folder = root
    else:
        folder = _locate(_FOLDER, root)

    def optional(split: str) -> list[Record] | None:
        wanted = part != "train" and (folder / split).is_dir()
        return _read_identity_split(folder, split, False, test_cameras) if wanted else None

    train = [] if part == "test" else [r for r in _read_identity_split(folder, "train_all", True) if r.pid != JUNK_PID]
    if not train and part != "test":
        raise UserError(f"folder: no training images in {folder / 'train_all'}; "
                        "put each identity's images in train_all/<ID>/")
    return DatasetSplits(
        "folder", str(folder), train, optional("query") or [], optional("gallery") or [],
        optional("multi-query"),
    )

