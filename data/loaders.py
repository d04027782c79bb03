"""Datasets and loaders: DG-Net's loaders a and b, the teacher's loader, test loaders, and `load_splits`.

A training item is a dict:
- `image`: the augmented image (generator input, structure-encoder input, reconstruction target);
- `label`: its identity label in 0..C-1;
- `pos`: a random *other* image of the same identity (itself when the identity has only one), with its
  own augmentation: DG-Net's positive, for the same-identity reconstruction and the positive ID loss;
- `image_erased`, `pos_erased`: random-erased copies of both, for the ReID losses only;
- `index`, `pos_index`: the dataset indices of both images.
The teacher's items have `image`, `image_erased`, `label` and `index`.

Training loaders are endless (`ResumableLoader`): the loop asks for `next(loader)` once per iteration,
and a checkpoint stores how many batches were taken, from which the loader restarts exactly.
"""
from __future__ import annotations

import atexit
import contextlib
import difflib
import filecmp
import gc
import multiprocessing
import os
import re
import signal
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data.datasets import DATASETS, DatasetSplits, Record, hold_out_validation, read_dataset
from data.samplers import IdentitySampler, ShuffleSampler
from data.transforms import eval_transform, random_erasing, train_transform
from utils import Notice, UserError, exclusive_lock, quiet_handover_errors, seed_everything

# Loader a and b are independent shuffles of the same split: two streams of one seed.
STREAM_A, STREAM_B, STREAM_TEACHER = 0, 1, 2


def read_image(path: str) -> Image.Image:
    """Open an image as RGB, or raise UserError naming the file."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):  # 16-bit grey (PNG, TIFF): convert() would clip it to white
                return _eight_bit(img).convert("RGB")
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path} ({err}); remove or replace it (in a dataset's splits, "
                        "skip_corrupt_images: true skips unreadable files)") from None


def _eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grey image scaled to 8 bits: 16-bit when its mode says so or a value
    passes 255 (Pillow opens some 16-bit files as 32-bit), else as it is."""
    grey = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or grey.max(initial=0) > 255:
        grey = grey / 257
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))


def _is_readable(path: str) -> bool:
    try:
        read_image(path)
        return True
    except UserError:
        return False


def drop_unreadable(records: Sequence[Record], what: str, workers: int = 4) -> list[Record]:
    """Decode every image once and keep the readable ones; warn with the count and the first names."""
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoding releases the GIL
        readable = list(pool.map(_is_readable, (r.path for r in records)))
    bad = [r.path for r, ok in zip(records, readable) if not ok]
    if bad:
        names = ", ".join(Path(p).name for p in bad[:3]) + (", ..." if len(bad) > 3 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image(s) in {what}: {names}", Notice, stacklevel=2)
    return [r for r, ok in zip(records, readable) if ok]


def init_worker(worker_id: int) -> None:
    """Set up a loader worker: seed python, numpy and torch from the seed torch gave it (explicit, not
    inherited), and let the first SIGINT or SIGTERM pass.

    The augmentations do not use these global RNGs (they use per-sample generators); seeding keeps any
    library that does deterministic too. The signals: a Ctrl-C in a terminal, `timeout`, or a scheduler
    that cancels a job signals the whole process group; a worker that died of it would take the main
    process down mid-iteration, before its safe stop could save. A second one acts as usual, as in the main
    process (a second Ctrl-C aborts), and so does the SIGTERM with which the loader ends a stuck worker. A
    handover that the main process broke off is not a traceback here (utils.quiet_handover_errors).
    """
    seed_everything(torch.initial_seed() % 2**63)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _pass_once)
    quiet_handover_errors()


def _pass_once(signum: int, frame: Any) -> None:
    """A worker's first SIGINT/SIGTERM: ignored; the next one gets the default action."""
    signal.signal(signum, signal.SIG_DFL)


# How torch reports a loader worker that died (killed by a signal, or exited) instead of returning a batch.
_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) "
                          r"(is killed by signal: [\w ]+|exited unexpectedly)")


