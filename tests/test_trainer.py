"""trainer.py: loss weights and LR schedules against the original's, every loss term switching with its
weight, gradient routing (the original's), the frozen teacher, sample(), exact state round trips,
the baseline (teacher) trainer with its batch-hard triplet loss, teacher loading, mixed precision."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from reIDmodel import AppearanceEncoder, Teacher, split_norms
from trainer import (
    RAMPED_WEIGHTS,
    BaselineTrainer,
    DGNet_Trainer,
    batch_hard_triplet,
    build_scheduler,
    full_weight_iteration,
    load_teacher,
    loss_weights,
    lr_multiplier,
    resolve_amp,
)
from utils import UserError, checkpoint_path, dump_config, load_config, save_checkpoint

CPU = torch.device("cpu")
NUM_CLASSES = 5
H, W, BATCH = 64, 32, 4
# every ramped weight at its cap from the first iteration on
ALL_ON = ("recon_s_w=1", "recon_f_w=1", "recon_x_cyc_w=2", "teacher_w=2")
GEN_TERMS = ("gan", "x", "xp", "s", "f", "cyc", "recon_id", "id", "pid", "teacher")


def tiny_cfg(*opts: str) -> dict:
    """64x32 images, resnet18 appearance encoder (code 4 x 512), a few-thousand-parameter G and D."""
    return load_config(None, [f"crop_image_height={H}", f"crop_image_width={W}", "backbone=resnet18",
                              "pretrained=none", "gen.dim=4", "gen.mlp_dim=16", "gen.id_dim=512", "gen.n_res=1",
                              "gen.pad_type=zero", "dis.dim=8", "dis.n_res=1", f"batch_size={BATCH}", *opts])


def make_batch(seed: int, height: int = H, width: int = W) -> dict:
    """A loader batch (data/loaders.py) of random images: image, label, pos and their erased views."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(BATCH, 3, height, width, generator=g)
    pos = torch.randn(BATCH, 3, height, width, generator=g)
    image_erased, pos_erased = image.clone(), pos.clone()
    image_erased[:, :, : height // 4, : width // 2] = 0
    pos_erased[:, :, height // 2:, width // 2:] = 0
    return {"image": image, "label": torch.randint(NUM_CLASSES, (BATCH,), generator=g), "pos": pos,
            "image_erased": image_erased, "pos_erased": pos_erased, "index": torch.arange(BATCH),
            "pos_index": torch.arange(BATCH)}


def tiny_teacher() -> Teacher:
    torch.manual_seed(123)
    return Teacher(NUM_CLASSES, backbone="resnet18", last_stride=2)


def make_trainer(*opts: str, seed: int = 0) -> DGNet_Trainer:
    torch.manual_seed(seed)
    return DGNet_Trainer(tiny_cfg(*opts), NUM_CLASSES, CPU, teacher=tiny_teacher())


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(p, before[name])}


def only(**weights: float) -> dict[str, float]:
    """A weight dict with every term off except the given ones (a ramped one on since the last iteration)."""
    w = dict.fromkeys(loss_weights(tiny_cfg(), 0), 0.0)
    w.update(weights)
    w.update({f"{key}_before": value for key, value in weights.items() if key in RAMPED_WEIGHTS})
    return w


# ---------------------------------------------------------------------------------------------------------
# weights, schedules, precision


def test_resolve_amp() -> None:
    assert resolve_amp("none", CPU) is None
    assert resolve_amp("auto", CPU) is None
    assert resolve_amp("bf16", CPU) == torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_amp("fp16", CPU)
    with pytest.raises(UserError, match="use auto, bf16, fp16 or none"):
        resolve_amp("fp32", CPU)


def original_warm_up(cfg: dict, iterations: int) -> list[tuple[dict, dict]]:
    """The original's ramps as its gen_update ran them, per iteration: (the weights it read to decide which
    ramped terms run and to weight the fine-grained head on real images, the weights in the total). It
    mutated its hyperparameter dict once per call, after those reads and just before the total."""
    caps = {"recon_f_w": "max_w", "recon_s_w": "max_w", "recon_x_cyc_w": "max_cyc_w"}
    hp = {key: cfg[key] for key in RAMPED_WEIGHTS}
    seen = []
    for iteration in range(iterations):
        read = dict(hp)
        if iteration > cfg["warm_iter"]:
            for key, cap in caps.items():
                hp[key] += cfg["warm_scale"]
                hp[key] = min(hp[key], cfg[cap])
        if iteration > cfg["warm_teacher_iter"]:
            hp["teacher_w"] += cfg["warm_scale"]
            hp["teacher_w"] = min(hp["teacher_w"], cfg["max_teacher_w"])
        seen.append((read, dict(hp)))
    return seen


@pytest.mark.parametrize("config", [None, "configs/quickstart/dgnet.yaml", "configs/quickstart/dgnet_long.yaml"])
def test_loss_weights_equal_the_original_at_every_iteration(config: str | None) -> None:
    cfg = load_config(config)
    end = max(cfg["warm_iter"], cfg["warm_teacher_iter"]) + 5000  # past every cap
    for it, (read, total) in enumerate(original_warm_up(cfg, end)):
        w = loss_weights(cfg, it)
        assert {k: w[k] for k in RAMPED_WEIGHTS} == total, it  # exactly: the same float additions
        assert {k: w[f"{k}_before"] for k in RAMPED_WEIGHTS} == read, it


def test_loss_weights_ramp_like_the_original() -> None:
    cfg = load_config(None)  # warm-ups at 30000, +0.0005 per iteration
    w = lambda it: loss_weights(cfg, it)
    assert w(30000)["teacher_w"] == 0.0 == w(30000)["teacher_w_before"]
    # the first increment: in the total, but the terms it gates are still off (the original's order)
    assert w(30001)["teacher_w"] == pytest.approx(0.0005) and w(30001)["teacher_w_before"] == 0.0
    assert w(30001)["recon_s_w"] == pytest.approx(0.0005) and w(30001)["recon_s_w_before"] == 0.0
    assert w(30002)["teacher_w_before"] == pytest.approx(0.0005)
    assert w(34000)["teacher_w_before"] == pytest.approx(2.0 - 0.0005)
    assert w(32000)["teacher_w"] == pytest.approx(1.0)
    assert w(34000)["teacher_w"] == pytest.approx(2.0)
    assert w(30000 + 4000 + 1)["teacher_w"] == 2.0 == w(100000)["teacher_w"]  # capped at max_teacher_w
    assert w(31000)["recon_s_w"] == pytest.approx(0.5) == w(31000)["recon_f_w"]
    assert w(32001)["recon_s_w"] == 1.0  # max_w
    assert w(33000)["recon_x_cyc_w"] == pytest.approx(1.5)
    assert w(40000)["recon_x_cyc_w"] == 2.0  # max_cyc_w
    assert all(w(0)[k] == 0.0 for k in ("recon_s_w", "recon_f_w", "recon_x_cyc_w", "teacher_w"))
    fixed = {"gan_w": 1.0, "recon_x_w": 5.0, "recon_xp_w": 5.0, "recon_id_w": 0.5, "id_w": 1.0, "pid_w": 1.0,
             "B_w": 0.2, "T_w": 1.0}
    assert {k: w(12345)[k] for k in fixed} == fixed
    late = load_config(None, ["warm_teacher_iter=100", "warm_iter=50"])
    assert loss_weights(late, 100)["teacher_w"] == 0.0 < loss_weights(late, 101)["teacher_w"]
    assert loss_weights(late, 50)["recon_s_w"] == 0.0 < loss_weights(late, 51)["recon_s_w"]


def test_full_weight_iteration_is_the_first_with_every_ramped_weight_at_its_cap() -> None:
    def at_cap(cfg: dict, it: int) -> bool:
        w = loss_weights(cfg, it)
        return all(w[k] == w[f"{k}_before"] == cfg[cap] for k, (cap, _) in RAMPED_WEIGHTS.items())

    for cfg in (load_config(None), load_config(None, ["warm_teacher_iter=100", "warm_iter=50", "warm_scale=0.1"])):
        full = full_weight_iteration(cfg)
        assert at_cap(cfg, full) and at_cap(cfg, full + 1000) and not at_cap(cfg, full - 1), full
    assert full_weight_iteration(load_config(None)) == 34002  # the teacher's ramp, 4,000 float additions, ends last


def test_lazy_r1_weights_and_steps() -> None:
    assert {loss_weights(load_config(None), it)["r1"] for it in range(5)} == {0.01}  # DG-Net: every step
    lazy = load_config(None, ["dis.r1_every=4"])
    assert [loss_weights(lazy, it)["r1"] for it in range(9)] == pytest.approx([0.04, 0, 0, 0, 0.04, 0, 0, 0, 0.04])
    trainer = make_trainer("dis.r1_every=4")
    x = [torch.randn(2, 3, H, W) for _ in range(4)]
    on = trainer.dis_update(*x, loss_weights(trainer.cfg, 8))
    off = trainer.dis_update(*x, loss_weights(trainer.cfg, 9))
    assert float(on["R1"]) > 0 and float(off["R1"]) == 0
    for bad in ("0", "1.5", "true"):
        with pytest.raises(UserError, match="dis.r1_every"):
            make_trainer(f"dis.r1_every={bad}")


def test_learning_rates_match_the_original_step_before_order() -> None:
    """The original stepped MultiStepLR before each iteration's optimizer steps; ours step after and must
    give the same LR at every iteration (first decay at 0-based iteration step_size - 1)."""
    trainer = make_trainer("step_size=8", "lr_g=1e-4", "lr_d=2e-4", "lr2=1e-3", "gamma=0.1", "gamma2=0.5")
    originals = {}
    for name, base, gamma in (("gen", 1e-4, 0.1), ("dis", 2e-4, 0.1), ("id", 1e-3, 0.5)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
        originals[name] = (opt, torch.optim.lr_scheduler.MultiStepLR(opt, [8, 12, 14], gamma=gamma))
    seen = []
    for it in range(18):
        for opt, sched in originals.values():  # the original: update_learning_rate() first
            opt.step()
            sched.step()
        rates = trainer.learning_rates()
        for name, (opt, _) in originals.items():
            assert rates[name] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), (name, it)
        assert rates["id_heads"] == pytest.approx(10 * rates["id"])
        seen.append(rates["gen"])
        for part in trainer.parts.values():  # ours: the optimizers step, then the schedulers
            part.optimizer.step()
            part.scheduler.step()
    assert seen[6] == pytest.approx(1e-4) and seen[7] == pytest.approx(1e-5)
    assert seen[11] == pytest.approx(1e-6) and seen[13] == pytest.approx(1e-7)

    step = {"lr_policy": "step", "step_size": 5}
    assert [lr_multiplier(step, i, 0.1) for i in (0, 4, 5, 10)] == pytest.approx([1, 1, 0.1, 0.01])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    assert build_scheduler(opt, {"lr_policy": "constant", "step_size": 5}, 0.1, ahead=1) is None
    # the teacher's warm-up: 0.1x to 1x over `warmup` steps, then the policy alone
    assert [lr_multiplier(step, i, 0.1, warmup=4) for i in (0, 2, 4, 5)] == pytest.approx([0.1, 0.55, 1, 0.1])
    constant = {"lr_policy": "constant", "step_size": 5}
    scheduler = build_scheduler(opt, constant, 0.1, ahead=0, warmup=2)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1, 0.55, 1.0, 1.0])
    with pytest.raises(UserError, match="lr_policy"):
        build_scheduler(opt, {"lr_policy": "cosine", "step_size": 5}, 0.1, ahead=1)


