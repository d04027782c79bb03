"""Dataset readers (data/datasets.py) and prepare.py, on tiny fake trees with each layout's quirks."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

import prepare
from data.datasets import DATASETS, DatasetSplits, Record, list_images, read_dataset
from utils import UserError

REPO = Path(__file__).resolve().parents[1]


def make_image(path: Path) -> None:
    """A tiny valid image whose colour depends on its name, so different files differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    crc = zlib.crc32(path.name.encode())
    colour = (crc & 255, (crc >> 8) & 255, (crc >> 16) & 255)
    Image.new("RGB", (4, 8), colour).save(path)


def make_files(folder: Path, names: list[str]) -> None:
    for name in names:
        if name.lower().endswith((".jpg", ".png")):
            make_image(folder / name)
        else:  # the clutter real datasets ship with
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"not an image")


def key(records: list[Record]) -> list[tuple[str, int, int]]:
    """Records up to their folder: (file name, pid, camid), sorted."""
    return sorted((os.path.basename(r.path), r.pid, r.camid) for r in records)


def pids(records: list[Record]) -> set[int]:
    return {r.pid for r in records}


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Trees

MARKET_TRAIN = [
    "0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c12s3_000101_00.jpg",
    "0007_c3s1_000551_02.jpg", "0011_c6s2_000876_01.jpg", "-1_c1s1_000401_04.jpg",
    "Thumbs.db", ".DS_Store", "._0002_c1s1_000451_03.jpg",
]
MARKET_TEST = [
    "0003_c1s1_000026_01.jpg", "0003_c4s1_000126_02.jpg", "0005_c5s2_001001_01.jpg",
    "0000_c2s1_000301_05.jpg", "-1_c3s1_000001_00.jpg", "Thumbs.db",
]
MARKET_QUERY = ["0003_c2s1_000151_00.jpg", "0005_c1s1_000201_00.jpg"]
MARKET_GT_BBOX = ["0003_c2s1_000151_00.jpg", "0003_c2s1_000176_00.jpg", "0005_c1s1_000201_00.jpg"]


def make_market(root: Path, gt_bbox: bool = True) -> Path:
    make_files(root / "bounding_box_train", MARKET_TRAIN)
    make_files(root / "bounding_box_test", MARKET_TEST)
    make_files(root / "query", MARKET_QUERY)
    if gt_bbox:
        make_files(root / "gt_bbox", MARKET_GT_BBOX)
    return root


def make_duke(root: Path) -> Path:
    make_files(root / "bounding_box_train",
               ["0001_c2_f0046182.jpg", "0001_c8_f0001234.jpg", "0004_c1_f0000100.jpg"])
    make_files(root / "bounding_box_test", ["0005_c3_f0000200.jpg", "0005_c7_f0000300.jpg", "0006_c5_f1.jpg"])
    make_files(root / "query", ["0005_c1_f0000400.jpg", "0006_c2_f0000500.jpg"])
    return root


def make_cuhk03(root: Path) -> Path:
    for split, cams in (("detected", (1, 2)), ("labeled", (2, 1))):
        a, b = cams
        train = [f"0001_c{a}_1.png", f"0001_c{b}_2.png", f"0002_c{a}_{a}.png"]
        make_files(root / split / "bounding_box_train", train)
        make_files(root / split / "bounding_box_test", [f"0003_c{a}_1.png", f"0004_c{b}_1.png"])
        make_files(root / split / "query", [f"0003_c{b}_2.png", f"0004_c{a}_2.png"])
    return root


MSMT_TRAIN = {  # list pid -> file names; MSMT17 numbers people from 0
    0: ["0000_000_01_0303morning_0015_0.jpg", "0000_001_15_0303morning_0016_0.jpg"],
    1: ["0001_000_07_0303noon_0020_1.jpg", "0001_001_03_0303noon_0021_0.jpg"],
}
MSMT_TEST = {0: ["0000_000_02_0113morning_0001_0.jpg", "0000_001_11_0113morning_0002_0.jpg"],
             4: ["0004_000_04_0113noon_0003_0.jpg", "0004_001_12_0113noon_0004_1.jpg"]}


def write_list(path: Path, entries: list[tuple[str, int]]) -> None:
    path.write_text("".join(f"{rel} {pid}\n" for rel, pid in entries))


def make_msmt(root: Path, v2: bool = False) -> Path:
    train_dir, test_dir = ("mask_train_v2", "mask_test_v2") if v2 else ("train", "test")
    train = [(f"{pid:04d}/{name}", pid) for pid, names in MSMT_TRAIN.items() for name in names]
    test = [(f"{pid:04d}/{name}", pid) for pid, names in MSMT_TEST.items() for name in names]
    for rel, _ in train:
        make_image(root / train_dir / rel)
    for rel, _ in test:
        make_image(root / test_dir / rel)
    # list_val: one image of each identity, one of them also (wrongly) in list_train: deduplicated.
    write_list(root / "list_train.txt", train[:3])
    write_list(root / "list_val.txt", train[2:])
    write_list(root / "list_query.txt", [test[0], test[2]])
    write_list(root / "list_gallery.txt", [test[1], test[3]])
    return root