def worker_death(err: BaseException) -> str | None:
    """The one-line explanation of `err` when it says that a loader worker died, else None."""
    m = _WORKER_DIED.search(str(err))
    if not isinstance(err, RuntimeError) or m is None:
        return None
    return _died(m.group(1).strip(), m.group(2).rstrip(".").replace("is killed by signal: ", "killed by signal: "))


def _died(pid: str, how: str) -> str:
    if "Killed" in how:
        how += ", usually by the out-of-memory killer"
    return f"a data loader worker (pid {pid}) died ({how}); lower num_workers or batch_size, then resume"


def dead_worker(iterator: Any, wait_s: float = 2.0) -> str | None:
    """The one-line explanation when one of `iterator`'s workers has died, else None.

    For a receive that broke (a reset connection, an EOF): a worker killed while handing over a batch
    breaks the handover before the kernel reports the worker dead, so torch's own check, made at once,
    can still find every worker alive. Waiting up to `wait_s` in all lets the death show.
    """
    deadline = time.monotonic() + wait_s
    try:
        for worker in getattr(iterator, "_workers", []):
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.exitcode is not None:
                code = worker.exitcode
                how = f"killed by signal: {signal.strsignal(-code)}" if code < 0 else f"exited with code {code}"
                return _died(str(worker.pid), how)
    except RuntimeError as err:  # torch's SIGCHLD check saw the death first, while we waited
        report = worker_death(err)
        if report is None:
            raise
        return report
    return None


def close_loaders(loaders: Iterable[Any]) -> None:
    """Close every loader, even when torch's SIGCHLD check raises partway because a worker died a moment
    ago: the run is already ending, on an error that says so or at its end, and torch still deregisters
    and ends the workers on its way out."""
    for loader in loaders:
        try:
            loader.close()
        except RuntimeError as err:
            if worker_death(err) is None:
                raise


def shut_down(iterator: Any) -> None:
    """Stop a DataLoader iterator's workers (and pin-memory thread) now, whoever still holds the iterator.

    Dropping the last reference is not enough after an error: the exception's traceback keeps the iterator
    alive, and at interpreter exit multiprocessing SIGTERMs the workers and waits for them, while a worker
    lets its first SIGTERM pass (init_worker), so the process never ended. torch's own shutdown asks the
    workers to finish through their queues; a worker still alive after it is killed.
    """
    stop = getattr(iterator, "_shutdown_workers", None)  # single-process iterators have no workers
    if stop is None:
        return
    stop()
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def _end_leftover_workers() -> None:
    """Exit hook, run before multiprocessing's (registered later): end the workers of loaders that an error
    left unclosed (a test loader's, say). Collecting garbage shuts their iterators down the normal way;
    a worker left after that is killed, with torch's SIGCHLD check off so its death raises nothing."""
    gc.collect()
    leftover = [p for p in multiprocessing.active_children() if p.daemon]
    if leftover:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in leftover:
        p.kill()
        p.join(timeout=5)


_exit_hook_registered = False


