"""Training speed of DG-Net and its teacher: the fast path against the original's costs, the loaders, numerics.

    python bench/train_bench.py                                   # DG-Net and teacher, reference and fast
    python bench/train_bench.py --mode fast --amp fp16 --compile  # one variant
    python bench/train_bench.py --bench loaders                   # loaders' delivery vs training's consumption
    python bench/train_bench.py --bench numerics --iters 300      # fast vs reference loss curves, same seed
    python bench/train_bench.py --model dgnet --mode fast,captured  # eager vs CUDA-graph replayed iterations
    python bench/train_bench.py --model teacher --mode reference,fast,captured  # the teacher, the same three
    python bench/train_bench.py --bench numerics --mode captured  # captured vs reference loss curves
    python bench/train_bench.py --bench profile --iters 10        # torch.profiler: phases and top kernels
    python bench/train_bench.py --bench ops --device cpu          # operators and network calls per iteration
    python bench/train_bench.py --bench syncs --device cpu        # host-device syncs per iteration, by source line
    python bench/train_bench.py --bench data                      # only generate the synthetic data
    python bench/train_bench.py --config configs/quickstart/dgnet.yaml --teacher_config ...  # quickstart sizes
    python bench/train_bench.py --tiny --device cpu               # the CPU/CI size

Default size: configs/latest.yaml (256x128, batch 8 + 8, ResNet-50 E_a) and configs/teacher/market.yaml
(batch 32), or the configs --config and --teacher_config name (e.g. the quickstart's), on synthetic
pedestrians rendered at the crop size into bench/results/data/ (generated once, so it runs anywhere),
`pretrained: none`. DG-Net's teacher is a random network of the backbone's shape built in-process and used
with the default teacher_style 0: it costs what a trained one costs, and no file is needed.

Modes: `reference` follows the original's costs (fp32, eager, contiguous NCHW, per-parameter optimizer
loops; cuDNN autotuning stays on, as the original had it); `fast` is the config's defaults on this device
(amp, channels_last, fused_optim: auto; compile as configured), which `--amp`, `--compile` and
`--channels_last` change and `--fast_opts` (e.g. dis.r1_every=16) adds to. `--phase full` (default) times
iterations with every loss term on (iteration 34,002 onwards at the defaults, the dearer 66% of a run);
`--phase early` the first 30000. `captured` is the fast mode with its iterations replayed from CUDA graphs
(capture.py, `cuda_graph: always`); on the CPU it runs capture.py's graph-safe form eagerly (static input
buffers, the coin drawn before the iteration), which is what `--tiny` checks. `--mode` takes one mode, a
comma-separated list, or `both` (reference,fast).

Every timed loop warms up first (cuDNN autotuning, compilation), synchronizes the GPU before reading the
clock, and fetches loss values only after the clock stops. Prints a table; writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from capture import CapturedStep, resolve_cuda_graph  # noqa: E402
from data.loaders import build_dgnet_loaders, build_teacher_loader, load_splits  # noqa: E402
from reIDmodel import Teacher  # noqa: E402
from trainer import BaselineTrainer, DGNet_Trainer, full_weight_iteration  # noqa: E402
from utils import UserError, load_config, seed_everything, write_text_atomic  # noqa: E402

DGNET_CONFIG = REPO / "configs" / "latest.yaml"
TEACHER_CONFIG = REPO / "configs" / "teacher" / "market.yaml"
# the tests' tiny DG-Net (tests/test_train.py): small enough for a CPU; like the quickstart's models, without
# the original's doubled ReID input at this height (scale2), which would make E_a the bulk of the step
TINY = ("crop_image_height=64", "crop_image_width=32", "pad=2", "scale2=false", "batch_size=4", "num_workers=0",
        "backbone=resnet18", "gen.dim=4", "gen.mlp_dim=16", "gen.id_dim=512", "gen.n_downsample=1",
        "dis.dim=8", "dis.n_res=1", "synthetic.ids=8", "synthetic.images_per_id=6", "synthetic.height=64",
        "synthetic.width=32")
# the original's costs: fp32, eager, NCHW, per-parameter optimizer loops (cudnn_benchmark stays: it had it)
REFERENCE = ("amp=none", "channels_last=never", "fused_optim=never", "compile=false")
# keys of a captured step: never in the reference, which keeps the original's costs
CAPTURE_KEYS = ("cuda_graph",)
MODES = ("reference", "fast", "captured")


# ---------------------------------------------------------------------------------------------------
# configs and devices


def variant_opts(args: argparse.Namespace, mode: str) -> list[str]:
    """--opts of one mode: the reference is always the original's costs; the switches change the fast mode."""
    if mode == "reference":
        return list(REFERENCE) + [f"{key}=never" for key in CAPTURE_KEYS]
    # captured on a CPU: capture.py's graph-safe form, run eagerly by the Job (no graphs without CUDA)
    opts = [f"cuda_graph={'always' if args.device.startswith('cuda') else 'never'}"] if mode == "captured" else []
    if args.amp:
        opts.append(f"amp={args.amp}")
    if args.compile:
        opts += ["compile=true", f"compile_backend={args.compile}"]
    if args.channels_last:
        opts.append("channels_last=always")
    return opts + list(args.fast_opts)