# ---------------------------------------------------------------------------------------------------------
# one DG-Net iteration


def test_train_step_trains_every_part_and_reports_weighted_terms() -> None:
    trainer = make_trainer(*ALL_ON)
    trainer.train()
    before = {name: snapshot(part.module) for name, part in trainer.parts.items()}
    teacher_before = snapshot(trainer.teacher)
    losses = trainer.train_step(1, make_batch(0), make_batch(1))

    assert set(losses) == set(DGNet_Trainer.LOSS_KEYS)
    for key, value in losses.items():
        assert value.dim() == 0 and not value.requires_grad and math.isfinite(float(value)), key
    assert all(float(losses[k]) > 0 for k in (*GEN_TERMS, "D", "R1")), losses
    assert float(losses["total"]) == pytest.approx(sum(float(losses[k]) for k in GEN_TERMS), rel=1e-5)
    assert float(losses["R1"]) < float(losses["D"])  # R1 is reported as the part of D it is
    for name, part in trainer.parts.items():
        assert changed(part.module, before[name]), f"{name} did not train"
    assert not changed(trainer.teacher, teacher_before)
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert trainer.gen_a is trainer.parts["gen"].module and trainer.id_a is trainer.parts["id"].module
    assert trainer.dis_a is trainer.parts["dis"].module


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # D never steps at gan_w 0
def test_ramped_terms_are_zero_exactly_while_their_weight_is() -> None:
    trainer = make_trainer("warm_iter=3", "warm_teacher_iter=3", "warm_scale=0.5")
    ramped = ("s", "f", "cyc", "teacher")
    for it in (3, 4):  # at 4 the weights are 0.5 in the total, but were 0 when the original read them
        off = trainer.train_step(it, make_batch(0), make_batch(1))
        assert all(float(off[k]) == 0.0 for k in ramped), (it, off)
    on = trainer.train_step(5, make_batch(2), make_batch(3))
    assert all(float(on[k]) > 0.0 for k in ramped), on

    no_gan = make_trainer("gan_w=0", "pid_w=0")
    dis_before = snapshot(no_gan.dis_a)
    losses = no_gan.train_step(0, make_batch(0), make_batch(1))
    assert float(losses["D"]) == float(losses["gan"]) == float(losses["pid"]) == 0.0
    assert not changed(no_gan.dis_a, dis_before)


