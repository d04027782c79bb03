"""Processes for training: one per GPU (or a few on the CPU, with gloo) under torch.distributed.

Three ways a run gets its processes:
- plain: one process, no process group (`python train.py ...`, one GPU or the CPU);
- the launcher: `--gpu_ids 0,1` (or `--nproc_per_machine N` on the CPU) spawns one worker per GPU on this
  machine; `--num_machines N --machine_rank R --dist_url tcp://HOST:PORT` joins machines (HOST:PORT is on
  machine 0); `--dist_url auto` picks a free local port and also forces a process group for one process;
- torchrun: the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) decides.

Every worker runs the same training function with a `Dist` that knows its rank, world size and device.
Control messages (stop requests, error agreement, RNG states) go through a gloo group even on NCCL, so
they never touch the GPU stream. The launcher starts workers in their own process group: a Ctrl-C
reaches the launcher alone, which forwards each signal once, so every rank sees the same number of them
(a signal that comes before every worker has joined its process group kills them instead: nothing to save).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import connection
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from utils import UserError, first_line, one_line, plain_warnings

STOP_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # a stop asked for (saved or aborted: it says which)
CRASH_GRACE_S = 10.0  # after one worker fails, how long the others get to finish before they are killed
ABORT_GRACE_S = 5.0  # after a second Ctrl-C, how long the workers get to abort before they are killed
STOP_NOTE_S = 20.0  # after a first Ctrl-C, when to say that the workers have not stopped yet
LAUNCHER_GONE_GRACE_S = 300.0  # a worker whose launcher died, blocked in a collective, exits after this
_PROGRESS = [time.monotonic()]  # when this worker's training loop last went on (Dist.launcher_gone)
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


# DDP's switch for its buffer broadcast before every forward: `forward_sync_buffers` from torch 2.14 (which
# deprecates `broadcast_buffers`), `broadcast_buffers` before. See Dist.wrap for why it is off.
_DDP_OPTIONS = inspect.signature(nn.parallel.DistributedDataParallel).parameters
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_OPTIONS
                           else {"broadcast_buffers": False})


class SharedError(UserError):
    """A bad input every process found (they agreed on it): rank 0 alone reports it."""


# ---------------------------------------------------------------------------------------------------
# the view a worker has of the run


@dataclass
class Dist:
    """This process's place in the run. `world_size` 1 without a group is the plain single-process path."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher_pid: int | None = None  # the launcher that spawned this worker (None: plain run or torchrun)
    buffer_owners: list[nn.Module] = field(default_factory=list)  # what `wrap` wrapped: `sync_buffers` syncs
    control: Any = field(default=None, repr=False)  # gloo group for control messages

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return torch_dist.is_available() and torch_dist.is_initialized()

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP around `module` when there is a process group, else the module itself.

        Parameters and buffers are broadcast from rank 0 here. DDP's own buffer broadcast before every
        forward is off: it copies BatchNorm running statistics in place, and DG-Net calls E_a and D several
        times before one backward, which then fails on CUDA, where BatchNorm's backward keeps those
        statistics ("modified by an inplace operation"; pytorch/pytorch#175024, fixed only in recent
        releases). `sync_buffers` broadcasts them from rank 0 once per iteration instead, before any forward:
        every rank still runs with rank 0's statistics, and a resumed run continues exactly.
        """
        if not self.enabled:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.buffer_owners.append(module)
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None,
                                                   **_NO_FORWARD_BUFFER_SYNC)

    def share(self, module: nn.Module) -> nn.Module:
        """`module` itself, made ready for a training step that averages its own gradients (a captured step,
        capture.py: DDP's backward hooks cannot be replayed from a CUDA graph): rank 0's parameters and
        buffers on every rank, as DDP's constructor broadcasts them, and its buffers in `sync_buffers`."""
        if not self.enabled:
            return module
        _through_flat([*module.parameters(), *module.buffers()], _from_rank_0)
        self.buffer_owners.append(module)
        return module

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of `params` over the ranks, in place: DDP's all-reduce, issued by the step
        itself after its backward (inside the graph when captured). One flat all-reduce per dtype; the
        parameters holding a gradient are the same on every rank, since every rank runs the same graph. A
        group of one all-reduces too (`--dist_url auto`: how one GPU checks the collective in a graph)."""
        if not self.enabled:
            return
        grads = [p.grad for p in dict.fromkeys(params) if p.grad is not None]  # each parameter once
        _through_flat(grads, lambda flat: torch_dist.all_reduce(flat.div_(self.world_size)))

    def main_value(self, value: int) -> int:
        """Rank 0's `value` on every rank (through the control group): what the ranks must agree on before an
        iteration, such as the graph a captured step replays."""
        if not self.enabled or self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch_dist.broadcast(t, src=0, group=self.control)
        return int(t.item())

    def sync_buffers(self) -> None:
        """Broadcast every wrapped module's buffers from rank 0 (once per iteration, before the first forward,
        when no graph holds them)."""
        if not self.enabled or self.world_size == 1:
            return
        _through_flat([b for module in self.buffer_owners for b in module.buffers()], _from_rank_0)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average a tensor over the ranks (used for logged losses, only when they are logged)."""
        if not self.enabled or self.world_size == 1:
            return values
        values = values.detach().clone()
        torch_dist.all_reduce(values)
        return values / self.world_size

    def max_flag(self, flag: int) -> int:
        """The largest of every rank's integer flag: how ranks agree to stop at the same iteration."""
        if not self.enabled:
            return flag
        t = torch.tensor([flag], dtype=torch.int64)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX, group=self.control)
        return int(t.item())

    def agree(self, ok: bool) -> bool:
        """True when every rank is ok: ranks check their input before the first collective of the model."""
        return self.max_flag(0 if ok else 1) == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj, group=self.control)
        return out

    def launcher_gone(self) -> bool:
        """The launcher died (killed with SIGKILL, say): the workers stop too instead of training on."""
        _PROGRESS[0] = time.monotonic()  # asked once an iteration: this process is not blocked
        return self.launcher_pid is not None and os.getppid() != self.launcher_pid

    def close(self) -> None:
        if self.enabled:
            end_process_group()


