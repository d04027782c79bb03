"""The GPU fast path's config keys (channels_last, fused_optim, cudnn_benchmark, compile) on the CPU: off at
their defaults, so CPU runs keep their exact numerics, and when forced on they compute the same step up to
float rounding; a checkpoint resumes across memory formats."""
from __future__ import annotations

import io

import pytest
import torch

from reIDmodel import Teacher
from trainer import BaselineTrainer, DGNet_Trainer, resolve_switch
from utils import UserError, load_config

CPU = torch.device("cpu")
NUM_CLASSES, BATCH, H, W = 5, 4, 64, 32
FAST = ("channels_last=always", "fused_optim=always")
ALL_ON = ("recon_s_w=1", "recon_f_w=1", "recon_x_cyc_w=2", "teacher_w=2")


def tiny_cfg(*opts: str) -> dict:
    """64x32 images, every loss term on. scale2 off, as at the default 256x128 (where it has no effect) that the
    GPU captures: E_a and the teacher at their own size cost a quarter of what the doubled input does."""
    return load_config(None, [f"crop_image_height={H}", f"crop_image_width={W}", "backbone=resnet18",
                              "pretrained=none", "gen.dim=4", "gen.mlp_dim=16", "gen.id_dim=512", "gen.n_res=1",
                              "gen.pad_type=zero", "dis.dim=8", "dis.n_res=1", "scale2=false", f"batch_size={BATCH}",
                              *ALL_ON, *opts])


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    image, pos = torch.randn(BATCH, 3, H, W, generator=g), torch.randn(BATCH, 3, H, W, generator=g)
    return {"image": image, "label": torch.randint(NUM_CLASSES, (BATCH,), generator=g), "pos": pos,
            "image_erased": image.flip(3), "pos_erased": pos.flip(3)}


def dgnet(*opts: str) -> DGNet_Trainer:
    torch.manual_seed(0)
    teacher = Teacher(NUM_CLASSES, backbone="resnet18", last_stride=2)
    return DGNet_Trainer(tiny_cfg(*opts), NUM_CLASSES, CPU, teacher=teacher)


def step(trainer: DGNet_Trainer, it: int) -> dict[str, torch.Tensor]:
    """Iteration `it` on its own batches, with the same dropout masks and re-encoding coin for any trainer."""
    torch.manual_seed(100 + it)
    return trainer.train_step(it + 1, batch(2 * it), batch(2 * it + 1))


def test_fast_path_is_off_on_the_cpu_by_default() -> None:
    cfg = tiny_cfg()
    assert (cfg["channels_last"], cfg["fused_optim"], cfg["compile"]) == ("auto", "auto", False)
    assert not resolve_switch(cfg, "channels_last", CPU)
    assert resolve_switch(cfg, "channels_last", torch.device("cuda"))
    assert resolve_switch(tiny_cfg("channels_last=always"), "channels_last", CPU)
    assert not resolve_switch(tiny_cfg("fused_optim=never"), "fused_optim", torch.device("cuda"))
    trainer = dgnet()
    assert not trainer.channels_last and not trainer.fused_optim
    conv = trainer.gen_a.enc_content.modules()
    weight = next(m.weight for m in conv if isinstance(m, torch.nn.Conv2d))
    assert weight.is_contiguous()
    # the per-parameter loops: PyTorch's CPU default, what the bit-exact resume tests ran before these keys
    for part in trainer.parts.values():
        group = part.optimizer.param_groups[0]
        assert not group["foreach"] and not group.get("fused")
    with pytest.raises(UserError, match="channels_last"):
        dgnet("channels_last=yes please")


def test_channels_last_and_fused_optimizers_change_a_cpu_step_only_by_rounding() -> None:
    plain, fast = dgnet(), dgnet(*FAST)
    assert fast.channels_last and fast.fused_optim
    conv = next(m for m in fast.id_a.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.parts["gen"].optimizer.param_groups[0]["fused"]
    assert fast.parts["id"].optimizer.param_groups[0]["foreach"]
    a, b = step(plain, 0), step(fast, 0)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)
    # The gradients of that step. Within one iteration D takes its Adam step before G's losses read it, and
    # Adam's first update is lr * sign(grad), which rounding flips where a gradient is ~0; BatchNorm on a
    # batch of 4 cancels most of some gradients. So single tensors differ by a few percent, the whole by less.
    diff = total = 0.0
    for name in plain.parts:
        for (key, p), q in zip(plain.parts[name].module.named_parameters(), fast.parts[name].module.parameters()):
            if p.grad is None:
                continue
            d, n = (q.grad - p.grad).norm().item(), p.grad.norm().item()
            # 1e-6: a bias right before an instance norm has a gradient of exactly 0 but for rounding
            assert d <= 0.1 * n + 1e-6, (name, key, d, n)
            diff, total = diff + d * d, total + n * n
    assert diff ** 0.5 < 1e-2 * total ** 0.5
    # the next step drifts apart a little (those sign flips), and no more: the teacher KL on the swaps, the
    # most sensitive term, moves by 1-3% depending on the draws (dropout, erasing); the step after is chaotic
    a, b = step(plain, 1), step(fast, 1)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=5e-2, atol=1e-6, msg=key)


def test_a_channels_last_checkpoint_resumes_without_it_and_back() -> None:
    fast = dgnet(*FAST)
    step(fast, 0)
    buffer = io.BytesIO()
    torch.save(fast.state_dict(), buffer)
    for opts in ((), FAST):
        buffer.seek(0)
        other = dgnet(*opts)
        other.load_state_dict(torch.load(buffer, weights_only=True))
        for part in other.parts.values():  # optimizer state follows each parameter's memory format
            for p, state in part.optimizer.state.items():
                for value in state.values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        assert value.stride() == p.stride()
        losses = step(other, 1)
        assert all(torch.isfinite(v) for v in losses.values())


def test_baseline_trainer_fast_path_on_the_cpu() -> None:
    cfg = tiny_cfg(*FAST)
    torch.manual_seed(0)
    trainer = BaselineTrainer(cfg, NUM_CLASSES, CPU)
    assert trainer.parts["teacher"].optimizer.param_groups[0]["foreach"]
    b = batch(0)
    losses = trainer.train_step(0, {"image_erased": b["image"], "label": b["label"]})
    assert torch.isfinite(losses["total"])
