"""Trainers: DG-Net (`DGNet_Trainer`) and the baseline ReID model that becomes its teacher (`BaselineTrainer`).

Each trainer holds a table of named parts, `{name: Part(module, optimizer, scheduler)}` (torchreid's
named sets): saving, loading, LR stepping and train/eval switching go through that one table. DG-Net's
parts are "gen" (E_s, decoder and MLPs: the original's `gen_a`), "dis" (D, `dis_a`) and "id" (E_a and the
ReID heads, `id_a`); the teacher is frozen and kept outside the table. Loss weights (`loss_weights`) and
LR multipliers (`lr_multiplier`) are pure functions of the iteration, so a resumed run continues exactly.

Naming follows the original DG-Net's trainer: x_a, x_b real images with labels l_a, l_b; s = structure code
(E_s, `enc_content`), f = appearance code (E_a); x_ba = G(s_b, f_a) is b's structure in a's appearance,
x_ab = G(s_a, f_b). Every loss term is the original trainer's, at the weights of its warm-up schedules,
with its gradient routing (which loss reaches which network: see `gen_update`).

Deliberate differences from the original (NVlabs/DG-Net trainer.py and train.py), for the README:
- The teacher stays frozen in eval mode (no dropout, BatchNorm running statistics) for the whole run. With
  `train_bn: true` (the default) the original's teacher had its BatchNorms in train mode from construction,
  and slipped into full train mode, dropout too, at the first image dump (its `sample()` ended with
  `self.train()`), so its soft labels came from a stochastic, batch-statistics teacher.
- Loss weights are a pure function of the iteration (`loss_weights`), so they survive a resume (the
  original's ramps restarted at 0). They equal the original's values at every iteration, bit for bit,
  including its order: a ramped term runs if its weight before this iteration's increment is > 0, and is
  weighted in the total by the incremented one.
- LR schedulers step after the optimizers (PyTorch's order); the multiplier used at iteration `it` is the
  original's, which stepped before them (see `lr_multiplier`). The E_a scheduler resumes like the others
  (the original restarted it at 0).
- Frozen-weight passes (identity loss on generated images, structure re-encoding, G's adversarial loss)
  use the live weights through `networks.frozen_call` instead of per-iteration deep copies.
- recon_f (appearance-code reconstruction) is reported at its weight and counted in the reported total,
  but it carries no gradient, exactly as in the original: both codes are detached inside E_a. It is read
  off the frozen E_a pass that the identity loss makes anyway, so it costs nothing extra.
- `f_grad_w` > 0 (not in the original; 0 by default) lets the generation losses reach E_a through f, their
  gradient scaled by f_grad_w: the paper's description rather than the released code. The clean pass then
  needs autograd, and recon_f carries gradient (into the swap, through the frozen E_a).
- The use_encoder_again coin is drawn from torch's CPU generator (the original used Python's `random`,
  seeded to 7 by its random-erasing constructor), so runs reproduce and resume bit for bit on CPU.
- Random erasing happens in the loader. With erasing on, E_a's pass on the clean image only yields the
  (detached) appearance code, the logits coming from the erased view, so it runs without autograd (the
  original built a graph there that nothing used); with erasing_p 0 one pass gives both, as in the original.
- G, E_s and D see the a and b halves in one batched call (none of them has batch-dependent layers at
  the defaults; D is called per half when dis.norm is bn). E_a's BatchNorm statistics depend on the batch,
  so each of the original's E_a calls keeps its own (reIDmodel.sub_batches), but the calls themselves are
  merged: the clean images in one, the erased views in one, both swaps of the frozen pass in one, both
  swaps of the teacher loss in one (4 network passes per iteration instead of 12). Outputs, gradients and
  running statistics are those of separate calls in the original's order; dropout masks are drawn once
  per merged call, so the random stream differs.
- `sample()` runs the display images as one batch in eval mode instead of one at a time: in eval mode no
  layer depends on the batch, so the images are the same.
- Mixed precision is torch.amp (bf16 autocast, or fp16 with a GradScaler) instead of apex O1; the LSGAN
  losses, R1, the L1 terms, cross-entropies and the teacher KL are computed in fp32.
- Teacher styles 2 (hard static) and 3 (uniform) do not need the teacher network, so none is loaded. Under
  mixed precision the frozen teacher's convolution and linear weights are kept in the autocast dtype
  (autocast would cast them at every call to the same values), and both swaps share one teacher call.
- The VGG perceptual loss (vgg_w, off by default, its loader broken in the original) is not implemented.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.profiler import record_function

from networks import build_discriminator, build_generator, dis_loss, frozen_call, gen_adv_loss, remap_gray, to_gray
from reIDmodel import Teacher, build_appearance_encoder, build_teacher, split_norms, sub_batches
from utils import (
    UserError,
    built,
    latest_checkpoint,
    load_checkpoint,
    load_config,
    mismatch_reason,
    saved_config,
)

# Ramped weights: key -> (cap key, warm-up key). Each starts at its config value (the original's name).
RAMPED_WEIGHTS = {
    "recon_s_w": ("max_w", "warm_iter"),
    "recon_f_w": ("max_w", "warm_iter"),
    "recon_x_cyc_w": ("max_cyc_w", "warm_iter"),
    "teacher_w": ("max_teacher_w", "warm_teacher_iter"),
}
FIXED_WEIGHTS = ("gan_w", "recon_x_w", "recon_xp_w", "recon_id_w", "id_w", "pid_w", "B_w", "T_w")
LR_POLICIES = ("multistep", "step", "constant")
SWITCHES = ("auto", "always", "never")  # values of the fast-path keys (resolve_switch)
TEACHER_STYLES = {0: "smooth dynamic", 1: "hard dynamic", 2: "hard static", 3: "uniform", 4: "two-label"}
TEACHER_NETWORK_STYLES = (0, 1, 4)  # the styles that run the teacher network
TRAIN_TEACHER = "python train.py --config configs/teacher/<dataset>.yaml --trainer baseline"
BATCH_KEYS = ("image", "label", "pos", "image_erased", "pos_erased")


def resolve_amp(cfg_amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for config key `amp`: auto (bf16 on CUDA GPUs that support it), bf16, fp16, none."""
    cuda = device.type == "cuda"
    if cfg_amp == "none":
        return None
    if cfg_amp == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    if cfg_amp == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise UserError("amp: bf16 is not supported by this GPU; use amp: fp16 or amp: none")
        return torch.bfloat16
    if cfg_amp == "fp16":
        if not cuda:
            raise UserError(f"amp: fp16 needs a CUDA GPU, the device is {device}; use amp: bf16 or amp: none")
        return torch.float16
    raise UserError(f"amp is {cfg_amp!r}: use auto, bf16, fp16 or none")


# switches whose auto stays off until bench/gpu_run.sh measures them faster on a GPU (its dgnet_captured,
# teacher_default and dgnet_r1_conv steps have not run yet)
UNMEASURED_SWITCHES = ("cuda_graph", "r1_conv")


def resolve_switch(cfg: dict, key: str, device: torch.device) -> bool:
    """A fast-path key (channels_last, fused_optim, cuda_graph, r1_conv): auto is on for CUDA devices only,
    so a CPU run keeps PyTorch's CPU defaults and its results bit for bit (for UNMEASURED_SWITCHES, off
    everywhere for now); always and never force it."""
    value = cfg[key]
    unmeasured = key in UNMEASURED_SWITCHES
    if value not in SWITCHES:
        auto = "never for now" if unmeasured else "on for CUDA GPUs"
        raise UserError(f"{key} is {value!r}: use auto ({auto}), always or never")
    return value == "always" or (value == "auto" and device.type == "cuda" and not unmeasured)