def end_process_group() -> None:
    """destroy_process_group, safely on every torch this project supports. A collective's tensor that Python
    made can be freed last on gloo's worker thread, which takes the GIL to do it; torch 2.4.1 destroys the group
    holding the GIL while it joins that thread, so a finished worker could hang at exit (3 times in 30 short
    two-process runs; none on 2.14, 2026-12-07). Sleeping lets go of the GIL while the thread finishes (0 in
    30)."""
    time.sleep(0.05)
    torch_dist.destroy_process_group()


def _through_flat(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], Any]) -> None:
    """Run `collective` in place on `tensors`: one flat tensor per dtype, copied back with one foreach call
    (this runs every iteration, and each extra operator costs a launch: BENCHMARKS.md). The pieces are cut
    in the tensors' logical order, whatever their memory format."""
    with torch.no_grad():
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            collective(flat)
            torch._foreach_copy_(group, [v.view_as(t) for t, v in zip(group, flat.split([t.numel() for t in group]))])


def _from_rank_0(flat: torch.Tensor) -> None:
    torch_dist.broadcast(flat, src=0)


# ---------------------------------------------------------------------------------------------------
# the launch plan: checked in the launcher, before any process starts or any file is written


@dataclass
class Plan:
    nproc: int  # processes on this machine
    num_machines: int
    machine_rank: int
    dist_url: str | None  # None: plain single-process run
    gpu_ids: list[int] | None  # None: CPU

    @property
    def world_size(self) -> int:
        return self.nproc * self.num_machines

    @property
    def backend(self) -> str:
        return "nccl" if self.gpu_ids is not None else "gloo"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu_ids", default=None,
                   help="GPUs of this machine, e.g. 0 or 0,1 (one process each, DDP); default: GPU 0 if any, "
                        "else the CPU")
    p.add_argument("--nproc_per_machine", type=int, default=None,
                   help="processes on this machine (default: one per --gpu_ids entry; on the CPU: 1, gloo)")
    p.add_argument("--num_machines", type=int, default=1, help="machines in the run (default 1)")
    p.add_argument("--machine_rank", type=int, default=0, help="this machine's index, 0..num_machines-1")
    p.add_argument("--dist_url", default=None,
                   help="tcp://HOST:PORT of machine 0 (needed for several machines), or auto: a free local port")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def parse_gpu_ids(gpu_ids: str) -> list[int]:
    try:
        ids = [int(x) for x in gpu_ids.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--gpu_ids takes GPU indices such as 0 or 0,1, got '{gpu_ids}'") from None
    if not ids or len(set(ids)) != len(ids):
        raise UserError(f"--gpu_ids {gpu_ids}: give each GPU once, e.g. 0,1")
    if not torch.cuda.is_available():
        raise UserError(f"--gpu_ids {gpu_ids}: CUDA is not available on this machine; leave --gpu_ids out to "
                        "train on the CPU")
    count = torch.cuda.device_count()
    missing = [i for i in ids if not 0 <= i < count]
    if missing:
        raise UserError(f"--gpu_ids {gpu_ids}: GPU {missing[0]} does not exist; this machine has {count} "
                        f"(0..{count - 1})")
    return ids


def plan_launch(args: argparse.Namespace) -> Plan:
    """What to start on this machine, from the command line; every error here comes before any file."""
    gpu_ids = parse_gpu_ids(args.gpu_ids) if args.gpu_ids is not None else None
    if gpu_ids is None and torch.cuda.is_available() and (args.nproc_per_machine or 1) > 1:
        gpu_ids = list(range(args.nproc_per_machine))  # several processes on a GPU machine: one GPU each
        parse_gpu_ids(",".join(map(str, gpu_ids)))
    nproc = args.nproc_per_machine if args.nproc_per_machine is not None else (len(gpu_ids) if gpu_ids else 1)
    if nproc < 1:
        raise UserError(f"--nproc_per_machine is {nproc}: use 1 or more")
    if gpu_ids is not None and nproc != len(gpu_ids):
        raise UserError(f"--nproc_per_machine {nproc} but --gpu_ids names {len(gpu_ids)} GPUs: one process per "
                        "GPU; leave --nproc_per_machine out")
    if args.num_machines < 1:
        raise UserError(f"--num_machines is {args.num_machines}: use 1 or more")
    if not 0 <= args.machine_rank < args.num_machines:
        raise UserError(f"--machine_rank {args.machine_rank} is not in 0..{args.num_machines - 1}")
    url = args.dist_url
    if args.num_machines > 1 and (url is None or url == "auto"):
        raise UserError("several machines need --dist_url tcp://HOST:PORT, with HOST machine 0's address and "
                        "PORT a free port there (the same on every machine)")
    if url is None and nproc * args.num_machines > 1:
        url = "auto"
    if url == "auto":
        url = f"tcp://127.0.0.1:{free_port()}"
    elif url is not None:
        host, port = split_url(url)
        if args.machine_rank == 0:
            check_port_free(host, port)
    if gpu_ids is None and args.gpu_ids is None and torch.cuda.is_available() and url is not None:
        gpu_ids = [0]  # one process with a group on a GPU machine: it trains on GPU 0
    return Plan(nproc=nproc, num_machines=args.num_machines, machine_rank=args.machine_rank, dist_url=url,
                gpu_ids=gpu_ids)


def split_url(url: str) -> tuple[str, int]:
    if not url.startswith("tcp://"):
        raise UserError(f"--dist_url {url}: use tcp://HOST:PORT or auto")
    host, _, port = url[len("tcp://"):].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--dist_url {url}: use tcp://HOST:PORT, e.g. tcp://10.0.0.1:29500")
    return host.strip("[]"), int(port)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Machine 0 hosts the rendezvous: its port must be free there, and HOST must be one of its addresses."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == 98:  # EADDRINUSE
                raise UserError(f"--dist_url: port {port} on {host} is in use; pick another port (or use "
                                "--dist_url auto on one machine)") from None
            raise UserError(f"--dist_url: cannot listen on {host}:{port} ({err.strerror}); on machine 0, HOST "
                            "must be this machine's address") from None


# ---------------------------------------------------------------------------------------------------
# starting workers


def run(args: argparse.Namespace, target: str) -> int:
    """Run `target` ("module:function", called as function(args, dist) -> exit code) in this run's
    processes: here for a plain run, in each worker for the launcher, under torchrun's own workers."""
    if under_torchrun():
        return _worker_main(_torchrun_dist, args, target)
    plan = plan_launch(args)
    if plan.dist_url is None:
        device = torch.device("cuda", plan.gpu_ids[0]) if plan.gpu_ids else (
            torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return _call(target, args, Dist(device=device))
    return launch(plan, args, target)


def launch(plan: Plan, args: argparse.Namespace, target: str) -> int:
    """Spawn this machine's workers, forward signals to them, and stop them all when one fails."""
    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in range(plan.nproc)]  # set once a worker's process group is formed
    procs = [ctx.Process(target=_spawned, args=(plan, local, os.getpid(), args, target, ready[local]),
                         name=f"rank{plan.machine_rank * plan.nproc + local}")
             for local in range(plan.nproc)]
    forwarded: list[tuple[int, float, bool]] = []

    def forward(signum: int, frame: Any) -> None:
        joined = all(r.is_set() for r in ready)
        forwarded.append((signum, time.monotonic(), joined))
        if not joined:  # nothing to save yet, and they may be blocked in the rendezvous: killed, no traceback
            _kill_alive(procs)
            return
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    if plan.num_machines > 1:
        print(f"machine {plan.machine_rank} of {plan.num_machines}: training starts when every machine has joined "
              f"at {plan.dist_url} (each runs this command with its own --machine_rank)", flush=True)
    try:
        for p in procs:
            p.start()
        return _supervise(procs, plan, forwarded)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()


def _supervise(procs: list[mp.Process], plan: Plan, forwarded: list[tuple[int, float, bool]] | None = None
               ) -> int:
    """Wait for the workers. When one fails, the others get CRASH_GRACE_S to finish (they usually fail
    with it, or stop together on a NaN); one still running then is blocked in a collective and is killed.

    A stop signal (`forwarded`: signal, time, whether every worker had joined its group) may meet workers
    blocked in C++ (waiting for another machine to join, or in a collective with a frozen one), where
    Python's signal handlers do not run: one before every worker joined has killed them (nothing to save
    yet), and a second one that has not ended them within ABORT_GRACE_S kills them."""
    forwarded = [] if forwarded is None else forwarded
    failed_at: float | None = None
    killed, noted = False, False
    while any(p.is_alive() for p in procs):
        connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=1.0)
        for local, p in enumerate(procs):
            code = p.exitcode
            if code in (None, 0, *STOP_EXIT_CODES) or failed_at is not None:
                continue
            if forwarded and -code in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                continue  # stopped by the signal itself (before its handler was in place, or killed for it)
            failed_at = time.monotonic()
            if code not in (2, 3):  # 2 and 3 (bad input, NaN) have printed their own message
                rank = plan.machine_rank * plan.nproc + local
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                print(f"error: process {rank} failed ({how}); stopping the others", file=sys.stderr, flush=True)
        now = time.monotonic()
        if failed_at is not None and now - failed_at > CRASH_GRACE_S:
            killed = _kill_alive(procs) or killed  # blocked in a collective with the failed process
        if forwarded and not forwarded[0][2]:
            if not any(p.is_alive() for p in procs):
                print("stopped before every process joined the run (waiting for another machine?); nothing was "
                      "trained or saved", file=sys.stderr, flush=True)
                return 128 + forwarded[0][0]
        elif forwarded and any(p.is_alive() for p in procs):
            if len(forwarded) >= 2 and now - forwarded[1][1] > ABORT_GRACE_S:
                _kill_alive(procs)
                print("aborted: the processes did not stop (blocked waiting for another machine?); killed; resume "
                      "from the newest checkpoint", file=sys.stderr, flush=True)
                return 128 + forwarded[1][0]
            if not noted and now - forwarded[0][1] > STOP_NOTE_S:
                noted = True
                print("still stopping: the processes finish their iteration and save together (a machine that is "
                      "gone or frozen holds them); Ctrl-C again to abort", file=sys.stderr, flush=True)
    if killed:
        print("error: stopped the processes that were still waiting for the failed one; resume from the "
              "newest checkpoint", file=sys.stderr, flush=True)
    codes = [_exit_status(p.exitcode) for p in procs]
    return codes[0] or next((c for c in codes if c), 0)