def bench_config(kind: str, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """The config of one measurement: the default (or tiny) config on the bench's synthetic data."""
    path = args.config if kind == "dgnet" else args.teacher_config
    if args.tiny:
        size = (64, 32)
    else:
        own = load_config(args.config)  # DG-Net's size, which the teacher shares (as a teacher of it must)
        size = (own["crop_image_height"], own["crop_image_width"])
    # tiny data has fewer identities than full data of the same size: it gets its own folder
    name = f"synthetic_{size[0]}x{size[1]}" + ("_tiny" if args.tiny else "")
    data_root = args.data or (args.data_dir or REPO / "bench" / "results" / "data") / name
    opts = ["dataset=synthetic", f"data_root={data_root}", "ID_class=null", "pretrained=none",
            f"synthetic.height={size[0]}", f"synthetic.width={size[1]}", "synthetic.ids=60"]
    if args.tiny:
        opts += TINY if kind == "dgnet" else [o for o in TINY if not o.startswith(("gen.", "dis.", "batch"))]
        if kind == "teacher":
            opts.append("batch_size=8")
    if args.workers is not None:
        opts.append(f"num_workers={args.workers}")
    extra = [o for o in args.opts if kind == "dgnet" or not o.startswith(("gen.", "dis."))]
    return load_config(path, opts + variant_opts(args, mode) + extra)


def first_iteration(cfg: dict[str, Any], phase: str) -> int:
    """Where the timed iterations start: 0 (early: the ramped terms are off) or the first iteration with
    every ramped loss weight at its cap (full: 34,002 at the defaults; trainer.full_weight_iteration)."""
    return 0 if phase == "early" else full_weight_iteration(cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what it is): the allocator's peak on a GPU; the process's resident peak on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "ru_maxrss (whole process so far)"


def random_teacher(cfg: dict[str, Any], num_classes: int) -> Teacher:
    """An untrained teacher of the default recipe's shape (last stride 2, the config's scale2): it costs
    what a trained one does."""
    return Teacher(num_classes, backbone=cfg["backbone"], last_stride=2, scale2=cfg["scale2"])


# ---------------------------------------------------------------------------------------------------
# the measurements


class Job:
    """The loaders of one model (train.py's), and its trainer unless `loaders_only`; steps as train.py does:
    a batch from each loader, one `step` (the trainer's train_step, or capture.py's CapturedStep when
    `captured`: CUDA graphs on a GPU, the graph-safe form run eagerly elsewhere)."""

    def __init__(self, kind: str, cfg: dict[str, Any], splits: Any, device: torch.device,
                 teacher: Teacher | None = None, loaders_only: bool = False, captured: bool = False):
        self.kind, self.cfg, self.device = kind, cfg, device
        self.captured: CapturedStep | None = None
        seed_everything(cfg["seed"])
        share = {"pin_memory": device.type == "cuda"}
        if kind == "dgnet":
            self.loaders = list(build_dgnet_loaders(cfg, splits, **share))
            self.images_per_iter = 2 * cfg["batch_size"]
        else:
            self.loaders = [build_teacher_loader(cfg, splits, identity_sampler=cfg["triplet_w"] > 0, **share)]
            self.images_per_iter = cfg["batch_size"]
        self.trainer: Any = None
        if loaders_only:
            return
        if kind == "dgnet":
            if teacher is None:
                teacher = random_teacher(cfg, splits.num_classes)
            self.trainer = DGNet_Trainer(cfg, splits.num_classes, device, teacher=teacher)
        else:
            self.trainer = BaselineTrainer(cfg, splits.num_classes, device)
        self.trainer.train()
        self.step: Any = self.trainer.train_step
        if captured:
            if device.type == "cuda":
                resolve_cuda_graph(cfg, device)  # what train.py refuses to capture (fp16's loss scaling)
            self.step = self.captured = CapturedStep(self.trainer, graphs=device.type == "cuda")

    def batches(self) -> list[dict]:
        return [next(loader) for loader in self.loaders]

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()


# a captured job warms up until this many iterations in a row were replays (every key it meets is captured),
# at most CAPTURE_WARMUP_MAX iterations in all
CAPTURE_SETTLED, CAPTURE_WARMUP_MAX = 8, 80


def warm_up(job: Job, warmup: int, start: int) -> int:
    """Untimed training iterations from `start` (autotuning, compilation): `warmup`, and with CUDA graphs
    until every key is captured; how many ran."""
    graphs = job.captured is not None and job.captured.graphs
    done = streak = 0
    while done < warmup or (graphs and streak < CAPTURE_SETTLED and done < CAPTURE_WARMUP_MAX):
        replays = job.captured.counts["replayed"] if job.captured is not None else 0
        job.step(start + done, *job.batches())
        done += 1
        streak = streak + 1 if job.captured is not None and job.captured.counts["replayed"] > replays else 0
    sync(job.device)
    return done


def time_training(job: Job, iters: int, warmup: int, start: int) -> dict[str, Any]:
    """Iterations/s, images/s, the share of wall time spent waiting for data, peak memory."""
    device = job.device
    tick = time.perf_counter()
    warmup = warm_up(job, warmup, start)
    warmup_s = time.perf_counter() - tick
    warm_peak, _ = peak_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data_s, losses = 0.0, {}
    tick = time.perf_counter()
    for i in range(iters):
        t = time.perf_counter()
        batches = job.batches()
        data_s += time.perf_counter() - t
        losses = job.step(start + warmup + i, *batches)
    sync(device)
    seconds = time.perf_counter() - tick
    peak, peak_kind = peak_memory(device)
    values = {k: float(v) for k, v in losses.items()}  # after the clock: no sync inside the timed loop
    if not all(math.isfinite(v) for v in values.values()):
        raise RuntimeError(f"non-finite loss in the timed iterations: {values}")
    return {"iters": iters, "warmup": warmup, "first_iteration": start, "seconds": round(seconds, 4),
            "warmup_seconds": round(warmup_s, 3), "iterations_per_s": round(iters / seconds, 4),
            "images_per_s": round(iters * job.images_per_iter / seconds, 2),
            "data_share": round(data_s / seconds, 4), "peak_memory_gib": round(peak, 3),
            "peak_memory_with_warmup_gib": round(max(peak, warm_peak), 3), "peak_memory_kind": peak_kind,
            "last_losses": {k: round(v, 6) for k, v in values.items()},
            **({"capture_counts": dict(job.captured.counts)} if job.captured is not None else {}),
            **({"dynamo": compiled} if (compiled := dynamo_counters()) else {})}


def dynamo_counters(most: int = 10) -> dict[str, dict[str, int]]:
    """What torch.compile did so far in this process (cumulative over its jobs): frames compiled, graphs,
    graph breaks and their reasons (the `most` frequent of each kind). A compiled job whose frames hit
    dynamo's recompilation limit runs eagerly without an error; these say whether it did."""
    from torch._dynamo.utils import counters

    return {kind: dict(sorted(((str(k), int(v)) for k, v in found.items()), key=lambda kv: -kv[1])[:most])
            for kind, found in counters.items() if found}


# the trainer's profiler labels (trainer.py): the phases of a DG-Net iteration, and inside the D and G
# updates their backward and optimizer steps
PHASES = ("DGNet.forward", "DGNet.dis_update", "DGNet.gen_update", "backward", "optimizer_step")


def profile_training(job: Job, iters: int, warmup: int, start: int, top: int = 15,
                     trace: Path | None = None, shapes: bool = False) -> dict[str, Any]:
    """torch.profiler over `iters` iterations after `warmup`: time per phase and the top operators by self
    time on the device (CUDA kernels' time on a GPU, CPU time on the CPU), per iteration. `shapes` ranks
    operators per input shape, which tells which layer a costly convolution belongs to."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = job.device
    warmup = warm_up(job, warmup, start)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=shapes) as prof:
        tick = time.perf_counter()
        for i in range(iters):
            job.step(start + warmup + i, *job.batches())
        sync(device)
        seconds = time.perf_counter() - tick
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    events = prof.key_averages(group_by_input_shape=shapes)

    def ms(us: float) -> float:
        return round(us / 1000 / iters, 3)

    # A phase label appears twice on a GPU: the CPU range (its CPU time) and the GPU range (its kernels' time).
    phases = {name: {"cpu_ms": ms(max(e.cpu_time_total for e in events if e.key == name)),
                     "device_ms": ms(max(e.device_time_total for e in events if e.key == name)) if cuda else None}
              for name in PHASES if any(e.key == name for e in events)}
    # Operators only: a kernel's time is also its launching operator's self time, so listing both would
    # count it twice. The operators' self device times add up to the time the GPU was busy.
    ops = [e for e in events if e.key not in PHASES and not e.key.startswith("ProfilerStep")
           and e.device_type == DeviceType.CPU]
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_time(e) for e in ops) or 1.0
    ranked = sorted(ops, key=self_time, reverse=True)[:top]
    return {"iters": iters, "warmup": warmup, "first_iteration": start,
            "ms_per_iteration": round(seconds * 1000 / iters, 2),
            "device_busy_ms": ms(total) if cuda else None,
            "time_kind": "self CUDA time" if cuda else "self CPU time",
            "phases": phases,
            "top": [{"name": e.key, "calls_per_iteration": round(e.count / iters, 2), "ms": ms(self_time(e)),
                     "share": round(self_time(e) / total, 4),
                     **({"input_shapes": str(e.input_shapes)} if shapes else {})} for e in ranked],
            "trace": str(trace) if trace is not None else None}


def print_profile(p: dict[str, Any]) -> None:
    busy = p.get("device_busy_ms")
    print(f"{p['ms_per_iteration']:.1f} ms/iteration under the profiler ({p['iters']} iterations)"
          + (f"; the GPU is busy {busy:.1f} ms of it (the rest waits on the CPU: Python, launches)" if busy else ""))
    print(f"{'phase':<18} {'CPU ms':>9} {'device ms':>10}")
    for name, t in p["phases"].items():
        device_ms = f"{t['device_ms']:>10.2f}" if t["device_ms"] is not None else f"{'-':>10}"
        print(f"{name:<18} {t['cpu_ms']:>9.2f} {device_ms}")
    print(f"top operators by {p['time_kind']} per iteration:")
    for op in p["top"]:
        print(f"  {op['ms']:>9.3f} ms  {op['share']:>6.1%}  {op['calls_per_iteration']:>7.1f} calls  {op['name'][:70]}")
        if op.get("input_shapes") not in (None, "[]"):
            print(f"{'':>38}{op['input_shapes'][:110]}")


# Not operators that cost a launch: views, aliases and detach only make a new tensor header.
VIEW_OPS = {"view", "_unsafe_view", "as_strided", "alias", "detach", "t", "transpose", "expand", "permute",
            "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "reshape"}


def count_ops(job: Job, warmup: int, start: int, top: int = 15) -> dict[str, Any]:
    """The aten operators one DG-Net iteration dispatches (views aside), by kind, and how often each network
    runs. On a GPU every operator costs CPU time to dispatch and launch, whatever its size: at DG-Net's batch
    8 their number, more than the arithmetic, sets the pace (BENCHMARKS.md). The count does not depend on
    the device, so it is measured anywhere and compared across changes."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    warmup = warm_up(job, warmup, start)
    kinds: Counter[str] = Counter()
    calls: Counter[str] = Counter()

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
            kinds[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    def counter(name: str):  # noqa: ANN202
        return lambda module, args: calls.update([name])

    # Each network once, under its first name (without DDP, run_id is id_a); the parts of a network that
    # runs through other methods than forward (G: encode, decode) are counted instead of it.
    trainer, hooks, seen = job.trainer, [], set()
    for name, module in vars(trainer).items():
        if not isinstance(module, torch.nn.Module) or id(module) in seen:
            continue
        seen.add(id(module))
        hooks.append(module.register_forward_pre_hook(counter(name)))
        hooks += [child.register_forward_pre_hook(counter(f"{name}.{child_name}"))
                  for child_name, child in module.named_children()]
    batches = job.batches()  # outside the count: the loaders' own operators run in workers on a GPU machine
    try:
        with CountOps():
            job.step(start + warmup, *batches)
    finally:
        for hook in hooks:
            hook.remove()
    calls = Counter({k: n for k, n in calls.items() if "." not in k or not calls[k.split(".")[0]]})
    launched = {k: v for k, v in kinds.items() if k not in VIEW_OPS}
    return {"first_iteration": start + warmup, "operators": sum(launched.values()),
            "views": sum(kinds.values()) - sum(launched.values()),
            "top": [{"name": k, "count": v} for k, v in Counter(launched).most_common(top)],
            "network_calls": dict(sorted(calls.items()))}


def print_ops(o: dict[str, Any]) -> None:
    print(f"{o['operators']} operators dispatched in one iteration ({o['views']} views and detaches aside)")
    print("most frequent:  " + ", ".join(f"{op['name']} {op['count']}" for op in o["top"]))
    print("network calls:  " + ", ".join(f"{name} {n}" for name, n in o["network_calls"].items()))


# aten operators after which the host waits for the device: a value read on the host (`.item()`, `float(t)`,
# `bool(t)`, `if t:` all reach _local_scalar_dense) or an output whose shape depends on the data
SYNC_OPS = {"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
            "masked_select", "equal"}
# torch's decorators and dispatch plumbing: never the line that reads a value
WRAPPER_FILES = {"_compile.py", "_contextlib.py", "eval_frame.py", "_python_dispatch.py", "_jit_internal.py"}


class SyncCounter:
    """A dispatch mode that counts, per source line, the operators after which the host waits for a value
    (SYNC_OPS, and copies from a device to the host): `with SyncCounter() as counter: ...`, then
    `counter.sites` {(project line, library line, operator, tensor device): count}. On the CPU every tensor
    is a host tensor, so it says where the reads are, and `device` which are real only on a GPU run."""

    def __init__(self) -> None:
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode

        self.sites: Counter[tuple[str, str, str, str]] = Counter()
        sites = self.sites

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
                out = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                to_host = (name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor)
                           and out.device.type == "cpu" and any(t.device.type != "cpu" for t in tensors))
                if name in SYNC_OPS or to_host:
                    site, via = _read_site()
                    device = tensors[-1 if name == "copy_" else 0].device.type if tensors else "?"
                    sites[(site, via, name, device)] += 1
                return out

        self.mode = Mode()

    def __enter__(self) -> SyncCounter:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.sites.values())