def touched(names: set[str], prefix: str) -> bool:
    return any(n.startswith(prefix) for n in names)


def test_gradient_routing() -> None:
    """Reference 4.5: which losses reach which network."""
    trainer = make_trainer(*ALL_ON)
    a, b = make_batch(0), make_batch(1)

    def step(w: dict[str, float], dis: bool = False) -> dict[str, set[str]]:
        before = {name: snapshot(part.module) for name, part in trainer.parts.items()}
        fw = trainer.forward(a, b, w)
        if dis:
            trainer.dis_update(fw.x_ab, fw.x_ba, fw.x_a, fw.x_b, w)
        else:
            trainer.gen_update(fw, w)
        return {name: changed(part.module, before[name]) for name, part in trainer.parts.items()}

    moved = step(only(gan_w=1.0), dis=True)  # D step: the swaps are detached
    assert moved["dis"] and not moved["gen"] and not moved["id"]

    for weights in ({"recon_x_w": 5.0}, {"recon_xp_w": 5.0}, {"gan_w": 1.0}, {"recon_id_w": 0.5}):
        moved = step(only(**weights))  # generation losses: G and E_s, never E_a (f detached, frozen E_a)
        assert not moved["id"] and not moved["dis"], weights
        for prefix in ("enc_content.", "dec.", "mlp_w1."):
            assert touched(moved["gen"], prefix), (weights, prefix)

    for weights in ({"id_w": 1.0}, {"pid_w": 1.0}, {"teacher_w": 2.0, "T_w": 1.0, "B_w": 0.2}):
        moved = step(only(**weights))  # ReID losses: E_a only
        assert moved["id"] and not moved["gen"] and not moved["dis"], weights
    moved = step(only(teacher_w=2.0, T_w=1.0, B_w=0.2))  # KL trains the primary head, mining the second
    assert touched(moved["id"], "classifier1.") and touched(moved["id"], "classifier2.")
    trainer.cfg["erasing_p"] = 0.0  # one E_a pass gives the code and the logits
    moved = step(only(id_w=1.0, recon_x_w=5.0))
    assert moved["id"] and touched(moved["gen"], "dec.") and not moved["dis"]

    trainer.cfg["use_encoder_again"] = 1.0  # live E_s on detached swaps: only E_s learns
    moved = step(only(recon_s_w=1.0))
    assert touched(moved["gen"], "enc_content.") and not touched(moved["gen"], "dec.")
    assert not touched(moved["gen"], "mlp_")
    trainer.cfg["use_encoder_again"] = 0.0  # frozen E_s on the swaps: the decoder and MLPs learn too
    moved = step(only(recon_s_w=1.0))
    assert touched(moved["gen"], "enc_content.") and touched(moved["gen"], "dec.") and touched(moved["gen"], "mlp_")
    assert not moved["id"]


