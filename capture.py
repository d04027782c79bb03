"""Training iterations replayed from CUDA graphs (config key `cuda_graph`): DG-Net's and the teacher's.

On a GPU, DG-Net at batch 8 is paced by the host launching a few thousand operators per iteration, not by
the arithmetic (BENCHMARKS.md); the teacher at batch 32 too, less so. A CUDA graph records the whole
iteration once: for DG-Net the forward, the D step with R1, the joint G + E_a step, both optimizers; for the
teacher its forward, backward and SGD step. A replay launches it all at once. The iteration is captured
whole with torch.cuda.graph: make_graphed_callables and torch.compile's autograd do not take R1's double
backward.

`CapturedStep(trainer)(it, *batches)` does what `trainer.train_step` does, for either trainer; the trainer's
`capture_plan(it)` says what of iteration `it` is decided on the host. What a replay cannot do, and what
takes its place:
- Host values are baked into a graph, so each combination of them is a *key* with its own graph. DG-Net's
  are the loss weights (which also decide which terms run), the use_encoder_again coin and the learning
  rates; the teacher's, its learning rate. They are floats in the key, not device tensors: DG-Net's are
  constant before the warm-up, after it and between LR milestones, so a run needs two graphs at a time
  (the coin's two paths), four with lazy R1 (dis.r1_every), and captures anew after each LR milestone; the
  teacher needs one. During DG-Net's ramp every iteration has new weights (4,000 of 100,000 iterations at
  the defaults); a key runs eagerly until it has been seen WARMUP times, so the ramp runs eagerly.
- DG-Net's coin is drawn on the host before the iteration (`DGNet_Trainer.capture_plan`), from torch's CPU
  generator as the eager step draws it. On a CUDA device nothing else in the step draws from that generator
  (dropout and structure jitter draw from the CUDA one, which torch.cuda.graph advances at each replay as
  the eager kernels would), so both paths get the same coins and random numbers. On the CPU, dropout shares
  the CPU generator, so there the earlier draw shifts the dropout masks (tests/test_capture.py).
- Inputs: static buffers, into which each batch is copied before the iteration.
- No host read inside the iteration: Adam is made capturable here (its capture check asks for it; the fused
  kernel computes the same with it). The step of the fused optimizers reads nothing on the host; the
  per-parameter loops (fused_optim: never) work too, with Adam's capturable loop.
- Outputs: the loss terms stacked in one tensor, which the next replay overwrites; the step returns a copy.
- Warm-up: a key's first WARMUP iterations run eagerly on a side stream (cuDNN autotuning, optimizer state
  and SGD momentum created outside the graph); the next one captures it, then replays it.
- Memory: every graph allocates from one shared pool, although their replays come in any order. That is safe
  here: what a replay leaves for later (parameters, optimizer state, BatchNorm statistics) and what it reads
  from before (the input buffers) were allocated outside the pool; the losses are copied right after their
  replay; the gradients a graph leaves behind are never read (every step begins by dropping them). At most
  MAX_GRAPHS graphs are kept, the least recently used is dropped.

Several processes (one per GPU): DDP's backward hooks and bucket bookkeeping run on the host, so a captured
step does without DDP. Its networks are bare (`Dist.share`: rank 0's weights at the start, its buffers each
iteration as before) and the step averages the gradients itself after each backward (`_PartsTrainer._step`,
`Dist.average_gradients`): one flat NCCL all-reduce per optimizer step, inside the graph, where DDP overlaps
bucketed all-reduces with the backward; the averaged gradients are the same up to summation order. NCCL
requires every rank to replay the graph that was captured together with the others', so the keys must agree:
the loss weights and learning rates do; the coin is rank 0's (`Dist.main_value`, one small broadcast on the
host per iteration through the gloo control group), where eager DDP has each rank draw its own.

Limits: amp bf16 or none (fp16's GradScaler reads its found-inf flag on the host at every step); no sync_bn in
several processes (its collectives inside the networks are not captured). Build the step after a checkpoint is
loaded: graphs hold the optimizer state's tensors.

`CapturedStep(trainer, graphs=False)` runs the same host flow with the captured function called eagerly
(the graph-safe form): how the CPU tests and `bench/train_bench.py --tiny` check it.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from trainer import resolve_switch
from utils import UserError

WARMUP = 3  # eager iterations of a key before it is captured
MAX_GRAPHS = 4  # the coin's two paths, each with and without lazy R1
SEEN = 64  # keys remembered for their warm-up count (the ramp makes one per iteration)
Key = tuple[Any, ...]


def resolve_cuda_graph(cfg: dict, device: torch.device, world_size: int = 1) -> bool:
    """Whether training replays captured iterations (`trainer.resolve_switch`: auto means never until a GPU
    measurement shows the captured iteration faster), refusing what a capture cannot take."""
    if not resolve_switch(cfg, "cuda_graph", device):
        return False
    if device.type != "cuda":
        raise UserError(f"cuda_graph: always needs a CUDA device, the device is {device}; use cuda_graph: never")
    if world_size > 1 and cfg["sync_bn"]:
        raise UserError("cuda_graph: always does not capture sync_bn's collectives inside the networks: use "
                        "sync_bn: false, or cuda_graph: never")
    if cfg["amp"] == "fp16":
        raise UserError("cuda_graph: always cannot capture fp16's loss scaling (it reads the GPU at every step): "
                        "use amp: bf16 or none, or cuda_graph: never")
    return True


def training_step(trainer: Any, cfg: dict, dist: Any) -> Callable:
    """Distribute `trainer` over `dist`'s processes (`trainer.distribute`) and return what train.py's loop
    calls each iteration: `trainer.train_step` (DDP in a process group), or its replay from CUDA graphs
    (gradients averaged by the step itself, inside the graph)."""
    captured = resolve_cuda_graph(cfg, dist.device, dist.world_size)
    trainer.distribute(dist, in_step=captured)
    return CapturedStep(trainer) if captured else trainer.train_step


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Adam steps inside a graph only with capturable=True: its step counts then live on the parameters'
    device (a checkpoint of an eager run keeps them on the CPU)."""
    groups = [group for group in optimizer.param_groups if "capturable" in group]
    for group in groups:
        group["capturable"] = True
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step) and step.device != p.device:
                optimizer.state[p]["step"] = step.to(p.device)


