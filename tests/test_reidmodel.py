"""reIDmodel.py: the appearance encoder (ft_netAB) and the teacher (ft_net): shapes, counts, code layout,
the original's key layout and checkpoints, class-count errors, pretrained weights offline."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

import reIDmodel as R

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("no_onednn")


def cfg(**over) -> dict:
    c = yaml.safe_load((ROOT / "configs" / "defaults.yaml").read_text())
    c.update(backbone="resnet18", pretrained="none", scale2=False)  # the maps at the input's own size
    c["gen"]["id_dim"] = 512
    c.update(over)
    return c


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def with_fc(state: dict, backbone: str = "resnet18") -> dict:
    """The original kept torchvision's ImageNet fc inside `model`: add it as its files have it."""
    fc = getattr(torchvision.models, backbone)().fc
    return {**state, "model.fc.weight": fc.weight.detach(), "model.fc.bias": fc.bias.detach()}


def test_default_appearance_encoder():
    torch.manual_seed(0)
    ea = R.build_appearance_encoder(cfg(backbone="resnet50", gen={"id_dim": 2048}), 751)
    assert count(ea.model) == 23_508_032  # ResNet-50 without the unused ImageNet fc
    assert count(ea.classifier1) == count(ea.classifier2) == 2048 * 512 + 512 + 2 * 512 + 512 * 751 + 751
    assert ea.code_dim == 8192
    x = torch.randn(1, 3, 256, 128)
    ea.eval()  # batch 1 (BatchNorm1d needs 2 samples in train mode)
    with torch.no_grad():
        assert R.backbone_forward(ea.model, x).shape == (1, 2048, 16, 8)  # ID_stride 1
        f, logits1, logits2 = ea(x)
        assert f.shape == (1, 8192) and logits1.shape == logits2.shape == (1, 751)
        assert ea.classifier1.add_block[2].p == 0.5 and ea.classifier2.add_block[2].p == 0.75
    # initialisation of the heads (the original ft_netAB's)
    assert ea.classifier1.classifier[0].weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert torch.equal(ea.classifier1.add_block[1].weight, torch.ones(512))
    assert ea.classifier1.add_block[0].weight.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.05)


def test_stride_pool_and_code_layout():
    torch.manual_seed(0)
    ea = R.build_appearance_encoder(cfg(), 5)
    x = torch.randn(2, 3, 128, 64, requires_grad=True)
    fmap = R.backbone_forward(ea.model, x)
    assert fmap.shape == (2, 512, 8, 4)
    f, logits1, _ = ea(x)
    assert f.shape == (2, 2048) and not f.requires_grad  # detached: generation losses never reach E_a
    # channel-major: f[:, c*4 + k] is channel c, stripe k (2 rows each here), max-pooled
    stripes = fmap.detach().view(2, 512, 4, 2, 4).amax(dim=(3, 4))
    torch.testing.assert_close(f, stripes.flatten(1))
    torch.testing.assert_close(f[:, :512 * 4].view(2, 512, 4), stripes[:, :512])
    assert R.backbone_forward(R.build_backbone("resnet18", 2), x).shape == (2, 512, 4, 2)
    ea.eval()
    with torch.no_grad():  # test features: both 512-d bottlenecks of the global max pool
        g = ea(x)[0].view(2, 512, 4).amax(2)  # the max over the stripes is the global max
        torch.testing.assert_close(ea.features(x), torch.cat([ea.classifier1.bottleneck(g),
                                                              ea.classifier2.bottleneck(g)], 1))
    avg = R.build_appearance_encoder(cfg(pool="avg"), 5)
    f_avg = avg(x)[0]
    torch.testing.assert_close(f_avg, R.backbone_forward(avg.model, x).detach().view(2, 512, 4, 2, 4)
                               .mean(dim=(3, 4)).flatten(1))


