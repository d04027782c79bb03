"""networks.py: shapes, parameter counts and key layout of the original, AdaIN, LayerNorm, losses, gradient
routing (which loss reaches which network, as in the original), frozen-weight calls, autocast,
channels_last, torch.compile."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import networks as N
import reIDmodel as R

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("no_onednn")


def default_cfg() -> dict:
    return yaml.safe_load((ROOT / "configs" / "defaults.yaml").read_text())


def tiny_cfg() -> dict:
    """64x32 images, tiny widths, resnet18 appearance code (4 x 512)."""
    cfg = default_cfg()
    cfg.update(backbone="resnet18", pretrained="none")
    cfg["gen"].update(dim=4, mlp_dim=16, id_dim=512, n_downsample=1, n_res=2)
    cfg["dis"].update(dim=4, n_res=1)
    return cfg


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def has_grad(module: torch.nn.Module) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads(module))


def no_grad(module: torch.nn.Module) -> bool:
    return all(g is None for g in grads(module))


# ---- the default config: the original networks' parameter counts and shapes (E_s, E_a, G, D) ----

def test_default_generator_counts_and_shapes():
    torch.manual_seed(0)
    gen = N.build_generator(default_cfg())
    mlps = [getattr(gen, f"mlp_{k}{i}") for k in "wb" for i in range(1, 5)]
    assert count(gen.enc_content) == 380_544
    assert count(gen.dec) == 1_455_555
    assert sum(count(m) for m in mlps) == 11_544_576
    assert count(gen) == 13_380_675
    x = torch.randn(1, 3, 256, 128)
    with torch.no_grad():
        s = gen.encode(x)
        assert s.shape == (1, 128, 64, 32)
        scales, biases = gen.adain_params(torch.randn(1, 8192))
        assert scales.shape == biases.shape == (1, 1024)  # 8 AdaIN layers x 128 channels
        assert gen.decode(s, torch.randn(1, 8192)).shape == (1, 3, 256, 128)
        # the encoder's gray input is the channel mean of the normalized image
        assert torch.equal(s, gen.enc_content.model(x.mean(1, keepdim=True)))


def test_default_discriminator_counts_and_shapes():
    torch.manual_seed(0)
    dis = N.build_discriminator(default_cfg())
    assert [count(c) for c in dis.cnns] == [341_857] * 3
    assert count(dis) == 1_025_571
    with torch.no_grad():
        outs = dis(torch.randn(1, 3, 256, 128))
    assert [tuple(o.shape) for o in outs] == [(1, 1, 64, 32), (1, 1, 32, 16), (1, 1, 16, 8)]


def original_generator_keys() -> dict[str, tuple[int, ...]]:
    """AdaINGen's state-dict keys at configs/latest.yaml, written out from the original's module tree."""
    keys: dict[str, tuple[int, ...]] = {}

    def conv(prefix, cin, cout, k):
        keys[f"{prefix}.conv.weight"] = (cout, cin, k, k)
        keys[f"{prefix}.conv.bias"] = (cout,)

    for i, (cin, cout) in enumerate([(1, 16), (16, 32), (32, 32), (32, 64)]):
        conv(f"enc_content.model.{i}", cin, cout, 3)
    for b in range(4):
        for j in range(2):
            conv(f"enc_content.model.4.model.{b}.model.{j}", 64, 64, 3)
    conv("enc_content.model.5.conv1", 64, 32, 1)
    for branch in ("conv6", "conv12", "conv18"):
        conv(f"enc_content.model.5.{branch}.0", 64, 32, 1)
        conv(f"enc_content.model.5.{branch}.1", 32, 32, 3)
    conv("enc_content.model.5.fuse", 128, 128, 1)
    for b in range(4):
        for j in range(2):
            conv(f"dec.model.1.model.{b}.model.{j}", 128, 128, 3)
            keys[f"dec.model.1.model.{b}.model.{j}.norm.running_mean"] = (128,)  # dummy AdaIN buffers
            keys[f"dec.model.1.model.{b}.model.{j}.norm.running_var"] = (128,)
    for i, (cin, cout) in ((3, (128, 64)), (5, (64, 32))):
        conv(f"dec.model.{i}", cin, cout, 5)
        keys[f"dec.model.{i}.norm.gamma"] = keys[f"dec.model.{i}.norm.beta"] = (cout,)
    conv("dec.model.6", 32, 32, 3)
    conv("dec.model.7", 32, 32, 3)
    conv("dec.model.8", 32, 3, 1)
    for kind in "wb":
        for i in range(1, 5):
            for j, (cin, cout) in enumerate([(2048, 512), (512, 512), (512, 256)]):
                keys[f"mlp_{kind}{i}.model.{j}.fc.weight"] = (cout, cin)
                keys[f"mlp_{kind}{i}.model.{j}.fc.bias"] = (cout,)
    return keys


def original_discriminator_keys() -> dict[str, tuple[int, ...]]:
    """MsImageDis's keys at configs/latest.yaml: per scale a flat Sequential, res blocks unwrapped."""
    keys: dict[str, tuple[int, ...]] = {}
    for s in range(3):
        for i, (cin, cout, k) in enumerate([(3, 32, 1), (32, 32, 3), (32, 32, 3), (32, 32, 3), (32, 64, 3)]):
            keys[f"cnns.{s}.{i}.conv.weight"] = (cout, cin, k, k)
            keys[f"cnns.{s}.{i}.conv.bias"] = (cout,)
        for b in range(5, 9):
            for j in range(2):
                keys[f"cnns.{s}.{b}.model.{j}.conv.weight"] = (64, 64, 3, 3)
                keys[f"cnns.{s}.{b}.model.{j}.conv.bias"] = (64,)
        keys[f"cnns.{s}.9.weight"] = (1, 64, 1, 1)
        keys[f"cnns.{s}.9.bias"] = (1,)
    return keys


