"""DG-Net's loaders: items, positives, erased views, determinism across workers, exact resume, bad input."""
from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from data.loaders import (
    ResumableLoader,
    TrainSet,
    build_dgnet_loaders,
    build_teacher_loader,
    build_test_loader,
    close_loaders,
    dead_worker,
    load_splits,
    read_image,
)
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, random_erasing, train_transform
from utils import REPO_ROOT, UserError, load_config

# pid -> number of training images; pid 9 has a single image (its positive is itself).
TRAIN_COUNTS = {2: 4, 5: 3, 7: 5, 9: 1, 11: 3}


def _jpeg(path, colour, size=(24, 48)):
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


@pytest.fixture
def market(tmp_path):
    """A tiny raw Market-1501 tree: 5 training identities, a few test images, junk and a distractor."""
    root = tmp_path / "Market"
    for sub in ("bounding_box_train", "bounding_box_test", "query"):
        (root / sub).mkdir(parents=True)
    for pid, count in TRAIN_COUNTS.items():
        for k in range(count):
            _jpeg(root / "bounding_box_train" / f"{pid:04d}_c{k % 3 + 1}s1_{k:06d}_00.jpg", (pid * 20, 80, 160))
    for pid in (20, 21):
        _jpeg(root / "query" / f"{pid:04d}_c1s1_000001_00.jpg", (pid * 10, 50, 50))
        _jpeg(root / "bounding_box_test" / f"{pid:04d}_c2s1_000002_00.jpg", (pid * 10, 50, 50))
    _jpeg(root / "bounding_box_test" / "-1_c3s1_000003_00.jpg", (0, 0, 0))
    _jpeg(root / "bounding_box_test" / "0000_c4s1_000004_00.jpg", (255, 255, 255))
    return root


def config(root, *opts):
    return load_config(None, [f"data_root={root}", "crop_image_height=32", "crop_image_width=16", "pad=2",
                              "batch_size=4", "num_workers=0", "ID_class=null", *opts])


def test_items_carry_image_label_positive_and_erased_views(market):
    cfg = config(market, "erasing_p=1.0")
    splits = load_splits(cfg)
    a, _ = build_dgnet_loaders(cfg, splits)
    batch = next(a)
    assert batch["image"].shape == batch["pos"].shape == batch["image_erased"].shape == (4, 3, 32, 16)
    labels = splits.train_labels
    for i, p, lab in zip(batch["index"].tolist(), batch["pos_index"].tolist(), batch["label"].tolist()):
        assert labels[i] == labels[p] == lab
        assert (p != i) or TRAIN_COUNTS[splits.train[i].pid] == 1
    # Erasing touches only the ReID views, never the generator's input.
    assert not torch.equal(batch["image"], batch["image_erased"])
    assert not torch.equal(batch["pos"], batch["pos_erased"])
    assert (batch["image_erased"] == 0).any() and not (batch["image"] == 0).all(dim=0).any()


def test_positive_is_another_image_of_the_identity(market):
    splits = load_splits(config(market))
    ds = TrainSet(splits.train, splits.train_labels, (32, 16), 2, 0.0, positives=True)
    for index, label in enumerate(ds.labels):
        picks = {ds.positive_of(index, torch.Generator().manual_seed(s)) for s in range(40)}
        others = set(ds.members[label]) - {index}
        assert picks == (others or {index})  # uniform over the others: all of them show up in 40 draws


def test_no_erasing_means_identical_views(market):
    cfg = config(market, "erasing_p=0.0")
    batch = next(build_dgnet_loaders(cfg, load_splits(cfg))[0])
    assert torch.equal(batch["image"], batch["image_erased"]) and torch.equal(batch["pos"], batch["pos_erased"])


def test_loaders_a_and_b_are_independent_shuffles(market):
    cfg = config(market)
    a, b = build_dgnet_loaders(cfg, load_splits(cfg))
    order_a = torch.cat([next(a)["index"] for _ in range(4)]).tolist()
    order_b = torch.cat([next(b)["index"] for _ in range(4)]).tolist()
    assert order_a != order_b and sorted(order_a[:16]) == sorted(order_b[:16]) == list(range(16))