def test_f_grad_w_lets_generation_losses_reach_the_backbone() -> None:
    """f_grad_w > 0 (not in the original): the generation losses reach E_a's backbone through f, scaled;
    the heads still learn only from ReID losses, and recon_f becomes live through the swap."""
    torch.manual_seed(0)
    encoder = AppearanceEncoder(NUM_CLASSES, backbone="resnet18", f_grad=1.0)
    x = torch.randn(2, 3, H, W)
    grads = {}
    for scale in (1.0, 0.5):
        encoder.f_grad = scale
        encoder.zero_grad()
        f, _, _ = encoder(x)
        (f * torch.linspace(-1, 1, f.shape[1])).sum().backward()
        grads[scale] = encoder.model.conv1.weight.grad.clone()
    torch.testing.assert_close(grads[0.5], 0.5 * grads[1.0])
    encoder.f_grad = 0.0
    f0, _, _ = encoder(x)
    encoder.f_grad = 0.5
    f_half, _, _ = encoder(x)
    assert not f0.requires_grad and torch.equal(f0, f_half.detach())  # the value is the same bit for bit

    for f_grad_w in (0.0, 1.0):
        trainer = make_trainer(*ALL_ON, f"f_grad_w={f_grad_w}")
        a, b = make_batch(0), make_batch(1)
        for weights in ({"recon_x_w": 5.0}, {"recon_f_w": 1.0}):
            before = {name: snapshot(part.module) for name, part in trainer.parts.items()}
            trainer.gen_update(trainer.forward(a, b, only(**weights)), only(**weights))
            moved = {name: changed(part.module, before[name]) for name, part in trainer.parts.items()}
            backbone = {n for n in moved["id"] if n.startswith("model.")}
            if f_grad_w == 0:  # the original: neither term reaches E_a, and recon_f reaches nothing at all
                assert not moved["id"], weights
                assert bool(moved["gen"]) == ("recon_x_w" in weights), weights
            else:
                assert backbone and backbone == moved["id"], weights  # the backbone, never the heads
                assert touched(moved["gen"], "dec."), weights  # recon_f through the swap into G