def _kill_alive(procs: list[mp.Process]) -> bool:
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    return bool(alive)


def _exit_status(code: int | None) -> int:
    """A worker's exit code as a shell reports it: a death by signal N is 128 + N (never 0)."""
    return 128 - code if code is not None and code < 0 else (code or 0)


def _spawned(plan: Plan, local_rank: int, launcher_pid: int, args: argparse.Namespace, target: str,
             ready: Any = None) -> None:
    os.setpgrp()  # Ctrl-C on the terminal reaches the launcher only; it forwards one signal per press
    torch.set_num_threads(worker_threads(plan.nproc))
    _exit_when_orphaned(launcher_pid)

    def make() -> Dist:
        rank = plan.machine_rank * plan.nproc + local_rank
        device = torch.device("cuda", plan.gpu_ids[local_rank]) if plan.gpu_ids else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group(plan.backend, init_method=plan.dist_url, world_size=plan.world_size,
                                      rank=rank, timeout=COLLECTIVE_TIMEOUT,
                                      **({"device_id": device} if device.type == "cuda" else {}))
        d = _with_control(Dist(device=device, rank=rank, world_size=plan.world_size, local_rank=local_rank,
                               launcher_pid=launcher_pid))
        if ready is not None:
            ready.set()
        return d

    sys.exit(_worker_main(make, args, target))