def test_batches_do_not_depend_on_worker_count(market):
    batches = {}
    for workers in (0, 2):
        cfg = config(market, f"num_workers={workers}")
        a, _ = build_dgnet_loaders(cfg, load_splits(cfg))
        batches[workers] = [next(a) for _ in range(3)]
        a.close()
    for x, y in zip(batches[0], batches[2]):
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_resume_gives_exactly_the_next_batches(market):
    cfg = config(market, "erasing_p=0.5")
    splits = load_splits(cfg)
    a, _ = build_dgnet_loaders(cfg, splits)
    straight = [next(a) for _ in range(7)]
    state = {"batches_taken": 4}
    resumed, _ = build_dgnet_loaders(cfg, splits)
    resumed.load_state_dict(state)
    for expected in straight[4:]:
        got = next(resumed)
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
    assert resumed.state_dict() == {"batches_taken": 7}


def test_distributed_ranks_split_the_global_batch(market):
    cfg = config(market)
    splits = load_splits(cfg)
    ranks = [build_dgnet_loaders(cfg, splits, rank=r, world_size=2)[0] for r in range(2)]
    first = [next(loader)["index"].tolist() for loader in ranks]
    assert len(first[0]) == len(first[1]) == 2  # the global batch of 4, halved
    assert set(first[0]).isdisjoint(first[1])
    with pytest.raises(UserError, match="divide evenly over 3"):
        build_dgnet_loaders(cfg, splits, rank=0, world_size=3)
    with pytest.raises(UserError, match="leaves 1 image per process.*sync_bn: true"):  # GPUs: SyncBatchNorm helps
        build_dgnet_loaders(cfg, splits, rank=0, world_size=4, gpus=True)
    with pytest.raises(UserError, match=r"leaves 1 image per process.*choose\)$"):  # on CPUs it is no way out
        build_dgnet_loaders(cfg, splits, rank=0, world_size=4)
    build_dgnet_loaders(config(market, "sync_bn=true"), splits, rank=0, world_size=4)  # normalized over all 4
    for opts in (("batch_size=1",), ("batch_size=1", "sync_bn=true")):  # one process: nothing to sync with
        with pytest.raises(UserError, match="batch_size 1 is 1 image"):
            build_teacher_loader(config(market, *opts), splits, identity_sampler=False)


def test_teacher_loader_pk_batches(market):
    cfg = config(market, "batch_size=4", "num_instances=2")
    splits = load_splits(cfg)
    batch = next(build_teacher_loader(cfg, splits, identity_sampler=True))
    assert "pos" not in batch and batch["image"].shape == (4, 3, 32, 16)
    labels = batch["label"].tolist()
    assert len(set(labels)) == 2 and all(labels.count(x) == 2 for x in labels)
    plain = next(build_teacher_loader(cfg, splits, identity_sampler=False))
    assert plain["image"].shape == (4, 3, 32, 16)
    with pytest.raises(UserError, match="identity sampler"):
        build_teacher_loader(config(market, "batch_size=5"), splits, identity_sampler=True)


def test_test_loader_keeps_order_and_ids(market):
    cfg = config(market)
    splits = load_splits(cfg)
    batch = next(iter(build_test_loader(cfg, splits.gallery, batch_size=8)))
    assert batch["image"].shape == (len(splits.gallery), 3, 32, 16)
    assert batch["pid"].tolist() == [r.pid for r in splits.gallery]
    assert batch["camid"].tolist() == [r.camid for r in splits.gallery]