def test_original_key_layout_loads(tmp_path):
    torch.manual_seed(0)
    cfg = default_cfg()
    gen, dis = N.build_generator(cfg), N.build_discriminator(cfg)
    expected_g = original_generator_keys()
    ours_g = {k: tuple(v.shape) for k, v in gen.state_dict().items()}
    assert ours_g == {k: v for k, v in expected_g.items() if not k.endswith(("running_mean", "running_var"))}
    assert {k: tuple(v.shape) for k, v in dis.state_dict().items()} == original_discriminator_keys()

    # an original-layout file (random weights, dummy AdaIN buffers, {'a': ...}; D saved via DataParallel)
    gen_state = {k: torch.randn(shape) for k, shape in expected_g.items()}
    dis_state = {f"module.{k}": torch.randn(shape) for k, shape in original_discriminator_keys().items()}
    torch.save({"a": gen_state}, tmp_path / "gen_00100000.pt")
    torch.save({"a": dis_state}, tmp_path / "dis_00100000.pt")
    N.load_original_state(gen, tmp_path / "gen_00100000.pt")
    N.load_original_state(dis, tmp_path / "dis_00100000.pt")
    assert torch.equal(gen.dec.model[3].norm.gamma, gen_state["dec.model.3.norm.gamma"])
    assert torch.equal(dis.cnns[2][9].weight, dis_state["module.cnns.2.9.weight"])


