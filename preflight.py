"""What train.py says before a long run: the teacher it starts from (its length and its figures) and, with
--dry_run, which iterations to try and what they say of the whole run (its time, GPU memory and disk space).
"""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from utils import BEST_NAME, format_seconds, latest_checkpoint, named_tensors, peek_checkpoint


def teacher_report(path: str) -> tuple[str | None, str | None]:
    """What a DG-Net run should know of the teacher checkpoint it pinned (at its start, or when a resume changes
    the teacher): a console line (its iteration of its run's max_iter, and the test.py figures written for it)
    and a warning when its run stopped short. The original release's issues (#26, #60) trace poor DG-Net
    results to the teacher, whose primary features E_a learns, so this is said before hours go into a run.
    (None, None) for what is not a teacher checkpoint of train.py: the original baseline's files carry no such
    record, and a bad file is load_teacher's to name."""
    p = Path(path)
    state = peek_checkpoint(p)  # mapped, not read: the teacher is loaded properly later
    try:
        kind, iteration, max_iter = state["kind"], int(state["iteration"]), int(state["config"]["max_iter"])
    except (TypeError, KeyError, ValueError):  # not a checkpoint of train.py, or unreadable
        return None, None
    if kind != "baseline":
        return None, None
    run_dir = p.parent.parent
    line = f"teacher: iteration {iteration:,} of its run's {max_iter:,}"
    finish = "finish its run first"
    if p.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():  # in a run folder
        output_path = run_dir.parent.parent  # run_folder's <output_path>/outputs/<name>
        options = "" if output_path.resolve() == Path.cwd().resolve() else f" --output_path {output_path}"
        which = ("" if p == latest_checkpoint(run_dir) else
                 " --which_iter best" if p.name == BEST_NAME else f" --which_iter {iteration}")
        results = run_dir / "results" / f"{iteration:08d}.json"
        try:
            scores = json.loads(results.read_text())
            line += f"; test.py on it: R1 {100 * scores['R1']:.2f} %, mAP {100 * scores['mAP']:.2f} % ({results})"
        except (OSError, ValueError, KeyError, TypeError):  # not evaluated, or not on its own data's defaults
            line += f"; not evaluated yet (python test.py --name {run_dir.name}{options}{which})"
        finish = f"finish it first (python train.py --resume --name {run_dir.name}{options})"
    warning = None
    if iteration < max_iter:
        warning = (f"the teacher's run stopped at iteration {iteration:,} of {max_iter:,}; E_a learns its primary "
                   f"features from it, and a teacher trained short holds DG-Net back: {finish}, or go on knowing it")
    return line, warning


def dry_run_iterations(cfg: dict[str, Any], kind: str, start: int, n: int) -> list[int]:
    """--dry_run N's iterations: the first half from the run's own start, the rest from where every loss term
    runs at full weight (trainer.full_weight_iteration), when the run has not reached it yet. DG-Net's warm-ups
    leave terms and their network calls off for the first 30,000 iterations, so the start alone would hide the
    memory and time of most of the run. Within max_iter."""
    from trainer import full_weight_iteration

    max_iter = cfg["max_iter"]
    straight = list(range(start, min(start + n, max_iter)))
    head = straight[:(n + 1) // 2]
    late = min(full_weight_iteration(cfg), max_iter - (n - len(head))) if kind == "DGNet" else start
    if late <= start + len(head):  # already there, or no room for a second phase
        return straight
    return head + list(range(late, late + n - len(head)))


def tensor_bytes(tree: Any) -> int:
    """The bytes of every tensor in a nested state (dicts, lists, tuples): about a checkpoint's size."""
    return sum(t.numel() * t.element_size() for _, t in named_tensors(tree))


def dry_run_report(cfg: dict[str, Any], run_dir: Path, iterations: list[int], seconds: list[float], trainer: Any,
                   device: torch.device) -> list[str]:
    """--dry_run's summary: the time of the whole run at the pace measured in each phase (a phase's first
    iteration, which builds, autotunes or captures, left out where there are more), the peak GPU memory, and
    the disk space its checkpoints take against what is free. Lines; a `warning:` line for what will not fit."""
    max_iter, start = cfg["max_iter"], iterations[0]
    phases: list[list[int]] = []  # positions in `iterations` of each run of consecutive iterations
    for i, it in enumerate(iterations):
        if i and it == iterations[i - 1] + 1:
            phases[-1].append(i)
        else:
            phases.append([i])
    paces = [statistics.median([seconds[i] for i in phase[1:] or phase]) for phase in phases]
    shown = " and ".join(f"{iterations[p[0]] + 1:,}" + (f"-{iterations[p[-1]] + 1:,}" if len(p) > 1 else "")
                         for p in phases)
    if len(phases) > 1:
        late = iterations[phases[1][0]]
        eta = paces[0] * (late - start) + paces[1] * (max_iter - late)
        pace = (f"{paces[0]:.3g} s each at the start, {paces[1]:.3g} s with every loss term at full weight (from "
                f"iteration {late + 1:,})")
    else:
        eta, pace = paces[0] * (max_iter - start), f"{paces[0]:.3g} s each"
    whole = "the whole run" if start == 0 else "the rest of the run"
    lines = [f"dry run: iterations {shown} of {max_iter:,} ran, {pace}: {whole} would take about "
             f"{format_seconds(eta)} (h:mm:ss) before grids, validation and snapshots"]
    warnings_ = []
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        reserved = torch.cuda.max_memory_reserved(device)
        lines.append(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated, "
                     f"{reserved / 2**30:.1f} GiB reserved, of the GPU's {total / 2**30:.1f} GiB")
        if reserved > 0.95 * total:
            warnings_.append("the run fills nearly all of the GPU's memory: another process on the GPU would stop "
                             "it; a smaller batch_size leaves room")
    size = tensor_bytes(trainer.state_dict())
    keep, every = cfg["keep_last"], cfg["snapshot_save_iter"]
    kept = (max_iter // every + 1 if keep == 0 else keep + 1) + (2 if cfg["val_ids"] > 0 else 0)  # + the one saving
    where = next(p for p in (run_dir, *run_dir.parents, Path(".")) if p.exists())
    free = shutil.disk_usage(where).free
    lines.append(f"checkpoints: about {size / 2**20:,.0f} MiB each, up to {kept} at once (keep_last {keep}"
                 f"{', best.pt' if cfg['val_ids'] > 0 else ''}, one being written): {kept * size / 2**30:.1f} GiB; "
                 f"{free / 2**30:.1f} GiB free at {where}")
    if kept * size > free:
        warnings_.append(f"the checkpoints will not fit in the {free / 2**30:.1f} GiB free at {where}: free space, "
                         "lower keep_last, or choose another --output_path")
    return lines + [f"warning: {w}" for w in warnings_] + [
        "nothing was written; the same command without --dry_run runs it"]