def _read_site() -> tuple[str, str]:
    """The innermost line of this project (not the bench) and, if the call went on into a library, the
    library's line that made the read."""
    import traceback

    frames = traceback.extract_stack()
    while frames and (frames[-1].filename == __file__ or frames[-1].filename.endswith("_python_dispatch.py")):
        frames.pop()  # this function and the mode's own frames (torch 2.4 calls the mode with one fewer)
    repo = str(REPO)
    own = [f for f in frames if f.filename.startswith(repo) and "/bench/" not in f.filename
           and "site-packages" not in f.filename]  # a virtual environment inside the checkout is not the project
    site = f"{Path(own[-1].filename).relative_to(REPO)}:{own[-1].lineno} {own[-1].name}" if own else "?"
    library = [f for f in frames[frames.index(own[-1]) + 1 if own else 0:]
               if Path(f.filename).name not in WRAPPER_FILES]
    last = library[-1] if library else None
    via = "" if last is None else f"{'/'.join(Path(last.filename).parts[-2:])}:{last.lineno} {last.name}"
    return site, via


def count_syncs(job: Job, iters: int, warmup: int, start: int) -> dict[str, Any]:
    """The host-device synchronizations that `iters` training iterations make, per source line. A CUDA graph
    cannot capture an iteration that makes one on a device tensor, and each one stalls the launch queue.
    On the CPU every tensor is a host tensor, so the count says where the syncs are and `device` says which
    are real only on a GPU run (a CPU tensor there, e.g. the eager optimizers' step counters, waits on
    nothing but still fixes a branch at capture time)."""
    from collections import Counter

    warmup = warm_up(job, warmup, start)
    batches = [job.batches() for _ in range(iters)]  # the loaders' own work is not the step's
    with SyncCounter() as counter:
        for i, batch in enumerate(batches):
            job.step(start + warmup + i, *batch)
    sites = counter.sites
    total = counter.total
    by_device: Counter[str] = Counter()
    for (_, _, _, device), n in sites.items():
        by_device[device] += n
    return {"iters": iters, "first_iteration": start + warmup, "syncs_per_iteration": round(total / iters, 2),
            "by_device": {k: round(v / iters, 2) for k, v in by_device.items()},
            "sites": [{"site": site, "via": via, "op": op, "device": device, "per_iteration": round(n / iters, 2)}
                      for (site, via, op, device), n in sites.most_common()]}