def _register_exit_hook() -> None:
    """Once, after the first workers started: multiprocessing's exit hook exists by then, and atexit runs
    hooks last-registered first, so ours runs before it."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_end_leftover_workers)
        _exit_hook_registered = True


class TrainSet(Dataset):
    """Training images with labels; indexed by `(index, seed)` pairs from the samplers."""

    def __init__(self, records: Sequence[Record], labels: Sequence[int], size: tuple[int, int], pad: int,
                 erasing_p: float, positives: bool, pad_mode: str = "edge"):
        if len(records) != len(labels):
            raise ValueError("one label per record")
        self.records, self.labels = list(records), [int(x) for x in labels]
        self.size, self.pad, self.pad_mode = size, pad, pad_mode
        self.erasing_p, self.positives = erasing_p, positives
        members: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(self.labels):
            members[label].append(index)
        self.members = dict(members)  # label -> indices, precomputed once (not a scan per item)

    def __len__(self) -> int:
        return len(self.records)

    def positive_of(self, index: int, gen: torch.Generator) -> int:
        """A uniformly random other image of the same identity; the image itself if it is alone."""
        others = self.members[self.labels[index]]
        if len(others) == 1:
            return index
        pick = int(torch.randint(len(others) - 1, (), generator=gen))
        own = others.index(index)
        return others[pick + (pick >= own)]

    def _view(self, index: int, gen: torch.Generator) -> torch.Tensor:
        return train_transform(read_image(self.records[index].path), self.size, self.pad, gen, self.pad_mode)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        gen = torch.Generator().manual_seed(seed)
        image = self._view(index, gen)
        sample = {"image": image, "label": self.labels[index], "index": index,
                  "image_erased": random_erasing(image, self.erasing_p, gen)}
        if self.positives:
            pos_index = self.positive_of(index, gen)
            pos = self._view(pos_index, gen)
            sample["pos"], sample["pos_index"] = pos, pos_index
            sample["pos_erased"] = random_erasing(pos, self.erasing_p, gen)
        return sample


class TestSet(Dataset):
    """Images for feature extraction: resized and normalized, in record order."""

    def __init__(self, records: Sequence[Record], size: tuple[int, int]):
        self.records, self.size = list(records), size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        return {"image": eval_transform(read_image(r.path), self.size), "pid": r.pid, "camid": r.camid,
                "index": index}


class ResumableLoader:
    """An endless training loader that knows how many batches it has handed out.

    `state_dict()` is that count; a loader built with the same config and `load_state_dict(state)` gives
    the same batches, augmentations included, as the original would have given next.
    """

    def __init__(self, dataset: TrainSet, sampler: ShuffleSampler | IdentitySampler, batch_size: int,
                 num_workers: int, pin_memory: bool = False):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.batches_taken = 0
        self._iterator: Iterator | None = None

    def _start(self) -> Iterator:
        self.sampler.start = self.batches_taken * self.batch_size
        # The worker seed comes from a private generator: drawing it from the global torch RNG would make
        # the training RNG depend on when the loader was (re)started, and resume would no longer be exact.
        base_seed = torch.Generator().manual_seed(self.sampler.seed * 1000 + self.sampler.stream)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                            num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=True,
                            generator=base_seed, worker_init_fn=init_worker,
                            prefetch_factor=4 if self.num_workers else None)
        iterator = iter(loader)
        if self.num_workers:
            _register_exit_hook()
        return iterator

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except (RuntimeError, OSError, EOFError) as err:
            # torch's report of a dead worker, or a handover that its worker's death broke (a reset
            # connection, an EOF); a real I/O error stays itself
            died = worker_death(err) if isinstance(err, RuntimeError) else dead_worker(self._iterator)
            if died is None:
                raise
            raise UserError(died) from None
        self.batches_taken += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_taken": self.batches_taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches_taken = int(state["batches_taken"])
        self.close()  # restarted lazily at the saved position

    def close(self) -> None:
        """Stop the workers now; the next `next()` starts new ones at the same position."""
        iterator, self._iterator = self._iterator, None
        shut_down(iterator)


# ---------------------------------------------------------------------------------------------------
# builders from a config


def image_size(cfg: dict[str, Any]) -> tuple[int, int]:
    return cfg["crop_image_height"], cfg["crop_image_width"]


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """`batch_size` is global: each of `world_size` processes takes an equal share."""
    if batch_size % world_size:
        raise UserError(f"batch_size {batch_size} is global and must divide evenly over {world_size} "
                        f"processes; use a multiple of {world_size}")
    return batch_size // world_size


def _ensure_synthetic(cfg: dict[str, Any], generate: bool = True, say: bool = True) -> None:
    """Generate the synthetic dataset into data_root the first time a config names it (with `generate`;
    otherwise a missing one is an error: evaluation must not make up a dataset at a mistyped path). The
    processes of a run, and runs started together, take turns: one generates, the others then find it."""
    from data import synthetic  # imported here: only synthetic configs need the generator

    root = Path(cfg["data_root"]).expanduser().absolute()
    turns = generate and not (root / synthetic.METADATA_FILE).is_file()
    if turns:
        root.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root.parent / f".{root.name}.generating") if turns else contextlib.nullcontext():
        _check_or_generate_synthetic(cfg, root, generate, say)


def _check_or_generate_synthetic(cfg: dict[str, Any], root: Path, generate: bool, say: bool) -> None:
    from data import synthetic
    if (root / synthetic.METADATA_FILE).is_file():
        # A dataset once generated is used as it is: say so when the config's `synthetic:` asks for another
        differs = synthetic.differences(root, **cfg["synthetic"]) if generate and say else ""
        if differs:
            print(f"note: data_root {root} holds a synthetic dataset made with other parameters ({differs}); "
                  "training uses it as it is; set data_root to a new folder to generate the config's", flush=True)
        return
    # One level too deep or too high would otherwise generate a second dataset there (or fail on the files)
    below = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in [root.parent, root.parent.parent, *below]:
        if (folder / synthetic.METADATA_FILE).is_file():
            raise UserError(f"synthetic: data_root {root} is not the synthetic dataset but "
                            f"{'holds' if folder.parent == root else 'lies inside'} one; set data_root to {folder}")
    if root.is_dir() and any(root.iterdir()):  # (a file there is refused by load_splits before this)
        raise UserError(f"synthetic: data_root {root} is not empty but holds no synthetic dataset "
                        f"({synthetic.METADATA_FILE}): if it is a real dataset, set dataset to its name "
                        f"({', '.join(DATASETS)}); if a generation was interrupted there, remove the folder; else "
                        "set data_root to a new folder to generate into")
    if not generate:
        raise UserError(f"synthetic: no synthetic dataset at data_root {root}; set data_root to the one the run "
                        "was trained or is to be evaluated on")
    s = cfg["synthetic"]
    print(f"generating the synthetic dataset into {root} ...", flush=True)
    synthetic.generate(root, ids=s["ids"], images_per_id=s["images_per_id"], height=s["height"],
                       width=s["width"], difficulty=s["difficulty"], seed=s["seed"], test_ids=s["test_ids"])


def load_splits(cfg: dict[str, Any], evaluation_only: bool = False, say: bool = True) -> DatasetSplits:
    """Read the dataset a config names (generating the synthetic one if needed) and check it; `say`: print
    its notes (one process of several does).

    evaluation_only: only the query and gallery will be used (test.py), so the training split is not checked
    against the config's ID_class nor split for validation: a model trained on one dataset can be evaluated
    on another's test split (cross-dataset evaluation)."""
    name = cfg["dataset"]
    if name not in (*DATASETS, "synthetic"):
        close = difflib.get_close_matches(name, (*DATASETS, "synthetic"), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"dataset: unknown '{name}'{hint}; known: {', '.join(DATASETS)}, synthetic")
    if Path(cfg["data_root"]).exists() and not Path(cfg["data_root"]).is_dir():
        raise UserError(f"data_root {cfg['data_root']} is a file: set data_root to the dataset's folder")
    if name == "synthetic":
        _ensure_synthetic(cfg, generate=not evaluation_only, say=say)
        splits = read_dataset("market1501", cfg["data_root"])
        splits.name = "synthetic"
    else:
        splits = read_dataset(name, cfg["data_root"], cuhk03_labeled=cfg["cuhk03_labeled"],
                              test_cameras=cfg["cross_camera"], part="test" if evaluation_only else "all")
    if not cfg["cross_camera"]:
        every_match_counts(splits, say)
    if cfg["skip_corrupt_images"]:
        if not evaluation_only:
            splits.train = drop_unreadable(splits.train, "the training split")
        splits.query = drop_unreadable(splits.query, "the query split")
        splits.gallery = drop_unreadable(splits.gallery, "the gallery split")
        if splits.multi_query is not None:
            splits.multi_query = drop_unreadable(splits.multi_query, "the multi-query split")
    if evaluation_only:
        return splits
    if not splits.train:
        raise UserError(f"{name}: the training split under {cfg['data_root']} is empty")
    add_extra_training(splits, cfg)
    if splits.num_classes < 2:  # a classifier of one class learns nothing (loss 0 from the start)
        raise UserError(f"{name}: the training split under {cfg['data_root']} has 1 identity; re-ID training needs "
                        "at least 2 (check that each identity's images are in a folder of their own)")
    expected = cfg["ID_class"]
    if expected is not None and expected != splits.num_classes:
        raise UserError(f"ID_class is {expected} but the training split under {cfg['data_root']} has "
                        f"{splits.num_classes} identities; fix data_root or set ID_class: null")
    if cfg["val_ids"] > 0:  # after the ID_class check, which counts the dataset's identities
        hold_out_validation(splits, cfg["val_ids"], cfg["seed"])
    return splits