def resolve_compile_backend(cfg: dict) -> str | None:
    """torch.compile's backend for config key `compile_backend`, or None when `compile` is off."""
    if not cfg["compile"]:
        return None
    backend = cfg["compile_backend"]
    known = [name for name in torch._dynamo.list_backends(exclude_tags=()) if "TESTING" not in name]
    if backend not in known:
        raise UserError(f"compile_backend is {backend!r}: use inductor, or one of {', '.join(known)}")
    return backend


def loss_weights(cfg: dict, it: int) -> dict[str, float]:
    """Every loss weight at iteration `it` (completed iterations, 0-based, the original's `iterations`).

    Ramped: ramp(k) = min(cap, init + max(0, k - warm) * warm_scale). The original added warm_scale to each
    ramped weight inside gen_update, after it had used the weight as it stood to decide whether the term
    runs at all and to weight the fine-grained head on real images, and just before it summed the total
    with the incremented weight. So each ramped key holds the weight in the total, ramp(it), and
    `<key>_before` the weight before this iteration's increment, ramp(it - 1), which gates the term: with
    the defaults teacher_w is 0.0005 at iteration 30001 but teacher_w_before is 0, so the teacher term
    starts at 30002; teacher_w reaches its cap 2 at 34000. Fixed weights are read as they are.
    """
    weights = {key: float(cfg[key]) for key in FIXED_WEIGHTS}
    for key in RAMPED_WEIGHTS:
        weights[key], weights[f"{key}_before"] = _ramp(cfg, key, it), _ramp(cfg, key, it - 1)
    # R1's weight: LAMBDA at every D step, or with lazy R1 (dis.r1_every N) N x LAMBDA at every N-th step,
    # the same penalty on average for 1/N of its cost (StyleGAN2's lazy regularization). StyleGAN2 takes the
    # penalty in an extra optimizer step and so scales Adam's lr and betas by N / (N + 1); here it joins the
    # iteration's one D step, which keeps D's number of Adam steps and needs no such adjustment.
    every = cfg["dis"]["r1_every"]
    weights["r1"] = float(cfg["dis"]["LAMBDA"]) * every if it % every == 0 else 0.0
    return weights


def _ramp(cfg: dict, key: str, k: int) -> float:
    """A ramped weight after the original's increments of iterations warm + 1 .. k."""
    cap, warm = RAMPED_WEIGHTS[key]
    steps = _ramp_steps(float(cfg[key]), float(cfg[cap]), float(cfg["warm_scale"]))
    return steps[min(max(0, k - cfg[warm]), len(steps) - 1)]


@functools.lru_cache(maxsize=16)
def _ramp_steps(init: float, cap: float, scale: float) -> tuple[float, ...]:
    """The original's ramp as it computed it: one float addition of `scale` per iteration, then the cap, so
    the weights equal its values bit for bit (init + n * scale differs in the last bits). Ends at the cap:
    about 4,000 values at the defaults."""
    steps = [init]
    while scale > 0 and steps[-1] != cap:
        steps.append(min(cap, steps[-1] + scale))
    return tuple(steps)


def full_weight_iteration(cfg: dict) -> int:
    """The first iteration at which every ramped weight, and the weight that gates its term, has reached its
    cap (34,002 with the defaults, where the teacher term joined at 30,002): from there on every loss term of
    the recipe runs at its full weight, and so does every network call a term needs."""
    last = 0
    for key, (cap, warm) in RAMPED_WEIGHTS.items():
        steps = _ramp_steps(float(cfg[key]), float(cfg[cap]), float(cfg["warm_scale"]))
        last = max(last, cfg[warm] + len(steps))  # `<key>_before`, one iteration behind, at its cap too
    return last


def lr_multiplier(cfg: dict, position: int, gamma: float, warmup: int = 0) -> float:
    """LR multiplier after `position` scheduler steps: multistep decays by `gamma` at step_size, x1.5 and
    x1.75 of it (60000, 90000, 105000 at the defaults), step every step_size, constant never; over the first
    `warmup` steps it is also scaled by a ramp from 0.1 to 1 (1 from step `warmup` on)."""
    policy, size = cfg["lr_policy"], cfg["step_size"]
    ramp = 0.1 + 0.9 * position / warmup if position < warmup else 1.0
    if policy == "multistep":
        milestones = (size, size + size // 2, size + size // 2 + size // 4)
        return ramp * gamma ** sum(position >= m for m in milestones)
    if policy == "step":
        return ramp * gamma ** (position // size)
    return ramp


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, gamma: float, ahead: int,
                    warmup: int = 0) -> LRScheduler | None:
    """A per-iteration scheduler (None for `constant` without warm-up); iteration `it` uses
    lr_multiplier(it + ahead)."""
    if cfg["lr_policy"] not in LR_POLICIES:
        raise UserError(f"lr_policy is {cfg['lr_policy']!r}: use one of {', '.join(LR_POLICIES)}")
    if cfg["lr_policy"] == "constant" and not warmup:
        return None
    if cfg["step_size"] <= 0:
        raise UserError(f"step_size is {cfg['step_size']}: use a positive number of iterations")
    return LambdaLR(optimizer, lambda position: lr_multiplier(cfg, position + ahead, gamma, warmup))


def reid_sgd(backbone: nn.Module, heads: list[nn.Module], cfg: dict, fused: bool = False) -> torch.optim.SGD:
    """SGD with Nesterov momentum 0.9: lr2 for the backbone, 10 x lr2 for the classifier heads.

    The groups are named, which `learning_rates` uses ("id" and "id_heads"). fused: the multi-tensor
    (foreach) update, a few launches for all parameters instead of several per parameter; otherwise the
    per-parameter loop (PyTorch's CPU default, and the original's).
    """
    head_params = [p for head in heads for p in head.parameters()]
    return torch.optim.SGD([{"params": list(backbone.parameters()), "name": "backbone"},
                            {"params": head_params, "lr": 10 * cfg["lr2"], "name": "heads"}],
                           lr=cfg["lr2"], momentum=0.9, nesterov=True, weight_decay=cfg["weight_decay"],
                           foreach=fused)


def _adam(module: nn.Module, lr: float, cfg: dict, fused: bool = False) -> torch.optim.Adam:
    # Adam with L2 weight decay (not AdamW), as the original. fused: one kernel for every parameter's
    # update; otherwise the per-parameter loop (PyTorch's CPU default).
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(cfg["beta1"], cfg["beta2"]),
                            weight_decay=cfg["weight_decay"], foreach=False if not fused else None,
                            fused=True if fused else None)


