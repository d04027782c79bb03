"""DG-Net's discriminative networks: the appearance encoder / ReID model and the teacher's baseline model.

Paper names first, the original release's names (NVlabs/DG-Net `reIDmodel.py`) in brackets:

- `AppearanceEncoder` [ft_netAB, `trainer.id_a`]: E_a and the ReID model at once. A ResNet whose last
  stage has stride `last_stride`; the appearance code f is the feature map max-pooled into 4 horizontal
  stripes (4 x 2048 = 8192 for ResNet-50) and detached; a global max pool feeds two bottleneck heads,
  `classifier1` (primary, dropout 0.5) and `classifier2` (fine-grained, dropout 0.75).
- `Teacher` [ft_net of layumi/Person_reID_baseline_pytorch, `trainer.teacher_model[0]`]: ResNet, global
  average pooling, one 512-d bottleneck head. Trained by the baseline trainer, then frozen.

Backbones: torchvision resnet18/34/50. The code length follows the backbone width (512 for resnet18/34, so
the code is 4 x 512 = 2048 and gen.id_dim must be 512), which keeps tiny configs cheap on a CPU.

Parameter names follow the original (`model.*` for the ResNet, `classifier1/2.add_block.{0,1}`,
`classifier1/2.classifier.0`, the teacher's `classifier.*`), so `id_*.pt` and a baseline `net_last.pth`
load with `load_original_state`. The one key map: the original kept torchvision's unused ImageNet `fc`
(`model.fc.*`, 2M parameters that never receive a gradient); it is not built here and is dropped on load.
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from networks import check_state_fits, load_failure, read_original_state

BACKBONE_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
NUM_STRIPES = 4  # horizontal stripes of the appearance code
DOWNLOAD_TIMEOUT_S = 15.0


# ---------------------------------------------------------------------------------------------------------
# BatchNorm over sub-batches: several E_a calls in one
# ---------------------------------------------------------------------------------------------------------

class _SubBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm that can treat its batch as consecutive sub-batches, each normalized by its own statistics.

    DG-Net runs E_a on several batches per iteration (clean and erased views, positives, both swaps), and in
    train mode each call's BatchNorm uses that call's statistics and moves the running statistics once. With
    `sub_batches` set, one call on the concatenated batches gives the same outputs, gradients and running
    statistics as the separate calls in that order, while every other layer runs once on the whole batch:
    a fraction of the operator launches that pace DG-Net on a GPU (BENCHMARKS.md). Eval mode uses the
    running statistics, which do not depend on the batch, so it ignores the sub-batches.
    """

    sub_batches: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = super().forward
        if len(self.sub_batches) < 2 or not self.training:
            return norm(x)
        if sum(self.sub_batches) != len(x):
            raise ValueError(f"sub-batches {self.sub_batches} do not add up to the batch of {len(x)}")
        parts = x.split(self.sub_batches)
        if self.momentum is None:  # a cumulative average: each sub-batch's factor depends on the count
            return torch.cat([norm(part) for part in parts])
        # What `norm` does per part, with the batch counter bumped once for all of them (one operator less
        # per sub-batch, the same count)
        self._check_input_dim(x)
        tracked = self.track_running_stats
        if tracked and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(len(parts))
        mean, var = (self.running_mean, self.running_var) if tracked else (None, None)
        return torch.cat([F.batch_norm(part, mean, var, self.weight, self.bias, True,
                                       self.momentum, self.eps) for part in parts])