def test_scale2_doubles_only_inputs_at_most_128_high():
    """The original's scale2: E_a and the teacher see a small image doubled by nearest neighbour, as the
    plain models see the doubled image; at 256x128 (DG-Net's size) it changes nothing."""
    torch.manual_seed(0)
    ea = R.build_appearance_encoder(cfg(scale2=True), 5).eval()
    teacher = R.build_teacher(cfg(scale2=True, ID_stride=2), 5).eval()
    plain_ea = R.build_appearance_encoder(cfg(), 5).eval()
    plain_teacher = R.build_teacher(cfg(ID_stride=2), 5).eval()
    plain_ea.load_state_dict(ea.state_dict())
    plain_teacher.load_state_dict(teacher.state_dict())
    small = torch.randn(2, 3, 64, 32)
    doubled = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    large = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        assert ea.feature_map(small).shape == (2, 512, 8, 4)
        for x, seen in ((small, doubled), (large, large)):
            for got, want in zip(ea(x), plain_ea(seen)):
                torch.testing.assert_close(got, want)
            torch.testing.assert_close(ea.features(x), plain_ea.features(seen))
            torch.testing.assert_close(teacher(x), plain_teacher(seen))
            torch.testing.assert_close(teacher.features(x), plain_teacher.features(seen))
        # 129 rows are left alone, 128 are doubled
        assert R.scale2(torch.zeros(1, 3, 129, 64)).shape[2:] == (129, 64)
        assert R.scale2(torch.zeros(1, 3, 128, 64)).shape[2:] == (256, 128)


def test_teacher_is_the_baseline_model():
    torch.manual_seed(0)
    teacher = R.build_teacher(cfg(ID_stride=2), 7).eval()
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        logits, feats = teacher(x), teacher.features(x)
        pooled = R.backbone_forward(teacher.model, x).mean(dim=(2, 3))  # average pooling
        torch.testing.assert_close(logits, teacher.classifier(pooled))
    assert logits.shape == (2, 7) and feats.shape == (2, 512)
    assert R.backbone_forward(teacher.model, x).shape == (2, 512, 4, 2)


def test_original_key_layout():
    tv_keys = {f"model.{k}": tuple(v.shape) for k, v in torchvision.models.resnet50().state_dict().items()}
    ea = R.AppearanceEncoder(751, "resnet50")
    ours = {k: tuple(v.shape) for k, v in ea.state_dict().items()}
    heads = {k: s for k, s in ours.items() if not k.startswith("model.")}
    assert {k: s for k, s in ours.items() if k.startswith("model.")} == {
        k: s for k, s in tv_keys.items() if not k.startswith("model.fc.")}
    expected_head = {"add_block.0.weight": (512, 2048), "add_block.0.bias": (512,),
                     "add_block.1.weight": (512,), "add_block.1.bias": (512,),
                     "add_block.1.running_mean": (512,), "add_block.1.running_var": (512,),
                     "add_block.1.num_batches_tracked": (), "classifier.0.weight": (751, 512),
                     "classifier.0.bias": (751,)}
    assert heads == {f"{c}.{k}": s for c in ("classifier1", "classifier2") for k, s in expected_head.items()}
    teacher = R.Teacher(751, "resnet50")
    assert {k: tuple(v.shape) for k, v in teacher.state_dict().items() if not k.startswith("model.")} == {
        f"classifier.{k}": s for k, s in expected_head.items()}