def _l1(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in fp32; the target carries no gradient (the original's recon_criterion)."""
    return (x.float() - target.detach().float()).abs().mean()


def _ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al.) on Euclidean distances, in fp32.

    For each anchor: its farthest same-label sample (another one, not itself) and its nearest other-label
    sample; loss = mean over anchors of max(0, d_ap - d_an + margin), or the soft margin softplus(d_ap - d_an)
    when margin is 0. Anchors without a positive or without a negative in the batch are left out.
    """
    x = features.float()
    sq = x.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    self_pair = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~self_pair, ~same
    d_ap = dist.masked_fill(~positive, float("-inf")).amax(1)
    d_an = dist.masked_fill(~negative, float("inf")).amin(1)
    valid = positive.any(1) & negative.any(1)
    # Masked rather than indexed, and no `if valid.any()`: either would wait for the GPU at every step. With
    # no valid anchor the result is a zero that still belongs to the graph, so one backward always works.
    gap = torch.where(valid, d_ap - d_an, torch.zeros_like(d_ap))
    per_anchor = F.softplus(gap) if margin == 0 else F.relu(gap + margin)
    return (per_anchor * valid).sum() / valid.sum().clamp_min(1)


class MethodCall(nn.Module):
    """`forward(method, *args)` calls `module.method(*args)`.

    DDP synchronizes gradients of what runs through `forward`, and G is used through `encode` and `decode`
    (the teacher's trainer through `pooled_logits`): this routes those calls through a forward.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, method: str, *args: Any) -> Any:
        return getattr(self.module, method)(*args)


@dataclass
class Part:
    """One trained network with its optimizer and (per-iteration) LR scheduler."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None


class _PartsTrainer:
    """What both trainers share: the parts table, mixed precision, the fast path, one optimizer-step
    helper, state.

    The fast path (configs/defaults.yaml, "optimization"; bench/train_bench.py measures it): channels_last
    weights and images (tensor cores read NHWC without transposes), fused Adam and foreach SGD, cuDNN
    autotuning and, when `compile` is true, torch.compile of G and E_a (D stays eager: R1's double backward
    does not go through compiled graphs). Modules are converted and compiled in place, before `distribute`
    wraps them in DDP, so state-dict keys do not change. At their defaults the keys change nothing on CPU.
    """

    parts: dict[str, Part]
    batch_keys: tuple[str, ...]  # what a step reads of each loader's batch (capture.py copies these in)
    # the process group's Dist when the step averages its own gradients (`distribute(dist, in_step=True)`);
    # None: one process, or DDP's hooks do it
    in_step_sync: Any = None

    def __init__(self, cfg: dict, device: torch.device):
        self.cfg, self.device = cfg, device
        self.amp_dtype = resolve_amp(cfg["amp"], device)
        # fp16 needs loss scaling; one scaler serves every backward of an iteration (bf16 and fp32 need none)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.channels_last = resolve_switch(cfg, "channels_last", device)
        self.fused_optim = resolve_switch(cfg, "fused_optim", device)
        self.compile_backend = resolve_compile_backend(cfg)
        if device.type == "cuda" and cfg["cudnn_benchmark"]:
            # the input sizes never change during training: autotune each convolution once (as the original)
            torch.backends.cudnn.benchmark = True

    def _compile(self, *modules: nn.Module) -> None:
        """torch.compile `modules` in place with `compile_backend`, when `compile` is true."""
        if self.compile_backend is not None:
            for module in modules:
                module.compile(backend=self.compile_backend)

    def _layout(self, module: nn.Module) -> nn.Module:
        """`module` in the trainer's memory format (in place: the parameter objects stay the same)."""
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A batch tensor on the device; images in channels_last when the weights are."""
        if self.channels_last and t.dim() == 4:
            return t.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return t.to(self.device, non_blocking=True)

    def _match_optimizer_layout(self) -> None:
        """Optimizer state loaded from a checkpoint takes its parameter's memory format (a checkpoint
        written in channels_last can be resumed without it, and back); fused updates want equal strides."""
        for part in self.parts.values():
            for p, state in part.optimizer.state.items():
                for key, value in state.items():
                    if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                        state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    def _autocast(self) -> AbstractContextManager:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _step(self, loss: torch.Tensor, names: tuple[str, ...]) -> None:
        """Backward `loss` and step the optimizers of the named parts (their gradients were zeroed)."""
        optimizers = [self.parts[name].optimizer for name in names]
        with record_function("backward"):  # profiler labels (bench/train_bench.py --bench profile)
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if self.in_step_sync is not None:
            self.in_step_sync.average_gradients([p for opt in optimizers for group in opt.param_groups
                                                 for p in group["params"]])
        with record_function("optimizer_step"):
            if self.scaler is None:
                for opt in optimizers:
                    opt.step()
                return
            for opt in optimizers:
                # GradScaler refuses an optimizer whose parameters received no gradient at all
                if any(p.grad is not None for group in opt.param_groups for p in group["params"]):
                    self.scaler.step(opt)
            self.scaler.update()

    def _zero_grad(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.parts[name].optimizer.zero_grad(set_to_none=True)

    def _step_schedulers(self) -> None:
        for part in self.parts.values():
            if part.scheduler is not None:
                part.scheduler.step()

    def _wrapper(self, dist: Any, in_step: bool) -> Callable[[nn.Module], nn.Module]:
        """How `distribute` readies each network: DDP (`dist.wrap`), or with `in_step` the bare network
        (`dist.share`) whose gradients `_step` averages: a captured step (capture.py) cannot replay DDP's
        backward hooks, but it can replay an all-reduce it issues itself."""
        if not in_step:
            return dist.wrap
        self.in_step_sync = dist if dist.enabled else None
        return dist.share

    def _sync_bn(self, module: nn.Module, dist: Any) -> None:
        """`sync_bn: true` in a process group: BatchNorm statistics over the global batch (small per-GPU
        batches). The converted layers keep the same parameter objects, so the optimizers still hold them."""
        if not self.cfg["sync_bn"] or dist.world_size == 1:
            return
        if dist.device.type != "cuda":
            raise UserError("sync_bn: true needs GPUs (SyncBatchNorm runs on CUDA); set sync_bn: false for a "
                            "CPU run")
        nn.SyncBatchNorm.convert_sync_batchnorm(module)

    def _modules(self) -> Iterator[nn.Module]:
        for part in self.parts.values():
            yield from part.module.modules()

    def train(self) -> None:
        for part in self.parts.values():
            part.module.train()

    def eval(self) -> None:
        for part in self.parts.values():
            part.module.eval()

    def learning_rates(self) -> dict[str, float]:
        """Current LR of every parameter group: `<part>` for the first, `<part>_<group name>` for the rest."""
        rates = {}
        for name, part in self.parts.items():
            for i, group in enumerate(part.optimizer.param_groups):
                rates[name if i == 0 else f"{name}_{group['name']}"] = group["lr"]
        return rates

    def state_dict(self) -> dict:
        """Models, optimizers, schedulers and the fp16 scaler: tensors and plain containers only."""
        return {
            "models": {name: part.module.state_dict() for name, part in self.parts.items()},
            "optimizers": {name: part.optimizer.state_dict() for name, part in self.parts.items()},
            "schedulers": {name: part.scheduler.state_dict() if part.scheduler is not None else None
                           for name, part in self.parts.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.parts) - set(state["models"]))
        if missing:
            raise UserError(f"the checkpoint has no {', '.join(missing)} network: it was written by another "
                            "trainer (--trainer)")
        for name, part in self.parts.items():
            # Adam's `capturable` is how this process steps (capture.py sets it), not part of the run: a
            # checkpoint of a captured run resumes eagerly, and on the CPU
            built = [group.get("capturable") for group in part.optimizer.param_groups]
            try:
                part.module.load_state_dict(state["models"][name])
                part.optimizer.load_state_dict(state["optimizers"][name])
                for group, capturable in zip(part.optimizer.param_groups, built):
                    if capturable is not None:
                        group["capturable"] = capturable
            except (RuntimeError, ValueError) as err:
                raise UserError(f"the checkpoint's {name} network does not fit this config "
                                f"({mismatch_reason(err)}): resume with the run's own config.yaml and data") from None
            if part.scheduler is not None and state["schedulers"].get(name) is not None:
                part.scheduler.load_state_dict(state["schedulers"][name])
        self._match_optimizer_layout()
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


    def optimizer_settings(self) -> dict[str, list[dict[str, Any]]]:
        """The config's optimizer settings per part and parameter group (base LR, betas, weight decay), read
        off the optimizers as built; call before `load_state_dict`, then `apply_optimizer_settings`."""
        return {name: [{k: group[k] for k in OPTIMIZER_SETTINGS if k in group} | {"lr": base_lr(group)}
                       for group in part.optimizer.param_groups] for name, part in self.parts.items()}

    def apply_optimizer_settings(self, settings: dict[str, list[dict[str, Any]]]) -> list[str]:
        """Give the restored optimizers the config's settings where they differ (a resume with --opts lr_g=...),
        with each LR at the schedule's current multiplier. Returns what changed, e.g. "gen lr 0.0001 -> 5e-05".
        Nothing is touched when the config is the checkpoint's, so a plain resume stays exact."""
        changed = []
        for name, part in self.parts.items():
            scheduler = part.scheduler
            for i, (group, want) in enumerate(zip(part.optimizer.param_groups, settings[name])):
                label = name if i == 0 else f"{name}_{group.get('name', i)}"
                for key, value in want.items():
                    if key != "lr" and _differs(group[key], value):
                        changed.append(f"{label} {key} {group[key]} -> {value}")
                        group[key] = value
                if _differs(base_lr(group), want["lr"]):
                    changed.append(f"{label} base lr {base_lr(group):g} -> {want['lr']:g}")
                    group["initial_lr" if "initial_lr" in group else "lr"] = want["lr"]
                if scheduler is not None:
                    scheduler.base_lrs[i] = group["initial_lr"]
                    current = group["initial_lr"] * scheduler.lr_lambdas[i](scheduler.last_epoch)
                    if _differs(group["lr"], current):  # a new base LR, step_size or gamma
                        group["lr"] = current
        return changed


OPTIMIZER_SETTINGS = ("betas", "weight_decay")


def base_lr(group: dict[str, Any]) -> float:
    """A parameter group's LR before the schedule's multiplier."""
    return group.get("initial_lr", group["lr"])


def _differs(a: Any, b: Any) -> bool:
    return (tuple(a) != tuple(b)) if isinstance(a, (tuple, list)) else a != b


@dataclass
class Forward:
    """The shared forward pass of one iteration [the original's `forward`], used by both updates.

    Labels l_a, l_b; codes s_a, s_b (E_s) and f_a, f_b (E_a, detached); generated images; ReID logits of
    the erased real views: (primary, fine-grained) for the images, primary only for the positives. A field
    is None when no term needs it at this iteration's weights.
    """

    x_a: torch.Tensor
    x_b: torch.Tensor
    l_a: torch.Tensor
    l_b: torch.Tensor
    s_a: torch.Tensor
    s_b: torch.Tensor
    f_a: torch.Tensor
    f_b: torch.Tensor
    x_ab: torch.Tensor
    x_ba: torch.Tensor
    x_a_recon: torch.Tensor | None
    x_b_recon: torch.Tensor | None
    x_a_recon_p: torch.Tensor | None
    x_b_recon_p: torch.Tensor | None
    logits_a: tuple[torch.Tensor, torch.Tensor] | None
    logits_b: tuple[torch.Tensor, torch.Tensor] | None
    logits_pos_a: torch.Tensor | None
    logits_pos_b: torch.Tensor | None


class DGNet_Trainer(_PartsTrainer):  # the original's class name, which users look for
    """DG-Net's joint training: one D step, then one joint step of G (Adam) and E_a (SGD) per iteration."""

    LOSS_KEYS = ("D", "R1", "gan", "x", "xp", "s", "f", "cyc", "recon_id", "id", "pid", "teacher", "total")
    batch_keys = BATCH_KEYS

    def __init__(self, cfg: dict, num_classes: int, device: torch.device, teacher: nn.Module | None = None):
        super().__init__(cfg, device)
        if cfg["teacher_style"] not in TEACHER_STYLES:
            styles = ", ".join(f"{k} ({v})" for k, v in TEACHER_STYLES.items())
            raise UserError(f"teacher_style is {cfg['teacher_style']}: use one of {styles}")
        if not 0 <= cfg["structure_jitter"] <= 1 or (cfg["structure_jitter"] > 0 and cfg["input_dim_a"] != 1):
            raise UserError(f"structure_jitter is {cfg['structure_jitter']}: use a probability in [0, 1], and only "
                            "with input_dim_a: 1 (it remaps the grey image E_s sees)")
        every = cfg["dis"]["r1_every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UserError(f"dis.r1_every is {every!r}: use a whole number of D steps, 1 or more (1 = R1 every step)")
        self.r1_conv = resolve_switch(cfg, "r1_conv", device)
        self.num_classes = num_classes
        gen = self._layout(built(build_generator, cfg).to(device))
        dis = self._layout(built(build_discriminator, cfg).to(device))
        id_ = self._layout(built(build_appearance_encoder, cfg, num_classes).to(device))
        fused = self.fused_optim
        opt_gen, opt_dis = _adam(gen, cfg["lr_g"], cfg, fused), _adam(dis, cfg["lr_d"], cfg, fused)
        opt_id = reid_sgd(id_.model, [id_.classifier1, id_.classifier2], cfg, fused)
        # The original stepped its schedulers *before* the optimizers, from a scheduler built at position 0,
        # so iteration `it` ran at position it + 1: the first decay hit iteration step_size - 1 (0-based),
        # not step_size. Ours step after the optimizers (position `it` during iteration `it`); `ahead=1`
        # keeps the original's LR at every iteration.
        self.parts = {
            "gen": Part(gen, opt_gen, build_scheduler(opt_gen, cfg, cfg["gamma"], ahead=1)),
            "dis": Part(dis, opt_dis, build_scheduler(opt_dis, cfg, cfg["gamma"], ahead=1)),
            "id": Part(id_, opt_id, build_scheduler(opt_id, cfg, cfg["gamma2"], ahead=1)),
        }
        self.gen_a, self.dis_a, self.id_a = gen, dis, id_  # the original's names for the same objects
        # The networks as training calls them: DDP wrappers after `distribute`, else these same modules.
        self.run_gen: nn.Module = MethodCall(gen)
        self.run_dis: nn.Module = dis
        self.run_id: nn.Module = id_
        self.id_norms = split_norms(id_)  # E_a's BatchNorms for `_id_calls` (None: the calls stay separate)
        # D without batch-dependent layers scores the a and b halves in one call
        self.dis_batched = cfg["dis"]["norm"] != "bn"
        if teacher is None and self.needs_teacher(cfg):
            try:
                teacher = load_teacher(cfg["teacher"], num_classes, device, scale2=cfg["scale2"])
            except TeacherClassMismatch as err:
                if not cfg["val_ids"]:
                    raise
                raise UserError(f"{err} (val_ids {cfg['val_ids']} holds identities out of this run's training "
                                f"split: the teacher must hold out the same ones, trained with val_ids: "
                                f"{cfg['val_ids']} and seed: {cfg['seed']})") from None
        if teacher is not None:
            teacher = self._layout(teacher.to(device).eval().requires_grad_(False))
        if teacher is not None and self.amp_dtype is not None:
            # Frozen, so its convolution and linear weights are cast to the autocast dtype once, here, rather
            # than by autocast at every call: the same values, fewer operators per iteration.
            for m in teacher.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.to(self.amp_dtype)
        self.teacher = teacher  # outside `parts`: never saved, stepped or switched to train mode
        # In place, before DDP wraps them: G through the one call that serves encode and decode (the frozen
        # re-encoding and `sample` use the bare G, eager); E_a whole, which its frozen calls also use; the
        # teacher. D stays eager: R1 needs a double backward.
        self._compile(self.run_gen, id_, *([teacher] if teacher is not None else []))

    def distribute(self, dist: Any, in_step: bool = False) -> None:
        """Wrap G, D and E_a for DDP (`distributed.Dist.wrap`; nothing changes in a single process), or with
        `in_step` (a captured step) leave them bare and average their gradients in the step.

        Call once, after a checkpoint was loaded. The frozen-weight passes keep using the bare modules.
        """
        self._sync_bn(self.id_a, dist)
        self.id_norms = split_norms(self.id_a)  # SyncBatchNorm cannot split a batch
        wrap = self._wrapper(dist, in_step)
        self.run_gen = wrap(self.run_gen)  # the MethodCall of __init__ (compiled when `compile` is on)
        self.run_dis = wrap(self.dis_a)
        self.run_id = wrap(self.id_a)

    @staticmethod
    def needs_teacher(cfg: dict) -> bool:
        """Whether the teacher network can ever run: the teacher KL is on at some iteration and the soft
        labels come from the teacher (styles 0, 1, 4)."""
        teacher_on = cfg["max_teacher_w"] > 0 or cfg["teacher_w"] > 0
        return teacher_on and cfg["T_w"] > 0 and cfg["teacher_style"] in TEACHER_NETWORK_STYLES

    # ---------------------------------------------------------------------------------------------------
    # one iteration

    def train_step(self, it: int, batch_a: dict, batch_b: dict) -> dict[str, torch.Tensor]:
        """Iteration `it`: forward, D step, joint G + E_a step, LR step. Returns the weighted loss terms."""
        w = loss_weights(self.cfg, it)
        a = {k: self._to_device(batch_a[k]) for k in BATCH_KEYS}
        b = {k: self._to_device(batch_b[k]) for k in BATCH_KEYS}
        losses = self.device_step(a, b, w)
        self._step_schedulers()
        return losses

    def capture_plan(self, it: int) -> tuple[tuple[Any, ...], Callable[..., dict[str, torch.Tensor]]]:
        """Iteration `it` for capture.py: the host values a CUDA graph bakes in (the loss weights, which also
        decide which terms run; the coin, drawn now; the learning rates) as the graph's key, and the device
        step on batches a, b (`batch_keys`) that they fix."""
        w = loss_weights(self.cfg, it)
        coin = self.draw_coin() if self.reencodes(w) else None  # on the host, as the eager step draws it
        if coin is not None and self.in_step_sync is not None:
            # Every rank must replay the same graph (its all-reduces are collectives): rank 0's coin, where
            # eager DDP runs each rank's own. Every rank still draws, so its random stream moves as before.
            coin = bool(self.in_step_sync.main_value(int(coin)))
        key = (tuple(w.items()), coin, tuple(self.learning_rates().values()))
        return key, lambda a, b: self.device_step(a, b, w, coin)

    def device_step(self, a: dict, b: dict, w: dict[str, float], coin: bool | None = None
                    ) -> dict[str, torch.Tensor]:
        """The iteration's work on the device: forward, D step, joint G + E_a step (no LR step), on batches
        already there. capture.py records exactly this in a CUDA graph. `coin`: the use_encoder_again
        outcome when the caller drew it before the iteration (`draw_coin`); None draws it where the
        structure is re-encoded."""
        fw = self.forward(a, b, w)
        losses = self.dis_update(fw.x_ab, fw.x_ba, fw.x_a, fw.x_b, w)
        losses.update(self.gen_update(fw, w, coin))
        return losses

    @staticmethod
    def reencodes(w: dict[str, float]) -> bool:
        """Whether an iteration at weights `w` re-encodes the swaps' structure, and so draws the coin: a
        ramped term runs if its weight before this iteration's increment is > 0 (loss_weights)."""
        return w["recon_s_w_before"] > 0 or w["recon_x_cyc_w_before"] > 0

    def draw_coin(self) -> bool:
        """use_encoder_again's coin, from torch's CPU generator: reproducible, and part of a checkpoint's RNG
        state. True: the live E_s re-encodes the detached swaps (see `_reencode_structure`)."""
        return float(torch.rand(())) < self.cfg["use_encoder_again"]

    @record_function("DGNet.forward")
    def forward(self, a: dict, b: dict, w: dict[str, float]) -> Forward:
        """Codes, swaps, reconstructions and ReID logits of real images [the original's `forward`]."""
        with self._autocast():
            s_a, s_b = self.run_gen("encode", self._structure_input(torch.cat([a["image"], b["image"]]))).chunk(2)
            # per real batch: (image, erased view, whether its logits are needed), in the original's order
            reals = {"a": (a["image"], a["image_erased"], w["id_w"] > 0),
                     "b": (b["image"], b["image_erased"], w["id_w"] > 0)}
            if w["recon_xp_w"] > 0 or w["pid_w"] > 0:
                reals.update(pos_a=(a["pos"], a["pos_erased"], w["pid_w"] > 0),
                             pos_b=(b["pos"], b["pos_erased"], w["pid_w"] > 0))
            f, logits = self._encode_reals(reals)
            jobs = {"x_ba": (s_b, f["a"]), "x_ab": (s_a, f["b"])}
            if w["recon_x_w"] > 0:
                jobs.update(x_a_recon=(s_a, f["a"]), x_b_recon=(s_b, f["b"]))
            if w["recon_xp_w"] > 0:
                jobs.update(x_a_recon_p=(s_a, f["pos_a"]), x_b_recon_p=(s_b, f["pos_b"]))
            # one decoder call for every image: the decoder has no batch-dependent layer
            s_all = torch.cat([s for s, _ in jobs.values()])
            f_all = torch.cat([f for _, f in jobs.values()])
            images = dict(zip(jobs, self.run_gen("decode", s_all, f_all).chunk(len(jobs))))
        return Forward(x_a=a["image"], x_b=b["image"], l_a=a["label"], l_b=b["label"], s_a=s_a, s_b=s_b,
                       f_a=f["a"], f_b=f["b"], x_ab=images["x_ab"], x_ba=images["x_ba"],
                       x_a_recon=images.get("x_a_recon"), x_b_recon=images.get("x_b_recon"),
                       x_a_recon_p=images.get("x_a_recon_p"), x_b_recon_p=images.get("x_b_recon_p"),
                       logits_a=logits.get("a"), logits_b=logits.get("b"),
                       logits_pos_a=logits["pos_a"][0] if "pos_a" in logits else None,
                       logits_pos_b=logits["pos_b"][0] if "pos_b" in logits else None)

    def _structure_input(self, real: torch.Tensor) -> torch.Tensor:
        """What E_s sees of the real images: the images (E_s takes their grey mean), or with
        `structure_jitter` their grey images, some with a random intensity curve (networks.remap_gray)."""
        if self.cfg["structure_jitter"] == 0:
            return real
        return remap_gray(to_gray(real), self.cfg["structure_jitter"])

    def _encode_reals(self, reals: dict[str, tuple[torch.Tensor, torch.Tensor, bool]]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """E_a on real batches {name: (image, erased view, logits wanted)}: the appearance codes of the clean
        images and the logits of the erased views that are wanted, as ({name: f}, {name: (p1, p2)}).

        As in the original, E_a sees every clean image first, then the erased views (its iteration order): two
        calls, each over all its batches (`_id_calls`). The codes are detached inside E_a, so the clean pass
        needs no autograd graph (unless `f_grad_w` lets them carry gradient). With erasing_p 0 the erased view
        is the image: one pass gives both.
        """
        one_pass = self.cfg["erasing_p"] == 0
        clean = [name for name, (_, _, wanted) in reals.items() if not (one_pass and wanted)]
        erased = [name for name, (_, _, wanted) in reals.items() if wanted]
        codes, logits = {}, {}
        with torch.set_grad_enabled(self.cfg["f_grad_w"] > 0 and torch.is_grad_enabled()):
            for name, (f, _, _) in zip(clean, self._id_calls([reals[name][0] for name in clean])):
                codes[name] = f
        for name, (f, p1, p2) in zip(erased, self._id_calls([reals[name][0 if one_pass else 1] for name in erased])):
            logits[name] = (p1, p2)
            if one_pass:
                codes[name] = f
        return codes, logits

    def _id_calls(self, batches: list[torch.Tensor], frozen: bool = False
                  ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """E_a's (f, logits1, logits2) on each batch, as separate calls in this order would give them, in one
        call on the concatenation: each batch is normalized by its own BatchNorm statistics, which move the
        running statistics in turn (reIDmodel.sub_batches). One network pass instead of one per batch: on a
        GPU, DG-Net's pace is set by the number of operators launched (BENCHMARKS.md). Where E_a's
        BatchNorms cannot split a batch (SyncBatchNorm), the calls stay separate.

        frozen: E_a's live weights with gradients stopped at them, BatchNorm per `train_bn` (frozen_call).
        """
        if frozen:
            def call(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                return frozen_call(self.id_a, x, train_bn=self.cfg["train_bn"])
        else:
            call = self.run_id
        if not batches:
            return []
        if len(batches) == 1 or self.id_norms is None:
            return [call(x) for x in batches]
        sizes = [len(x) for x in batches]
        with sub_batches(self.id_norms, sizes):
            outputs = call(torch.cat(batches))
        return list(zip(*(t.split(sizes) for t in outputs)))

    def _dis_pairs(self, fakes: list[torch.Tensor], reals: list[torch.Tensor],
                   r1_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over (fake, real) pairs of D's loss and its R1 part, fp32 (networks.dis_loss)."""
        gan_type = self.cfg["dis"]["gan_type"]
        if self.dis_batched:
            # the losses are batch means: one call on equal halves is the mean of the two, hence the factor
            loss, r1 = dis_loss(self.run_dis, torch.cat(fakes), torch.cat(reals), gan_type, r1_weight, self.r1_conv)
            return len(fakes) * loss, len(fakes) * r1
        pairs = [dis_loss(self.run_dis, fake, real, gan_type, r1_weight, self.r1_conv)
                 for fake, real in zip(fakes, reals)]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def _adv(self, fakes: list[torch.Tensor]) -> torch.Tensor:
        """G's adversarial loss summed over halves, through D's frozen weights (networks.gen_adv_loss)."""
        gan_type = self.cfg["dis"]["gan_type"]
        if self.dis_batched:
            return len(fakes) * gen_adv_loss(self.dis_a, torch.cat(fakes), gan_type)
        return sum(gen_adv_loss(self.dis_a, fake, gan_type) for fake in fakes)

    @record_function("DGNet.dis_update")
    def dis_update(self, x_ab: torch.Tensor, x_ba: torch.Tensor, x_a: torch.Tensor, x_b: torch.Tensor,
                   w: dict[str, float]) -> dict[str, torch.Tensor]:
        """D step: gan_w * [D(x_ba vs x_a) + D(x_ab vs x_b)], LSGAN on every scale plus R1 on the reals
        at weight w["r1"] (0 on the steps that lazy R1 skips).

        The generated images are detached (inside dis_loss): only D learns here.
        """
        zero = torch.zeros((), device=self.device)
        if w["gan_w"] <= 0:
            return {"D": zero, "R1": zero}
        self._zero_grad(("dis",))
        with self._autocast():
            loss, r1 = self._dis_pairs([x_ba, x_ab], [x_a, x_b], w["r1"])
        loss, r1 = w["gan_w"] * loss, w["gan_w"] * r1
        self._step(loss, ("dis",))
        return {"D": loss.detach(), "R1": r1.detach()}

    @record_function("DGNet.gen_update")
    def gen_update(self, fw: Forward, w: dict[str, float], coin: bool | None = None) -> dict[str, torch.Tensor]:
        """Joint step of G (Adam) and E_a (SGD) on every generator and ReID loss, one backward.

        The adversarial term uses the D just updated by `dis_update`. Gradient routing (the original's):
        reconstructions, the adversarial and the identity loss on generated images reach G and E_s only
        (f is detached, E_a runs frozen on generated images); the ReID losses on real images, the teacher
        KL and the fine-grained loss on detached generated images reach E_a only. With `f_grad_w` > 0 (not
        in the original) f is not detached: every term that decodes f also reaches E_a's backbone through f,
        scaled by f_grad_w, and the codes that the frozen E_a reads from the swaps (recon_f, the cycle) pass
        their gradient on to the swaps. `coin`: see `device_step`.
        """
        zero = torch.zeros((), device=self.device)
        losses = dict.fromkeys(("gan", "x", "xp", "s", "f", "cyc", "recon_id", "id", "pid", "teacher"), zero)
        self._zero_grad(("gen", "id"))
        with self._autocast():
            if w["gan_w"] > 0:
                losses["gan"] = w["gan_w"] * self._adv([fw.x_ba, fw.x_ab])
            if w["recon_x_w"] > 0:
                losses["x"] = w["recon_x_w"] * (_l1(fw.x_a_recon, fw.x_a) + _l1(fw.x_b_recon, fw.x_b))
            if w["recon_xp_w"] > 0:
                losses["xp"] = w["recon_xp_w"] * (_l1(fw.x_a_recon_p, fw.x_a) + _l1(fw.x_b_recon_p, fw.x_b))

            # a ramped term runs if its weight before this iteration's increment is > 0 (loss_weights)
            cyc_on = w["recon_x_cyc_w_before"] > 0
            if self.reencodes(w):
                s_a_recon, s_b_recon = self._reencode_structure(fw.x_ab, fw.x_ba, coin)
                if w["recon_s_w_before"] > 0:
                    losses["s"] = w["recon_s_w"] * (_l1(s_a_recon, fw.s_a) + _l1(s_b_recon, fw.s_b))

            # E_a with frozen weights on the generated images [the original's per-iteration copy of id_a]:
            # the identity loss (appearance provider's label), and the codes for recon_f and the cycle.
            if w["recon_id_w"] > 0 or w["recon_f_w_before"] > 0 or cyc_on:
                # a graph for the identity loss, or for the codes when they carry gradient (f_grad_w)
                live = w["recon_id_w"] > 0 or self.cfg["f_grad_w"] > 0
                with torch.set_grad_enabled(live and torch.is_grad_enabled()):
                    (f_a_recon, p_ba, _), (f_b_recon, p_ab, _) = self._id_calls([fw.x_ba, fw.x_ab], frozen=True)
                if w["recon_id_w"] > 0:
                    losses["recon_id"] = w["recon_id_w"] * (_ce(p_ba, fw.l_a) + _ce(p_ab, fw.l_b))
                if w["recon_f_w_before"] > 0:  # with f_grad_w 0 both codes are detached: no gradient (module doc)
                    losses["f"] = w["recon_f_w"] * (_l1(f_a_recon, fw.f_a) + _l1(f_b_recon, fw.f_b))
                if cyc_on:  # x_aba = G(E_s(x_ab), E_a(x_ba)), x_bab = G(E_s(x_ba), E_a(x_ab))
                    x_aba, x_bab = self.run_gen("decode", torch.cat([s_a_recon, s_b_recon]),
                                                torch.cat([f_a_recon, f_b_recon])).chunk(2)
                    losses["cyc"] = w["recon_x_cyc_w"] * (_l1(x_aba, fw.x_a) + _l1(x_bab, fw.x_b))

            if w["id_w"] > 0:
                (p1_a, p2_a), (p1_b, p2_b) = fw.logits_a, fw.logits_b
                ident = _ce(p1_a, fw.l_a) + _ce(p1_b, fw.l_b)
                # The fine-grained head on real images follows the teacher ramp. At weight 0 the term is still
                # there, as in the original: classifier2 gets zero gradients, so SGD's weight decay and momentum
                # act on it during the warm-up, and every E_a parameter has a gradient at every iteration
                # (what DDP without find_unused_parameters needs). Its weight is the teacher's before this
                # iteration's increment, as the original computed it.
                fine_w = w["teacher_w_before"] * w["B_w"]
                ident = ident + fine_w * (_ce(p2_a, fw.l_a) + _ce(p2_b, fw.l_b))
                losses["id"] = w["id_w"] * ident
            if w["pid_w"] > 0:
                losses["pid"] = w["pid_w"] * (_ce(fw.logits_pos_a, fw.l_a) + _ce(fw.logits_pos_b, fw.l_b))
            if w["teacher_w_before"] > 0 and (w["T_w"] > 0 or w["B_w"] > 0):
                losses["teacher"] = w["teacher_w"] * self._teacher_loss(fw, w)

        total = sum(losses.values())
        if total.requires_grad:
            self._step(total, ("gen", "id"))
        losses["total"] = total
        return {k: v.detach() for k, v in losses.items()}

    def _reencode_structure(self, x_ab: torch.Tensor, x_ba: torch.Tensor, coin: bool | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(E_s(x_ab), E_s(x_ba)) = (s_a_recon, s_b_recon) on one of the original's two paths.

        With probability use_encoder_again: the live E_s on the detached swaps (only E_s learns). Otherwise
        E_s with frozen weights on the swaps themselves: the gradient flows into the swaps and from there
        into the decoder, the MLPs and E_s through the s that made them. The coin (`draw_coin`) is drawn
        here unless the caller drew it before the iteration.
        """
        swaps = torch.cat([x_ab, x_ba])
        if self.draw_coin() if coin is None else coin:
            s = self.run_gen("encode", swaps.detach())
        else:
            s = frozen_call(self.gen_a.enc_content, swaps)
        return s.chunk(2)

    def _teacher_loss(self, fw: Forward, w: dict[str, float]) -> torch.Tensor:
        """T_w * KL(teacher || E_a) + B_w * fine-grained CE, on both detached swaps; it trains E_a only.

        KL: the live E_a's primary head against the soft labels, summed over classes, averaged over the
        batch, temperature 1. Fine-grained: the secondary head against the *structure* provider's label.
        """
        loss = torch.zeros((), device=self.device)
        # x_ba has a's appearance and b's structure; x_ab the reverse
        swaps = [fw.x_ba.detach(), fw.x_ab.detach()]
        appearance, structure = [fw.l_a, fw.l_b], [fw.l_b, fw.l_a]
        outputs = self._id_calls(swaps)  # live E_a in train mode, each swap with its own BatchNorm statistics
        if w["T_w"] > 0:  # one teacher call for both swaps: it is in eval mode, so nothing depends on the batch
            targets = self.soft_labels(torch.cat(swaps), torch.cat(appearance), torch.cat(structure)).chunk(2)
        for k, (_, p1, p2) in enumerate(outputs):
            if w["T_w"] > 0:
                kl = F.kl_div(F.log_softmax(p1.float(), dim=1), targets[k], reduction="batchmean")
                loss = loss + w["T_w"] * kl
            if w["B_w"] > 0:
                loss = loss + w["B_w"] * _ce(p2, structure[k])
        return loss

    @torch.no_grad()
    def soft_labels(self, x: torch.Tensor, appearance: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
        """Teacher targets for generated images x (B, num_classes), by teacher_style [predict_label].

        0: mean of the teacher's softmax on x and on its mirror; 1: one-hot of its argmax; 2: one-hot of the
        appearance label; 3: uniform; 4: style 0 restricted to the appearance and structure labels.
        """
        style, n = self.cfg["teacher_style"], self.num_classes
        if style == 2:
            return F.one_hot(appearance, n).float()
        if style == 3:
            return torch.full((len(x), n), 1.0 / n, device=x.device)
        if self.teacher is None:
            raise UserError(f"teacher_style {style} needs a teacher: set `teacher:` to a trained one "
                            f"({TRAIN_TEACHER})")
        # the teacher is in eval mode, so the image and its mirror can share one call
        with self._autocast():  # its matrix weights may be in the autocast dtype (see __init__)
            logits = self.teacher(torch.cat([x, x.flip(3)])).float()
        probs = F.softmax(logits, dim=1).view(2, len(x), -1).mean(0)
        if style == 1:
            return F.one_hot(probs.argmax(1), n).float()
        if style == 4:
            mask = (F.one_hot(appearance, n) + F.one_hot(structure, n)).clamp_max(1)
            probs = probs * mask
            return probs / probs.sum(1, keepdim=True).clamp_min(1e-12)
        return probs

    # ---------------------------------------------------------------------------------------------------
    # images

    @torch.no_grad()
    def sample(self, x_a: torch.Tensor, x_b: torch.Tensor) -> list[torch.Tensor]:
        """Display images [the original's `sample`]: x_a, G(s_a, f_a), x_aba, x_ab, x_b, G(s_b, f_b), x_bab,
        x_ba, each shaped like x_a, fp32.

        x_ab = G(s_a, f_b) and x_ba = G(s_b, f_a) as in training; the cycle images are rebuilt from the
        swaps: x_aba = G(E_s(x_ab), E_a(x_ba)). Runs in eval mode (BatchNorm running statistics, no
        dropout) and restores every module's previous mode; the teacher is not touched.
        """
        if x_a.shape != x_b.shape:
            raise ValueError(f"sample needs two batches of the same shape, got {tuple(x_a.shape)} and "
                             f"{tuple(x_b.shape)}")
        modes = [(m, m.training) for m in self._modules()]
        self.eval()
        try:
            with self._autocast():
                s_a, s_b = self.gen_a.encode(torch.cat([x_a, x_b])).chunk(2)
                f_a, f_b = self.id_a(torch.cat([x_a, x_b]))[0].chunk(2)
                x_ba, x_ab, x_a_recon, x_b_recon = self.gen_a.decode(
                    torch.cat([s_b, s_a, s_a, s_b]), torch.cat([f_a, f_b, f_a, f_b])).chunk(4)
                s_a_recon, s_b_recon = self.gen_a.encode(torch.cat([x_ab, x_ba])).chunk(2)
                f_a_recon, f_b_recon = self.id_a(torch.cat([x_ba, x_ab]))[0].chunk(2)
                x_aba, x_bab = self.gen_a.decode(torch.cat([s_a_recon, s_b_recon]),
                                                 torch.cat([f_a_recon, f_b_recon])).chunk(2)
        finally:
            for module, training in modes:
                module.training = training
        return [t.float() for t in (x_a, x_a_recon, x_aba, x_ab, x_b, x_b_recon, x_bab, x_ba)]


class BaselineTrainer(_PartsTrainer):
    """The teacher's trainer (`--trainer baseline`): a ResNet with one bottleneck head, cross-entropy on
    the erased view, optionally a batch-hard triplet loss on the pooled feature."""

    batch_keys = ("image_erased", "label")

    def __init__(self, cfg: dict, num_classes: int, device: torch.device):
        super().__init__(cfg, device)
        self.num_classes = num_classes
        teacher = self._layout(built(build_teacher, cfg, num_classes).to(device))
        opt = reid_sgd(teacher.model, [teacher.classifier], cfg, self.fused_optim)
        # no original order to match here: the LR decays at iteration step_size exactly
        scheduler = build_scheduler(opt, cfg, cfg["gamma2"], ahead=0, warmup=cfg["lr_warmup_iter"])
        self.parts = {"teacher": Part(teacher, opt, scheduler)}
        self.run_teacher: nn.Module = MethodCall(teacher)  # a DDP wrapper after `distribute`
        self._compile(self.run_teacher)  # in place, before DDP wraps it

    def distribute(self, dist: Any, in_step: bool = False) -> None:
        """Wrap the model for DDP (nothing changes in a single process), or with `in_step` (a captured step)
        average its gradients in the step; call once, after any resume."""
        teacher = self.parts["teacher"].module
        self._sync_bn(teacher, dist)
        self.run_teacher = self._wrapper(dist, in_step)(self.run_teacher)  # the MethodCall of __init__

    def train_step(self, it: int, batch: dict) -> dict[str, torch.Tensor]:
        """One SGD step. Returns the weighted terms "ce", "triplet" (when triplet_w > 0), "acc", "total"."""
        losses = self.device_step({k: self._to_device(batch[k]) for k in self.batch_keys})
        self._step_schedulers()
        return losses

    def capture_plan(self, it: int) -> tuple[tuple[Any, ...], Callable[..., dict[str, torch.Tensor]]]:
        """Iteration `it` for capture.py: the learning rate is the only host value the step bakes in."""
        return tuple(self.learning_rates().values()), self.device_step

    def device_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """The SGD step on a batch already on the device (no LR step): what capture.py records."""
        cfg = self.cfg
        x, labels = batch["image_erased"], batch["label"]
        self._zero_grad(("teacher",))
        with self._autocast():
            pooled, logits = self.run_teacher("pooled_logits", x)
        losses = {"ce": _ce(logits, labels, cfg["label_smoothing"])}
        if cfg["triplet_w"] > 0:
            losses["triplet"] = cfg["triplet_w"] * batch_hard_triplet(pooled, labels, cfg["triplet_margin"])
        total = sum(losses.values())
        self._step(total, ("teacher",))
        losses = {k: v.detach() for k, v in losses.items()}
        losses["acc"] = (logits.detach().argmax(1) == labels).float().mean()
        losses["total"] = total.detach()
        return losses


# -------------------------------------------------------------------------------------------------------
# loading a trained teacher


def load_teacher(path: str, num_classes: int, device: torch.device, scale2: bool = True) -> nn.Module:
    """A trained teacher, frozen and in eval mode on `device`.

    `path` is one of: a run folder of `--trainer baseline` (config.yaml and checkpoints/: the newest
    checkpoint is used), one of its checkpoint files, the original baseline's folder (net_last.pth and
    opts.yaml, ResNet-50 with the stride of opts.yaml), or such a .pth file. A run's teacher doubles small
    inputs as its own config says (it was trained so); the original baseline's does with `scale2`, as
    DG-Net's trainer doubles every teacher input at most 128 pixels high.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"teacher {path} does not exist: train one with `{TRAIN_TEACHER}`, then set "
                        "teacher: outputs/<name>")
    if p.is_dir() and (p / "config.yaml").is_file():
        checkpoint = latest_checkpoint(p)
        if checkpoint is None:
            raise UserError(f"teacher run {p} has no checkpoint yet: let its training reach a snapshot, or "
                            f"train one with `{TRAIN_TEACHER}`")
        teacher = _teacher_from_run(checkpoint, load_config(p / "config.yaml"), num_classes, p)
    elif p.is_dir() and (p / "net_last.pth").is_file():
        teacher = _teacher_from_original(p / "net_last.pth", num_classes, scale2)
    elif p.is_dir():
        raise UserError(f"teacher {p} is neither a baseline run folder (config.yaml, checkpoints/) nor the "
                        f"original baseline's (net_last.pth, opts.yaml): train one with `{TRAIN_TEACHER}`")
    elif p.suffix == ".pth":
        teacher = _teacher_from_original(p, num_classes, scale2)
    else:
        state = load_checkpoint(p, instead=TEACHER_INSTEAD)
        if not isinstance(state.get("config"), dict):
            raise UserError(f"teacher {p} is not a checkpoint of train.py (no config inside): point `teacher:` at "
                            f"a run folder of `{TRAIN_TEACHER}`")
        teacher = _teacher_from_run(p, saved_config(state["config"]), num_classes, p, state)
    return teacher.to(device).eval().requires_grad_(False)


TEACHER_INSTEAD = "point teacher: at another of its checkpoints, or at the teacher's run folder"


class TeacherClassMismatch(UserError):
    """A teacher trained on other identities than the training split's."""


def _class_mismatch(where: Path, have: int, num_classes: int) -> UserError:
    return TeacherClassMismatch(f"teacher at {where} has {have} classes but the data has {num_classes} identities: "
                                f"train a teacher on this dataset ({TRAIN_TEACHER}), then set teacher: outputs/<name>")


def _teacher_from_run(checkpoint: Path, cfg: dict, num_classes: int, where: Path,
                      state: dict | None = None) -> Teacher:
    """A Teacher built from a baseline run's config and loaded from one of its checkpoints."""
    state = load_checkpoint(checkpoint, instead=TEACHER_INSTEAD) if state is None else state
    trainer = state.get("trainer")
    models = trainer.get("models") if isinstance(trainer, dict) else None
    if not isinstance(models, dict) or "teacher" not in models:
        raise UserError(f"{checkpoint} holds no teacher: point `teacher:` at a run of `--trainer baseline`")
    weights = models["teacher"]
    classifier = weights.get("classifier.classifier.0.weight") if isinstance(weights, dict) else None
    if not isinstance(classifier, torch.Tensor):
        raise UserError(f"{checkpoint} holds no teacher classifier: point `teacher:` at a run of `--trainer "
                        "baseline`")
    have = classifier.shape[0]
    if have != num_classes:
        raise _class_mismatch(where, have, num_classes)
    teacher = built(build_teacher, cfg, num_classes, pretrained="none")
    try:
        teacher.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"{checkpoint} does not fit the Teacher of its own config ({mismatch_reason(err)})"
                        ) from None
    return teacher


def _teacher_from_original(weights: Path, num_classes: int, scale2: bool) -> Teacher:
    """The original baseline's ResNet-50 `ft_net` (original.py), checked against the data's identities."""
    from original import baseline_teacher

    return baseline_teacher(weights, scale2, num_classes)
