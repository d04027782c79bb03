"""Train DG-Net, or the teacher it needs.

    python train.py --config configs/teacher/market.yaml --trainer baseline --name teacher-market  # the teacher
    python train.py --config configs/latest.yaml --dry_run                    # check it first; writes nothing
    python train.py --config configs/latest.yaml                              # DG-Net (its teacher: the run above)
    python train.py --config configs/latest.yaml --resume                     # continue exactly
    python train.py --resume --name latest --which_iter 20000                 # continue from an older one
    python train.py --config configs/latest.yaml --gpu_ids 0,1                # DDP, one process per GPU

A run lives in `<output_path>/outputs/<name>/`: `config.yaml` (resolved), `checkpoints/<iteration>.pt`
(the whole run state), `images/` (grids and index.html), `logs/` (tensorboard), `src/` (the code),
`config_changes.log` (what each `--resume --opts` changed, from which iteration), and the plain-text record
(runlog.py): `metrics.jsonl` (every logged scalar), `log.txt` (the console), `env.json` (each start's software
and hardware). While it trains, `.lock`
keeps any second train.py out of the folder. Bad input is refused before the folder is created.
The loop is at the bottom of this file: one `train_step` per iteration, then the periodic steps.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import distributed
import runlog
from data.loaders import (
    TestSet,
    TrainSet,
    build_dgnet_loaders,
    build_teacher_loader,
    close_loaders,
    image_size,
    load_splits,
    worker_death,
)
from preflight import dry_run_iterations, dry_run_report, teacher_report
from utils import (
    BEST_NAME,
    REPO_ROOT,
    NonFiniteState,
    RunLock,
    UserError,
    check_run_checkpoint,
    check_writable,
    checkpoint_path,
    config_help,
    dump_config,
    find_checkpoint,
    first_line,
    first_non_finite,
    flatten,
    format_seconds,
    interrupted,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_config,
    one_line,
    peek_checkpoint,
    plain_warnings,
    quiet_handover_errors,
    run_folder,
    save_checkpoint,
    saved_config,
    seed_everything,
    write_grid,
    write_image_index,
)

TRAINERS = ("DGNet", "baseline")
SOURCE_FILES = ("train.py", "trainer.py", "distributed.py", "networks.py", "reIDmodel.py", "utils.py", "runlog.py",
                "data")


# ---------------------------------------------------------------------------------------------------
# command line, device, run folder


DRY_RUN_ITERS = 4  # --dry_run's default: two at the run's start, two with every loss term on


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: configs/latest.yaml); a resumed run keeps its own "
                                    "config.yaml, changed only by --opts")
    p.add_argument("--trainer", choices=TRAINERS,
                   help="DGNet (default), or baseline for the teacher; with --resume: the run's own kind")
    p.add_argument("--name", help="run name (default: the config file's base name)")
    p.add_argument("--output_path", default=".", help="runs go to OUTPUT_PATH/outputs/NAME (default: .)")
    p.add_argument("--resume", action="store_true", help="continue the run NAME from its newest checkpoint")
    p.add_argument("--which_iter", default="last",
                   help="with --resume: the checkpoint to continue from, an iteration number, last (default) or "
                        "best; newer checkpoints are moved to checkpoints/superseded_<date>/")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. max_iter=10")
    p.add_argument("--evaluate", action="store_true",
                   help="with --resume: evaluate the run's newest checkpoint on the test split (as test.py does) "
                        "instead of training")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--dry_run", nargs="?", type=int, const=DRY_RUN_ITERS, metavar="N",
                   help=f"check a run before starting it: N iterations (default {DRY_RUN_ITERS}), half at its first "
                        "iteration and half where every loss term runs at full weight, each one's losses, speed and "
                        "GPU memory printed, then the whole run's time and its checkpoints' disk space; nothing is "
                        "written")
    distributed.add_arguments(p)
    args = p.parse_args(argv)
    if args.dry_run is not None and args.dry_run < 1:
        p.error(f"--dry_run {args.dry_run}: give a number of iterations, 1 or more")
    if args.dry_run is not None and args.evaluate:
        p.error("--dry_run checks a training run; --evaluate trains nothing: give one of them")
    return args


DEFAULT_CONFIG = "configs/latest.yaml"


def resume_config_note(config: str, run_dir: Path, opts: list[str]) -> str | None:
    """--config with --resume: a resumed run keeps its own config.yaml (changed only by --opts), so what the
    --config file says otherwise is not applied; a line naming those keys, or None when they agree (as when
    `make quickstart` resumes with the config it started from)."""
    given, own = flatten(load_config(config, opts)), flatten(load_config(run_dir / "config.yaml", opts))
    differ = sorted(k for k in given if given[k] != own.get(k))
    if not differ:
        return None
    shown = ", ".join(f"{k}: {given[k]!r}" for k in differ[:4]) + (", ..." if len(differ) > 4 else "")
    return (f"note: --resume continues with {run_dir / 'config.yaml'}; where --config {config} differs from it "
            f"({len(differ)} keys: {shown}) it is not applied: give such changes as --opts")


# Keys a resumed run cannot take from --opts: the checkpoint restores what they decided.
FIXED_ON_RESUME = {
    "seed": "the run's random streams continue from the checkpoint",
    "pretrained": "the weights come from the checkpoint",
    "gen.init": "the weights come from the checkpoint",
    "lr_policy": "the LR schedulers are restored from the checkpoint",
    "scale2": "the appearance encoder and the teacher were trained at their input size",
    "ID_stride": "the appearance encoder's weights were trained with its last stride",
    "pool": "the appearance encoder's weights were trained with its pooling",
    "extra_train": "the loaders resume at their position in the training split the run started with",
    "dataset": "the loaders resume at their position in the training split the run started with",
    "cuhk03_labeled": "the loaders resume at their position in the training split the run started with",
    "val_ids": "the held-out identities decide the training split the loaders resume in",
    "crop_image_height": "the networks were trained at the run's image size",
    "crop_image_width": "the networks were trained at the run's image size",
    "batch_size": "the loaders resume at their position counted in batches of the run's size",
    "num_instances": "the identity sampler resumes at its position counted in the run's batches",
}
CHANGES_FILE = "config_changes.log"


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (value in the checkpoint's config, value now) for every key that differs."""
    old, new = flatten(before), flatten(after)
    return {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}