def make_folder(root: Path) -> Path:
    make_files(root / "train_all", [
        "0002/0002_c1s1_000451_03.jpg", "0002/0002_c2s1_000301_01.jpg", "0007/0007_c12s3_000101_00.jpg",
        "0011/0011_000_03_0303morning_0015_0.jpg", "0011/nocamera.jpg", "0011/Thumbs.db",
        "-1/-1_c1s1_000401_04.jpg",
    ])
    make_files(root / "query", ["0003/0003_c2s1_000151_00.jpg"])
    make_files(root / "gallery", [
        "0003/0003_c1s1_000026_01.jpg", "0000/0000_c2s1_000301_05.jpg", "-1/-1_c3s1_000001_00.jpg",
    ])
    make_files(root / "multi-query", ["0003/0003_c2s1_000176_00.jpg"])
    return root


# ---------------------------------------------------------------------------------------------
# Market-1501


def test_market_splits_junk_distractors_and_cameras(tmp_path):
    data = read_dataset("market1501", make_market(tmp_path / "Market-1501-v15.09.15"))
    assert data.name == "market1501"
    assert key(data.train) == [
        ("0002_c1s1_000451_03.jpg", 2, 1), ("0002_c2s1_000301_01.jpg", 2, 2),
        ("0007_c12s3_000101_00.jpg", 7, 12), ("0007_c3s1_000551_02.jpg", 7, 3),
        ("0011_c6s2_000876_01.jpg", 11, 6),
    ]  # junk dropped, Thumbs.db / .DS_Store / ._* skipped, the two-digit camera read whole
    assert pids(data.gallery) == {3, 5, 0, -1}  # distractor and junk stay in the gallery
    assert len(data.gallery) == 5
    assert key(data.query) == [("0003_c2s1_000151_00.jpg", 3, 2), ("0005_c1s1_000201_00.jpg", 5, 1)]
    assert key(data.multi_query) == [
        ("0003_c2s1_000151_00.jpg", 3, 2), ("0003_c2s1_000176_00.jpg", 3, 2),
        ("0005_c1s1_000201_00.jpg", 5, 1),
    ]
    for r in data.train + data.query + data.gallery:
        assert os.path.isabs(r.path) and os.path.isfile(r.path)


def test_relabelling_and_num_classes(tmp_path):
    data = read_dataset("market1501", make_market(tmp_path / "m"))
    assert data.train_pids == [2, 7, 11]
    assert data.num_classes == 3
    assert data.train_labels == [0, 0, 1, 1, 2]
    assert [data.train_pids[label] for label in data.train_labels] == [r.pid for r in data.train]


def test_market_root_may_be_a_parent(tmp_path):
    direct = read_dataset("market1501", make_market(tmp_path / "datasets" / "Market-1501-v15.09.15"))
    from_parent = read_dataset("market1501", tmp_path / "datasets")
    assert from_parent.train == direct.train and from_parent.gallery == direct.gallery
    # torchreid's tree: reid-data/market1501/Market-1501-v15.09.15
    make_market(tmp_path / "reid-data" / "market1501" / "Market-1501-v15.09.15")
    nested = read_dataset("market1501", str(tmp_path / "reid-data"))
    assert key(nested.train) == key(direct.train)
    assert nested.root == str(tmp_path / "reid-data" / "market1501" / "Market-1501-v15.09.15")


def test_market_without_gt_bbox_has_no_multi_query(tmp_path):
    assert read_dataset("market1501", make_market(tmp_path / "m", gt_bbox=False)).multi_query is None


def test_summary_counts(tmp_path):
    text = read_dataset("market1501", make_market(tmp_path / "m")).summary()
    lines = text.splitlines()
    assert lines[0].startswith("market1501 at ")
    train = next(line for line in lines if line.strip().startswith("train"))
    assert "5 images" in train and "3 identities" in train and "5 cameras" in train
    gallery = next(line for line in lines if line.strip().startswith("gallery"))
    assert "2 identities" in gallery and "1 distractor" in gallery and "1 junk" in gallery
    assert any(line.strip().startswith("multi-query") for line in lines)