EXTRA_KEYS = {"dataset", "data_root", "same_ids"}


def add_extra_training(splits: DatasetSplits, cfg: dict[str, Any]) -> None:
    """`extra_train`: more training sets appended to the training split, each `{dataset, data_root,
    same_ids}` (`same_ids: true`: its pids are the main set's people, as in a DG-Market generated from
    it; false, the default: new people, numbered after the main set's). Their test splits are not read."""
    extras = cfg["extra_train"]
    for i, entry in enumerate(extras):
        where = f"extra_train[{i}]"
        if not isinstance(entry, dict) or not {"dataset", "data_root"} <= entry.keys() or set(entry) - EXTRA_KEYS:
            raise UserError(f"{where} is {entry!r}: give {{dataset: <layout>, data_root: <folder>, same_ids: "
                            "true|false} (same_ids optional, false by default)")
        if entry["dataset"] not in DATASETS:
            raise UserError(f"{where}: dataset {entry['dataset']!r} is not one of {', '.join(DATASETS)}")
        same_ids = entry.get("same_ids", False)
        if not isinstance(same_ids, bool):
            raise UserError(f"{where}: same_ids is {same_ids!r}: use true or false")
        extra = read_dataset(entry["dataset"], entry["data_root"], cuhk03_labeled=cfg["cuhk03_labeled"],
                             part="train").train
        if cfg["skip_corrupt_images"]:
            extra = drop_unreadable(extra, f"{where}'s training split")
        if not extra:
            raise UserError(f"{where}: the training split under {entry['data_root']} is empty")
        strangers = {r.pid for r in extra} - {r.pid for r in splits.train} if same_ids else set()
        if strangers:  # they join as new classes: likely a wrong same_ids or another dataset
            warnings.warn(f"{where}: same_ids is true, but {len(strangers)} of its identities are not in the main "
                          f"training split (e.g. pid {min(strangers)}); they train as new classes. If it holds "
                          "other people, set same_ids: false", Notice, stacklevel=2)
        if not same_ids:  # new people: numbered after every pid so far, in their own sorted order
            first = max(r.pid for r in splits.train) + 1
            rank = {pid: first + k for k, pid in enumerate(sorted({r.pid for r in extra}))}
            extra = [r._replace(pid=rank[r.pid]) for r in extra]
        splits.train = splits.train + extra
        splits.extra_sets.append(f"{where}: {len(extra)} images, {len({r.pid for r in extra})} identities of "
                                 f"{entry['dataset']} at {entry['data_root']}")