def print_syncs(o: dict[str, Any]) -> None:
    print(f"{o['syncs_per_iteration']:g} host-device syncs per iteration ({o['iters']} iterations from "
          f"{o['first_iteration']}); by tensor device: {o['by_device']}")
    for s in o["sites"]:
        print(f"  {s['per_iteration']:>7g}  {s['op']:<20} {s['device']:<5} {s['site']}"
              + (f"  (in {s['via']})" if s["via"] else ""))


def time_loaders(job: Job, iters: int, warmup: int) -> dict[str, Any]:
    """What the loaders alone deliver, in iterations' worth of batches per second (all loaders of a step)."""
    for _ in range(warmup):  # starts the workers
        job.batches()
    tick = time.perf_counter()
    for _ in range(iters):
        job.batches()
    seconds = time.perf_counter() - tick
    return {"iters": iters, "num_workers": job.cfg["num_workers"], "loaders": len(job.loaders),
            "iterations_per_s": round(iters / seconds, 3),
            "images_per_s": round(iters * job.images_per_iter / seconds, 1)}


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def curve_differences(ref: dict[str, list[float]], other: dict[str, list[float]], window: int
                      ) -> dict[str, dict[str, float]]:
    """Per loss term, how far `other`'s curve strays from `ref`'s, relative to the term's mean magnitude in
    `ref` (a term crossing zero has no own scale): at the worst iteration, at the first, and between the
    means over windows of `window` iterations (the curves' trend)."""
    terms = {}
    for key, r in ref.items():
        o = other[key]
        scale = sum(abs(v) for v in r) / len(r)
        diffs = [abs(a - b) for a, b in zip(o, r)]
        means = [(sum(r[j:j + window]) / len(r[j:j + window]), sum(o[j:j + window]) / len(o[j:j + window]))
                 for j in range(0, len(r), window)]
        terms[key] = {
            "mean_abs_reference": scale,
            "max_rel_diff": max(diffs) / scale if scale > 0 else (0.0 if max(diffs) == 0 else math.inf),
            "first_iteration_rel_diff": diffs[0] / scale if scale > 0 else 0.0,
            "max_window_rel_diff": max(abs(b - a) for a, b in means) / scale if scale > 0 else 0.0,
        }
    return terms