def check_resume_changes(changes: dict[str, tuple[Any, Any]]) -> None:
    """Refuse an --opts change that a resumed run could only record, not apply."""
    for key, (old, new) in changes.items():
        if key in FIXED_ON_RESUME:
            raise UserError(f"--resume: {key} cannot change from {old!r} to {new!r} ({FIXED_ON_RESUME[key]}); "
                            f"drop {key} from --opts, or start a new run with another --name")


def prepare_run_folder(run_dir: Path, cfg: dict[str, Any], changes: str | None = None) -> None:
    """The run's subfolders, its resolved config and a copy of its code; `changes` (a resume's --opts) is
    appended to config_changes.log, so config.yaml and that log together say what ran from when."""
    for sub in ("checkpoints", "images", "logs", "src"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    if changes:
        with open(run_dir / CHANGES_FILE, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {changes}\n")
    for name in SOURCE_FILES:  # the code that defines the run, as the original kept its copies
        src, dst = REPO_ROOT / name, run_dir / "src" / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy2(src, dst)


# ---------------------------------------------------------------------------------------------------
# run state: everything a checkpoint needs besides the trainer's own state


def rng_state() -> dict[str, Any]:
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------
# periodic steps (each runs every N iterations; the loop calls them in order)


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the iteration, saves, and exits. A second SIGINT aborts
    (once a call into tensorboard's writer has returned: utils.ctrl_c_held)."""

    def __init__(self, quiet: bool = False):
        self.signal: int | None = None
        self.quiet = quiet  # ranks other than 0 stop without saying so
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            if signum == signal.SIGINT:
                # In a plain run the loader workers die of this press too (the terminal signals the whole
                # group); torch's SIGCHLD check would then raise its own error, with a traceback, over the quiet
                # abort.
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                raise KeyboardInterrupt
            return  # a repeated SIGTERM (`timeout` signals the process and then its group) changes nothing
        self.signal = signum
        quiet_handover_errors()  # the loader workers may have got this signal too: their dying is expected now
        if not self.quiet:
            # Said from a thread: the handler can run inside the main thread's own write to the console (tee'd
            # to log.txt, runlog.py), where printing again is a reentrant call that raises; a thread waits for
            # that write to end.
            threading.Thread(target=print, args=(f"\n{signal.Signals(signum).name}: finishing this iteration, then "
                                                 "saving a checkpoint (press Ctrl-C again to abort without saving)",),
                             kwargs={"flush": True}, daemon=True).start()


class NonFiniteLoss(Exception):
    pass


def write_state(state: dict[str, Any], path: Path, dist: distributed.Dist) -> None:
    """Rank 0 writes a checkpoint, unless some process's state holds NaN or infinity: every process checks
    its own (they stop together), and only here, when a checkpoint is due, never per iteration."""
    bad = first_non_finite(state["trainer"])
    if dist.max_flag(int(bad is not None)):
        where = f"trainer.{bad}" if bad else "another process's state"
        raise NonFiniteState(f"not saving {path}: {where} holds NaN or infinity; the run has diverged")
    if dist.is_main:
        save_checkpoint(state, path)


class LossValues:
    """An iteration's loss terms as floats, averaged over the processes, computed once per iteration when a
    periodic step first asks (reading them waits for the GPU, so only logged iterations pay). Every process
    calls it at the same iterations, so all of them see the same values and stop together on a NaN."""

    def __init__(self, dist: distributed.Dist):
        self.dist, self.done, self.values = dist, -1, {}

    def __call__(self, done: int, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        if done != self.done:
            keys = list(losses)
            stacked = self.dist.mean(torch.stack([losses[k].float() for k in keys]))
            self.done, self.values = done, dict(zip(keys, stacked.tolist()))
        if not all(math.isfinite(v) for v in self.values.values()):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in self.values.items())
            raise NonFiniteLoss(f"non-finite loss at iteration {done}: {terms}")
        return self.values


class Logger:
    """Console line and tensorboard scalars every `log_iter` (rank 0); also where non-finite losses are caught."""

    def __init__(self, every: int, max_iter: int, writer: Any, trainer: Any, dist: distributed.Dist,
                 values: LossValues):
        self.every, self.max_iter, self.writer, self.trainer = every, max_iter, writer, trainer
        self.dist, self.values = dist, values
        self.window_start = time.perf_counter()
        self.window_iters, self.data_time = 0, 0.0

    def record(self, data_seconds: float) -> None:
        self.window_iters += 1
        self.data_time += data_seconds

    def __call__(self, done: int, losses: dict[str, torch.Tensor]) -> None:
        if done % self.every and done != self.max_iter:
            return
        values = self.values(done, losses)
        elapsed = time.perf_counter() - self.window_start  # after the .item() syncs above: GPU work is done
        speed = self.window_iters / max(elapsed, 1e-9)
        data_share = self.data_time / max(elapsed, 1e-9)
        self.window_start, self.window_iters, self.data_time = time.perf_counter(), 0, 0.0
        if not self.dist.is_main:
            return
        lrs = self.trainer.learning_rates()
        eta = (self.max_iter - done) / max(speed, 1e-9)
        terms = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        rates = " ".join(f"{k} {v:.2e}" for k, v in lrs.items())
        line = (f"[{done:>{len(str(self.max_iter))}d}/{self.max_iter}] {terms} | lr {rates} | {speed:.2f} it/s, "
                f"data {data_share:.0%}")
        device = self.dist.device
        if device.type == "cuda":
            line += f" | peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        print(line + f" | eta {format_seconds(eta)}", flush=True)
        for k, v in values.items():
            self.writer.add_scalar(f"loss/{k}", v, done)
        for k, v in lrs.items():
            self.writer.add_scalar(f"lr/{k}", v, done)
        self.writer.add_scalar("speed/iterations_per_s", speed, done)
        self.writer.add_scalar("speed/data_share", data_share, done)


class ImageGrids:
    """DG-Net's grids (the original trainer's `sample()`): rows x, reconstruction, cycle, swap; a2b and b2a;
    train and test."""

    def __init__(self, cfg: dict[str, Any], splits: Any, trainer: Any, image_dir: Path, writer: Any,
                 device: torch.device):
        self.trainer, self.image_dir, self.writer, self.device = trainer, image_dir, writer, device
        self.every = {"train": cfg["image_display_iter"], "test": cfg["image_save_iter"]}
        self.max_iter = cfg["max_iter"]
        n = cfg["display_size"]
        train = TrainSet(splits.train, splits.train_labels, image_size(cfg), cfg["pad"], 0.0, positives=False,
                         pad_mode=cfg["pad_mode"])
        self.inputs = {"train": self._pick(train, n, lambda i: train[(i, i)]["image"])}
        if len(splits.query) >= 2:
            query = TestSet(splits.query, image_size(cfg))
            self.inputs["test"] = self._pick(query, n, lambda i: query[i]["image"])

    @staticmethod
    def _pick(dataset: Any, n: int, load: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Two fixed sets of n images, spread over the split: the a and b rows of every grid."""
        n = min(n, len(dataset) // 2)
        spots = np.linspace(0, len(dataset) - 1, 2 * n).round().astype(int)
        images = torch.stack([load(int(i)) for i in spots])
        return images[0::2], images[1::2]

    def __call__(self, done: int, losses: dict[str, torch.Tensor]) -> None:
        written = False
        for split, (x_a, x_b) in self.inputs.items():
            if done % self.every[split] and done != self.max_iter:
                continue
            out = self.trainer.sample(x_a.to(self.device), x_b.to(self.device))
            for direction, rows in (("a2b", out[:4]), ("b2a", out[4:])):
                path = self.image_dir / f"gen_{direction}_{split}_{done:08d}.jpg"
                grid = write_grid(rows, path)
                self.writer.add_image(f"{split}/{direction}", grid, done, dataformats="HWC")
            written = True
        if written:
            write_image_index(self.image_dir, f"{self.image_dir.parent.name}: generated images")


class Snapshots:
    """A checkpoint every `snapshot_save_iter` and at the end (rank 0 writes); the newest `keep_last` stay
    (all of them with 0), and the final one always.

    Every process takes part: the checkpoint holds each one's RNG state.
    """

    def __init__(self, run_dir: Path, every: int, keep_last: int, max_iter: int, state_of: Any,
                 dist: distributed.Dist, values: LossValues):
        self.run_dir, self.every, self.keep_last, self.max_iter, self.state_of = (
            run_dir, every, keep_last, max_iter, state_of)
        self.dist, self.values = dist, values

    def save(self, done: int, losses: dict[str, torch.Tensor]) -> Path:
        self.values(done, losses)  # never write a checkpoint of a diverged model
        path = checkpoint_path(self.run_dir, done)
        write_state(self.state_of(done), path, self.dist)
        if self.dist.is_main and self.keep_last > 0:  # 0: every snapshot stays
            for it, old in list_checkpoints(self.run_dir)[:-self.keep_last]:
                if it != self.max_iter:
                    old.unlink()
        return path

    def __call__(self, done: int, losses: dict[str, torch.Tensor]) -> None:
        if done % self.every == 0 or done == self.max_iter:
            self.save(done, losses)


class Validation:
    """R1/mAP on the held-out training identities (`val_ids`) every `eval_iter`, by rank 0, with the test
    protocol; `checkpoints/best.pt` keeps the whole state at the best validation mAP so far. The test split
    is never used for selection. The run's last iteration is validated too, for the log, but is a candidate
    for best.pt only on the eval_iter schedule: a run ended there and continued later would otherwise choose
    among other points than the same run made in one go."""

    def __init__(self, cfg: dict[str, Any], splits: Any, model: torch.nn.Module, writer: Any,
                 dist: distributed.Dist, best_path: Path, state_of: Any, best: float | None):
        self.cfg, self.splits, self.model, self.writer, self.dist = cfg, splits, model, writer, dist
        self.every, self.max_iter = cfg["eval_iter"], cfg["max_iter"]
        self.best_path, self.state_of, self.best = best_path, state_of, best

    def __call__(self, done: int, losses: dict[str, torch.Tensor]) -> None:
        on_schedule = done % self.every == 0
        if not on_schedule and done != self.max_iter:
            return
        improved, diverged = False, None
        if self.dist.is_main:
            from test import evaluate_model  # the evaluation protocol of test.py, on the validation split

            try:
                r = evaluate_model(self.model, self.cfg, self.splits.val_query, self.splits.val_gallery,
                                   self.dist.device)
            except NonFiniteState as err:  # a diverged E_a: the run stops as on a NaN loss, every process
                diverged = NonFiniteState(f"validation at {done}: {err}")
            else:
                for key in ("R1", "R5", "mAP", "mINP"):
                    self.writer.add_scalar(f"val/{key}", r[key], done)
                improved = on_schedule and (self.best is None or r["mAP"] > self.best)
                if improved:
                    self.best = r["mAP"]
                note = f"; best so far, saved {self.best_path}" if improved else ""
                if not on_schedule:
                    note = f"; off the eval_iter schedule ({self.every}): not a candidate for best.pt"
                print(f"validation at {done}: R1 {100 * r['R1']:.2f} mAP {100 * r['mAP']:.2f} mINP "
                      f"{100 * r['mINP']:.2f} ({r['num_valid_queries']} queries, {self.cfg['val_ids']} held-out "
                      f"identities){note}", flush=True)
        # one agreement for both: 2 stops every process (rank 0 alone evaluated), 1 makes each take part in the
        # checkpoint (its RNG state)
        verdict = self.dist.max_flag(2 if diverged else int(improved))
        if verdict == 2:
            raise diverged or NonFiniteState(f"validation at {done}: the model of process 0 has diverged")
        if verdict:
            write_state(self.state_of(done), self.best_path, self.dist)


class SwapFidelity:
    """On the synthetic dataset: SSIM and L1 of swaps against the true swap every `fidelity_iter`, beside
    the two trivial answers, and the identity judge's verdicts (quality.swap_fidelity), to tensorboard and
    the console (rank 0)."""

    def __init__(self, cfg: dict[str, Any], splits: Any, trainer: Any, writer: Any):
        self.cfg, self.splits, self.trainer, self.writer = cfg, splits, trainer, writer
        self.every, self.max_iter = cfg["fidelity_iter"], cfg["max_iter"]

    def __call__(self, done: int, losses: dict[str, torch.Tensor]) -> None:
        if done % self.every and done != self.max_iter:
            return
        import quality

        r = quality.swap_fidelity(self.trainer.gen_a, self.trainer.id_a, self.cfg, self.splits)
        for tag, value in quality.scalars({"swap_fidelity": r}).items():
            self.writer.add_scalar(tag, value, done)
        s, b, a = r["swap"], r["structure_image"], r["appearance_image"]
        coarsest = quality.BLUR_FACTORS[-1]
        blur, flat = r[quality.blurred_key(coarsest)], r["flat_mean_colour"]
        print(f"swap fidelity at {done}: person L1 {s['person_l1']:.4f} (structure image {b['person_l1']:.4f}, "
              f"appearance image {a['person_l1']:.4f}, true swap at 1/{coarsest} {blur['person_l1']:.4f}, "
              f"flat mean colour {flat['person_l1']:.4f}), whole-image SSIM {s['ssim']:.4f} ({b['ssim']:.4f}, "
              f"{a['ssim']:.4f}, {blur['ssim']:.4f}, {flat['ssim']:.4f})", flush=True)
        j = r["identity_judge"]
        print(f"identity judge at {done}: judged A (top-1 / top-5) {j['swap']['top1']:.3f} / {j['swap']['top5']:.3f}, "
              f"judged B {j['swap']['as_structure']:.3f}; chroma alone {j['swap']['chroma_top1']:.3f} / "
              f"{j['swap']['chroma_top5']:.3f}, B {j['swap']['chroma_as_structure']:.3f}; B's own reconstruction "
              f"judged B {j['reconstruction']['as_structure']:.3f}, chroma "
              f"{j['reconstruction']['chroma_as_structure']:.3f} (chance {j['chance']:.3f}; "
              f"structure image judged A {j['structure_image']['top1']:.3f}, appearance image "
              f"{j['appearance_image']['top1']:.3f}, flat {j['flat_mean_colour']['top1']:.3f})", flush=True)


class NullWriter:
    """What ranks other than 0 log to: nothing."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_image(self, *args: Any, **kwargs: Any) -> None:
        pass

    def end_iteration(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# training


def located_weights(path: str | None, output_path: str) -> str | None:
    """`teacher:` or `pretrained:` as given where it exists from the current folder; else, a relative one under
    --output_path, where train.py wrote the teacher's run when it was given the same --output_path (so the
    README's teacher and DG-Net commands pair up with any --output_path)."""
    if not path or Path(path).expanduser().is_absolute() or Path(path).exists():
        return path
    under = Path(output_path) / path
    return str(under) if under.exists() else path


def pinned_weights(path: str) -> str:
    """The file a weights path stands for, absolute: a run folder's newest checkpoint, the original
    baseline's folder's net_last.pth, a file itself. So config.yaml names the weights the run started from,
    and a resume loads the same ones whatever the teacher's run did since; a path that holds none of these
    is returned as it is (loading it says what is wrong)."""
    p = Path(path).expanduser()
    if p.is_dir():
        checkpoint = latest_checkpoint(p) if (p / "config.yaml").is_file() else None
        p = checkpoint or (p / "net_last.pth" if (p / "net_last.pth").is_file() else None)
        if p is None:
            return path
    return str(p.absolute()) if p.is_file() else path


def pin_weights(cfg: dict[str, Any], kind: str, output_path: str, saved: dict[str, Any] | None, say: bool,
                recorded: bool = True) -> None:
    """`teacher:` (DG-Net, when it runs) and `pretrained:` as the exact files (pinned_weights), found under
    --output_path when relative (located_weights); `say`: print what a folder stood for (and, `recorded`,
    that config.yaml will name the file: not in a dry run).

    A resume (`saved`: the checkpoint's config) keeps the files it started from when the config names them or
    the run folders holding them, so a resume command that repeats the first one's --opts keeps the weights;
    another teacher is a change, recorded (another `pretrained` is refused: those weights are in the
    checkpoint, and a resume does not read them)."""
    from trainer import DGNet_Trainer

    keys = ["teacher"] if kind == "DGNet" and DGNet_Trainer.needs_teacher(cfg) else []
    if str(cfg["pretrained"]).lower() not in ("imagenet", "none", ""):
        keys.append("pretrained")
    for key in keys:
        given = located_weights(cfg[key], output_path)
        kept = saved.get(key) if saved else None
        if kept and Path(str(kept)).expanduser().resolve().is_relative_to(Path(given).expanduser().resolve()):
            given = kept
        elif saved and key == "pretrained":
            continue
        if saved and key == "teacher" and not Path(given).expanduser().exists():
            raise UserError(f"--resume: the teacher {given} is gone: put it back, or give the teacher checkpoint "
                            "to continue with, --opts teacher=FILE (recorded in config_changes.log)")
        cfg[key] = given if saved and key == "pretrained" else pinned_weights(given)
        if say and Path(given).expanduser().is_dir() and cfg[key] != given:
            record = "; recorded in the run's config.yaml" if recorded else ""
            print(f"{key}: {cfg[key]} (the weights in {given} now{record})", flush=True)
        if say and key == "teacher" and (not saved or cfg[key] != saved.get(key)):  # fresh, or another teacher
            line, warning = teacher_report(cfg[key])
            if line:
                print(line, flush=True)
            if warning:
                print(f"warning: {warning}", file=sys.stderr, flush=True)


def build_trainer(kind: str, cfg: dict[str, Any], num_classes: int, device: torch.device) -> Any:
    from trainer import BaselineTrainer, DGNet_Trainer  # imported here so --help stays fast

    if kind == "baseline":
        return BaselineTrainer(cfg, num_classes, device)
    return DGNet_Trainer(cfg, num_classes, device)


def build_loaders(kind: str, cfg: dict[str, Any], splits: Any, dist: distributed.Dist) -> dict[str, Any]:
    on_gpus = dist.device.type == "cuda"
    share = {"rank": dist.rank, "world_size": dist.world_size, "pin_memory": on_gpus, "gpus": on_gpus}
    if kind == "baseline":
        return {"batch": build_teacher_loader(cfg, splits, identity_sampler=cfg["triplet_w"] > 0, **share)}
    a, b = build_dgnet_loaders(cfg, splits, **share)
    return {"a": a, "b": b}


def parameter_fingerprints(trainer: Any) -> dict[str, str]:
    """A hash of each part's parameters: equal on every process of a healthy DDP run."""
    out = {}
    for name, part in trainer.parts.items():
        h = hashlib.sha1()
        for p in part.module.parameters():
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def resume_rng(state: dict[str, Any], dist: distributed.Dist) -> None:
    """Each process continues its own random stream; with another process count, rank 0's."""
    per_rank = state.get("rng_ranks")
    if per_rank is not None and len(per_rank) == dist.world_size:
        set_rng_state(per_rank[dist.rank])
        return
    set_rng_state(state["rng"])
    saved = len(per_rank) if per_rank is not None else 1
    if saved != dist.world_size and dist.is_main:
        print(f"note: the checkpoint was written by {saved} process(es), this run has {dist.world_size}: the data "
              "order continues exactly, dropout and the other random draws do not", flush=True)


KINDS = {"DGNet": "DG-Net", "baseline": "teacher (--trainer baseline)"}


def check_resume(args: argparse.Namespace, state: dict[str, Any], cfg: dict[str, Any],
                 run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """A resume continues the run's own kind, forward, with only the --opts changes it can apply."""
    kind = state["kind"]
    if args.trainer is not None and args.trainer != kind:
        raise UserError(f"--resume: {run_dir} is a {KINDS[kind]} run and cannot continue as "
                        f"{KINDS[args.trainer]}; drop --trainer, or start the new run with another --name")
    if cfg["max_iter"] < state["iteration"]:
        raise UserError(f"--resume: the checkpoint is at iteration {state['iteration']}, past max_iter "
                        f"{cfg['max_iter']}; continue with --opts max_iter=N, N larger than {state['iteration']}")
    changes = config_changes(saved_config(state["config"]), cfg)
    check_resume_changes(changes)
    return changes


def check_networks_take(cfg: dict[str, Any], kind: str) -> None:
    """DG-Net's G and D take only some image sizes (networks.check_image_size); the teacher takes any."""
    if kind != "DGNet":
        return
    from networks import check_image_size

    try:
        check_image_size(cfg)
    except ValueError as err:
        raise UserError(str(err)) from None


def setup(args: argparse.Namespace, dist: distributed.Dist, lock: RunLock | None) -> tuple[Any, ...]:
    """Everything that can fail on bad input, before any file is written or any network is shared.

    The config is read and checked first; only then does rank 0 create and lock the run folder (`lock`),
    and what is already in the folder (a run, its checkpoints) is looked at under the lock.
    """
    name = args.name if args.name is not None else Path(args.config or DEFAULT_CONFIG).stem
    run_dir = run_folder(args.output_path, name)
    own_config = run_dir / "config.yaml"
    state: dict[str, Any] | None = None
    if args.resume and not own_config.is_file():
        if latest_checkpoint(run_dir) is None:
            raise UserError(f"--resume: no run in {run_dir} (no config.yaml, no checkpoint); check --name and "
                            "--output_path")
        # config.yaml lost (deleted, or a copied checkpoints/ folder): every checkpoint carries the config it
        # ran with, and config.yaml is written again from it when the run starts.
        resume_from = find_checkpoint(run_dir, args.which_iter)
        state = check_run_checkpoint(load_checkpoint(resume_from), resume_from)
        cfg = saved_config(state["config"], args.opts)
        if dist.is_main:
            print(f"note: {own_config} is missing; the run continues with the config saved in {resume_from}",
                  file=sys.stderr, flush=True)
    else:
        if args.resume and args.config and dist.is_main:
            note = resume_config_note(args.config, run_dir, args.opts)
            if note:
                print(note, file=sys.stderr, flush=True)
        cfg = load_config(own_config if args.resume else args.config or DEFAULT_CONFIG, args.opts)
    if cfg["sync_bn"] and dist.world_size > 1 and dist.device.type != "cuda":
        raise UserError("sync_bn: true needs GPUs (SyncBatchNorm runs on CUDA); set sync_bn: false for a CPU run")
    if not args.resume:  # a resume learns its kind from the checkpoint, below
        check_networks_take(cfg, args.trainer or "DGNet")
    if dist.is_main:
        check_writable(run_dir, "the run folder")
    if lock is not None:
        lock.acquire(run_dir)
    changes: dict[str, tuple[Any, Any]] = {}
    if args.resume and state is None:
        resume_from = find_checkpoint(run_dir, args.which_iter)
        state = check_run_checkpoint(load_checkpoint(resume_from), resume_from)
    elif not args.resume and latest_checkpoint(run_dir) is not None:
        raise UserError(f"{run_dir} already holds a run; continue it with --resume, or pick another --name")
    kind = state["kind"] if state else (args.trainer or "DGNet")
    pin_weights(cfg, kind, args.output_path, saved_config(state["config"]) if state else None, dist.is_main,
                recorded=args.dry_run is None)
    if state:
        changes = check_resume(args, state, cfg, run_dir)
        check_networks_take(cfg, kind)
    from capture import resolve_cuda_graph  # imported here so --help stays fast

    resolve_cuda_graph(cfg, dist.device, dist.world_size)  # a bad cuda_graph stops here, before any file

    # Each process its own random stream (dropout, the re-encoding coin); the models start from rank 0's
    # weights, which DDP broadcasts.
    seed_everything(cfg["seed"] + dist.rank)
    splits = load_splits(cfg, say=dist.is_main)
    loaders = build_loaders(kind, cfg, splits, dist)
    # A resume's weights come from its checkpoint: the pretrained ones are neither needed nor read
    trainer = build_trainer(kind, {**cfg, "pretrained": "none"} if state else cfg, splits.num_classes, dist.device)
    if state:
        from_config = trainer.optimizer_settings()
        trainer.load_state_dict(state["trainer"])
        applied = trainer.apply_optimizer_settings(from_config)  # --opts lr_g=... takes effect on resume
        if applied and dist.is_main:
            print(f"applied to the restored optimizers: {'; '.join(applied)}", flush=True)
        for key, loader in loaders.items():
            loader.load_state_dict(state["loaders"][key])
    return name, run_dir, cfg, splits, state, kind, trainer, loaders, changes


def resume_command(args: argparse.Namespace, name: str) -> str:
    """The command that continues this run, with its processes and machines as it was started."""
    command = f"python train.py --resume --name {name}"
    for option in ("output_path", "gpu_ids", "nproc_per_machine", "num_machines", "machine_rank", "dist_url"):
        value = getattr(args, option, None)
        default = {"output_path": ".", "num_machines": 1}.get(option)
        if value is not None and value != default and not (option == "machine_rank" and args.num_machines == 1):
            command += f" --{option} {value}"
    if args.num_machines > 1:
        command += " (on every machine, each with its own --machine_rank)"
    return command


def run_fingerprint(name: str, cfg: dict[str, Any], splits: Any, state: dict[str, Any] | None,
                    kind: str) -> dict[str, Any]:
    """What every process of a run must share: its kind, name, starting iteration and settings. Paths that
    name the same files through each machine's own mount (data_root, extra_train's) and the loader workers
    are left out; the
    teacher and pretrained weights count by file name (each process pinned them itself: a teacher run that
    saved a checkpoint meanwhile would give them different weights)."""
    own = ("data_root", "extra_train", "teacher", "pretrained", "num_workers")  # num_workers: each machine's cores
    settings = {k: v for k, v in flatten(cfg).items() if k not in own}
    return {"kind": kind, "run": name, "start": state["iteration"] if state else 0,
            "training images": len(splits.train), **settings,
            **{k: Path(str(cfg[k])).name for k in ("teacher", "pretrained")}}


def fingerprint_mismatch(fingerprints: list[dict[str, Any]]) -> str | None:
    """One line naming what the first process that differs from process 0 has otherwise; None if all agree."""
    for rank, theirs in enumerate(fingerprints[1:], 1):
        differ = [k for k in dict.fromkeys([*fingerprints[0], *theirs]) if fingerprints[0].get(k) != theirs.get(k)]
        if differ and set(differ) <= {"teacher", "pretrained"}:
            return (f"process {rank} loaded other weights than process 0 ({', '.join(differ)}: "
                    f"{[theirs[k] for k in differ]} against {[fingerprints[0][k] for k in differ]}): the teacher's "
                    "run saved a checkpoint while this run started; start it again")
        if differ:
            shown = ", ".join(f"{k} {theirs.get(k)!r} (process 0: {fingerprints[0].get(k)!r})" for k in differ[:3])
            return (f"process {rank} runs other settings than process 0: {shown}; every machine must run the same "
                    "command and config, but for --machine_rank")
    return None


def supersede_newer(run_dir: Path, start: int) -> None:
    """Resuming from an older checkpoint: the newer ones belong to the abandoned continuation. They move to
    checkpoints/superseded_<date>/ (nothing is deleted), so the newest checkpoint is this run's again; so does
    best.pt when it was chosen after `start` (the next validation that beats the best mAP up to `start` writes
    it again)."""
    newer = [p for it, p in list_checkpoints(run_dir) if it > start]
    best = run_dir / "checkpoints" / BEST_NAME
    if best.is_file() and int((peek_checkpoint(best) or {}).get("iteration", 0)) > start:
        newer.append(best)
    if not newer:
        return
    folder = run_dir / "checkpoints" / f"superseded_{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(exist_ok=True)
    for path in newer:
        path.rename(folder / path.name)
    print(f"moved {len(newer)} newer checkpoint(s) ({', '.join(p.name for p in newer)}) to {folder}: the run "
          f"continues from iteration {start}", flush=True)


def describe_changes(changes: dict[str, tuple[Any, Any]], start: int) -> str | None:
    if not changes:
        return None
    return (f"resumed at iteration {start} with " +
            ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))


def train(args: argparse.Namespace, dist: distributed.Dist) -> int:
    """One process's training: the whole run in a plain run, its share under DDP. Rank 0 holds the run
    folder's lock from setup to the end, whatever the exit."""
    lock = RunLock() if dist.is_main and args.dry_run is None else None  # a dry run writes nothing, locks nothing
    try:
        with contextlib.ExitStack() as record:  # the run's log.txt, once its folder is written
            return train_locked(args, dist, lock, record)
    finally:
        if lock is not None:
            lock.release()


def train_locked(args: argparse.Namespace, dist: distributed.Dist, lock: RunLock | None,
                 record: contextlib.ExitStack) -> int:
    try:
        setup_error, prepared = None, setup(args, dist, lock)
    except UserError as err:
        setup_error, prepared = err, None
    # Ranks agree before the first collective of the model: a bad input stops every one of them, and so do
    # settings that differ between machines (each ran its own command line), which would train wrongly or hang.
    reports = dist.gather((None if setup_error is None else one_line(setup_error),
                           None if prepared is None else run_fingerprint(prepared[0], *prepared[2:6])))
    first = next((f if rank == 0 else f"process {rank}: {f}" for rank, (f, _) in enumerate(reports) if f), None)
    if first is None:
        first = fingerprint_mismatch([f for _, f in reports])
    if first is not None:
        raise distributed.SharedError(first)
    name, run_dir, cfg, splits, state, kind, trainer, loaders, changes = prepared
    start = state["iteration"] if state else 0
    if start >= cfg["max_iter"]:
        if dist.is_main:
            print(f"{run_dir} is complete (iteration {start}, max_iter {cfg['max_iter']}): nothing to train; "
                  f"continue it with --opts max_iter=N, N larger than {start}", flush=True)
        return 0
    if not dist.is_main and dist.local_rank == 0:  # another machine: say it runs, and where to look
        print(f"joined {run_dir.name} as process {dist.rank} of {dist.world_size}, from iteration {start}; "
              "machine 0 prints the progress and writes the run folder", flush=True)
    from capture import training_step

    train_step = training_step(trainer, cfg, dist)  # DDP, or the replay of CUDA graphs
    if hasattr(train_step, "release"):  # CUDA graphs go before the process group, whatever ends the run
        record.callback(train_step.release)

    dry = args.dry_run
    # Everything that can fail on bad input has run: only now is the run folder written, by rank 0.
    if dist.is_main and not dry:
        run_dir.mkdir(parents=True, exist_ok=True)
        record.enter_context(runlog.console_log(run_dir / runlog.LOG_FILE))
        if state:
            supersede_newer(run_dir, start)
        prepare_run_folder(run_dir, cfg, describe_changes(changes, start))
        if changes:
            print(f"{describe_changes(changes, start)} (recorded in {run_dir / 'config.yaml'} and {CHANGES_FILE})",
                  flush=True)
        from tensorboardX import SummaryWriter

        runlog.record_start(run_dir / runlog.ENV_FILE, start, dist.device, dist.world_size)
        # Both records keep what was logged up to `start` (the checkpoint's own iteration included) and drop the
        # rest: a newer, abandoned continuation, or an earlier attempt that stopped before its first snapshot.
        # The process id in the name: tensorboardX names event files by the second and opens them for writing,
        # so a resume within a second of a short attempt's start would otherwise empty that attempt's file
        events = SummaryWriter(str(run_dir / "logs"), purge_step=start + 1, filename_suffix=f".{os.getpid()}")
        writer: Any = runlog.ScalarRecord(events, run_dir / runlog.METRICS_FILE, start)
    else:
        writer = NullWriter()
        if dist.is_main and changes:
            print(f"dry run: {describe_changes(changes, start)} (not recorded)", flush=True)

    validation: Validation | None = None

    def state_of(done: int) -> dict[str, Any]:
        rngs = dist.gather(rng_state())
        out = {"kind": kind, "iteration": done, "trainer": trainer.state_dict(), "config": cfg,
               "loaders": {k: v.state_dict() for k, v in loaders.items()}, "rng": rngs[0]}
        if dist.world_size > 1:
            out["rng_ranks"] = rngs
        if validation is not None and validation.best is not None:
            out["best_val_mAP"] = validation.best
        return out

    max_iter = cfg["max_iter"]
    values = LossValues(dist)
    logger = Logger(1 if dry else cfg["log_iter"], max_iter, writer, trainer, dist, values)
    snapshots = Snapshots(run_dir, cfg["snapshot_save_iter"], cfg["keep_last"], max_iter, state_of, dist, values)
    periodic: list[Any] = [logger]
    if not dry:  # a dry run: only the iterations and their console lines (no grids, validation, checkpoints)
        if kind == "DGNet" and dist.is_main:
            periodic.append(ImageGrids(cfg, splits, trainer, run_dir / "images", writer, dist.device))
        if kind == "DGNet" and dist.is_main and cfg["fidelity_iter"] > 0 and cfg["dataset"] == "synthetic":
            periodic.append(SwapFidelity(cfg, splits, trainer, writer))
        if cfg["val_ids"] > 0:
            model = trainer.id_a if kind == "DGNet" else trainer.parts["teacher"].module
            validation = Validation(cfg, splits, model, writer, dist, run_dir / "checkpoints" / BEST_NAME, state_of,
                                    state.get("best_val_mAP") if state else None)
            periodic.append(validation)
        periodic.append(snapshots)  # last: the RNG state it saves is the one the next iteration starts from

    if state:
        resume_rng(state, dist)  # after every model was built: their init drew from the same RNGs
        if dist.is_main:
            print(f"resumed {run_dir} at iteration {start}", flush=True)
    if dist.is_main:
        where = f"{dist.world_size} processes ({dist.device.type})" if dist.world_size > 1 else str(dist.device)
        captured = "; iterations replayed from CUDA graphs" if cfg["cuda_graph"] == "always" else ""
        folder = f"nothing is written to {run_dir}" if dry else f"run folder {run_dir}"
        print(f"{'dry run: ' if dry else ''}{kind} on {splits.title} ({splits.num_classes} identities, "
              f"{len(splits.train)} images) on {where}; {folder}{captured}", flush=True)
    resume_hint = "the same command" if dry else resume_command(args, name)  # in the errors' lines
    iterations = dry_run_iterations(cfg, kind, start, dry) if dry else range(start, max_iter)
    seconds: list[float] = []  # a dry run's time per iteration
    trainer.train()
    losses: dict[str, torch.Tensor] = {}
    with StopRequest(quiet=not dist.is_main) as stop:
        try:
            for it in iterations:
                tick = time.perf_counter()
                try:
                    batches = [next(loader) for loader in loaders.values()]
                except UserError:  # an unreadable image, a dead worker
                    if not dry:
                        rescue(snapshots, loaders, it, losses, dist, resume_hint)
                    raise
                logger.record(time.perf_counter() - tick)
                dist.sync_buffers()
                losses = train_step(it, *batches)
                done = it + 1
                for step in periodic:
                    step(done, losses)
                writer.end_iteration()  # the iteration's line of metrics.jsonl, written whole
                if dry:  # after the logger's reads (every iteration in a dry run): the device's work is done
                    seconds.append(time.perf_counter() - tick)
                # every process stops at the same iteration, whichever of them got the signal
                local = stop.signal or (signal.SIGTERM if dist.launcher_gone() else 0)
                stop_signal = dist.max_flag(local) if dist.world_size > 1 else local
                if stop_signal and dry:
                    if dist.is_main:
                        print(f"dry run stopped at iteration {done}; nothing was written", flush=True)
                    return 128 + stop_signal
                if stop_signal:
                    if done % snapshots.every and done != max_iter:
                        snapshots.save(done, losses)
                    if dist.is_main:
                        print(f"stopped at iteration {done}; resume with: {resume_hint}", flush=True)
                    return 128 + stop_signal
        except (NonFiniteLoss, NonFiniteState) as err:
            if dist.is_main:
                print(f"error: {err}; stopping ({last_good(run_dir)})", file=sys.stderr, flush=True)
            return 3
        except BaseException as err:
            if interrupted(err):  # a second Ctrl-C, also when it broke a save or a loader on its way
                if dist.is_main:
                    print(f"aborted without saving ({last_good(run_dir)})", file=sys.stderr, flush=True)
                return 128 + signal.SIGINT
            if isinstance(err, (RuntimeError, OSError)):
                raise as_user_error(err, resume_hint, several=dist.world_size > 1) from None
            raise
        finally:
            close_loaders(loaders.values())  # first: afterwards a worker's death can no longer raise here
            with contextlib.suppress(KeyboardInterrupt):  # the run is ending: one more Ctrl-C changes nothing
                writer.close()
    if dist.world_size > 1:
        prints = dist.gather(parameter_fingerprints(trainer))
        if any(p != prints[0] for p in prints):
            raise RuntimeError("the processes ended with different parameters: a DDP synchronization bug")
        if dist.is_main:
            print(f"parameters identical on all {dist.world_size} processes", flush=True)
    if dry:
        if dist.is_main:
            for line in dry_run_report(cfg, run_dir, iterations, seconds, trainer, dist.device):
                print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)
        return 0
    if dist.is_main:
        print(f"finished {max_iter} iteration{'s' if max_iter != 1 else ''}; checkpoint "
              f"{checkpoint_path(run_dir, max_iter)}", flush=True)
    return 0


def last_good(run_dir: Path) -> str:
    """Which checkpoint a stopped run can resume from (none holds NaN: write_state refuses those)."""
    last = latest_checkpoint(run_dir)
    return f"the last good checkpoint is {last}" if last else "no checkpoint was written"


def rescue(snapshots: Snapshots, loaders: dict[str, Any], done: int, losses: dict[str, torch.Tensor],
           dist: distributed.Dist, resume_hint: str) -> None:
    """A loader failed before iteration done+1 began: the models and random streams are exactly the state
    after `done` iterations, so save it, with the loaders rewound there. One process only (under DDP the
    others are elsewhere in their iteration); nothing when a snapshot of `done` exists or none ran yet."""
    if dist.world_size > 1 or not losses or checkpoint_path(snapshots.run_dir, done).is_file():
        return
    close_loaders(loaders.values())  # a dead worker's late SIGCHLD check must not stop the save
    for loader in loaders.values():
        loader.load_state_dict({"batches_taken": done})
    try:
        path = snapshots.save(done, losses)
    except (NonFiniteLoss, UserError):  # a diverged state or a full disk: the error that stops the run is enough
        return
    print(f"saved {path} before stopping; once the cause is fixed, resume with: {resume_hint}", flush=True)


def as_user_error(err: RuntimeError | OSError, resume_hint: str, several: bool = False) -> BaseException:
    """One line for what a long run meets: a killed loader worker (torch's SIGCHLD check raises it wherever
    the loop is), a failed write (a full disk, a lost mount) of images, logs or the config, and (`several`
    processes) another process gone. Anything else stays itself, with its traceback: a bug."""
    died = worker_death(err)
    if died is not None:
        return UserError(died)
    if several and peer_lost(err):
        return UserError(f"the connection to another process of the run was lost ({first_line(err)}): a machine or "
                         f"process died or its network failed; once every machine is back, resume with: {resume_hint}")
    if isinstance(err, torch.cuda.OutOfMemoryError):  # the original's users met it often (its issues #3, #71)
        return UserError(f"the GPU ran out of memory ({first_line(err, 120)}): free it of other processes and "
                         f"resume ({resume_hint}), or start again with a smaller batch_size or more GPUs (--dry_run "
                         "measures a setting's memory in a minute)")
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        return UserError(f"{err.strerror or err}{where}; free space or fix the folder, then resume with: "
                         f"{resume_hint}")
    return err


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Socket Timeout", "Connection refused")


def peer_lost(err: BaseException) -> bool:
    """A collective that failed because another process of the run is gone (gloo's and the store's words for
    it); an NCCL backend error, which can be a bug, is not."""
    return (isinstance(err, (torch.distributed.DistNetworkError, torch.distributed.DistStoreError))
            or any(p in str(err) for p in PEER_LOST))


def evaluate_run(args: argparse.Namespace) -> int:
    """`--resume --evaluate`: test.py on the run's newest checkpoint, without training (open-reid's habit)."""
    if not args.resume:
        raise UserError("--evaluate evaluates an existing run: use it with --resume (and --name)")
    import test

    name = args.name if args.name is not None else Path(args.config or DEFAULT_CONFIG).stem
    overrides = ["--opts", *args.opts] if args.opts else []
    return test.main(["--name", name, "--output_path", args.output_path, "--which_iter", args.which_iter,
                      *overrides])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(config_help())
        return 0
    try:
        if args.evaluate:
            return evaluate_run(args)
        return distributed.run(args, "train:train")
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