def test_train_transform_is_a_function_of_the_seed():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 20, 3), dtype=np.uint8))
    views = [train_transform(img, (32, 16), 3, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(views[0], views[1]) and views[0].shape == (3, 32, 16)
    assert any(not torch.equal(views[0], train_transform(img, (32, 16), 3, torch.Generator().manual_seed(s)))
               for s in range(2, 6))


def test_padding_repeats_the_border_or_is_black():
    """pad_mode edge (DG-Net's loader) never shows black on a white image; zero (the baseline teacher's) shows it
    in the crops that reach into the padding. The teacher configs pad with zeros, DG-Net's by the edge."""
    white = Image.new("RGB", (20, 40), (255, 255, 255))
    black = -torch.tensor(IMAGENET_MEAN)[:, None, None] / torch.tensor(IMAGENET_STD)[:, None, None]

    def black_pixels(mode: str) -> int:
        views = [train_transform(white, (40, 20), 10, torch.Generator().manual_seed(s), mode) for s in range(8)]
        return sum(int(torch.isclose(v, black, atol=1e-5).all(0).sum()) for v in views)

    assert black_pixels("edge") == 0 and black_pixels("zero") > 0
    assert load_config(REPO_ROOT / "configs" / "teacher" / "market.yaml")["pad_mode"] == "zero"
    assert load_config(REPO_ROOT / "configs" / "latest.yaml")["pad_mode"] == "edge"


def test_random_erasing_area_and_fill():
    x = torch.ones(3, 64, 32)
    erased = [random_erasing(x, 1.0, torch.Generator().manual_seed(s)) for s in range(50)]
    fractions = [float((e == 0).all(dim=0).float().mean()) for e in erased]
    assert all(0.0 < f <= 0.45 for f in fractions)
    assert torch.equal(random_erasing(x, 0.0, torch.Generator()), x)
    assert torch.equal(x, torch.ones(3, 64, 32))  # the input is never modified in place


def _generate_with_others(root: str, results) -> None:
    from data.loaders import load_splits as load

    try:
        cfg = load_config(None, ["dataset=synthetic", f"data_root={root}", "synthetic.ids=8",
                                 "synthetic.images_per_id=6", "synthetic.height=64", "synthetic.width=32",
                                 "ID_class=null"])
        results.put(len(load(cfg).train))
    except Exception as exc:  # reported to the test instead of leaving it waiting
        results.put(repr(exc))


def test_processes_that_generate_the_synthetic_data_together_take_turns(tmp_path):
    """The processes of a run (or two runs) started on a missing synthetic data_root: one generates it, the
    other waits and reads it, instead of both writing into one folder."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_generate_with_others, args=(str(tmp_path / "data"), results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert got[0] == got[1] and isinstance(got[0], int) and got[0] > 0, got


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG (some cameras' exports) keeps its shades; Pillow's plain conversion makes it white."""
    Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)).save(tmp_path / "grey16.png")
    rgb = np.asarray(read_image(str(tmp_path / "grey16.png")))
    assert rgb.shape == (8, 8, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == round(63000 / 257)
    assert len(np.unique(rgb)) == 64


def test_corrupt_image_is_named_or_skipped(market):
    bad = market / "bounding_box_train" / "0005_c1s1_000099_00.jpg"
    bad.write_bytes(b"not a jpeg at all")
    cfg = config(market)
    splits = load_splits(cfg)
    ds = TrainSet(splits.train, splits.train_labels, (32, 16), 2, 0.0, positives=False)
    index = [r.path for r in splits.train].index(str(bad))
    with pytest.raises(UserError, match="0005_c1s1_000099_00.jpg.*skip_corrupt_images"):
        ds[(index, 0)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = load_splits(config(market, "skip_corrupt_images=true"))
    assert len(kept.train) == len(splits.train) - 1
    assert any("skipped 1 unreadable image" in str(w.message) for w in caught)


def test_class_count_and_size_checks(market):
    with pytest.raises(UserError, match="ID_class is 751 but .* has 5 identities"):
        load_splits(config(market, "ID_class=751"))
    cfg = config(market, "batch_size=64")
    with pytest.raises(UserError, match="fewer than one batch"):
        build_dgnet_loaders(cfg, load_splits(cfg))


def test_missing_data_root_and_unknown_dataset_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="market1501"):
        load_splits(config(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="did you mean 'synthetic'"):
        load_splits(config(tmp_path, "dataset=synthtic"))


def test_synthetic_data_root_one_level_off_names_the_dataset(data_root):
    """A data_root inside or above the synthetic dataset names it instead of generating a second one there."""
    train_dir = data_root / "bounding_box_train"
    before = sorted(train_dir.iterdir())
    for off in (train_dir, data_root.parent):
        with pytest.raises(UserError) as info:
            load_splits(config(off, "dataset=synthetic"))
        assert str(info.value).endswith(f"set data_root to {data_root}")
    assert sorted(train_dir.iterdir()) == before
    assert load_splits(config(data_root, "dataset=synthetic")).name == "synthetic"


def test_synthetic_config_on_another_folder_or_a_missing_one(market, tmp_path):
    """A synthetic config pointed at a real dataset says so (and writes nothing there); evaluation does not
    generate a dataset at a mistyped data_root."""
    before = sorted(p.relative_to(market) for p in market.rglob("*"))
    with pytest.raises(UserError, match="set dataset to its name"):
        load_splits(config(market, "dataset=synthetic"))
    assert sorted(p.relative_to(market) for p in market.rglob("*")) == before
    with pytest.raises(UserError, match="no synthetic dataset at data_root"):
        load_splits(config(tmp_path / "typo", "dataset=synthetic"), evaluation_only=True)
    assert not (tmp_path / "typo").exists()
    # evaluation reads only the query and gallery: another dataset's ID_class is not checked
    assert load_splits(config(market, "ID_class=751"), evaluation_only=True).query


def test_cli_summary_and_error(market, tmp_path, capsys):
    """`python -m data` (its main; the command itself runs in bench/gpu_quickstart.sh's test)."""
    from data.__main__ import main

    latest = str(REPO_ROOT / "configs" / "latest.yaml")
    assert main(["--config", latest, "--opts", f"data_root={market}", "ID_class=5"]) == 0
    out = capsys.readouterr().out
    assert "market1501" in out and "train" in out
    assert main(["--config", latest, "--opts", f"data_root={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_resumable_loader_state_round_trip(market):
    cfg = config(market)
    splits = load_splits(cfg)
    loader = build_teacher_loader(cfg, splits, identity_sampler=False)
    assert isinstance(loader, ResumableLoader)
    for _ in range(3):
        next(loader)
    assert loader.state_dict() == {"batches_taken": 3}


def test_a_worker_lets_the_first_sigterm_pass_and_dies_of_the_second():
    """The group-wide SIGTERM of `timeout` or a job scheduler must not kill the workers before the main
    process has saved; the loader's own SIGTERM for a stuck worker still ends it. A handover the main process
    broke off (a reset connection in the resource sharer's thread, reported through sys.excepthook) prints
    nothing."""
    code = ("import sys, threading, time; from data.loaders import init_worker; init_worker(0); "
            "t = threading.Thread(target=sys.excepthook, args=(ConnectionResetError, ConnectionResetError(), None)); "
            "t.start(); t.join(); print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert proc.stderr.read() == ""
    finally:
        proc.kill()


class BrokenHandover:
    """What torch's worker iterator does when a worker is killed while handing a batch over: the receive
    breaks (the worker's end of the connection is gone) before the kernel reports the worker dead."""

    def __init__(self, workers):
        self._workers = workers

    def __next__(self):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")


def test_a_handover_broken_by_a_killed_worker_names_the_worker(market):
    """Not "Connection reset by peer; free space or fix the folder": the worker's death, with what to do."""
    cfg = config(market)
    loader = build_teacher_loader(cfg, load_splits(cfg), identity_sampler=False)
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
    worker.start()
    os.kill(worker.pid, signal.SIGKILL)  # not waited for: the loader must wait for the death to show
    loader._iterator = BrokenHandover([worker])
    with pytest.raises(UserError, match=rf"worker \(pid {worker.pid}\) died \(killed by signal: Killed, usually by "
                                        r"the out-of-memory killer\); lower num_workers"):
        next(loader)
    assert loader.state_dict() == {"batches_taken": 0}


def test_a_broken_receive_with_every_worker_alive_stays_itself(market):
    cfg = config(market)
    loader = build_teacher_loader(cfg, load_splits(cfg), identity_sampler=False)
    loader._iterator = BrokenHandover([])
    with pytest.raises(ConnectionResetError):
        next(loader)
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
    worker.start()
    try:
        assert dead_worker(BrokenHandover([worker]), wait_s=0.2) is None
    finally:
        worker.kill()
        worker.join()


class Closing:
    def __init__(self, error=None):
        self.error, self.closed = error, False

    def close(self):
        self.closed = True
        if self.error:
            raise self.error


def test_closing_loaders_outlasts_a_late_worker_death_report():
    """torch's SIGCHLD check can report a worker killed a moment ago while the loaders are being closed;
    every loader is still closed and the report does not replace the run's own ending. Other errors stay."""
    late = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
    loaders = [Closing(late), Closing()]
    close_loaders(loaders)
    assert all(loader.closed for loader in loaders)
    with pytest.raises(RuntimeError, match="unrelated"):
        close_loaders([Closing(RuntimeError("unrelated"))])


def test_own_test_data_without_cameras_counts_every_match(tmp_path):
    from test_datasets import make_files

    root = tmp_path / "mine"
    make_files(root / "train_all", ["a/x1.jpg", "a/x2.jpg", "b/y1.jpg", "b/y2.jpg"])
    make_files(root / "query", ["0001/q.jpg"])
    make_files(root / "gallery", ["0001/g.jpg", "0002/h.jpg", "-1/junk.jpg"])
    with pytest.raises(UserError, match="cannot read the camera.*or set cross_camera: false"):
        load_splits(config(root, "dataset=folder"))
    splits = load_splits(config(root, "dataset=folder", "cross_camera=false"))
    assert [r.camid for r in splits.query] == [1] and {r.camid for r in splits.gallery} == {0}
    summary = splits.summary().splitlines()  # the stand-in cameras are not counted as cameras
    assert "cameras" not in summary[2] and "cameras" not in summary[3] and "every match counts" in summary[-1]
    assert sorted(r.pid for r in splits.gallery) == [-1, 1, 2]  # junk stays junk
    # a query's own file in the gallery is ignored for that query alone; every other match counts
    from evaluate import evaluate_distmat

    make_files(root / "query", ["0002/h2.jpg"])
    make_files(root / "gallery", ["0001/q.jpg"])  # a copy of the first query's image
    splits = load_splits(config(root, "dataset=folder", "cross_camera=false"))
    assert [r.camid for r in splits.query] == [1, 2]
    cams = {os.path.basename(r.path): r.camid for r in splits.gallery}
    assert cams == {"q.jpg": 1, "g.jpg": 0, "h.jpg": 0, "junk.jpg": 0}
    pids = np.array([r.pid for r in splits.gallery])
    gcams = np.array([r.camid for r in splits.gallery])
    distmat = np.where(np.array([os.path.basename(r.path) == "q.jpg" for r in splits.gallery]), 0.0, 0.5)[None]
    got = evaluate_distmat(distmat, np.array([1]), pids, np.array([1]), gcams)
    assert got["num_valid_queries"] == 1 and got["mAP"] == 1.0  # q itself ignored, g found first
    # the same identity and file name but another photo (img_0.jpg in query/ and gallery/) is a match
    from PIL import Image

    Image.new("RGB", (4, 8), (1, 2, 3)).save(root / "gallery" / "0002" / "h2.jpg")
    splits = load_splits(config(root, "dataset=folder", "cross_camera=false"))
    cams = {os.path.relpath(r.path, root): r.camid for r in splits.gallery}
    assert cams["gallery/0001/q.jpg"] == 1 and cams["gallery/0002/h2.jpg"] == 0


def test_extra_training_sets_join_the_training_split(market, tmp_path):
    from test_datasets import make_files

    base = load_splits(config(market))
    extra = tmp_path / "dg-market"  # generated images of the same people, per-identity folders
    make_files(extra / "train_all", [f"{pid:04d}/{pid:04d}_c1s1_000001_00__s_x.jpg" for pid in sorted(TRAIN_COUNTS)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same people: nothing to say
        same = load_splits(config(market, f"extra_train=[{{dataset: folder, data_root: {extra}, same_ids: true}}]"))
    assert same.num_classes == base.num_classes and len(same.train) == len(base.train) + len(TRAIN_COUNTS)
    assert same.train_labels[len(base.train):] == list(range(base.num_classes))  # the same people's labels
    new = load_splits(config(market, f"extra_train=[{{dataset: folder, data_root: {extra}}}]"))
    assert new.num_classes == 2 * base.num_classes
    n = len(TRAIN_COUNTS)
    assert f"(train includes extra_train[0]: {n} images, {n} identities of folder at {extra})" in new.summary()
    strangers = tmp_path / "others"  # same_ids: true for people the main set does not have: a warning
    make_files(strangers / "train_all", ["0042/0042_c1s1_000001_00.jpg"])
    with pytest.warns(UserWarning, match="1 of its identities are not in the main training split"):
        load_splits(config(market, f"extra_train=[{{dataset: folder, data_root: {strangers}, same_ids: true}}]"))
    assert min(r.pid for r in new.train[len(base.train):]) > max(r.pid for r in base.train)
    assert load_splits(config(market, f"extra_train=[{{dataset: folder, data_root: {extra}}}]"),
                       evaluation_only=True).train == base.train  # evaluation reads no extra set
    for bad, words in (("[3]", "give {dataset"), (f"[{{dataset: nope, data_root: {extra}}}]", "is not one of"),
                       (f"[{{dataset: folder, data_root: {extra}, same_ids: 2}}]", "use true or false"),
                       (f"[{{dataset: folder, data_root: {tmp_path / 'none'}}}]", "does not exist")):
        with pytest.raises(UserError, match=words):
            load_splits(config(market, f"extra_train={bad}"))