def every_match_counts(splits: DatasetSplits, say: bool = True) -> None:
    """`cross_camera: false`: each query on a camera of its own (1, 2, ...) and the gallery on camera 0, so
    the protocol's same-camera rule drops no match, except a gallery copy of a query's own image (the same
    identity and file name, and the same bytes: img_0.jpg of one identity in query/ and gallery/ may be two
    photos), which takes that query's camera and so is ignored for it alone (a query never matches itself).
    Multi-query images, which are averaged per identity and camera, are not used."""
    queries: dict[tuple[int, str], list[tuple[str, int]]] = defaultdict(list)
    for camid, r in enumerate(splits.query, 1):
        queries[r.pid, os.path.basename(r.path)].append((r.path, camid))

    def camera(r: Record) -> int:
        for path, camid in queries.get((r.pid, os.path.basename(r.path)), ()):
            if _same_file_content(path, r.path):
                return camid
        return 0

    splits.query = [r._replace(camid=camid) for camid, r in enumerate(splits.query, 1)]
    splits.gallery = [r._replace(camid=camera(r)) for r in splits.gallery]
    splits.multi_query = None
    splits.every_match = True
    copies = sum(r.camid > 0 for r in splits.gallery)
    if copies and say:
        print(f"cross_camera false: {copies} gallery image(s) are copies of a query's own image, ignored for "
              "that query alone", flush=True)