def compare_numerics(args: argparse.Namespace, splits: Any, device: torch.device, start: int) -> dict[str, Any]:
    """DG-Net trainers from the same seed (same weights, same batches, same random draws), reference and fast
    (captured with --mode captured), stepped side by side; per loss term, how far the fast curve strays from
    the reference one. The result calls the compared side "fast" whichever mode it is. With --mode captured a
    third trainer runs the fast mode eagerly: `eager_terms` (eager fast vs reference) is what the fast
    settings (bf16) do to the curves, `captured_vs_eager` what capture adds, so a gap to the reference can be
    told apart from a fault of the capture."""
    compared = "captured" if "captured" in modes_of(args) else "fast"
    modes = {"reference": "reference", "fast": compared, **({"eager": "fast"} if compared == "captured" else {})}
    cfgs = {name: bench_config("dgnet", args, mode) for name, mode in modes.items()}
    torch.manual_seed(cfgs["reference"]["seed"])
    teacher = random_teacher(cfgs["reference"], splits.num_classes)
    jobs = {}
    for name, cfg in cfgs.items():
        jobs[name] = Job("dgnet", cfg, splits, device, teacher=copy.deepcopy(teacher),
                         captured=name == "fast" and compared == "captured")
    ref_state = jobs["reference"].trainer.state_dict()["models"]
    for job in jobs.values():
        state = job.trainer.state_dict()["models"]
        if not all(torch.equal(ref_state[n][k], state[n][k]) for n in ref_state for k in ref_state[n]):
            raise RuntimeError("the trainers did not start from the same weights")
    rngs = dict.fromkeys(jobs, rng_state(device))
    curves: dict[str, dict[str, list[float]]] = {name: {} for name in jobs}
    loader_job = jobs["reference"]
    tick, done = time.perf_counter(), 0
    for i in range(args.iters):
        if args.time_limit and time.perf_counter() - tick > args.time_limit:
            break  # a budgeted run keeps the curves it has rather than losing them to a kill
        done = i + 1
        batches = loader_job.batches()
        for name, job in jobs.items():
            set_rng(rngs[name], device)
            losses = job.step(start + i, *batches)
            rngs[name] = rng_state(device)
            for key, value in losses.items():
                curves[name].setdefault(key, []).append(float(value))
    for job in jobs.values():
        job.close()
    window = max(1, done // 10)
    eager = {"eager_terms": curve_differences(curves["reference"], curves["eager"], window),
             "captured_vs_eager": curve_differences(curves["eager"], curves["fast"], window)} if "eager" in jobs else {}
    return {"iters": done, "iters_asked": args.iters, "seconds": round(time.perf_counter() - tick, 2),
            "first_iteration": start, "window": window, "compared": compared,
            **({"capture_counts": dict(jobs["fast"].captured.counts)} if jobs["fast"].captured else {}),
            "reference": settings(jobs["reference"]), "fast": settings(jobs["fast"]),
            "terms": curve_differences(curves["reference"], curves["fast"], window), **eager, "curves": curves}


def settings(job: Job) -> dict[str, Any]:
    """The fast-path settings a trainer resolved to."""
    t = job.trainer
    captured = "graphs" if job.captured and job.captured.graphs else "graph-safe" if job.captured else "no"
    return {"amp": str(t.amp_dtype).removeprefix("torch.") if t.amp_dtype else "none",
            "channels_last": t.channels_last, "fused_optim": t.fused_optim,
            "compile": t.compile_backend or False,  # the backend's name when compiled
            "cudnn_benchmark": job.device.type == "cuda" and job.cfg["cudnn_benchmark"], "captured": captured,
            "r1_conv": getattr(t, "r1_conv", False)}


# ---------------------------------------------------------------------------------------------------
# output


def print_speed_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'model':<8} {'mode':<10} {'amp':<9} {'NHWC':<5} {'fused':<6} {'compile':<8} {'graphs':<11} "
          f"{'it/s':>8} {'images/s':>9} {'data':>6} {'peak GiB':>9}")
    for r in rows:
        s = r["settings"]
        print(f"{r['model']:<8} {r['mode']:<10} {s['amp']:<9} {'yes' if s['channels_last'] else 'no':<5} "
              f"{'yes' if s['fused_optim'] else 'no':<6} {s['compile'] or 'no':<8} {s['captured']:<11} "
              f"{r['iterations_per_s']:>8.3f} {r['images_per_s']:>9.1f} {r['data_share']:>6.1%} "
              f"{r['peak_memory_gib']:>9.2f}")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def cuda_facts(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    # TF32: PyTorch's defaults let cuDNN's fp32 convolutions use it (not matmuls), so the fp32 reference's
    # convolutions round to TF32 on a GPU that has it; recorded, not changed, as a user's amp: none run has them
    return {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "capability": f"{props.major}.{props.minor}", "gpu_memory_gib": round(props.total_memory / 2**30, 2),
            "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default="speed",
                   choices=("speed", "loaders", "numerics", "profile", "ops", "syncs", "data"),
                   help="speed (default): it/s, images/s, data share, peak memory; loaders: what the loaders "
                        "deliver vs what training consumes; numerics: fast vs reference loss curves; profile: "
                        "torch.profiler on DG-Net (the fast mode unless --mode reference): phases, top "
                        "operators; ops: operators dispatched and network calls in one DG-Net iteration (the fast "
                        "mode unless --mode reference); syncs: host-device syncs per iteration by source line "
                        "(the fast mode unless --mode reference); data: generate the synthetic data and stop")
    p.add_argument("--top", type=int, default=15, help="profile, ops: how many operators to list")
    p.add_argument("--trace", type=Path, help="profile: also write a Chrome trace (chrome://tracing, Perfetto) here")
    p.add_argument("--shapes", action="store_true", help="profile: rank operators per input shape")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every measured run (e.g. dis.LAMBDA=0: R1 off)")
    p.add_argument("--config", type=Path, default=DGNET_CONFIG, help="DG-Net's config (default: configs/latest.yaml)")
    p.add_argument("--teacher_config", type=Path, default=TEACHER_CONFIG,
                   help="the teacher's config (default: configs/teacher/market.yaml)")
    p.add_argument("--fast_opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for the fast mode only (e.g. cuda_graph=always, dis.r1_every=16)")
    p.add_argument("--mode", default="both",
                   help="reference: fp32, eager, NCHW, per-parameter optimizers; fast: the config's defaults; "
                        "captured: fast with iterations replayed from CUDA graphs (the graph-safe form run eagerly "
                        "on a CPU); a comma-separated list of them, or both (reference,fast). numerics compares "
                        "captured with the reference when the list holds it, else fast")
    p.add_argument("--model", default="both", choices=("dgnet", "teacher", "both"), help="what --bench speed times")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help="the fast mode's amp (default: the config's, auto)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="the fast mode compiles G and E_a (and the teacher) with torch.compile's BACKEND "
                        "(default inductor; aot_eager and eager trace without generating code, for the CPU)")
    p.add_argument("--channels_last", action="store_true", help="the fast mode uses channels_last on any device")
    p.add_argument("--iters", type=int, default=50,
                   help="timed iterations (numerics: compared iterations; syncs: counted iterations)")
    p.add_argument("--time_limit", type=float, default=0.0,
                   help="numerics: stop comparing after this many seconds and report the iterations done (0: none)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    p.add_argument("--phase", default="full", choices=("full", "early"),
                   help="full: every loss term on (iteration 34000+); early: the ramped terms still off")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny config (64x32, ResNet-18): CPU and CI")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, help="num_workers per loader (default: the config's)")
    p.add_argument("--data", type=Path, help="synthetic data folder (default: bench/results/data/...)")
    p.add_argument("--data_dir", type=Path,
                   help="where the per-size synthetic data folders go (default: bench/results/data)")
    p.add_argument("--json", type=Path, help="output (default: bench/results/train_bench[_tiny][_<bench>].json)")
    return p.parse_args(argv)


def modes_of(args: argparse.Namespace) -> tuple[str, ...]:
    return ("reference", "fast") if args.mode == "both" else tuple(args.mode.split(","))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        print("error: --iters must be at least 1 and --warmup at least 0", file=sys.stderr)
        return 2
    if not set(modes_of(args)) <= set(MODES):
        print(f"error: --mode {args.mode}: use both, or one or more of {', '.join(MODES)} separated by commas",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available; use --device cpu (with --tiny)", file=sys.stderr)
        return 2
    try:
        return run(args, device, sys.argv[1:] if argv is None else argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def time_mode(args: argparse.Namespace, model: str, mode: str, splits: Any, device: torch.device) -> dict[str, Any]:
    """One speed row: `model` trained in `mode` (and, for --bench loaders, its loaders alone)."""
    cfg = bench_config(model, args, mode)
    job = Job(model, cfg, splits, device, captured=mode == "captured")
    try:
        row = time_training(job, args.iters, args.warmup, first_iteration(cfg, args.phase) if model == "dgnet" else 0)
        row.update(model=model, mode=mode, settings=settings(job), batch_size=cfg["batch_size"],
                   num_workers=cfg["num_workers"])
        if args.bench == "loaders":
            loaders_job = Job(model, cfg, splits, device, loaders_only=True)
            try:
                row["loaders"] = time_loaders(loaders_job, max(args.iters, 1), args.warmup)
            finally:
                loaders_job.close()
            row["loaders"]["delivers_over_consumes"] = round(
                row["loaders"]["iterations_per_s"] / row["iterations_per_s"], 3)
    finally:
        job.close()
    return row


def run(args: argparse.Namespace, device: torch.device, argv: list[str]) -> int:
    modes = modes_of(args)
    models = ("dgnet", "teacher") if args.model == "both" else (args.model,)
    first = bench_config("dgnet", args, modes[0])
    splits = load_splits(first)  # generates the data the first time
    size = f"{first['crop_image_height']}x{first['crop_image_width']}"
    result: dict[str, Any] = {
        "benchmark": "train_bench", "bench": args.bench, "tiny": args.tiny,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device), "device_name": describe_device(device), "torch": torch.__version__,
        **cuda_facts(device),
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(), "size": size,
        "num_classes": splits.num_classes, "train_images": len(splits.train), "phase": args.phase,
        "teacher": "DG-Net's teacher: a random network built in-process, teacher_style 0 (a trained one's cost)",
        "command": " ".join(["python bench/train_bench.py", *argv]),
    }
    suffix = ("_tiny" if args.tiny else "") + ("" if args.bench == "speed" else f"_{args.bench}")
    path = args.json or REPO / "bench" / "results" / f"train_bench{suffix}.json"

    def write() -> None:
        """The JSON as it stands: after each speed row too, so a mode that fails or is cut off by a time limit
        leaves the rows measured before it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(result, indent=2) + "\n")

    print(f"{result['device_name']}, torch {torch.__version__}, {size}, synthetic data ({len(splits.train)} "
          f"training images, {splits.num_classes} identities), phase {args.phase}; {result['teacher']}")

    if args.bench == "data":  # load_splits above generated what was missing
        result["data"] = {"data_root": str(first["data_root"]), "train_images": len(splits.train)}
        if args.model != "dgnet":  # the teacher's config may name other data
            teacher_cfg = bench_config("teacher", args, modes[0])
            result["data"]["teacher_train_images"] = len(load_splits(teacher_cfg).train)
    elif args.bench in ("profile", "ops", "syncs"):  # one DG-Net job in one mode, examined
        mode = modes[-1] if args.mode != "both" else "fast"
        cfg = bench_config("dgnet", args, mode)
        job = Job("dgnet", cfg, splits, device, captured=mode == "captured")
        start = first_iteration(cfg, args.phase)
        try:
            if args.bench == "profile":
                out = profile_training(job, args.iters, args.warmup, start, args.top, args.trace, args.shapes)
            elif args.bench == "ops":
                out = count_ops(job, args.warmup, start, args.top)
            else:
                out = count_syncs(job, args.iters, args.warmup, start)
        finally:
            job.close()
        out.update(mode=mode, settings=settings(job))
        result[args.bench] = out
        {"profile": print_profile, "ops": print_ops, "syncs": print_syncs}[args.bench](out)
    elif args.bench == "numerics":
        start = first_iteration(bench_config("dgnet", args, "reference"), args.phase)
        out = compare_numerics(args, splits, device, start)
        result["numerics"] = out
        print(f"fast {out['fast']} vs reference {out['reference']}, {out['iters']} iterations from {start}")
        print(f"{'term':<10} {'mean |ref|':>11} {'max rel diff':>13} {'1st it':>9} {'windows':>9}")
        for key, t in out["terms"].items():
            print(f"{key:<10} {t['mean_abs_reference']:>11.4g} {t['max_rel_diff']:>13.3g} "
                  f"{t['first_iteration_rel_diff']:>9.3g} {t['max_window_rel_diff']:>9.3g}")
    else:
        rows: list[dict[str, Any]] = result.setdefault("runs", [])
        for model in models if args.bench == "speed" else ("dgnet",):
            for mode in modes if args.bench == "speed" else ("fast",):
                try:
                    rows.append(time_mode(args, model, mode, splits, device))
                except Exception as err:  # one mode's failure (a capture, a non-finite loss) keeps the others
                    print(f"error: {model} {mode}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                    rows.append({"model": model, "mode": mode, "error": f"{type(err).__name__}: {err}"[:500]})
                write()
                if device.type == "cuda":
                    gc.collect()  # a failed mode's frames, which hold its models, go before the next mode
                    torch.cuda.empty_cache()
        measured = [r for r in rows if "error" not in r]
        print_speed_table(measured)
        for model in models:
            by_mode = {r["mode"]: r for r in measured if r["model"] == model}
            if {"reference", "fast"} <= by_mode.keys():
                speedup = by_mode["fast"]["iterations_per_s"] / by_mode["reference"]["iterations_per_s"]
                result.setdefault("speedup", {})[model] = round(speedup, 3)
                print(f"{model}: fast path {speedup:.2f}x the reference")
            if {"fast", "captured"} <= by_mode.keys():
                speedup = by_mode["captured"]["iterations_per_s"] / by_mode["fast"]["iterations_per_s"]
                result.setdefault("speedup_captured", {})[model] = round(speedup, 3)
                print(f"{model}: captured iterations {speedup:.2f}x the eager fast path")
        for r in measured:
            if "loaders" in r:
                lo = r["loaders"]
                print(f"loaders ({lo['loaders']} x {lo['num_workers']} workers) deliver {lo['iterations_per_s']:.2f} "
                      f"it/s, training consumes {r['iterations_per_s']:.2f} it/s: {lo['delivers_over_consumes']:.2f}x")

    write()
    print(f"wrote {path}")
    return 1 if any("error" in r for r in result.get("runs", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