class CapturedStep:
    """`trainer.train_step` with every iteration of a recurring key replayed from a CUDA graph (see the
    module's docstring); `trainer` is a DGNet_Trainer or a BaselineTrainer. `counts`: iterations run eagerly,
    captured (each then replayed once) and replayed."""

    def __init__(self, trainer: Any, graphs: bool = True):
        if graphs and trainer.device.type != "cuda":
            raise UserError(f"cuda_graph: always needs a CUDA device, the device is {trainer.device}")
        if trainer.scaler is not None:  # resolve_cuda_graph refuses the config; this, a trainer built without it
            raise UserError("cuda_graph: always cannot capture fp16's loss scaling (it reads the GPU at every "
                            "step): use amp: bf16 or none")
        self.trainer, self.graphs = trainer, graphs
        self.inputs: list[dict[str, torch.Tensor]] | None = None  # the static buffers, one per loader's batch
        self.seen: OrderedDict[Key, int] = OrderedDict()
        self.captured: OrderedDict[Key, tuple[Any, tuple[str, ...], torch.Tensor]] = OrderedDict()
        self.counts: Counter[str] = Counter()
        if graphs:
            for part in trainer.parts.values():
                make_capturable(part.optimizer)
            self.side = torch.cuda.Stream(trainer.device)
            self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, it: int, *batches: dict) -> dict[str, torch.Tensor]:
        trainer = self.trainer
        key, step = trainer.capture_plan(it)  # the host values of iteration `it`, fixed before it runs
        if self._copy_in(batches):
            names, out = self._run(key, step)
        else:  # another batch shape (not from train.py's loaders): eagerly, on the batches themselves
            on_device = [{k: trainer._to_device(batch[k]) for k in trainer.batch_keys} for batch in batches]
            names, out = self._eager(lambda: _stacked(step(*on_device)))
        trainer._step_schedulers()
        return dict(zip(names, out.clone().unbind()))

    def step_function(self, step: Callable[..., dict[str, torch.Tensor]]) -> tuple[tuple[str, ...], torch.Tensor]:
        """The captured function: the trainer's device step on the static buffers; (loss names, values)."""
        assert self.inputs is not None
        return _stacked(step(*self.inputs))

    def _run(self, key: Key, step: Callable[..., dict[str, torch.Tensor]]) -> tuple[tuple[str, ...], torch.Tensor]:
        if key in self.captured:
            self.captured.move_to_end(key)
            self.counts["replayed"] += 1
            graph, names, out = self.captured[key]
            if graph is None:  # the graph-safe form: the captured function, called
                return self.step_function(step)
            graph.replay()
            return names, out
        seen = self.seen.pop(key, 0)
        if seen < WARMUP:
            self.seen[key] = seen + 1
            while len(self.seen) > SEEN:
                self.seen.popitem(last=False)
            self.counts["eager"] += 1
            return self._eager(lambda: self.step_function(step))
        self.counts["captured"] += 1
        if not self.graphs:
            names, out = self.step_function(step)
            self._keep(key, (None, names, out))
            return names, out
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loaders' pin-memory thread may allocate pinned memory meanwhile, which the default
        # (global) mode turns into a broken capture; the backward's kernels, issued from autograd's thread onto
        # the capturing stream, are captured in either mode. The warm-ups' stream: its kernels' workspaces
        # exist already. No compilation inside a capture (its autotuning reads the host): a graph the
        # warm-ups did not compile stops the capture with dynamo's own error instead of a broken graph.
        with _no_recompiling(), \
                torch.cuda.graph(graph, pool=self.pool, stream=self.side, capture_error_mode="thread_local"):
            names, out = self.step_function(step)
        self._keep(key, (graph, names, out))
        graph.replay()  # capturing recorded the iteration without running it
        return names, out

    def release(self) -> None:
        """Destroy the graphs (after the replays in flight): before the process group goes, since NCCL waits
        for graphs that hold its collectives, and before a failed run's traceback would keep them alive."""
        if self.graphs and self.captured:
            torch.cuda.synchronize(self.trainer.device)
        self.captured.clear()

    def _keep(self, key: Key, entry: tuple[Any, tuple[str, ...], torch.Tensor]) -> None:
        self.captured[key] = entry
        while len(self.captured) > MAX_GRAPHS:
            if self.graphs:  # a graph is destroyed without waiting for its replays in flight
                torch.cuda.synchronize(self.trainer.device)
            self.captured.popitem(last=False)

    def _eager(self, step: Callable[[], tuple[tuple[str, ...], torch.Tensor]]
               ) -> tuple[tuple[str, ...], torch.Tensor]:
        """An iteration run eagerly; on a GPU on a side stream, as warm-ups before a capture want."""
        if not self.graphs:
            return step()
        current = torch.cuda.current_stream(self.trainer.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capturable=True.*running without")  # the warm-ups
            names, out = step()
        current.wait_stream(self.side)
        out.record_stream(current)
        return names, out

    def _copy_in(self, batches: tuple[dict, ...]) -> bool:
        """Copy the batches into the static buffers (made from the first ones); False if their shapes differ."""
        keys = self.trainer.batch_keys
        if self.inputs is None:
            self.inputs = [{k: self.trainer._to_device(batch[k]).clone() for k in keys} for batch in batches]
            return True
        if len(batches) != len(self.inputs) or any(
                buffer[k].shape != batch[k].shape or buffer[k].dtype != batch[k].dtype
                for buffer, batch in zip(self.inputs, batches) for k in keys):
            return False
        for buffer, batch in zip(self.inputs, batches):
            for k in keys:
                buffer[k].copy_(batch[k], non_blocking=True)
        return True


def _no_recompiling() -> Any:
    """torch.compile may not compile (or recompile) inside: torch >= 2.6's fail_on_recompile stance, else
    nothing."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("fail_on_recompile") if set_stance is not None else contextlib.nullcontext()


def _stacked(losses: dict[str, torch.Tensor]) -> tuple[tuple[str, ...], torch.Tensor]:
    """The loss terms as (names, one fp32 tensor): one output buffer for a graph, one copy after it."""
    return tuple(losses), torch.stack([v.float() for v in losses.values()])