def test_original_checkpoints_load_and_reproduce(tmp_path):
    torch.manual_seed(1)
    ea_a, teacher_a = R.build_appearance_encoder(cfg(), 9).eval(), R.build_teacher(cfg(), 9).eval()
    torch.manual_seed(2)
    ea_b, teacher_b = R.build_appearance_encoder(cfg(), 9).eval(), R.build_teacher(cfg(), 9).eval()
    torch.save({"a": with_fc(ea_a.state_dict())}, tmp_path / "id_00100000.pt")
    # the baseline saves a bare state dict; a DataParallel save adds "module."
    teacher_state = {f"module.{k}": v for k, v in with_fc(teacher_a.state_dict()).items()}
    torch.save(teacher_state, tmp_path / "net_last.pth")
    R.load_original_state(ea_b, tmp_path / "id_00100000.pt")
    R.load_original_state(teacher_b, tmp_path / "net_last.pth")
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ea_a(x), ea_b(x)))
        assert torch.equal(ea_a.features(x), ea_b.features(x))
        assert torch.equal(teacher_a(x), teacher_b(x))

    with pytest.raises(ValueError, match=r"teacher .* has 9 classes, the data has 7: train a teacher"):
        R.load_original_state(R.build_teacher(cfg(), 7), tmp_path / "net_last.pth")
    with pytest.raises(ValueError, match="has 9 classes, the data has 7"):
        R.load_original_state(R.build_appearance_encoder(cfg(), 7), tmp_path / "id_00100000.pt")
    with pytest.raises(ValueError, match="does not fit this Teacher"):
        R.load_original_state(R.build_teacher(cfg(backbone="resnet34"), 9), tmp_path / "net_last.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.load_original_state(teacher_b, tmp_path / "nope" / "net_last.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        R.load_original_state(teacher_b, tmp_path / "junk.pth")


def test_gen_id_dim_must_follow_the_backbone():
    with pytest.raises(ValueError, match="gen.id_dim is 2048 but resnet18 has 512 channels"):
        R.build_appearance_encoder(cfg(gen={"id_dim": 2048}), 5)
    with pytest.raises(ValueError, match="backbone is 'vgg16'"):
        R.build_appearance_encoder(cfg(backbone="vgg16"), 5)
    with pytest.raises(ValueError, match="ID_stride"):
        R.build_appearance_encoder(cfg(ID_stride=3), 5)


# ---- pretrained weights ----

def test_imagenet_offline_error_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(url, dst, timeout=R.DOWNLOAD_TIMEOUT_S):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(R, "_download", offline)
    path = str(tmp_path / "empty" / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    assert R.imagenet_weights_path("resnet50") == path
    with pytest.raises(FileNotFoundError) as info:
        R.build_appearance_encoder(cfg(backbone="resnet50", pretrained="imagenet", gen={}), 751)
    message = str(info.value)
    assert "\n" not in message
    assert path in message and "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert "pretrained: none" in message and "name resolution" in message


def test_imagenet_from_the_hub_cache_and_from_a_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(R, "_download", lambda *a, **k: pytest.fail("the cache must be read first"))
    torch.manual_seed(3)
    weights = torchvision.models.resnet18().state_dict()  # stands in for the ImageNet file
    cached = Path(R.imagenet_weights_path("resnet18"))
    cached.parent.mkdir(parents=True)
    torch.save(weights, cached)
    ea = R.build_appearance_encoder(cfg(pretrained="imagenet"), 5)
    assert torch.equal(ea.model.layer4[1].conv2.weight, weights["layer4.1.conv2.weight"])
    assert torch.equal(ea.model.bn1.running_var, weights["bn1.running_var"])

    teacher = R.build_teacher(cfg(pretrained=str(cached)), 5)
    assert torch.equal(teacher.model.conv1.weight, weights["conv1.weight"])
    with pytest.raises(ValueError, match="do not fit a torchvision resnet34"):
        R.build_teacher(cfg(backbone="resnet34", pretrained=str(cached)), 5)
    with pytest.raises(FileNotFoundError, match="pretrained weights .* do not exist"):
        R.build_teacher(cfg(pretrained=str(tmp_path / "missing.pth")), 5)


def test_download_checks_the_hash_and_leaves_no_partial_file(tmp_path):
    payload = b"weights" * 1000
    digest = hashlib.sha256(payload).hexdigest()
    source = tmp_path / "src.pth"
    source.write_bytes(payload)
    good = tmp_path / "cache" / f"resnet18-{digest[:8]}.pth"
    R._download(source.as_uri(), str(good))
    assert good.read_bytes() == payload
    bad = tmp_path / "cache" / "resnet18-00000000.pth"
    with pytest.raises(ValueError, match="sha256"):
        R._download(source.as_uri(), str(bad))
    assert sorted(os.listdir(tmp_path / "cache")) == [good.name]


def test_backbone_from_a_reid_checkpoint(tmp_path):
    """`pretrained: PATH` may name a ReID model's weights: a train.py checkpoint or a `model.*` state dict."""
    teacher = R.Teacher(num_classes=5, backbone="resnet18")
    run_state = {"kind": "baseline", "iteration": 3, "trainer": {"models": {"teacher": teacher.state_dict()}}}
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(run_state, tmp_path / "run" / "checkpoints" / "00000003.pt")
    torch.save({"a": teacher.state_dict()}, tmp_path / "net_last.pth")
    for name in ("run", "run/checkpoints/00000003.pt", "net_last.pth", "."):
        net = R.build_backbone("resnet18", last_stride=1, pretrained=str(tmp_path / name))
        for key, value in net.state_dict().items():
            assert torch.equal(value, teacher.model.state_dict()[key]), key


def encoder_and_copy(momentum: float | None = 0.1) -> tuple[R.AppearanceEncoder, R.AppearanceEncoder]:
    """A train-mode E_a without dropout (its masks would be drawn differently per call) and a copy of it."""
    import copy

    torch.manual_seed(0)
    ea = R.AppearanceEncoder(5, backbone="resnet18").train()
    for m in ea.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    return ea, copy.deepcopy(ea)


@pytest.mark.parametrize("momentum", [0.1, None])  # None: a cumulative average, the count matters
def test_sub_batches_match_separate_calls(momentum):
    """One call on concatenated batches under `sub_batches`: the outputs, gradients and running statistics
    (batch counters included) of separate calls in that order, including the heads' BatchNorm1d."""
    ea, separate = encoder_and_copy(momentum)
    batches = [torch.randn(4, 3, 64, 32) * (k + 1) + k for k in range(3)]  # statistics differ per batch
    expected = [separate(x) for x in batches]
    norms = R.split_norms(ea)
    assert norms and all(isinstance(m, (R.SubBatchNorm1d, R.SubBatchNorm2d)) for m in norms)
    with R.sub_batches(norms, [4, 4, 4]):
        got = ea(torch.cat(batches))
    for k in range(3):
        torch.testing.assert_close(got[k], torch.cat([out[k] for out in expected]))
    for (name, b), b_separate in zip(ea.named_buffers(), separate.buffers()):
        torch.testing.assert_close(b, b_separate, msg=name)  # the same order of running-statistic moves
    sum(out[1].square().sum() for out in expected).backward()
    got[1].square().sum().backward()
    for (name, p), p_separate in zip(ea.named_parameters(), separate.parameters()):
        torch.testing.assert_close(p.grad, p_separate.grad, rtol=1e-4, atol=1e-6, msg=name)

    # the setting ends with the block; a joint call normalizes over the whole batch, which differs
    joint = ea(torch.cat(batches))[1]
    assert not torch.allclose(joint, got[1], atol=1e-3)
    with pytest.raises(ValueError, match="add up"), R.sub_batches(norms, [4, 4]):
        ea(torch.cat(batches))
    # eval mode reads the running statistics: the batch does not matter, nor do the sub-batches
    ea.eval()
    with R.sub_batches(norms, [6, 6]):
        torch.testing.assert_close(ea(torch.cat(batches))[1], ea(torch.cat(batches))[1])
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(ea)
    assert R.split_norms(ea) is None


def test_sub_batch_norm_keeps_the_state_dict_keys():
    plain = torchvision.models.resnet18(weights=None)
    plain.fc = torch.nn.Identity()
    ours = R.build_backbone("resnet18", last_stride=2)
    assert isinstance(ours.bn1, R.SubBatchNorm2d)
    assert list(ours.state_dict()) == list(plain.state_dict())
    ours.load_state_dict(plain.state_dict(), strict=True)


def test_sub_batches_compile_in_one_graph():
    """`compile: true` compiles E_a: the split BatchNorm traces as one graph (aot_eager: no C++ compiler)."""
    ea, separate = encoder_and_copy()
    ea.compile(backend="aot_eager", fullgraph=True)
    batches = [torch.randn(4, 3, 64, 32) * (k + 1) for k in range(2)]
    with R.sub_batches(R.split_norms(ea), [4, 4]):
        logits = ea(torch.cat(batches))[1]
    torch.testing.assert_close(logits, torch.cat([separate(x)[1] for x in batches]))
    for b, b_separate in zip(ea.buffers(), separate.buffers()):
        torch.testing.assert_close(b, b_separate)