def _same_file_content(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:  # unreadable: not known to be a copy (reading the image will say what is wrong)
        return False


def _train_set(cfg: dict[str, Any], splits: DatasetSplits, positives: bool) -> TrainSet:
    return TrainSet(splits.train, splits.train_labels, image_size(cfg), cfg["pad"], cfg["erasing_p"],
                    positives=positives, pad_mode=cfg["pad_mode"])


def _check_feedable(cfg: dict[str, Any], splits: DatasetSplits, world_size: int, gpus: bool = False) -> int:
    batch = per_rank_batch(cfg["batch_size"], world_size)
    # BatchNorm cannot train on one value per channel; SyncBatchNorm can, over several processes' images
    if batch < 2 and not (cfg["sync_bn"] and world_size > 1):
        where = f"over {world_size} processes leaves 1 image per process" if world_size > 1 else "is 1 image"
        raise UserError(f"batch_size {cfg['batch_size']} {where}, and BatchNorm needs at least 2 to train: raise "
                        f"batch_size to {2 * world_size} or more (a change from the recipe; scale the learning "
                        "rates with it if you choose)" + (", or set sync_bn: true to normalize over the global "
                                                         "batch" if world_size > 1 and gpus else ""))
    if len(splits.train) < cfg["batch_size"]:
        raise UserError(f"the training split has {len(splits.train)} images, fewer than one batch of "
                        f"{cfg['batch_size']}; lower batch_size")
    return batch


def build_dgnet_loaders(cfg: dict[str, Any], splits: DatasetSplits, *, rank: int = 0, world_size: int = 1,
                        pin_memory: bool = False, gpus: bool = False) -> tuple[ResumableLoader, ResumableLoader]:
    """DG-Net's loaders a and b: two independent shuffles of the training split, with positives. `gpus`: the
    processes train on GPUs (where sync_bn can help a small batch)."""
    batch = _check_feedable(cfg, splits, world_size, gpus)
    dataset = _train_set(cfg, splits, positives=True)
    loaders = []
    for stream in (STREAM_A, STREAM_B):
        sampler = ShuffleSampler(len(dataset), seed=cfg["seed"], stream=stream, rank=rank, world_size=world_size)
        loaders.append(ResumableLoader(dataset, sampler, batch, cfg["num_workers"], pin_memory))
    return loaders[0], loaders[1]


def build_teacher_loader(cfg: dict[str, Any], splits: DatasetSplits, *, identity_sampler: bool, rank: int = 0,
                         world_size: int = 1, pin_memory: bool = False, gpus: bool = False) -> ResumableLoader:
    """The teacher's loader: a plain shuffle, or P x K identities for the batch-hard triplet loss."""
    batch = _check_feedable(cfg, splits, world_size, gpus)
    dataset = _train_set(cfg, splits, positives=False)
    sampler: ShuffleSampler | IdentitySampler
    if identity_sampler:
        try:
            sampler = IdentitySampler(dataset.labels, batch_size=cfg["batch_size"],
                                      num_instances=cfg["num_instances"], seed=cfg["seed"],
                                      stream=STREAM_TEACHER, rank=rank, world_size=world_size)
        except ValueError as err:
            raise UserError(f"identity sampler: {err}") from None
    else:
        sampler = ShuffleSampler(len(dataset), seed=cfg["seed"], stream=STREAM_TEACHER, rank=rank,
                                 world_size=world_size)
    return ResumableLoader(dataset, sampler, batch, cfg["num_workers"], pin_memory)


def build_test_loader(cfg: dict[str, Any], records: Sequence[Record], batch_size: int,
                      pin_memory: bool = False) -> DataLoader:
    """Records in order, resized and normalized, for feature extraction."""
    return DataLoader(TestSet(records, image_size(cfg)), batch_size=batch_size, shuffle=False,
                      num_workers=cfg["num_workers"], pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