def worker_threads(nproc: int) -> int:
    """CPU threads per worker: OMP_NUM_THREADS when set, else this machine's cores shared by its processes.
    A CPU run's floating-point sums follow the thread count: a bit-exact resume needs the same per process."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else max(1, (os.cpu_count() or 1) // nproc)


def _exit_when_orphaned(launcher_pid: int) -> None:
    """A worker whose launcher died saves and stops at the end of its iteration (Dist.launcher_gone, which
    marks each check as progress); one blocked in a collective (another machine gone too) cannot, and would
    hold the port and the run folder: it exits once LAUNCHER_GONE_GRACE_S pass without progress."""
    def watch() -> None:
        while os.getppid() == launcher_pid or time.monotonic() - _PROGRESS[0] < LAUNCHER_GONE_GRACE_S:
            time.sleep(2.0)
        print(f"error (process {os.getpid()}): the launcher is gone and this process is blocked; exiting (resume "
              "from the newest checkpoint)", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _torchrun_dist() -> Dist:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return _with_control(Dist(device=device, rank=rank, world_size=world, local_rank=local))


def _with_control(d: Dist) -> Dist:
    d.control = torch_dist.new_group(backend="gloo") if torch_dist.get_backend() != "gloo" else None
    return d


def _worker_main(make: Callable[[], Dist], args: argparse.Namespace, target: str) -> int:
    plain_warnings()  # a started process runs no command's entry point
    try:
        d = make()
    except torch_dist.DistError as err:  # e.g. the rendezvous timed out
        print(f"error: the run's processes could not join ({first_line(err)}); start every machine with the same "
              f"--num_machines and --dist_url (or torchrun's --nnodes and --master_addr), within "
              f"{COLLECTIVE_TIMEOUT} of each other", file=sys.stderr, flush=True)
        return 2
    try:
        return _call(target, args, d)
    finally:
        d.close()


def _call(target: str, args: argparse.Namespace, d: Dist) -> int:
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    try:
        return fn(args, d)
    except UserError as err:
        if d.is_main or (isinstance(err, SharedError) and d.local_rank == 0):  # every machine says why it stops
            print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        elif not isinstance(err, SharedError):  # this process's own trouble: rank 0 does not know it
            print(f"error (process {d.rank}): {one_line(err)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the training loop handles it (which stops safely, with a save)
        if d.is_main:
            print("aborted (Ctrl-C) before training began; nothing was saved", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