def test_teacher_soft_label_styles() -> None:
    trainer = make_trainer()
    x = torch.randn(BATCH, 3, H, W)
    appearance, structure = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 4, 0])
    labels = {}
    for style in range(5):
        trainer.cfg["teacher_style"] = style
        labels[style] = trainer.soft_labels(x, appearance, structure)
        assert labels[style].shape == (BATCH, NUM_CLASSES)
        assert torch.allclose(labels[style].sum(1), torch.ones(BATCH))
    teacher = trainer.teacher
    expected = (F.softmax(teacher(x), 1) + F.softmax(teacher(x.flip(3)), 1)) / 2
    assert torch.allclose(labels[0], expected.detach(), atol=1e-6)
    assert torch.equal(labels[1], F.one_hot(expected.argmax(1), NUM_CLASSES).float())
    assert torch.equal(labels[2], F.one_hot(appearance, NUM_CLASSES).float())
    assert torch.allclose(labels[3], torch.full((BATCH, NUM_CLASSES), 1 / NUM_CLASSES))
    allowed = F.one_hot(appearance, NUM_CLASSES) + F.one_hot(structure, NUM_CLASSES) > 0
    assert (labels[4][~allowed] == 0).all() and (labels[4][allowed] > 0).all()
    trainer.cfg["teacher_style"] = 2  # hard targets: the KL stays finite (0 log 0 = 0)
    losses = trainer.gen_update(trainer.forward(make_batch(0), make_batch(1), only(teacher_w=1.0, T_w=1.0)),
                                only(teacher_w=1.0, T_w=1.0))
    assert math.isfinite(float(losses["teacher"])) and float(losses["teacher"]) > 0


def test_teacher_stays_frozen_and_sample_restores_modes() -> None:
    trainer = make_trainer()
    trainer.train()
    assert not any(m.training for m in trainer.teacher.modules())
    trainer.dis_a.eval()  # a mixed state must come back as it was
    modes = {name: [m.training for m in part.module.modules()] for name, part in trainer.parts.items()}
    x_a, x_b = torch.randn(3, 3, H, W), torch.randn(3, 3, H, W)
    out = trainer.sample(x_a, x_b)
    assert len(out) == 8 and all(t.shape == x_a.shape and t.dtype == torch.float32 for t in out)
    assert torch.equal(out[0], x_a) and torch.equal(out[4], x_b)
    assert modes == {name: [m.training for m in part.module.modules()] for name, part in trainer.parts.items()}
    assert not any(m.training for m in trainer.teacher.modules())
    # eval mode: nothing depends on the batch, so the batched call equals the original's one-at-a-time loop
    one = trainer.sample(x_a[1:2], x_b[1:2])
    for batched, single in zip(out, one):
        assert torch.allclose(batched[1:2], single, atol=1e-5)
    trainer.eval()
    trainer.train()
    assert not trainer.teacher.training