def test_list_images_sorted_and_filtered(tmp_path):
    make_files(tmp_path, ["b.jpg", "a.PNG", "c.jpeg", "d.bmp", "Thumbs.db", ".DS_Store", "._a.jpg", "x.txt"])
    for name in ("e.webp", "f.tif"):  # formats Pillow reads, which exports of one's own data use
        Image.new("RGB", (4, 8), (9, 8, 7)).save(tmp_path / name)
    (tmp_path / "sub.jpg").mkdir()  # a folder with an image-like name is not an image
    found = list_images(tmp_path)
    assert [os.path.basename(p) for p in found] == ["a.PNG", "b.jpg", "c.jpeg", "d.bmp", "e.webp", "f.tif"]
    from data.loaders import read_image
    assert read_image(found[-2]).size == read_image(found[-1]).size == (4, 8)
    assert all(p.startswith(str(tmp_path)) for p in list_images(tmp_path))
    assert "no folder" in error_of(list_images, tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# Bad input


def test_unknown_dataset_names_the_closest(tmp_path):
    message = error_of(read_dataset, "market", tmp_path)
    assert "unknown dataset 'market'" in message and "did you mean market1501?" in message
    assert all(name in message for name in DATASETS)
    assert "did you mean" not in error_of(read_dataset, "imagenet", tmp_path)


def test_missing_root(tmp_path):
    message = error_of(read_dataset, "market1501", tmp_path / "nowhere")
    assert message.startswith("market1501:") and str(tmp_path / "nowhere") in message
    assert "does not exist" in message and "bounding_box_train/" in message and "data_root" in message


def test_missing_required_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = error_of(read_dataset, "market1501", empty)
    assert f"no bounding_box_train/ under {empty} " in message
    assert "bounding_box_test/" in message and "query/" in message and "set data_root" in message

    root = make_market(tmp_path / "m")
    for path in list_images(root / "query"):
        os.remove(path)
    (root / "query").rmdir()
    assert f"market1501: no query/ under {root} " in error_of(read_dataset, "market1501", root)


def test_several_dataset_folders_are_ambiguous(tmp_path):
    make_market(tmp_path / "Market-1501")
    make_market(tmp_path / "market1501")
    message = error_of(read_dataset, "market1501", tmp_path)
    assert "several" in message and "Market-1501" in message and "market1501" in message


def test_bad_file_name_is_named(tmp_path):
    root = make_market(tmp_path / "m")
    make_image(root / "bounding_box_test" / "person.jpg")
    message = error_of(read_dataset, "market1501", root)
    assert str(root / "bounding_box_test" / "person.jpg") in message and "0002_c1s1_000451_03.jpg" in message


def test_empty_training_split(tmp_path):
    root = make_market(tmp_path / "m")
    for path in list_images(root / "bounding_box_train"):
        if not os.path.basename(path).startswith("-1_"):
            os.remove(path)
    assert "no training images" in error_of(read_dataset, "market1501", root)


# ---------------------------------------------------------------------------------------------
# DukeMTMC-reID and CUHK03-NP


def test_duke(tmp_path):
    make_duke(tmp_path / "DukeMTMC-reID")
    data = read_dataset("dukemtmc", tmp_path)  # the parent
    assert key(data.train) == [("0001_c2_f0046182.jpg", 1, 2), ("0001_c8_f0001234.jpg", 1, 8),
                               ("0004_c1_f0000100.jpg", 4, 1)]
    assert data.multi_query is None and data.num_classes == 2 and len(data.gallery) == 3
    message = error_of(read_dataset, "dukemtmc", tmp_path / "DukeMTMC-reID" / "query")
    assert "dukemtmc: no bounding_box_train/" in message


def test_cuhk03_detected_and_labeled(tmp_path):
    root = make_cuhk03(tmp_path / "cuhk03-np")
    detected = read_dataset("cuhk03", root)
    labeled = read_dataset("cuhk03", tmp_path, cuhk03_labeled=True)  # the parent
    assert detected.root == str(root / "detected") and labeled.root == str(root / "labeled")
    assert key(detected.train) == [("0001_c1_1.png", 1, 1), ("0001_c2_2.png", 1, 2), ("0002_c1_1.png", 2, 1)]
    assert key(labeled.train) == [("0001_c1_2.png", 1, 1), ("0001_c2_1.png", 1, 2), ("0002_c2_2.png", 2, 2)]
    assert detected.multi_query is None and len(detected.query) == 2 and len(labeled.gallery) == 2

    (root / "detected").rename(root / "elsewhere")
    message = error_of(read_dataset, "cuhk03", root)
    assert f"cuhk03: no detected/ under {root} " in message and "labeled/" in message


def test_cuhk03_detected_or_labeled_folder_itself(tmp_path):
    """cuhk03-np/detected (or labeled) has the Market layout: pointing at it reads those boxes and says so."""
    root = make_cuhk03(tmp_path / "cuhk03-np")
    from_root = read_dataset("cuhk03", root)
    detected = read_dataset("cuhk03", root / "detected")
    assert detected.root == from_root.root == str(root / "detected")
    assert key(detected.train) == key(from_root.train) and key(detected.gallery) == key(from_root.gallery)
    assert detected.variant == from_root.variant == "detected boxes"
    assert detected.summary().splitlines()[0] == f"cuhk03 (detected boxes) at {root / 'detected'}"
    # the folder decides: labeled/ gives the labeled boxes without cuhk03_labeled, and with it
    labeled = read_dataset("cuhk03", root / "labeled")
    assert labeled.variant == "labeled boxes"
    assert key(labeled.train) == key(read_dataset("cuhk03", root, cuhk03_labeled=True).train)
    assert key(read_dataset("cuhk03", root / "labeled", cuhk03_labeled=True).train) == key(labeled.train)
    # ... but asking for the labeled boxes while pointing at the detected ones is a contradiction
    message = error_of(read_dataset, "cuhk03", root / "detected", cuhk03_labeled=True)
    assert "labeled boxes" in message and str(root / "labeled") in message
    # one level deeper still names the folder to use
    message = error_of(read_dataset, "cuhk03", root / "detected" / "query")
    assert message.endswith(f"set data_root to {root / 'detected'}")


def test_cuhk03_boxes_from_a_config_and_prepare(tmp_path, capsys):
    from data.loaders import load_splits
    from utils import load_config

    root = make_cuhk03(tmp_path / "cuhk03-np")
    cfg = load_config(None, ["dataset=cuhk03", f"data_root={root / 'labeled'}", "val_ids=0", "ID_class=null"])
    assert load_splits(cfg).title == "cuhk03 (labeled boxes)"

    out = tmp_path / "out"
    assert prepare.main(["--dataset", "cuhk03", "--src", str(root / "detected"), "--dst", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"prepare: cuhk03 (detected boxes) from {root / 'detected'} -> {out}")
    assert_round_trip(read_dataset("cuhk03", root), out)
    # the reader's message speaks of the options prepare.py has
    assert prepare.main(["--dataset", "cuhk03", "--src", str(root / "detected"), "--dst", str(out),
                         "--cuhk03-labeled"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cuhk03-labeled" in err and f"set --src to {root / 'labeled'}" in err


@pytest.mark.parametrize("dataset,inner,outer", [
    ("market1501", "Market-1501-v15.09.15/bounding_box_train", "Market-1501-v15.09.15"),
    ("market1501", "Market-1501-v15.09.15/gt_bbox", "Market-1501-v15.09.15"),
    ("dukemtmc", "DukeMTMC-reID/bounding_box_test", "DukeMTMC-reID"),
    ("msmt17", "MSMT17_V1/train", "MSMT17_V1"),
    ("msmt17", "MSMT17_V1/test/0004", "MSMT17_V1"),  # two levels inside
    ("folder", "pytorch/train_all", "pytorch"),
    ("folder", "pytorch/query/0003", "pytorch"),
    ("cuhk03", "cuhk03-np/detected", "cuhk03-np"),  # with cuhk03_labeled: labeled/ is a sibling
])
def test_a_folder_inside_the_dataset_names_the_dataset_folder(tmp_path, dataset, inner, outer):
    make = {"market1501": make_market, "dukemtmc": make_duke, "msmt17": make_msmt, "folder": make_folder,
            "cuhk03": make_cuhk03}[dataset]
    make(tmp_path / outer)
    kwargs = {"cuhk03_labeled": True} if dataset == "cuhk03" else {}
    message = error_of(read_dataset, dataset, tmp_path / inner, **kwargs)
    assert message.startswith(f"{dataset}: ") and str(tmp_path / inner) in message
    assert message.endswith(f"set data_root to {tmp_path / outer}") or str(tmp_path / outer / "labeled") in message


@pytest.mark.parametrize("dataset", ["market1501", "dukemtmc", "msmt17", "folder", "cuhk03"])
def test_any_name_one_or_two_levels_down(tmp_path, dataset):
    """An extra parent folder, or a dataset folder with an unusual name, still finds the one dataset."""
    make = {"market1501": make_market, "dukemtmc": make_duke, "msmt17": make_msmt, "folder": make_folder,
            "cuhk03": make_cuhk03}[dataset]
    folder = make(tmp_path / "downloads" / "unpacked" / "my copy")
    direct = read_dataset(dataset, folder)
    for root in (tmp_path / "downloads" / "unpacked", tmp_path / "downloads"):
        found = read_dataset(dataset, root)
        assert found.root == direct.root and key(found.train) == key(direct.train)
    assert "no " in error_of(read_dataset, dataset, tmp_path)  # three levels up: not searched


def test_search_below_never_takes_another_datasets_folder(tmp_path):
    make_duke(tmp_path / "datasets" / "DukeMTMC-reID")  # the same marker (bounding_box_train/) as Market
    message = error_of(read_dataset, "market1501", tmp_path / "datasets")
    assert message.startswith(f"market1501: no bounding_box_train/ under {tmp_path / 'datasets'} ")
    market = make_market(tmp_path / "datasets" / "Market-1501-v15.09.15")
    assert read_dataset("market1501", tmp_path / "datasets").root == str(market)
    assert read_dataset("dukemtmc", tmp_path / "datasets").root == str(tmp_path / "datasets" / "DukeMTMC-reID")
    # two copies under unusual names are ambiguous; the message names both
    make_market(tmp_path / "other" / "copy a")
    make_market(tmp_path / "other" / "copy b")
    message = error_of(read_dataset, "market1501", tmp_path / "other")
    assert "several dataset folders (copy a, copy b)" in message
    # prepare.py's output may carry a dataset's name: it is found, as no other layout has train_all/
    make_folder(tmp_path / "prepared" / "Market")
    assert read_dataset("folder", tmp_path / "prepared").root == str(tmp_path / "prepared" / "Market")


def test_the_other_layout_is_named(tmp_path):
    """Raw folders read as per-identity folders, or the reverse, say which dataset setting reads them."""
    raw, prepared = make_market(tmp_path / "raw"), make_folder(tmp_path / "prepared")
    message = error_of(read_dataset, "folder", raw)
    assert "holds bounding_box_train/, a raw dataset" in message and "market1501" in message
    for name in ("market1501", "msmt17", "cuhk03"):
        message = error_of(read_dataset, name, prepared)
        assert message.startswith(f"{name}: ") and "set dataset: folder" in message


def test_a_file_is_not_a_data_root(tmp_path):
    archive = tmp_path / "Market-1501-v15.09.15.zip"
    archive.write_bytes(b"PK")
    message = error_of(read_dataset, "market1501", archive)
    assert "is a file" in message and "extract it" in message


# ---------------------------------------------------------------------------------------------
# MSMT17


@pytest.mark.parametrize("v2", [False, True], ids=["V1", "V2"])
def test_msmt17_versions_and_pid_shift(tmp_path, v2):
    name = "MSMT17_V2" if v2 else "MSMT17_V1"
    make_msmt(tmp_path / name, v2=v2)
    data = read_dataset("msmt17", tmp_path)  # the parent
    assert data.root == str(tmp_path / name)
    # list pids 0 and 1 become 1 and 2; list_train + list_val, the shared line counted once
    assert key(data.train) == [
        ("0000_000_01_0303morning_0015_0.jpg", 1, 1), ("0000_001_15_0303morning_0016_0.jpg", 1, 15),
        ("0001_000_07_0303noon_0020_1.jpg", 2, 7), ("0001_001_03_0303noon_0021_0.jpg", 2, 3),
    ]
    assert data.train_pids == [1, 2] and data.train_labels == [0, 0, 1, 1]
    assert key(data.query) == [
        ("0000_000_02_0113morning_0001_0.jpg", 1, 2), ("0004_000_04_0113noon_0003_0.jpg", 5, 4),
    ]
    assert pids(data.gallery) == {1, 5} and data.multi_query is None
    test_dir = "mask_test_v2" if v2 else "test"
    assert all(f"{os.sep}{test_dir}{os.sep}" in r.path for r in data.query + data.gallery)


def test_msmt17_errors(tmp_path):
    root = make_msmt(tmp_path / "MSMT17_V1")
    (root / "list_query.txt").write_text("0000/0000_000_02_0113morning_0001_0.jpg\n")
    message = error_of(read_dataset, "msmt17", root)
    assert "line 1 of" in message and "list_query.txt" in message and "<relative path> <pid>" in message

    make_msmt(root)
    with open(root / "list_gallery.txt", "a") as f:
        f.write("0009/0009_000_03_0113noon_0001_0.jpg 9\n")
    message = error_of(read_dataset, "msmt17", root)
    assert "do not exist" in message and "0009_000_03_0113noon_0001_0.jpg" in message

    make_msmt(root)
    with open(root / "list_train.txt", "a") as f:
        f.write("0001/odd_name.jpg 1\n")
    assert "odd_name.jpg" in error_of(read_dataset, "msmt17", root)

    make_msmt(root)
    (root / "list_val.txt").unlink()
    assert f"msmt17: no list_val.txt under {root} " in error_of(read_dataset, "msmt17", root)

    make_msmt(root, v2=True)
    assert "both train/ and mask_train_v2/" in error_of(read_dataset, "msmt17", root)


# ---------------------------------------------------------------------------------------------
# Per-identity folders


def test_folder_layout(tmp_path):
    data = read_dataset("folder", make_folder(tmp_path / "pytorch"))
    assert key(data.train) == [
        ("0002_c1s1_000451_03.jpg", 2, 1), ("0002_c2s1_000301_01.jpg", 2, 2),
        ("0007_c12s3_000101_00.jpg", 7, 12),
        ("0011_000_03_0303morning_0015_0.jpg", 11, 3), ("nocamera.jpg", 11, -1),
    ]  # the -1 folder is junk; the MSMT-style camera is read; no camera in training -> -1
    assert data.num_classes == 3 and data.train_labels == [0, 0, 1, 2, 2]
    assert key(data.gallery) == [("-1_c3s1_000001_00.jpg", -1, 3), ("0000_c2s1_000301_05.jpg", 0, 2),
                                 ("0003_c1s1_000026_01.jpg", 3, 1)]
    assert key(data.multi_query) == [("0003_c2s1_000176_00.jpg", 3, 2)]
    assert read_dataset("folder", tmp_path).root == data.root  # the parent of pytorch/


def test_folder_train_only_and_named_identities(tmp_path):
    make_files(tmp_path / "train_all", ["bob/1.jpg", "alice/1.jpg", "alice/2.png", "-1/x.jpg"])
    data = read_dataset("folder", tmp_path)
    assert data.query == [] and data.gallery == [] and data.multi_query is None
    # names numbered by sorted folder name from 1: alice -> 1, bob -> 2; the junk folder is dropped
    assert key(data.train) == [("1.jpg", 1, -1), ("1.jpg", 2, -1), ("2.png", 1, -1)]
    assert data.num_classes == 2


def test_a_test_set_alone_and_a_training_set_alone(tmp_path):
    """Evaluation reads only the test part of one's own data (no training images needed); an extra training
    set only its training part (its test folders may hold anything)."""
    mine = tmp_path / "mine"
    make_files(mine / "query", ["0001/0001_c1_a.jpg"])
    make_files(mine / "gallery", ["0001/0001_c2_b.jpg", "0002/0002_c1_c.jpg"])
    assert "no train_all/" in error_of(read_dataset, "folder", mine)
    data = read_dataset("folder", mine, part="test")
    assert data.train == [] and len(data.query) == 1 and len(data.gallery) == 2
    from data.loaders import load_splits  # test.py's reading: the test part only
    from utils import load_config

    cfg = load_config(None, ["dataset=folder", f"data_root={mine}"])
    assert len(load_splits(cfg, evaluation_only=True).gallery) == 2
    make_files(mine / "train_all", ["0005/x.jpg"])
    make_files(mine / "query", ["person_7/y.jpg"])  # not read as training data
    assert key(read_dataset("folder", mine, part="train").train) == [("x.jpg", 5, -1)]
    assert "integer" in error_of(read_dataset, "folder", mine)

    lists = tmp_path / "lists"
    for name in ("a.jpg", "b.jpg"):
        make_image(lists / name)
    (lists / "query.txt").write_text("a.jpg 1 1\n")
    (lists / "gallery.txt").write_text("b.jpg 1 2\n")
    assert "no train.txt" in error_of(read_dataset, "list", lists)
    data = read_dataset("list", lists, part="test")
    assert data.train == [] and [r.pid for r in data.query + data.gallery] == [1, 1]
    (lists / "train.txt").write_text("a.jpg 3\n")
    (lists / "gallery.txt").write_text("missing.jpg 1 2\n")
    assert [r.pid for r in read_dataset("list", lists, part="train").train] == [3]
    assert "do not exist" in error_of(read_dataset, "list", lists)
    (lists / "query.txt").unlink(), (lists / "gallery.txt").unlink()
    assert "no query.txt nor gallery.txt" in error_of(read_dataset, "list", lists, part="test")


def test_one_identity_does_not_train(tmp_path):
    from data.loaders import load_splits
    from utils import load_config

    make_files(tmp_path / "train_all", ["0001/a.jpg", "0001/b.jpg"])  # e.g. every image in one folder
    cfg = load_config(None, ["dataset=folder", f"data_root={tmp_path}", "ID_class=null", "val_ids=0"])
    assert "has 1 identity; re-ID training needs at least 2" in error_of(load_splits, cfg)


def test_folder_errors(tmp_path):
    assert "no train_all/ under" in error_of(read_dataset, "folder", tmp_path)

    make_files(tmp_path / "train_all", ["0001/0001_c1s1_000001_00.jpg", "loose.jpg"])
    assert "lies directly in train_all/" in error_of(read_dataset, "folder", tmp_path)
    os.remove(tmp_path / "train_all" / "loose.jpg")

    make_files(tmp_path / "query", ["alice/0001_c1s1_000001_00.jpg"])
    message = error_of(read_dataset, "folder", tmp_path)
    assert str(tmp_path / "query" / "alice") in message and "integer" in message
    (tmp_path / "query" / "alice").rename(tmp_path / "query" / "0001")

    make_files(tmp_path / "gallery", ["0001/snapshot.jpg"])
    message = error_of(read_dataset, "folder", tmp_path)
    assert str(tmp_path / "gallery" / "0001" / "snapshot.jpg") in message and "<pid>_c<camera>" in message
    os.remove(tmp_path / "gallery" / "0001" / "snapshot.jpg")

    make_files(tmp_path / "train_all", ["1/0001_c2s1_000001_00.jpg"])
    assert "same identity 1" in error_of(read_dataset, "folder", tmp_path)
    (tmp_path / "train_all" / "1" / "0001_c2s1_000001_00.jpg").unlink()
    (tmp_path / "train_all" / "1").rmdir()

    make_files(tmp_path / "train_all", ["0001/cam2/0001_c2s1_000001_00.jpg"])  # would be left out unread
    assert "train_all/0001/cam2 is a folder inside identity folder" in error_of(read_dataset, "folder", tmp_path)
    shutil.rmtree(tmp_path / "train_all" / "0001" / "cam2")

    make_files(tmp_path / "train_all", ["-1/x.jpg"])
    os.remove(tmp_path / "train_all" / "0001" / "0001_c1s1_000001_00.jpg")
    assert "no training images" in error_of(read_dataset, "folder", tmp_path)


# ---------------------------------------------------------------------------------------------
# prepare.py


def assert_round_trip(raw: DatasetSplits, out: Path) -> DatasetSplits:
    back = read_dataset("folder", out)
    assert key(back.train) == key(raw.train)
    assert key(back.query) == key(raw.query)
    assert key(back.gallery) == key(raw.gallery)
    assert (back.multi_query is None) == (raw.multi_query is None)
    if raw.multi_query is not None:
        assert key(back.multi_query) == key(raw.multi_query)
    return back


def test_prepare_market_hard_links_and_round_trip(tmp_path):
    src, out = make_market(tmp_path / "Market"), tmp_path / "out"
    raw = read_dataset("market1501", src)
    summary = prepare.prepare("market1501", src, out)
    assert "20 linked, 0 copied, 0 already there" in summary  # train_all 5, train 2, val 3, query 2, ...
    assert_round_trip(raw, out)
    folders = ["gallery", "multi-query", "query", "train", "train_all", "val"]
    assert sorted(p.name for p in out.iterdir()) == folders
    assert sorted(p.name for p in (out / "gallery").iterdir()) == ["-1", "0000", "0003", "0005"]
    linked = out / "train_all" / "0007" / "0007_c12s3_000101_00.jpg"
    assert os.stat(linked).st_ino == os.stat(src / "bounding_box_train" / linked.name).st_ino
    # val = the first image (by name) of each identity, train the rest
    assert key(read_dataset("folder", out).train) == key(raw.train)
    val = sorted(str(p.relative_to(out / "val")) for p in (out / "val").rglob("*.jpg"))
    assert val == [
        "0002/0002_c1s1_000451_03.jpg", "0007/0007_c12s3_000101_00.jpg", "0011/0011_c6s2_000876_01.jpg",
    ]
    train = sorted(str(p.relative_to(out / "train")) for p in (out / "train").rglob("*.jpg"))
    assert train == ["0002/0002_c2s1_000301_01.jpg", "0007/0007_c3s1_000551_02.jpg"]


def test_prepare_copy_and_rerun_is_a_no_op(tmp_path):
    src, out = make_duke(tmp_path / "DukeMTMC-reID"), tmp_path / "out"
    assert "0 linked, 11 copied" in prepare.prepare("dukemtmc", src, out, copy=True)
    copied = out / "query" / "0005" / "0005_c1_f0000400.jpg"
    original = src / "query" / copied.name
    assert os.stat(copied).st_ino != os.stat(original).st_ino
    assert copied.read_bytes() == original.read_bytes()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert "0 linked, 0 copied, 11 already there" in prepare.prepare("dukemtmc", src, out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert_round_trip(read_dataset("dukemtmc", src), out)


def test_prepare_copies_when_linking_fails(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    src, out = make_duke(tmp_path / "DukeMTMC-reID"), tmp_path / "out"
    assert "0 linked, 11 copied" in prepare.prepare("dukemtmc", src, out)
    assert_round_trip(read_dataset("dukemtmc", src), out)


def test_prepare_into_the_raw_dataset_is_refused(tmp_path):
    src = make_market(tmp_path / "Market")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    for dst in (src, src / "prepared", tmp_path):
        if dst == tmp_path:  # the folder given as --src, the raw dataset found inside it
            message = error_of(prepare.prepare, "market1501", tmp_path, tmp_path)
        else:
            message = error_of(prepare.prepare, "market1501", src, dst)
        assert "overlaps the raw dataset" in message
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


def test_prepare_conflict_writes_nothing(tmp_path):
    src, out = make_market(tmp_path / "Market"), tmp_path / "out"
    target = out / "query" / "0005" / "0005_c1s1_000201_00.jpg"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"someone else's file")
    message = error_of(prepare.prepare, "market1501", src, out)
    assert str(target) in message and "differs" in message
    assert target.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in out.iterdir()) == ["query"]


@pytest.mark.parametrize("dataset", ["msmt17", "cuhk03"])
def test_prepare_round_trip_msmt17_and_cuhk03(tmp_path, dataset):
    src = make_msmt(tmp_path / "MSMT17_V1") if dataset == "msmt17" else make_cuhk03(tmp_path / "cuhk03-np")
    out = tmp_path / "out"
    prepare.prepare(dataset, src, out, cuhk03_labeled=True)
    raw = read_dataset(dataset, src, cuhk03_labeled=True)
    back = assert_round_trip(raw, out)
    assert back.train_pids == raw.train_pids
    if dataset == "msmt17":  # the +1 shift is kept in the folder names: no real identity in 0000
        assert sorted(p.name for p in (out / "train_all").iterdir()) == ["0001", "0002"]


def test_prepare_list_keeps_identities_and_cameras(tmp_path, capsys):
    from data.loaders import load_splits
    from utils import load_config

    root = tmp_path / "lists"
    lists = {  # `<path> <pid> <camera>`: names without a camera, a Market name agreeing with it, one that does not
        "train": ["imgs/train_0.jpg 1 1", "imgs/train_1.jpg 1 2", "imgs/train_2.jpg 2 11", "imgs/train_3.jpg 2 3",
                  "cam/0002_c3s1_000451_03.jpg 2 3", "imgs/train_0.jpg 1 1"],  # one line twice: written once
        "query": ["imgs/query_0.jpg 9 1", "cam/0009_c1s1_000001_00.jpg 9 4"],
        "gallery": ["imgs/gallery_0.jpg 9 2", "imgs/gallery_1.jpg 0 1", "imgs/gallery_2.jpg -1 5"],
    }
    for split, lines in lists.items():
        for line in lines:
            make_image(root / line.split()[0])
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert prepare.main(["--dataset", "list", "--src", str(root), "--dst", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0 already there" in printed and "no camera" not in printed
    assert (out / "query" / "0009" / "0009_c1_query_0.jpg").is_file()  # the audit's query_0.jpg, now readable
    assert (out / "query" / "0009" / "0009_c4_0009_c1s1_000001_00.jpg").is_file()  # the list's camera wins
    assert (out / "train_all" / "0002" / "0002_c3s1_000451_03.jpg").is_file()  # already right: name kept

    def images(records: list[Record]) -> list[tuple[int, int, bytes]]:  # (pid, camera, which image)
        return sorted({(r.pid, r.camid, Path(r.path).read_bytes()) for r in records})

    raw = read_dataset("list", root)
    back = load_splits(load_config(None, ["dataset=folder", f"data_root={out}", "val_ids=0", "ID_class=null"]))
    for split in ("train", "query", "gallery"):
        assert images(getattr(back, split)) == images(getattr(raw, split)), split

    # no camera column and none in the names: prepared as they are, read back with cross_camera: false only
    (root / "query.txt").write_text("imgs/query_0.jpg 9\n")
    (root / "gallery.txt").write_text("imgs/gallery_0.jpg 9\nimgs/gallery_1.jpg 0\n")
    out = tmp_path / "no_cameras"
    assert prepare.main(["--dataset", "list", "--src", str(root), "--dst", str(out)]) == 0
    assert f"3 test images have no camera (none in the list nor the name): read {out} with cross_camera: false" \
        in capsys.readouterr().out
    assert "cross_camera: false" in error_of(read_dataset, "folder", out)
    back = load_splits(load_config(None, ["dataset=folder", f"data_root={out}", "val_ids=0", "ID_class=null",
                                          "cross_camera=false"]))
    assert [r.pid for r in back.query] == [9] and sorted(r.pid for r in back.gallery) == [0, 9]


def test_prepare_cli(tmp_path):
    src, out = make_market(tmp_path / "Market"), tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(REPO / "prepare.py"), "--dataset", "market1501", "--src", str(tmp_path / "nope"),
         "--dst", str(out)], capture_output=True, text=True, cwd=tmp_path,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "does not exist" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()

    args = ["--dataset", "market1501", "--src", str(src), "--dst"]
    assert prepare.main([*args, str(out)]) == 0
    assert prepare.main([*args, str(src / "query" / MARKET_QUERY[0])]) == 2  # --dst is a file


def test_prepare_on_a_prepared_folder_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare.main(["--dataset", "market1501", "--src", str(make_market(tmp_path / "Market")), "--dst",
                         str(out)]) == 0
    assert prepare.main(["--dataset", "market1501", "--src", str(out), "--dst", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "it is prepared already (a config reads it with dataset: folder)" in err and "set dataset" not in err


def test_list_files_read_as_the_folders_they_list(tmp_path):
    market = read_dataset("market1501", make_market(tmp_path / "Market-1501-v15.09.15"))
    root = tmp_path / "lists"
    root.mkdir()
    for split, records in (("train", market.train), ("query", market.query), ("gallery", market.gallery)):
        lines = ["# path pid camera", ""]
        for i, r in enumerate(records):  # relative paths with the camera given, absolute ones without
            lines.append(f"{os.path.relpath(r.path, root)} {r.pid} {r.camid}" if i % 2 else f"{r.path} {r.pid}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    data = read_dataset("list", root)
    assert data.name == "list" and data.multi_query is None
    for split in ("train", "query", "gallery"):
        assert key(getattr(data, split)) == key(getattr(market, split)), split
    assert data.num_classes == market.num_classes and data.train_labels == market.train_labels

    (root / "query.txt").write_text("nocamera.jpg 3\n")
    make_image(root / "nocamera.jpg")
    assert "gives no camera" in error_of(read_dataset, "list", root)
    assert [r.camid for r in read_dataset("list", root, test_cameras=False).query] == [-1]
    (root / "query.txt").write_text("missing.jpg 3 1\n")
    assert "1 images named in" in error_of(read_dataset, "list", root)
    (root / "query.txt").write_text("x.jpg three\n")
    assert "expected '<image path> <pid> [<camera>]'" in error_of(read_dataset, "list", root)
    for line in ("nocamera.jpg -2 1", "nocamera.jpg 3 -1"):
        (root / "query.txt").write_text(line + "\n")
        assert "the pid must be -1 (junk), 0 (distractor)" in error_of(read_dataset, "list", root)
    assert "no train.txt" in error_of(read_dataset, "list", tmp_path)
    # spaces in paths (the numbers are read from the right); a spreadsheet's byte-order mark; UTF-16 refused
    make_image(root / "my imgs" / "a b.jpg")
    (root / "query.txt").write_text("my imgs/a b.jpg 3 1\nmy imgs/a b.jpg\t3\n", encoding="utf-8-sig")
    assert [(r.path, r.pid, r.camid) for r in read_dataset("list", root, test_cameras=False).query] == [
        (str(root / "my imgs" / "a b.jpg"), 3, 1), (str(root / "my imgs" / "a b.jpg"), 3, -1)]
    (root / "query.txt").write_text("my imgs/a b.jpg 3 1\n", encoding="utf-16")
    assert "query.txt is not UTF-8 text" in error_of(read_dataset, "list", root)