def test_original_state_reproduces_outputs_and_mismatch_is_clear(tmp_path):
    cfg = tiny_cfg()
    torch.manual_seed(1)
    gen_a, dis_a = N.build_generator(cfg), N.build_discriminator(cfg)
    torch.manual_seed(2)
    gen_b, dis_b = N.build_generator(cfg), N.build_discriminator(cfg)
    state = dict(gen_a.state_dict())
    for name, module in gen_a.named_modules():  # the original's AdaIN layers carried two dummy buffers
        if isinstance(module, N.ConvBlock) and module.norm_type == "adain":
            state[f"{name}.norm.running_mean"] = torch.zeros(module.conv.out_channels)
            state[f"{name}.norm.running_var"] = torch.ones(module.conv.out_channels)
    torch.save({"a": state}, tmp_path / "gen.pt")
    torch.save({"a": {f"module.{k}": v for k, v in dis_a.state_dict().items()}}, tmp_path / "dis.pt")
    N.load_original_state(gen_b, tmp_path / "gen.pt")
    N.load_original_state(dis_b, tmp_path / "dis.pt")
    x, f = torch.randn(2, 3, 64, 32), torch.randn(2, 2048)
    with torch.no_grad():
        assert torch.equal(gen_a.decode(gen_a.encode(x), f), gen_b.decode(gen_b.encode(x), f))
        assert all(torch.equal(a, b) for a, b in zip(dis_a(x), dis_b(x)))

    cfg["gen"]["dim"] = 8
    with pytest.raises(ValueError, match="does not fit this Generator"):
        N.load_original_state(N.build_generator(cfg), tmp_path / "gen.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        N.load_original_state(gen_b, tmp_path / "missing.pt")


# ---- normalization layers ----

def test_layernorm_is_the_originals():
    torch.manual_seed(0)
    ln = N.LayerNorm(6)
    assert ln.gamma.min() >= 0 and ln.gamma.max() < 1 and torch.equal(ln.beta, torch.zeros(6))
    with torch.no_grad():
        ln.beta.normal_()
    x = torch.randn(3, 6, 5, 4) * 3 + 1
    flat = x.view(3, -1)
    mean, std = flat.mean(1).view(3, 1, 1, 1), flat.std(1).view(3, 1, 1, 1)  # unbiased std, eps on the std
    expected = (x - mean) / (std + 1e-5) * ln.gamma.view(1, -1, 1, 1) + ln.beta.view(1, -1, 1, 1)
    torch.testing.assert_close(ln(x), expected)


def test_adain_equals_the_batch_norm_trick():
    """The original ran batch_norm (train mode) on the input reshaped to 1 x (B*C) x H x W."""
    x = torch.randn(3, 5, 6, 4) * 2 + 0.5
    scale, bias = torch.randn(3, 5), torch.randn(3, 5)
    expected = F.batch_norm(x.reshape(1, 15, 6, 4), torch.zeros(15), torch.ones(15), scale.reshape(-1),
                            bias.reshape(-1), True, 0.1, 1e-5).view(3, 5, 6, 4)
    torch.testing.assert_close(N.instance_norm(x, scale, bias), expected)


def test_adain_is_per_sample():
    torch.manual_seed(0)
    gen = N.build_generator(tiny_cfg())
    x, f = torch.randn(2, 3, 64, 32), torch.randn(2, 2048)
    with torch.no_grad():
        s = gen.encode(x)
        both = gen.decode(s, f)
        one = torch.cat([gen.decode(s[:1], f[:1]), gen.decode(s[1:], f[1:])])
        swapped = gen.decode(s, f.flip(0))
    torch.testing.assert_close(both, one)
    assert not torch.allclose(both, swapped)  # the appearance code matters


def test_norm_statistics_are_fp32_under_autocast():
    # values 256 and 258 are exact in bf16, their mean 257 is not: bf16 statistics would be off by one
    x = (256 + 2 * (torch.arange(2 * 4 * 8 * 8) % 2)).float().view(2, 4, 8, 8).to(torch.bfloat16)
    ln = N.LayerNorm(4)
    with torch.no_grad():
        ln.gamma.fill_(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ln, y_in = ln(x), N.instance_norm(x, torch.ones(2, 4), torch.zeros(2, 4))
    for y in (y_ln, y_in):
        assert y.dtype == torch.bfloat16
        assert y.float().mean().abs() < 1e-2 and (y.float().abs() - 1).abs().max() < 2e-2


# ---- losses ----

def test_dis_and_gen_losses_sanity_values_and_r1():
    torch.manual_seed(0)
    dis = N.build_discriminator(tiny_cfg())
    real, fake = torch.randn(2, 3, 64, 32), torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        for net in dis.cnns:  # D == 0: the original's printed sanity values
            net[-1].weight.zero_()
            net[-1].bias.zero_()
    loss, r1 = N.dis_loss(dis, fake, real, "lsgan", 0.01)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(3.0) and r1.item() == 0.0
    assert N.gen_adv_loss(dis, fake, "lsgan").item() == pytest.approx(6.0)

    torch.manual_seed(1)
    dis = N.build_discriminator(tiny_cfg())
    x = real.clone().requires_grad_(True)
    r1_manual = 0.0
    for out in dis(x):
        (g,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
        r1_manual += g.pow(2).flatten(1).sum(1).mean()
    loss, r1 = N.dis_loss(dis, fake, real, "lsgan", 0.5)
    torch.testing.assert_close(r1, 0.5 * r1_manual, rtol=1e-5, atol=0.0)
    assert not real.requires_grad  # the caller's tensor is left alone
    loss_ns, _ = N.dis_loss(dis, fake, real, "nsgan", 0.0)
    assert torch.isfinite(loss_ns) and N.gen_adv_loss(dis, fake, "nsgan") > 0
    r1_sigmoid = 0.0  # nsgan's R1 is of the probability sigmoid(D), as the original's latest release takes it
    for out in dis(x):
        (g,) = torch.autograd.grad(out.sigmoid().sum(), x, retain_graph=True)
        r1_sigmoid += g.pow(2).flatten(1).sum(1).mean()
    _, r1_ns = N.dis_loss(dis, fake, real, "nsgan", 0.5)
    torch.testing.assert_close(r1_ns, 0.5 * r1_sigmoid, rtol=1e-5, atol=0.0)
    assert r1_ns < r1 / 10  # sigmoid'(D) <= 1/4 shrinks the gradient, the penalty by up to 16 times
    # under bf16 autocast the penalty is still the fp32 one: D's pass on the reals leaves autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, r1_amp = N.dis_loss(dis, fake, real, "lsgan", 0.5)
    torch.testing.assert_close(r1_amp, r1, rtol=1e-5, atol=0.0)  # R1 is ~1e-13 at init: relative only


# ---- gradient routing (which loss reaches which network, as in the original) ----

@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    return N.build_generator(cfg), N.build_discriminator(cfg), R.build_appearance_encoder(cfg, 5)


def zero_grads(*modules):
    for m in modules:
        m.zero_grad(set_to_none=True)


def test_gradient_routing(tiny_models):
    gen, dis, ea = tiny_models
    mlps = torch.nn.ModuleList(getattr(gen, f"mlp_{k}{i}") for k in "wb" for i in range(1, 5))
    x_a, x_b = torch.randn(2, 3, 64, 32), torch.randn(2, 3, 64, 32)
    labels = torch.tensor([1, 3])

    # reconstruction: E_s, decoder and MLPs learn; E_a does not (f is detached inside E_a)
    zero_grads(gen, dis, ea)
    f_a, _, _ = ea(x_a)
    assert not f_a.requires_grad
    s_a = gen.encode(x_a)
    F.l1_loss(gen.decode(s_a, f_a), x_a).backward()
    assert has_grad(gen.enc_content) and has_grad(gen.dec) and has_grad(mlps) and no_grad(ea)

    # D loss on generated images reaches D only
    zero_grads(gen, dis, ea)
    f_a, _, _ = ea(x_a)
    x_ba = gen.decode(gen.encode(x_b), f_a)
    N.dis_loss(dis, x_ba, x_a, "lsgan", 0.01)[0].backward()
    assert has_grad(dis) and no_grad(gen) and no_grad(ea)

    # G adversarial loss reaches G (E_s, decoder, MLPs), never D's weights
    zero_grads(gen, dis, ea)
    x_ba = gen.decode(gen.encode(x_b), f_a)
    N.gen_adv_loss(dis, x_ba).backward()
    assert has_grad(gen.enc_content) and has_grad(gen.dec) and has_grad(mlps) and no_grad(dis)

    # identity loss on a generated image through the frozen E_a: G learns, E_a does not, BN stats kept
    zero_grads(gen, dis, ea)
    bn_before = {k: v.clone() for k, v in ea.state_dict().items() if "running" in k or "num_batches" in k}
    x_ba = gen.decode(gen.encode(x_b), f_a)
    _, logits, _ = N.frozen_call(ea, x_ba, train_bn=True)
    F.cross_entropy(logits, labels).backward()
    assert has_grad(gen.dec) and has_grad(gen.enc_content) and no_grad(ea)
    assert all(torch.equal(ea.state_dict()[k], v) for k, v in bn_before.items())
    assert ea.training and ea.classifier1.add_block[2].training  # modes restored

    # ReID losses on real images reach E_a
    zero_grads(gen, dis, ea)
    _, logits1, logits2 = ea(x_a)
    (F.cross_entropy(logits1, labels) + F.cross_entropy(logits2, labels)).backward()
    assert has_grad(ea.model) and has_grad(ea.classifier1) and has_grad(ea.classifier2) and no_grad(gen)

    # structure re-encoding, frozen encoder on the non-detached swap: decoder, MLPs and E_s learn
    zero_grads(gen, dis, ea)
    s_a = gen.encode(x_a)
    x_ab = gen.decode(s_a, ea(x_b)[0])
    F.l1_loss(N.frozen_call(gen.enc_content, x_ab), s_a.detach()).backward()
    assert has_grad(gen.dec) and has_grad(mlps) and has_grad(gen.enc_content)
    # ... and the live encoder on the detached swap: only E_s learns
    zero_grads(gen, dis, ea)
    F.l1_loss(gen.encode(x_ab.detach()), s_a.detach()).backward()
    assert has_grad(gen.enc_content) and no_grad(gen.dec) and no_grad(mlps)


def test_frozen_call_grads_buffers_and_modes():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                              torch.nn.Linear(8, 3))
    net.train()
    x = torch.randn(6, 4, requires_grad=True)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    out = N.frozen_call(net, x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, dict(net.named_buffers())[k]) for k, v in buffers.items())

    # train_bn=True: no dropout, batch statistics; the same as an eval copy with BN in train mode
    reference = copy.deepcopy(net).eval()
    reference[1].train()
    x = torch.randn(6, 4)
    torch.testing.assert_close(N.frozen_call(net, x, train_bn=True), reference(x))
    torch.testing.assert_close(N.frozen_call(net, x, train_bn=False), copy.deepcopy(net).eval()(x))
    assert net.training and net[1].training and net[2].training
    assert all(torch.equal(v, dict(net.named_buffers())[k]) for k, v in buffers.items())
    assert net[1].track_running_stats  # switched off for the call only
    # the running statistics are read in place, not copied: eval mode sees their current values
    with torch.no_grad():
        net[1].running_mean.add_(1.0)
    torch.testing.assert_close(N.frozen_call(net, x, train_bn=False), copy.deepcopy(net).eval()(x))


# ---- precision, memory format, compile ----

def test_autocast_bf16_cpu(tiny_models):
    gen, dis, _ = tiny_models
    x, f = torch.randn(2, 3, 64, 32), torch.randn(2, 2048)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gen.decode(gen.encode(x), f)
        loss, r1 = N.dis_loss(dis, y, x, "lsgan", 0.01)
        adv = N.gen_adv_loss(dis, y)
    assert y.shape == (2, 3, 64, 32) and torch.isfinite(y.float()).all()
    assert loss.dtype == r1.dtype == adv.dtype == torch.float32
    (loss + adv).backward()
    assert all(torch.isfinite(p.grad).all() for p in dis.parameters() if p.grad is not None)
    zero_grads(gen, dis)


def test_channels_last_matches(tiny_models):
    gen, dis, _ = tiny_models
    x, f = torch.randn(2, 3, 64, 32), torch.randn(2, 2048)
    with torch.no_grad():
        y = gen.decode(gen.encode(x), f)
        d = dis(x)
        gen_cl = copy.deepcopy(gen).to(memory_format=torch.channels_last)
        dis_cl = copy.deepcopy(dis).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(gen_cl.decode(gen_cl.encode(x_cl), f), y, atol=1e-4, rtol=1e-4)
        for a, b in zip(dis_cl(x_cl), d):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_config_errors_are_clear():
    cfg = tiny_cfg()
    cfg["gen"]["activ"] = "gelu"
    with pytest.raises(ValueError, match="gen.activ is 'gelu'"):
        N.build_generator(cfg)
    cfg = tiny_cfg()
    cfg["dis"]["gan_type"] = "wgan"
    with pytest.raises(ValueError, match="dis.gan_type"):
        N.build_discriminator(cfg)
    gen = N.build_generator(tiny_cfg())
    with pytest.raises(ValueError, match="appearance code must be"):
        gen.adain_params(torch.randn(1, 100))
    cfg = tiny_cfg()
    cfg["gen"]["n_downsample"] = 2  # 64x32 -> a 16x8 structure map: too small for dilation-9 reflect pads
    with pytest.raises(ValueError, match="too small"):
        N.build_generator(cfg).encode(torch.randn(1, 3, 64, 32))


def test_compile_fullgraph_decoder_cpu():
    """Dynamo traces the decoder with functional AdaIN as one graph (no breaks), forward and backward.

    aot_eager skips inductor's C++ code generation (about 40 s on 2 cores); that part runs below on
    request and in bench/networks_gpu_check.py on a GPU.
    """
    torch.manual_seed(0)
    gen = N.build_generator(tiny_cfg())
    s, f = torch.randn(2, 16, 32, 16, requires_grad=True), torch.randn(2, 2048)
    scales, biases = gen.adain_params(f)
    y = torch.compile(gen.dec, backend="aot_eager", fullgraph=True)(s, scales, biases)
    torch.testing.assert_close(y, gen.dec(s, scales, biases))
    y.sum().backward()
    assert s.grad is not None and has_grad(gen.dec) and has_grad(gen.mlp_w1)


@pytest.mark.skipif(not os.environ.get("DGNET_SLOW_TESTS"),
                    reason="inductor on CPU takes ~40 s on 2 cores; set DGNET_SLOW_TESTS=1 to run it")
def test_compile_inductor_decoder_cpu():
    torch.manual_seed(0)
    gen = N.build_generator(tiny_cfg()).eval()
    s, f = torch.randn(2, 16, 32, 16), torch.randn(2, 2048)
    with torch.no_grad():
        scales, biases = gen.adain_params(f)
        y = torch.compile(gen.dec)(s, scales, biases)
        torch.testing.assert_close(y, gen.dec(s, scales, biases), atol=1e-4, rtol=1e-4)


def test_ddp_forward_and_frozen_call_through_the_wrapper(tmp_path):
    """Functional AdaIN under DDP (gloo, one process); frozen_call unwraps DDP so no reduction is left due."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from distributed import end_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        gen, dis = N.build_generator(tiny_cfg()), N.build_discriminator(tiny_cfg())
        ddp_gen, ddp_dis = DDP(gen), DDP(dis)
        x, f = torch.randn(2, 3, 64, 32), torch.randn(2, 2048)
        for _ in range(2):  # a second iteration fails if DDP still waits for a reduction
            zero_grads(gen, dis)
            N.dis_loss(ddp_dis, ddp_gen(gen.encode(x), f), x, "lsgan", 0.01)[0].backward()
            assert has_grad(dis) and no_grad(gen)
            zero_grads(gen, dis)
            y = ddp_gen(gen.encode(x), f)
            (N.gen_adv_loss(ddp_dis, y) + F.l1_loss(y, x)).backward()
            assert has_grad(gen.dec) and no_grad(dis)
    finally:
        end_process_group()


def test_remap_gray_is_a_per_image_intensity_curve():
    torch.manual_seed(0)
    levels = torch.tensor([-1.5, -0.5, 0.3, 1.2, 2.0])  # 5 grey levels, each on a block of pixels
    gray = levels[torch.randint(0, 5, (6, 1, 8, 4))]
    gray[:, 0, 0, 0], gray[:, 0, 0, 1] = -1.5, 2.0  # every image spans the same [min, max]
    assert torch.equal(N.remap_gray(gray, 0.0), gray)
    out = N.remap_gray(gray, 1.0)
    assert out.shape == gray.shape and not torch.equal(out, gray)
    assert out.min() >= -1.5 - 1e-6 and out.max() <= 2.0 + 1e-6  # stays in each image's own range
    for g, o in zip(gray, out):  # a function of the grey level: equal inputs give equal outputs
        for v in levels:
            assert o[g == v].unique().numel() == 1
    # different curves per image, and not always monotone (which part is brighter is not kept)
    curves = torch.stack([torch.stack([o[g == v][0] for v in levels]) for g, o in zip(gray, out)])
    assert curves.unique(dim=0).shape[0] == 6
    assert (curves.diff(dim=1) < 0).any()


# ---- the image sizes DG-Net's G and D take (check_image_size) against the networks themselves ----


@pytest.mark.parametrize("gen_opts, sizes", [
    (["gen.n_downsample=2", "gen.pad_type=reflect"], [(40, 40), (40, 36), (44, 40), (42, 40), (36, 40), (40, 41)]),
    (["gen.n_downsample=1", "gen.pad_type=zero"], [(6, 8), (8, 6), (7, 8), (8, 9)]),
])
def test_check_image_size_agrees_with_the_generator(gen_opts, sizes, no_onednn):
    from utils import load_config

    cfg = load_config(None, [*gen_opts, "gen.dim=2", "gen.mlp_dim=4", "gen.id_dim=4", "gen.n_res=1",
                             "dis.pad_type=zero"])
    g = N.build_generator(cfg).eval()
    for h, w in sizes:
        cfg["crop_image_height"], cfg["crop_image_width"] = h, w
        try:
            with torch.no_grad():
                works = g.decode(g.encode(torch.zeros(1, 3, h, w)), torch.zeros(1, 16)).shape[-2:] == (h, w)
        except (RuntimeError, ValueError):
            works = False
        try:
            N.check_image_size(cfg)
            accepted = True
        except ValueError as err:
            accepted = False
            assert "crop_image_height x crop_image_width" in str(err) and "use " in str(err)
        assert accepted == works, (gen_opts, h, w)


@pytest.mark.parametrize("dis_opts", [["dis.num_scales=3", "dis.n_layer=2", "dis.n_res=1"],
                                      ["dis.num_scales=2", "dis.n_layer=1", "dis.n_res=0"]])
def test_check_image_size_agrees_with_the_discriminator(dis_opts, no_onednn):
    from utils import load_config

    cfg = load_config(None, [*dis_opts, "dis.dim=2", "dis.pad_type=reflect", "gen.n_downsample=1",
                             "gen.pad_type=zero"])
    d = N.build_discriminator(cfg)
    for side in (2, 4, 6, 8, 10, 16, 18):
        cfg["crop_image_height"], cfg["crop_image_width"] = side, 18
        try:
            d(torch.zeros(2, 3, side, 18))
            works = True
        except RuntimeError:
            works = False
        try:
            N.check_image_size(cfg)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == works, (dis_opts, side)


class Payload:
    """Unpickling it would run code: weights_only refuses it."""


def test_a_refused_pickle_says_why_without_the_unsafe_advice(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"a": Payload()}, path)
    for load in (N.read_original_state, lambda p: R.load_original_state(R.Teacher(4, "resnet18"), p),
                 lambda p: R._load_weights_file(str(p), "pretrained weights")):
        with pytest.raises(ValueError) as info:
            load(path)
        message = str(info.value)
        assert "could run code" in message and "weights_only" not in message and len(message.splitlines()) == 1


def test_original_weights_holding_nan_are_refused(tmp_path):
    """A diverged run's weights in the original's format (`{'a': state_dict}`) are refused like ours."""
    gen = N.Generator(dim=4, mlp_dim=8, id_dim=8, n_res=1)
    state = gen.state_dict()
    state["dec.model.1.model.0.model.0.conv.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "gen_00100000.pt"
    torch.save({"a": state}, path)
    with pytest.raises(ValueError, match="NaN or infinity in dec.model.1.model.0.model.0.conv.weight"):
        N.read_original_state(path)
    state["dec.model.1.model.0.model.0.conv.weight"][0, 0, 0, 0] = 0.0
    torch.save({"a": state}, path)
    assert set(N.read_original_state(path)) == set(state)