def test_state_dict_round_trip_continues_bit_for_bit() -> None:
    first = make_trainer(*ALL_ON)
    torch.manual_seed(1)
    first.train_step(1, make_batch(0), make_batch(1))  # non-trivial optimizer and scheduler state
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # only tensors and plain containers

    second = make_trainer(*ALL_ON, seed=99)  # other initial weights, overwritten by the state
    second.load_state_dict(state)
    assert second.learning_rates() == first.learning_rates()
    results = []
    for trainer in (first, second):
        torch.manual_seed(7)
        results.append(trainer.train_step(2, make_batch(2), make_batch(3)))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0]), results
    for name in first.parts:
        for (key, p), q in zip(first.parts[name].module.state_dict().items(),
                               second.parts[name].module.state_dict().values()):
            assert torch.equal(p, q), (name, key)


def test_e_a_runs_clean_then_erased_batches_in_one_call_each() -> None:
    """E_a's BatchNorm running statistics after the forward are those of the original's eight calls in its
    order (the four clean images, then the four erased views), from two network calls; the frozen pass on
    the swaps leaves them alone, and the teacher loss's live pass moves them once per swap."""
    import copy

    trainer = make_trainer(*ALL_ON)
    reference = copy.deepcopy(trainer.id_a)
    calls = []
    hook = trainer.id_a.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    a, b = make_batch(0), make_batch(1)
    w = loss_weights(trainer.cfg, 1)
    fw = trainer.forward(a, b, w)
    assert calls == [4 * BATCH, 4 * BATCH]
    with torch.no_grad():
        for x in (a["image"], b["image"], a["pos"], b["pos"], a["image_erased"], b["image_erased"],
                  a["pos_erased"], b["pos_erased"]):
            reference(x)
    for (name, buf), expected in zip(trainer.id_a.named_buffers(), reference.buffers()):
        torch.testing.assert_close(buf, expected, msg=name)

    calls.clear()
    trainer.gen_update(fw, w)
    hook.remove()
    assert calls == [2 * BATCH, 2 * BATCH]  # the frozen pass on both swaps, the teacher loss's live pass
    with torch.no_grad():
        reference(fw.x_ba)
        reference(fw.x_ab)
    for (name, buf), expected in zip(trainer.id_a.named_buffers(), reference.buffers()):
        torch.testing.assert_close(buf, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_e_a_calls_stay_separate_where_batch_norms_cannot_split() -> None:
    trainer = make_trainer()
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(trainer.id_a)  # what sync_bn does in a process group
    trainer.id_norms = split_norms(trainer.id_a)  # as `distribute` does after converting
    assert trainer.id_norms is None
    calls = []
    trainer.id_a.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    outputs = trainer._id_calls([torch.randn(BATCH, 3, H, W), torch.randn(BATCH, 3, H, W)])
    assert calls == [BATCH, BATCH] and [out[1].shape for out in outputs] == [(BATCH, NUM_CLASSES)] * 2


def test_the_frozen_teacher_keeps_its_weights_in_the_autocast_dtype() -> None:
    x = torch.randn(BATCH, 3, 32, 16)
    plain = make_trainer("crop_image_height=32", "crop_image_width=16")
    cast = make_trainer("amp=bf16", "crop_image_height=32", "crop_image_width=16")
    convs = [m for m in cast.teacher.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert convs and all(p.dtype == torch.bfloat16 for m in convs for p in m.parameters())
    norms = [m for m in cast.teacher.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    labels = torch.arange(BATCH) % NUM_CLASSES
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what autocast computes with the fp32 teacher
        expected = plain.soft_labels(x, labels, labels)
    torch.testing.assert_close(cast.soft_labels(x, labels, labels), expected)


def test_bf16_autocast_train_step_on_cpu() -> None:
    # 32x16 images: CPUs without bf16 instructions run bf16 convolutions on a slow path
    trainer = make_trainer(*ALL_ON, "amp=bf16", "crop_image_height=32", "crop_image_width=16", "dis.pad_type=zero")
    assert trainer.scaler is None
    losses = trainer.train_step(1, make_batch(0, 32, 16), make_batch(1, 32, 16))
    assert all(math.isfinite(float(v)) for v in losses.values()), losses
    assert float(losses["total"]) > 0
    with pytest.raises(UserError, match="fp16"):
        make_trainer("amp=fp16")


# ---------------------------------------------------------------------------------------------------------
# the baseline (teacher) trainer


def test_batch_hard_triplet_picks_hardest_pairs() -> None:
    features = torch.tensor([[0.0], [2.0], [1.0], [5.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    # anchor 0: farthest positive 2, nearest negative 1; anchor 2: 2, 1; anchor 1: 4 (to 5), 1; anchor 5: 4, 3
    loss = batch_hard_triplet(features, labels, margin=0.3)
    assert float(loss.detach()) == pytest.approx((1.3 + 1.3 + 3.3 + 1.3) / 4, rel=1e-5)
    loss.backward()
    assert torch.isfinite(features.grad).all()
    soft = batch_hard_triplet(features.detach(), labels, margin=0.0)
    assert float(soft) == pytest.approx(float(F.softplus(torch.tensor([1.0, 1.0, 3.0, 1.0])).mean()), rel=1e-5)
    # an anchor without a positive in the batch is left out
    alone = batch_hard_triplet(torch.tensor([[0.0], [2.0], [1.0]]), torch.tensor([0, 0, 1]), margin=0.3)
    assert float(alone) == pytest.approx(1.3, rel=1e-5)
    # no anchor has both a positive and a negative: zero, still part of the graph, with finite gradients
    single = torch.tensor([[0.0], [2.0]], requires_grad=True)
    none = batch_hard_triplet(single, torch.tensor([0, 1]), margin=0.3)
    assert float(none.detach()) == 0.0 and none.requires_grad
    none.backward()
    assert torch.equal(single.grad, torch.zeros_like(single))


def baseline_batch(seed: int) -> dict:
    batch = make_batch(seed)
    batch["label"] = torch.tensor([0, 0, 1, 1])  # P x K: two identities, two images each
    return {k: batch[k] for k in ("image", "image_erased", "label", "index")}


def test_the_teachers_learning_rates_warm_up_and_dg_nets_do_not() -> None:
    teacher = BaselineTrainer(tiny_cfg("lr_warmup_iter=2", "lr_policy=step", "step_size=100"), NUM_CLASSES, CPU)
    seen = []
    for _ in range(3):
        seen.append(teacher.learning_rates()["teacher"])
        teacher.parts["teacher"].optimizer.step()  # no gradients: nothing moves; the scheduler's order is kept
        teacher._step_schedulers()
    lr2 = tiny_cfg()["lr2"]
    assert seen == pytest.approx([0.1 * lr2, 0.55 * lr2, lr2])
    dgnet = DGNet_Trainer(tiny_cfg("lr_warmup_iter=2"), NUM_CLASSES, CPU, teacher=tiny_teacher())
    assert dgnet.learning_rates()["id"] == pytest.approx(lr2)  # DG-Net's E_a: no warm-up


def test_baseline_trainer_step_with_and_without_triplet() -> None:
    torch.manual_seed(0)
    plain = BaselineTrainer(tiny_cfg(), NUM_CLASSES, CPU)
    rates = plain.learning_rates()
    assert set(rates) == {"teacher", "teacher_heads"} and rates["teacher_heads"] == pytest.approx(10 * rates["teacher"])
    before = snapshot(plain.parts["teacher"].module)
    losses = plain.train_step(0, baseline_batch(0))
    assert set(losses) == {"ce", "acc", "total"}
    assert float(losses["ce"]) == pytest.approx(math.log(NUM_CLASSES), abs=0.1)  # N(0, 0.001) classifier
    assert 0.0 <= float(losses["acc"]) <= 1.0 and torch.equal(losses["total"], losses["ce"])
    assert changed(plain.parts["teacher"].module, before)

    torch.manual_seed(0)
    triplet = BaselineTrainer(tiny_cfg("triplet_w=1.0", "label_smoothing=0.1"), NUM_CLASSES, CPU)
    losses = triplet.train_step(0, baseline_batch(0))
    assert set(losses) == {"ce", "triplet", "acc", "total"}
    assert all(math.isfinite(float(v)) for v in losses.values())
    assert float(losses["total"]) == pytest.approx(float(losses["ce"]) + float(losses["triplet"]), rel=1e-6)

    teacher = triplet.parts["teacher"].module.eval()  # the trainer's pooled feature is the Teacher's own
    x = baseline_batch(1)["image"]
    with torch.no_grad():
        assert torch.allclose(teacher.classifier(teacher._pooled(x)), teacher(x))


# ---------------------------------------------------------------------------------------------------------
# loading a teacher


def test_load_teacher_from_the_original_baseline_layout(tmp_path) -> None:
    torch.manual_seed(0)
    original = Teacher(NUM_CLASSES, backbone="resnet50", last_stride=1)
    folder = tmp_path / "best"
    folder.mkdir()
    torch.save(original.state_dict(), folder / "net_last.pth")
    (folder / "opts.yaml").write_text(yaml.safe_dump({"stride": 1, "nclasses": NUM_CLASSES, "droprate": 0.5}))
    for path in (folder, folder / "net_last.pth"):
        teacher = load_teacher(str(path), NUM_CLASSES, CPU)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert teacher.model.layer4[0].conv2.stride == (1, 1)  # from opts.yaml
        assert all(torch.equal(p, q) for p, q in zip(teacher.state_dict().values(), original.state_dict().values()))
    with pytest.raises(UserError, match=f"has {NUM_CLASSES} classes.*train a teacher"):
        load_teacher(str(folder), 7, CPU)


def test_load_teacher_from_a_baseline_run_folder(tmp_path) -> None:
    cfg = tiny_cfg("ID_stride=2")
    torch.manual_seed(0)
    baseline = BaselineTrainer(cfg, NUM_CLASSES, CPU)
    run = tmp_path / "outputs" / "teacher"
    run.mkdir(parents=True)
    dump_config(cfg, run / "config.yaml")
    save_checkpoint({"trainer": baseline.state_dict(), "iteration": 5, "config": cfg}, checkpoint_path(run, 5))
    baseline.train_step(5, baseline_batch(0))  # the newest checkpoint must win
    save_checkpoint({"trainer": baseline.state_dict(), "iteration": 10, "config": cfg}, checkpoint_path(run, 10))
    trained = baseline.parts["teacher"].module.state_dict()

    for path in (run, checkpoint_path(run, 10)):
        teacher = load_teacher(str(path), NUM_CLASSES, CPU)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert all(torch.equal(p, q) for p, q in zip(teacher.state_dict().values(), trained.values()))
    with pytest.raises(UserError, match=f"teacher at {run} has {NUM_CLASSES} classes but the data has 7 identities"):
        load_teacher(str(run), 7, CPU)

    torch.manual_seed(0)  # DG-Net loads the teacher named in its config when none is handed in
    trainer = DGNet_Trainer(tiny_cfg(f"teacher={run}"), NUM_CLASSES, CPU)
    assert trainer.teacher is not None and not trainer.teacher.training
    assert all(torch.equal(p, q) for p, q in zip(trainer.teacher.state_dict().values(), trained.values()))
    assert "teacher" not in trainer.parts and "teacher" not in trainer.state_dict()["models"]


def test_load_teacher_errors_and_when_no_teacher_is_needed(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist.*--trainer baseline.*teacher: outputs/<name>"):
        load_teacher(str(tmp_path / "missing"), NUM_CLASSES, CPU)
    with pytest.raises(UserError, match="neither a baseline run folder"):
        load_teacher(str(tmp_path), NUM_CLASSES, CPU)
    missing = f"teacher={tmp_path / 'missing'}"
    with pytest.raises(UserError, match="does not exist"):
        DGNet_Trainer(tiny_cfg(missing), NUM_CLASSES, CPU)
    for opts in (("max_teacher_w=0",), ("teacher_style=3",), ("teacher_style=2",), ("T_w=0",)):
        assert DGNet_Trainer(tiny_cfg(missing, *opts), NUM_CLASSES, CPU).teacher is None, opts
    with pytest.raises(UserError, match="teacher_style"):
        DGNet_Trainer(tiny_cfg(missing, "teacher_style=7"), NUM_CLASSES, CPU)
