"""The synthetic pedestrian dataset: layout, protocol, determinism, swap ground truth, refusals, CLI, hardness."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.synthetic import (
    METADATA_FILE,
    PART_NAMES,
    SPLIT_FOLDERS,
    differences,
    generate,
    jpeg_bytes,
    load_metadata,
    part_labels,
    person_mask,
    render,
)
from data.synthetic import main as synthetic_main
from utils import UserError

REPO = Path(__file__).resolve().parents[1]
MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d+)s1_\d{6}_00\.jpg$")
SMALL = {"ids": 12, "images_per_id": 6, "seed": 3}
UPPER, LOWER, SKIN = (PART_NAMES.index(name) for name in ("upper", "lower", "skin"))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("small") / "synthetic"
    return root, generate(root, **SMALL)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """Difficulty 0: no lighting change, blur, noise or occlusion, so drawn colours are palette colours."""
    root = tmp_path_factory.mktemp("clean") / "synthetic"
    generate(root, ids=6, images_per_id=4, difficulty=0.0, seed=1)
    return root


def files_in(root: Path) -> dict[str, list[str]]:
    return {split: sorted(os.listdir(root / folder)) for split, folder in SPLIT_FOLDERS.items()}


def people(entries: list[dict]) -> list[dict]:
    """Whole, unoccluded people (not junk crops), whose silhouettes can be compared."""
    return [e for e in entries if e["pid"] > 0 and e["structure"]["occluder"] is None]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ---------------------------------------------------------------------------------------------
# Layout, counts, protocol

def test_layout_and_names(small):
    root, _ = small
    assert (root / METADATA_FILE).is_file()
    meta = load_metadata(root)
    for split, names in files_in(root).items():
        assert names, split
        for name in names:
            match = MARKET_NAME.match(name)
            assert match, name
            entry = meta[name]
            assert entry["split"] == split and entry["file"] == f"{SPLIT_FOLDERS[split]}/{name}"
            assert int(match.group(1)) == entry["pid"] and int(match.group(2)) == entry["cam"]
            assert 1 <= entry["cam"] <= 6
    assert {e["kind"] for e in meta if e["pid"] == -1} == {"junk"}
    assert {e["kind"] for e in meta if e["pid"] == 0} == {"distractor"}


def test_counts_match_summary_and_metadata(small):
    root, summary = small
    meta = load_metadata(root)
    files = files_in(root)
    assert summary == meta.summary
    assert summary["images"] == len(meta) == sum(len(names) for names in files.values())
    for split, names in files.items():
        entries = meta.split(split)
        assert sorted(Path(e["file"]).name for e in entries) == names
        counts = summary[split]
        assert counts["images"] == len(names)
        assert counts["identities"] == len({e["pid"] for e in entries if e["pid"] > 0})
        assert counts["distractors"] == sum(e["pid"] == 0 for e in entries)
        assert counts["junk"] == sum(e["pid"] == -1 for e in entries)
    assert summary["train"]["identities"] == summary["query"]["identities"] == SMALL["ids"] // 2
    assert summary["train"]["images"] == SMALL["ids"] // 2 * SMALL["images_per_id"]
    assert summary["gallery"]["distractors"] >= 1 and summary["gallery"]["junk"] >= 1
    assert summary["train"]["junk"] == summary["query"]["distractors"] == 0


def test_train_and_test_identities_are_disjoint(small):
    meta = load_metadata(small[0])
    train = {e["pid"] for e in meta.split("train")}
    query = {e["pid"] for e in meta.split("query")}
    gallery = {e["pid"] for e in meta.split("gallery") if e["pid"] > 0}
    assert train and not train & (query | gallery)
    assert query == gallery


def test_every_query_has_a_match_in_another_camera(small):
    meta = load_metadata(small[0])
    gallery = meta.split("gallery")
    pairs = [(e["pid"], e["cam"]) for e in meta.split("query")]
    assert len(pairs) == len(set(pairs)), "one query per identity and camera"
    for pid, cam in pairs:
        assert any(g["pid"] == pid and g["cam"] != cam for g in gallery), (pid, cam)
    for pid in {pid for pid, _ in pairs}:  # every camera a test identity appears in has its query
        cams = {e["cam"] for e in meta if e["pid"] == pid}
        assert len(cams) >= 2 and cams == {cam for p, cam in pairs if p == pid}


def test_appearance_is_the_identity(small):
    meta = load_metadata(small[0])
    for pid in {e["pid"] for e in meta if e["pid"] > 0}:
        appearances = [e["appearance"] for e in meta if e["pid"] == pid]
        assert all(a == appearances[0] for a in appearances)


# ---------------------------------------------------------------------------------------------
# Determinism and rendering

def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    args = {"ids": 4, "images_per_id": 4, "height": 64, "width": 32}
    roots = [tmp_path / name for name in ("a", "b", "c")]
    generate(roots[0], seed=7, **args)
    generate(roots[1], seed=7, **args)
    generate(roots[2], seed=8, **args)

    def contents(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert contents(roots[0]) == contents(roots[1])
    assert contents(roots[0])[METADATA_FILE] != contents(roots[2])[METADATA_FILE]
    images_a = {k: v for k, v in contents(roots[0]).items() if k.endswith(".jpg")}
    images_c = {k: v for k, v in contents(roots[2]).items() if k.endswith(".jpg")}
    assert set(images_a.values()).isdisjoint(images_c.values())


def test_render_of_an_entry_is_the_image_in_its_file(small):
    root, _ = small
    meta = load_metadata(root)
    for entry in meta:
        image = render(entry, entry)
        assert image.size == (64, 128) and image.mode == "RGB"
        written = (root / entry["file"]).read_bytes()
        assert jpeg_bytes(image, entry["structure"]) == written  # the very pixels that were encoded
    entry = meta.split("query")[0]
    decoded = pixels(Image.open(root / entry["file"]).convert("RGB"))
    assert np.abs(decoded - pixels(render(entry, entry))).mean() < 6


def test_render_at_another_size(small):
    entry = people(load_metadata(small[0]).split("gallery"))[0]
    assert render(entry, entry, 256, 128).size == (128, 256)
    assert render(entry, entry, height=256).size == (128, 256)  # one side keeps the aspect ratio
    assert part_labels(entry, entry, 256, 128).shape == (256, 128)


def test_swap_within_an_identity_is_the_original(small):
    meta = load_metadata(small[0])
    b = people(meta.split("gallery"))[0]
    same_person = [e for e in meta if e["pid"] == b["pid"] and e["file"] != b["file"]]
    assert same_person
    for a in same_person:
        assert np.array_equal(pixels(render(a, b)), pixels(render(b, b)))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    grown = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            grown |= np.roll(mask, (dy, dx), axis=(0, 1))
    return grown


def test_swap_keeps_the_structure_of_b(small):
    meta = load_metadata(small[0])
    candidates = people(meta.split("gallery"))
    pairs = [(a, b) for a, b in zip(candidates, candidates[1:], strict=False) if a["pid"] != b["pid"]][:6]
    assert pairs
    for a, b in pairs:
        swap, original_b = pixels(render(a, b)), pixels(render(b, b))
        assert np.abs(swap - original_b).mean() > 1 and np.abs(swap - pixels(render(a, a))).mean() > 1
        swap_mask, b_mask = person_mask(a, b), person_mask(b, b)
        # Away from both silhouettes (blur reaches a pixel or two) every pixel is b's: background, clutter,
        # lighting and noise all belong to the structure.
        outside = ~dilate(swap_mask | b_mask, 3)
        assert outside.mean() > 0.3
        assert np.array_equal(swap[outside], original_b[outside])
        # Same place and pose: the feet stand on the same row whatever a's build.
        swap_rows, b_rows = np.nonzero(swap_mask.any(axis=1))[0], np.nonzero(b_mask.any(axis=1))[0]
        assert abs(int(swap_rows.max()) - int(b_rows.max())) <= 3
        # The silhouette depends on the structure and on the identity's shape (build, hair style, clothing
        # type, bag): give a b's shape and its silhouette is exactly b's.
        a_shaped_like_b = copy.deepcopy(a)
        appearance, b_appearance = a_shaped_like_b["appearance"], b["appearance"]
        appearance["build"] = b_appearance["build"]
        appearance["hair"]["style"] = b_appearance["hair"]["style"]
        appearance["lower"]["type"] = b_appearance["lower"]["type"]
        appearance["bag"].update(type=b_appearance["bag"]["type"], side=b_appearance["bag"]["side"])
        assert np.array_equal(person_mask(a_shaped_like_b, b), b_mask)


def test_swap_carries_the_appearance_of_a(clean):
    meta = load_metadata(clean)
    candidates = people(meta.split("train") + meta.split("gallery"))
    a = candidates[0]
    b = next(e for e in candidates if e["pid"] != a["pid"]
             and e["appearance"]["upper"]["colour"] != a["appearance"]["upper"]["colour"])
    swap, labels = pixels(render(a, b)), part_labels(a, b)
    assert set(np.unique(labels)) <= set(range(len(PART_NAMES)))
    upper = a["appearance"]["upper"]
    drawn_upper = {tuple(c) for c in swap[labels == UPPER]}
    assert tuple(upper["colour"]) in drawn_upper
    assert drawn_upper <= {tuple(upper["colour"]), tuple(upper["secondary"])}
    assert {tuple(c) for c in swap[labels == LOWER]} == {tuple(a["appearance"]["lower"]["colour"])}
    assert {tuple(c) for c in swap[labels == SKIN]} == {tuple(a["appearance"]["skin"])}
    assert tuple(b["appearance"]["upper"]["colour"]) not in drawn_upper


def test_junk_background_crop_has_no_person(small):
    meta = load_metadata(small[0])
    for entry in meta:
        if entry["structure"]["framing"] == "background":
            assert not person_mask(entry, entry).any()


def test_metadata_lookup(small):
    root, _ = small
    meta = load_metadata(root)
    entry = meta.split("query")[0]
    name = Path(entry["file"]).name
    assert meta[name] is meta[entry["file"]] is meta[root / entry["file"]] is entry
    assert name in meta and "0001_c9s1_999999_00.jpg" not in meta
    with pytest.raises(KeyError):
        meta["0001_c9s1_999999_00.jpg"]
    with pytest.raises(UserError, match=METADATA_FILE):
        load_metadata(root / "query")


# ---------------------------------------------------------------------------------------------
# Refusals and bad input

def test_existing_dataset_with_the_same_parameters_is_reused(small):
    root, summary = small
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert generate(root, **SMALL) == summary
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_differences_name_what_the_config_asks_otherwise(small, capsys):
    root, _ = small
    assert differences(root, **SMALL) == ""
    assert differences(root, **SMALL, test_ids=6) == ""  # the default half, stored without the key
    assert differences(root, **{**SMALL, "seed": 4}, width=32) == "seed 3 (config 4), width 64 (config 32)"
    assert differences(root, **SMALL, test_ids=2) == "test_ids None (config 2)"
    # Training on it says so once (the dataset is used as it is); evaluation does not
    from data.loaders import load_splits
    from utils import load_config
    cfg = load_config(None, ["dataset=synthetic", f"data_root={root}", "synthetic.ids=12", "synthetic.images_per_id=6",
                             "synthetic.seed=4", "ID_class=null"])
    load_splits(cfg)
    assert "holds a synthetic dataset made with other parameters (seed 3 (config 4))" in capsys.readouterr().out
    load_splits(cfg, evaluation_only=True)
    assert capsys.readouterr().out == ""


def test_refuses_to_write_over_other_content(small, tmp_path):
    root, _ = small
    with pytest.raises(UserError, match="other parameters"):
        generate(root, **{**SMALL, "seed": 4})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        generate(foreign, ids=4, images_per_id=4)
    assert os.listdir(foreign) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"
    interrupted = tmp_path / "interrupted"
    (interrupted / "bounding_box_train").mkdir(parents=True)
    (interrupted / "bounding_box_train" / "0001_c1s1_000001_00.jpg").write_bytes(b"partial")
    with pytest.raises(UserError, match="incomplete"):
        generate(interrupted, ids=4, images_per_id=4)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UserError, match="not a folder"):
        generate(a_file)


def test_test_ids_holds_out_the_last_identities(small, tmp_path):
    """More training identities than test ones (a judge over as many candidates, more people to learn from);
    without test_ids the split and the files stay those of datasets made before the parameter existed."""
    root = tmp_path / "more_train"
    summary = generate(root, **{**SMALL, "test_ids": 3})
    assert summary["train"]["identities"] == 9 and summary["query"]["identities"] == 3
    meta = load_metadata(root)
    assert {e["pid"] for e in meta.split("query")} == {10, 11, 12}
    assert load_metadata(small[0]).params.get("test_ids") is None
    with pytest.raises(UserError, match="test_ids must be an integer from 1 to 11"):
        generate(tmp_path / "bad", **{**SMALL, "test_ids": 12})


@pytest.mark.parametrize("bad", [
    {"ids": 1}, {"ids": 2.5}, {"images_per_id": 3}, {"difficulty": 1.5}, {"difficulty": "hard"},
    {"height": 8}, {"cameras": 1}, {"cameras": 10}, {"seed": -1}, {"test_ids": 0},
])
def test_bad_parameters_are_one_clear_error(tmp_path, bad):
    with pytest.raises(UserError) as error:
        generate(tmp_path / "out", **bad)
    assert "\n" not in str(error.value) and list(bad)[0] in str(error.value)
    assert not (tmp_path / "out").exists()


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--ids", "4", "--images-per-id", "4", "--height", "64", "--width", "32"]
    done = subprocess.run([sys.executable, "-m", "data.synthetic", *args, "--seed", "5"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "query" in done.stdout and "gallery" in done.stdout
    assert load_metadata(out).params["seed"] == 5
    # The refusal path in-process (a second interpreter start costs seconds): one line, status 2.
    assert synthetic_main([*args, "--seed", "6"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and "other parameters" in captured.err


# ---------------------------------------------------------------------------------------------
# Hardness: identity is in the person's colours, but not for the taking

def colour_histogram(image: np.ndarray, bins: int = 8) -> np.ndarray:
    q = image.reshape(-1, 3).astype(np.int64) * bins // 256
    counts = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins**3).astype(np.float64)
    return np.sqrt(counts / counts.sum())  # Hellinger: cosine of square roots


def histogram_rank1(root: Path, region) -> tuple[float, float]:
    """Rank-1 of nearest-neighbour colour histograms under the Market protocol, and its chance level."""
    meta = load_metadata(root)
    query, gallery = meta.split("query"), meta.split("gallery")

    def features(entries):
        return np.stack([colour_histogram(region(np.asarray(Image.open(root / e["file"]).convert("RGB"))))
                         for e in entries])

    similarity = features(query) @ features(gallery).T
    gallery_pid = np.array([e["pid"] for e in gallery])
    gallery_cam = np.array([e["cam"] for e in gallery])
    hits, chance = 0, 0.0
    for row, q in zip(similarity, query, strict=True):
        # Market protocol: junk and same-identity images from the query's own camera do not count.
        valid = (gallery_pid != -1) & ~((gallery_pid == q["pid"]) & (gallery_cam == q["cam"]))
        hits += gallery_pid[np.argmax(np.where(valid, row, -np.inf))] == q["pid"]
        chance += ((gallery_pid == q["pid"]) & valid).sum() / valid.sum()
    return hits / len(query), chance / len(query)


def test_default_test_split_is_hard_but_learnable(tmp_path):
    root = tmp_path / "default"
    summary = generate(root)  # the default size: what a small CNN would be trained and tested on
    assert summary["query"]["identities"] == 60 and summary["train"]["images"] == 720

    def centre(image):  # where the person stands
        h, w = image.shape[:2]
        return image[h // 8: h * 15 // 16, w // 4: w * 3 // 4]

    rank1, chance = histogram_rank1(root, centre)
    assert 5 * chance < rank1 < 0.85, (rank1, chance)  # colour carries identity, but is far from enough
    whole_rank1, _ = histogram_rank1(root, lambda image: image)
    assert whole_rank1 < rank1  # each camera's scene misleads a matcher that looks at the whole crop