class SubBatchNorm1d(_SubBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d with `sub_batches` (same parameters, buffers and state-dict keys)."""


class SubBatchNorm2d(_SubBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d with `sub_batches` (same parameters, buffers and state-dict keys)."""


def split_norms(module: nn.Module) -> list[_SubBatchNorm] | None:
    """The BatchNorms of `module`, for `sub_batches`; None if one of them cannot split its batch (it was
    converted to SyncBatchNorm)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return norms if all(isinstance(m, _SubBatchNorm) for m in norms) else None


@contextmanager
def sub_batches(norms: list[_SubBatchNorm], sizes: list[int]) -> Iterator[None]:
    """Inside: a call of the module that holds `norms` (`split_norms(module)`) on `torch.cat` of batches of
    these sizes normalizes each batch by its own BatchNorm statistics, as separate calls in that order
    would. The list is an argument so that a training loop finds the layers once, not at every call."""
    sizes = tuple(sizes)
    for m in norms:
        m.sub_batches = sizes
    try:
        yield
    finally:
        for m in norms:
            m.sub_batches = ()


# ---------------------------------------------------------------------------------------------------------
# Backbone and pretrained weights
# ---------------------------------------------------------------------------------------------------------

def imagenet_weights_url(backbone: str) -> str:
    """torchvision's IMAGENET1K_V1 weights for `backbone` (what DG-Net used through `pretrained=True`)."""
    weights = getattr(torchvision.models, f"ResNet{backbone[len('resnet'):]}_Weights")
    return weights.IMAGENET1K_V1.url


def imagenet_weights_path(backbone: str) -> str:
    """Where torch hub caches those weights: `torch.hub.get_dir()/checkpoints/<file name of the URL>`."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(imagenet_weights_url(backbone)))


def _download(url: str, dst: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch `url` to `dst` through a temporary file, checking the sha256 prefix in torchvision's names."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.{os.getpid()}.partial"
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        expected = re.search(r"-([a-f0-9]{6,})\.", os.path.basename(dst))
        if expected and not digest.hexdigest().startswith(expected.group(1)):
            raise ValueError("the downloaded file's sha256 does not match its name")
        os.replace(tmp, dst)  # atomic: several processes may download at once
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_weights_file(path: str, what: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or pickled objects that weights_only refuses
        raise ValueError(f"could not read {what} {path} as a state dict ({load_failure(exc)}): give a file saved "
                         "with torch.save(state_dict)") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path} does not hold a state dict: give a file saved with "
                         "torch.save(state_dict)")
    return state


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights from the torch hub cache, downloaded there first when they are missing.

    Offline with nothing cached: FileNotFoundError naming the file, where to put it, and how to switch
    pretraining off. Never hangs: the download has a short timeout.
    """
    url, path = imagenet_weights_url(backbone), imagenet_weights_path(backbone)
    if not os.path.isfile(path):
        try:
            _download(url, path)
        except Exception as exc:
            raise FileNotFoundError(
                f"ImageNet weights for {backbone} are not cached and could not be downloaded "
                f"({load_failure(exc)}): download {url} to {path}, or set `pretrained: none` (or a path to a "
                "state dict) in the config") from None
    return _load_weights_file(path, "ImageNet weights")


def _weights_file(path: str) -> str:
    """A run folder stands for its newest checkpoint (`checkpoints/<iteration>.pt`), the original baseline's
    folder for its `net_last.pth`; any other path is returned as it is."""
    if not os.path.isdir(path):
        return path
    folder = os.path.join(path, "checkpoints")
    found = sorted(n for n in os.listdir(folder) if re.fullmatch(r"\d{8}\.pt", n)) if os.path.isdir(folder) else []
    return os.path.join(folder, found[-1]) if found else os.path.join(path, "net_last.pth")


def _reid_backbone(state: dict) -> dict[str, torch.Tensor]:
    """The backbone part of a ReID model's weights: a train.py checkpoint (its teacher, else its E_a), or a
    state dict with `model.*` keys (ours, or the original's id_*.pt / net_last.pth); others pass through."""
    if isinstance(state.get("trainer"), dict):
        models = state["trainer"]["models"]
        state = models.get("teacher") or models.get("id") or {}
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return state


def _backbone_state_dict(backbone: str, pretrained: str) -> dict[str, torch.Tensor] | None:
    """pretrained: imagenet, none, or a path to ResNet weights: torchvision's layout, or a ReID model's
    (a train.py checkpoint, an original id_*.pt or net_last.pth), whose backbone is taken."""
    if pretrained is None or str(pretrained).lower() in ("none", ""):
        return None
    if str(pretrained).lower() == "imagenet":
        return imagenet_state_dict(backbone)
    path = _weights_file(os.path.expanduser(str(pretrained)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights {path} do not exist: give an existing file or run "
                                "folder, or `pretrained: imagenet` or `pretrained: none`")
    state = _load_weights_file(path, "pretrained weights")
    if set(state) == {"a"} and isinstance(state["a"], dict):
        state = state["a"]
    return _reid_backbone(state)


def build_backbone(backbone: str = "resnet50", last_stride: int = 1, pretrained: str = "none") -> nn.Module:
    """A torchvision ResNet without its ImageNet `fc`, with `last_stride` in its last stage.

    last_stride 1 removes the last downsampling (DG-Net): 256x128 -> a 16x8 map instead of 8x4.
    """
    if backbone not in BACKBONE_CHANNELS:
        raise ValueError(f"backbone {backbone!r} is not known: use one of {', '.join(BACKBONE_CHANNELS)}")
    if last_stride not in (1, 2):
        raise ValueError(f"ID_stride is {last_stride!r}: use 1 (DG-Net, 16x8 map at 256x128) or 2")
    net = getattr(torchvision.models, backbone)(weights=None, norm_layer=SubBatchNorm2d)
    net.fc = nn.Identity()  # never used; the original kept it (see load_original_state)
    state = _backbone_state_dict(backbone, pretrained)
    if state is not None:
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"the pretrained weights ({pretrained}) do not fit a torchvision {backbone} "
                             f"({load_failure(exc)}): give {backbone} weights, or set `pretrained: none`"
                             ) from None
    if last_stride == 1:
        block = net.layer4[0]
        # the stride sits in conv2 of a Bottleneck (resnet50) and in conv1 of a BasicBlock (resnet18/34)
        (block.conv2 if hasattr(block, "conv3") else block.conv1).stride = (1, 1)
        block.downsample[0].stride = (1, 1)
    return net


SCALE2_MAX_HEIGHT = 128


def scale2(x: torch.Tensor) -> torch.Tensor:
    """The original's `scale2`: an image batch at most 128 pixels high doubled by nearest neighbour.

    DG-Net's trainer hands E_a and the teacher their input this way, so at 64x32 their ResNet sees 128x64
    and f is pooled from a feature map 4 times larger; at 256x128 it changes nothing.
    """
    return F.interpolate(x, scale_factor=2, mode="nearest") if x.shape[-2] <= SCALE2_MAX_HEIGHT else x


def backbone_forward(net: nn.Module, x: torch.Tensor, double_small: bool = False) -> torch.Tensor:
    """The ResNet's feature map before pooling: (B, C, H/16, W/16) with last stride 1; with `double_small`,
    of the input after `scale2`."""
    if double_small:
        x = scale2(x)
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


# ---------------------------------------------------------------------------------------------------------
# Heads and models
# ---------------------------------------------------------------------------------------------------------

class ClassBlock(nn.Module):
    """Bottleneck head [ClassBlock]: Linear(in, 512) + BatchNorm1d + Dropout, then Linear(512, classes).

    No ReLU. Bottleneck Linear: Kaiming normal (fan_out), bias 0; classifier Linear: N(0, 0.001), bias 0.
    BatchNorm1d: PyTorch's default (DG-Net's own head) or N(1, 0.02) (`baseline_bn_init`, the baseline's
    head, used for the teacher). `bottleneck(x)` is the 512-d test-time feature.
    """

    def __init__(self, in_dim: int, num_classes: int, droprate: float, num_bottleneck: int = 512,
                 baseline_bn_init: bool = False):
        super().__init__()
        self.add_block = nn.Sequential(nn.Linear(in_dim, num_bottleneck), SubBatchNorm1d(num_bottleneck),
                                       nn.Dropout(droprate))
        self.classifier = nn.Sequential(nn.Linear(num_bottleneck, num_classes))
        nn.init.kaiming_normal_(self.add_block[0].weight, a=0, mode="fan_out")
        nn.init.zeros_(self.add_block[0].bias)
        if baseline_bn_init:
            nn.init.normal_(self.add_block[1].weight, 1.0, 0.02)
            nn.init.zeros_(self.add_block[1].bias)
        nn.init.normal_(self.classifier[0].weight, std=0.001)
        nn.init.zeros_(self.classifier[0].bias)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_block[1](self.add_block[0](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.add_block(x))


def _pool(x: torch.Tensor, size: tuple[int, int], pool: str) -> torch.Tensor:
    return F.adaptive_max_pool2d(x, size) if pool == "max" else F.adaptive_avg_pool2d(x, size)


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x itself in the forward pass; its gradient multiplied by `scale` in the backward pass (0: detached)."""
    if scale == 0:
        return x.detach()
    if scale == 1:
        return x
    frozen = x.detach()
    return frozen + scale * (x - frozen)  # x - frozen is exactly 0: the value is x's, bit for bit


class AppearanceEncoder(nn.Module):
    """E_a and the ReID model [ft_netAB]: image -> (appearance code f, primary logits, fine-grained logits).

    f: the last feature map pooled (max by default) to 4 horizontal stripes and flattened channel-major, so
    f[:, c*4 + k] is channel c in stripe k and the decoder's 4 consecutive chunks are channel groups, as in
    the original. f is *detached* by default: generation losses never train E_a (as in the original). With
    `f_grad` > 0 (not in the original) f carries their gradient into the backbone, scaled by `f_grad`; its
    value is unchanged. The heads see the global pool (max by default: the original's `pool: max` made its
    "avgpool" a max pool).
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", last_stride: int = 1,
                 pool: str = "max", pretrained: str = "none", droprates: tuple[float, float] = (0.5, 0.75),
                 scale2: bool = False, f_grad: float = 0.0):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool is {pool!r}: use max (DG-Net) or avg")
        if f_grad < 0:
            raise ValueError(f"f_grad is {f_grad}: use 0 (f detached, DG-Net) or a positive scale")
        self.pool = pool
        self.scale2 = scale2
        self.f_grad = f_grad
        self.model = build_backbone(backbone, last_stride, pretrained)
        self.channels = BACKBONE_CHANNELS[backbone]
        self.classifier1 = ClassBlock(self.channels, num_classes, droprates[0])
        self.classifier2 = ClassBlock(self.channels, num_classes, droprates[1])

    @property
    def code_dim(self) -> int:
        """Length of the appearance code: 4 stripes x backbone width."""
        return NUM_STRIPES * self.channels

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map of (B, 3, H, W) normalized images, doubled first with `scale2`."""
        return backbone_forward(self.model, x, self.scale2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalized -> f (B, 4*C) (detached unless `f_grad`), logits1 (B, classes), logits2."""
        fmap = self.feature_map(x)
        f = scale_grad(_pool(fmap, (NUM_STRIPES, 1), self.pool).flatten(1), self.f_grad)
        g = _pool(fmap, (1, 1), self.pool).flatten(1)
        return f, self.classifier1(g), self.classifier2(g)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Test-time feature (B, 1024): the primary, then the fine-grained 512-d bottleneck output.

        Call it in eval mode. Flip-averaging and the per-half normalization of the evaluation protocol are
        the caller's.
        """
        g = _pool(self.feature_map(x), (1, 1), self.pool).flatten(1)
        return torch.cat([self.classifier1.bottleneck(g), self.classifier2.bottleneck(g)], dim=1)


class Teacher(nn.Module):
    """The baseline model that teaches E_a [ft_net]: ResNet, global average pooling, one ClassBlock.

    `forward(x)` -> logits (B, classes); `features(x)` -> the 512-d bottleneck (B, 512).
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", last_stride: int = 2,
                 pretrained: str = "none", droprate: float = 0.5, scale2: bool = False):
        super().__init__()
        self.scale2 = scale2
        self.model = build_backbone(backbone, last_stride, pretrained)
        self.classifier = ClassBlock(BACKBONE_CHANNELS[backbone], num_classes, droprate,
                                     baseline_bn_init=True)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(backbone_forward(self.model, x, self.scale2), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._pooled(x))

    def pooled_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled feature, logits): what training needs (the triplet loss is on the pooled feature)."""
        pooled = self._pooled(x)
        return pooled, self.classifier(pooled)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.bottleneck(self._pooled(x))


# ---------------------------------------------------------------------------------------------------------
# The original's checkpoints
# ---------------------------------------------------------------------------------------------------------

def _class_count(state: dict[str, torch.Tensor], key: str) -> int | None:
    weight = state.get(key)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def load_original_state(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an original `id_*.pt` into `AppearanceEncoder` or a baseline `net_last.pth` into `Teacher`.

    Reads with weights_only=True, unwraps `{'a': state_dict}`, strips a DataParallel `module.` prefix,
    drops the unused ImageNet classifier `model.fc.*` (the one key map), and loads strictly. A class-count
    mismatch and any other mismatch raise ValueError with one line saying what to do. Returns `module`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path (a teacher is a folder "
                                "with net_last.pth, or the file itself)")
    state = read_original_state(path)
    state = {k: v for k, v in state.items() if not k.startswith("model.fc.")}

    is_teacher = isinstance(module, Teacher)
    head = "classifier.classifier.0.weight" if is_teacher else "classifier1.classifier.0.weight"
    own = module.state_dict()
    have, want = _class_count(state, head), _class_count(own, head)
    if have is not None and want is not None and have != want:
        if is_teacher:
            raise ValueError(f"teacher {path} has {have} classes, the data has {want}: train a teacher on "
                             "this dataset (python train.py --config configs/teacher/<dataset>.yaml "
                             "--trainer baseline) and point `teacher:` at it")
        raise ValueError(f"checkpoint {path} has {have} classes, the data has {want}: use a checkpoint "
                         "trained on this dataset")
    check_state_fits(module, state, path, "check `backbone` and that the file is the right kind (id_*.pt "
                                          "for DG-Net, net_last.pth for a teacher)")
    module.load_state_dict(state, strict=True)
    return module


# ---------------------------------------------------------------------------------------------------------
# Builders from the config dict (configs/defaults.yaml)
# ---------------------------------------------------------------------------------------------------------

def build_appearance_encoder(cfg: dict, num_classes: int, pretrained: str | None = None) -> AppearanceEncoder:
    """AppearanceEncoder from cfg keys backbone, pretrained, ID_stride, pool; checks gen.id_dim if present.

    `pretrained` overrides cfg["pretrained"] (e.g. "none" when a checkpoint will be loaded anyway).
    """
    backbone = cfg["backbone"]
    if backbone not in BACKBONE_CHANNELS:
        raise ValueError(f"backbone is {backbone!r}: use one of {', '.join(BACKBONE_CHANNELS)}")
    id_dim = cfg.get("gen", {}).get("id_dim")
    if id_dim is not None and id_dim != BACKBONE_CHANNELS[backbone]:
        raise ValueError(f"gen.id_dim is {id_dim} but {backbone} has {BACKBONE_CHANNELS[backbone]} channels: "
                         f"set gen.id_dim: {BACKBONE_CHANNELS[backbone]} (each MLP reads one of the 4 chunks "
                         "of the appearance code)")
    return AppearanceEncoder(num_classes, backbone=backbone, last_stride=cfg["ID_stride"], pool=cfg["pool"],
                             pretrained=cfg["pretrained"] if pretrained is None else pretrained,
                             scale2=cfg["scale2"], f_grad=cfg["f_grad_w"])


def build_teacher(cfg: dict, num_classes: int, pretrained: str | None = None) -> Teacher:
    """Teacher from the teacher run's cfg keys backbone, ID_stride, pretrained (pooling is always average).

    `pretrained` overrides cfg["pretrained"]: pass "none" when loading a trained teacher.
    """
    return Teacher(num_classes, backbone=cfg["backbone"], last_stride=cfg["ID_stride"],
                   pretrained=cfg["pretrained"] if pretrained is None else pretrained, scale2=cfg["scale2"])
