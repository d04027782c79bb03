"""DG-Net's generative networks: structure encoder, AdaIN decoder with its MLPs, multi-scale discriminator.

Paper names first, the original release's names (NVlabs/DG-Net `networks.py`) in brackets:

- `StructureEncoder` [ContentEncoder, `gen_a.enc_content`]: channel mean of the normalized image ->
  structure code s (128x64x32 at 256x128).
- `Decoder` [Decoder, `gen_a.dec`]: s plus per-sample AdaIN scales and biases -> image (unbounded, in
  ImageNet-normalized space).
- `Generator` [AdaINGen, `gen_a`]: the encoder, the decoder and the 8 MLPs `mlp_w1..4`/`mlp_b1..4` that map
  the 4 chunks of the appearance code to the decoder's AdaIN scales and biases.
- `MsImageDis` [MsImageDis, `dis_a`]: 3-scale PatchGAN discriminator; `dis_loss` (LSGAN + R1 on reals) and
  `gen_adv_loss` are pure functions computed in fp32.
- `frozen_call`: run a module with its live weights but gradients stopped at the weights (the original
  deep-copied the appearance and structure encoders every iteration for this).

Module and parameter names follow the original so that its `gen_*.pt` / `dis_*.pt` checkpoints load with
`load_original_state`. Deliberate differences, all numerically neutral for the released config:
AdaIN is functional (scales and biases are arguments, never module attributes, so DDP and torch.compile
work); the original's dummy AdaIN buffers `...norm.running_mean/var` are dropped on load; normalization
statistics are computed in fp32 under autocast; the original's fp16 LayerNorm branch (statistics over the
whole batch) is not reproduced.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from r1conv import r1_convs, weight_grads_skipped

PAD_MODES = {"reflect": "reflect", "replicate": "replicate", "zero": "zeros"}
ACTIVATIONS = ("relu", "lrelu", "prelu", "selu", "tanh", "none")
INITS = ("gaussian", "kaiming", "xavier", "orthogonal", "default")
GAN_TYPES = ("lsgan", "nsgan")


# ---------------------------------------------------------------------------------------------------------
# Normalization: statistics always in fp32, result back in the input's dtype (bf16/fp16 under autocast).
# ---------------------------------------------------------------------------------------------------------

def instance_norm(x: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  eps: float = 1e-5) -> torch.Tensor:
    """Per-sample, per-channel normalization over H, W (biased variance), then optional AdaIN.

    `scale`/`bias` are (B, C): each sample gets its own. This equals the original's AdaIN, which ran
    `batch_norm` in training mode on the input reshaped to 1 x (B*C) x H x W. The output scale is used as
    is (no "1 +"), like the original. Computed as a group norm with one group per channel: one fused
    kernel instead of a chain of elementwise operators (G runs about 40 of these per iteration).
    """
    y = F.group_norm(x.float(), x.shape[1], eps=eps)
    if scale is not None:
        y = torch.addcmul(bias.float()[:, :, None, None], y, scale.float()[:, :, None, None])
    return y.to(x.dtype)


class LayerNorm(nn.Module):
    """The original's (MUNIT's) LayerNorm, which is neither `nn.LayerNorm` nor `GroupNorm(1, C)`.

    Per sample, over all of C*H*W: y = (x - mean) / (std + eps) * gamma_c + beta_c with the *unbiased* std
    and eps added to the std, not the variance. gamma starts U[0, 1), beta at 0.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.rand(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        std, mean = torch.std_mean(x32, dim=tuple(range(1, x.dim())), keepdim=True, correction=1)
        y = (x32 - mean) / (std + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (y * self.gamma.view(shape) + self.beta.view(shape)).to(x.dtype)


def make_activation(name: str) -> nn.Module | None:
    """relu, lrelu (slope 0.2), prelu, selu, tanh or none (None)."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "lrelu":
        return nn.LeakyReLU(0.2, inplace=True)
    if name == "prelu":
        return nn.PReLU()
    if name == "selu":
        return nn.SELU(inplace=True)
    if name == "tanh":
        return nn.Tanh()
    if name == "none":
        return None
    raise ValueError(f"activation {name!r} is not known: use one of {', '.join(ACTIVATIONS)}")


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------

class ConvBlock(nn.Module):
    """Padded conv, then norm, then activation [Conv2dBlock].

    norm: none, in (instance norm, no affine), adain (instance norm with per-sample scale and bias passed
    to forward), ln (the original LayerNorm) or bn. The padding lives in the conv (`padding_mode`), which
    is the same computation as the original's separate pad module and keeps the key `conv.weight`.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int = 1, padding: int = 0,
                 norm: str = "none", activ: str = "relu", pad_type: str = "zero", dilation: int = 1):
        super().__init__()
        if pad_type not in PAD_MODES:
            raise ValueError(f"padding {pad_type!r} is not known: use one of {', '.join(PAD_MODES)}")
        self.conv = nn.Conv2d(in_dim, out_dim, kernel, stride, padding, dilation=dilation,
                              padding_mode=PAD_MODES[pad_type])
        self.norm_type = norm
        if norm == "ln":
            self.norm = LayerNorm(out_dim)
        elif norm == "bn":
            self.norm = nn.BatchNorm2d(out_dim)
        elif norm in ("none", "in", "adain"):
            self.norm = None  # "in" and "adain" are the functional instance_norm
        else:
            raise ValueError(f"normalization {norm!r} is not known: use one of none, in, adain, ln, bn")
        self.activation = make_activation(activ)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_type == "adain":
            if scale is None or bias is None:
                raise ValueError("an AdaIN layer needs per-sample scales and biases: call the decoder with "
                                 "the MLP outputs (Generator.decode does this)")
            x = instance_norm(x, scale, bias)
        elif self.norm_type == "in":
            x = instance_norm(x)
        elif self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class ResBlock(nn.Module):
    """x + (conv3x3-norm-activ, conv3x3-norm); nothing after the sum [ResBlock, res_type basic].

    With norm "adain", `scales`/`biases` are (B, 2, C): one (B, C) pair for each of the two convs.
    """

    def __init__(self, dim: int, norm: str, activ: str, pad_type: str):
        super().__init__()
        self.model = nn.ModuleList([ConvBlock(dim, dim, 3, 1, 1, norm, activ, pad_type),
                                    ConvBlock(dim, dim, 3, 1, 1, norm, "none", pad_type)])

    def forward(self, x: torch.Tensor, scales: torch.Tensor | None = None,
                biases: torch.Tensor | None = None) -> torch.Tensor:
        s0 = s1 = b0 = b1 = None
        if scales is not None:
            s0, s1 = scales.unbind(1)
            b0, b1 = biases.unbind(1)
        return x + self.model[1](self.model[0](x, s0, b0), s1, b1)


class ResBlocks(nn.Module):
    """`num_blocks` ResBlocks; with AdaIN, block i takes the AdaIN layers 2i and 2i+1 of (B, 2n, C)."""

    def __init__(self, num_blocks: int, dim: int, norm: str, activ: str, pad_type: str):
        super().__init__()
        self.model = nn.ModuleList([ResBlock(dim, norm, activ, pad_type) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor, scales: torch.Tensor | None = None,
                biases: torch.Tensor | None = None) -> torch.Tensor:
        for i, block in enumerate(self.model):
            if scales is None:
                x = block(x)
            else:
                x = block(x, scales[:, 2 * i:2 * i + 2], biases[:, 2 * i:2 * i + 2])
        return x


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 4 branches of dim/2 channels, concatenated, fused to 2*dim [ASPP].

    (a) 1x1 conv + norm; (b, c, d) 1x1 conv + norm + activ, then 3x3 conv dilated 3/6/9 + norm. The fuse is
    a 1x1 conv + norm with no activation. Branch names keep the original's keys (conv1, conv6, ...).
    """

    def __init__(self, dim: int, norm: str, activ: str, pad_type: str):
        super().__init__()
        part = dim // 2
        self.pad_type = pad_type
        self.conv1 = ConvBlock(dim, part, 1, 1, 0, norm, "none", pad_type)
        self.conv6 = nn.Sequential(ConvBlock(dim, part, 1, 1, 0, norm, activ, pad_type),
                                   ConvBlock(part, part, 3, 1, 3, norm, "none", pad_type, dilation=3))
        self.conv12 = nn.Sequential(ConvBlock(dim, part, 1, 1, 0, norm, activ, pad_type),
                                    ConvBlock(part, part, 3, 1, 6, norm, "none", pad_type, dilation=6))
        self.conv18 = nn.Sequential(ConvBlock(dim, part, 1, 1, 0, norm, activ, pad_type),
                                    ConvBlock(part, part, 3, 1, 9, norm, "none", pad_type, dilation=9))
        self.fuse = ConvBlock(4 * part, 2 * dim, 1, 1, 0, norm, "none", pad_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_type != "zero" and min(x.shape[2:]) <= 9:
            # reflect/replicate padding of 9 needs a map larger than 9 pixels: fail with a clear message
            raise ValueError(f"the structure map is {x.shape[2]}x{x.shape[3]}, too small for the ASPP's "
                             f"dilation-9 {self.pad_type} padding: use larger images (at least 128x64 with "
                             "gen.n_downsample 2), fewer gen.n_downsample stages, or gen.pad_type: zero")
        branches = [self.conv1(x), self.conv6(x), self.conv12(x), self.conv18(x)]
        return self.fuse(torch.cat(branches, dim=1))


class LinearBlock(nn.Module):
    """Linear, then activation [LinearBlock with norm none]."""

    def __init__(self, in_dim: int, out_dim: int, activ: str):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.activation = make_activation(activ)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        return x if self.activation is None else self.activation(x)


class MLP(nn.Module):
    """in -> dim -> ... -> out, `n_blk` Linear layers, activation between them, none at the output [MLP]."""

    def __init__(self, in_dim: int, out_dim: int, dim: int, n_blk: int, activ: str):
        super().__init__()
        layers = [LinearBlock(in_dim, dim, activ)]
        layers += [LinearBlock(dim, dim, activ) for _ in range(n_blk - 2)]
        layers += [LinearBlock(dim, out_dim, "none")]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ---------------------------------------------------------------------------------------------------------
# Structure encoder E_s, decoder G, generator
# ---------------------------------------------------------------------------------------------------------

def to_gray(images: torch.Tensor) -> torch.Tensor:
    """The structure encoder's input: per-pixel mean of the 3 *normalized* channels [trainer.to_gray]."""
    return images.mean(dim=1, keepdim=True)


def remap_gray(gray: torch.Tensor, p: float, knots: int = 5) -> torch.Tensor:
    """With probability `p` per image, a random intensity curve applied to a grey image (B, 1, H, W).

    The curve is piecewise linear over the image's own [min, max], with `knots` values drawn uniformly in
    that range, so it is not monotone: shapes and edges survive, while which part is brighter does not.
    E_s then cannot pass the structure provider's clothing brightness to the decoder, which must take it
    from the appearance code (not in the original; `structure_jitter`). Draws from the global generator.
    """
    n = gray.shape[0]
    flat = gray.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    t = (flat - lo) / (hi - lo).clamp_min(1e-6) * (knots - 1)
    left = t.floor().clamp(max=knots - 2)
    values = torch.rand(n, knots, device=gray.device, dtype=gray.dtype)
    index = left.long()
    v0, v1 = values.gather(1, index), values.gather(1, index + 1)
    remapped = (lo + (v0 + (t - left) * (v1 - v0)) * (hi - lo)).view_as(gray)
    chosen = torch.rand(n, 1, 1, 1, device=gray.device) < p
    return torch.where(chosen, remapped, gray)


class StructureEncoder(nn.Module):
    """E_s [ContentEncoder, `enc_content`]: image -> structure code.

    At the defaults (dim 16, n_downsample 2, n_res 4), 1x256x128 -> 16x128x64 (stride 2) -> 32x128x64 ->
    32x128x64 -> 64x64x32 (stride 2) -> 4 residual blocks -> ASPP -> 128x64x32. Every conv is followed by
    instance norm and the activation. With `input_dim` 1, a 3-channel normalized image is turned into its
    channel mean first (the original did this in the trainer), so callers always pass the RGB image.
    """

    def __init__(self, input_dim: int = 1, dim: int = 16, n_downsample: int = 2, n_res: int = 4,
                 activ: str = "lrelu", pad_type: str = "reflect", tanh: bool = False):
        super().__init__()
        self.input_dim = input_dim
        layers: list[nn.Module] = [ConvBlock(input_dim, dim, 3, 2, 1, "in", activ, pad_type),
                                   ConvBlock(dim, 2 * dim, 3, 1, 1, "in", activ, pad_type)]
        dim *= 2
        for _ in range(n_downsample - 1):
            layers += [ConvBlock(dim, dim, 3, 1, 1, "in", activ, pad_type),
                       ConvBlock(dim, 2 * dim, 3, 2, 1, "in", activ, pad_type)]
            dim *= 2
        layers += [ResBlocks(n_res, dim, "in", activ, pad_type), ASPP(dim, "in", activ, pad_type)]
        if tanh:  # the original's gen.tanh bounds the structure code, not the decoder output
            layers += [nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.output_dim = 2 * dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_dim == 1 and x.shape[1] == 3:
            x = to_gray(x)
        return self.model(x)


class Decoder(nn.Module):
    """G's image decoder [Decoder]: structure code + AdaIN scales/biases -> image.

    Dropout, `n_res` AdaIN residual blocks at `dim` channels, then `n_upsample` x (nearest 2x upsample, 5x5
    conv halving the width + LayerNorm + activ), two 3x3 convs + activ, a 1x1 conv to `output_dim`. No tanh:
    the output lives in normalized image space. The layers sit in `model` (a ModuleList) in the original's
    order, so its `dec.model.<i>...` keys load; forward walks them top to bottom.
    """

    def __init__(self, n_upsample: int = 2, n_res: int = 4, dim: int = 128, output_dim: int = 3,
                 dropout: float = 0.0, activ: str = "lrelu", pad_type: str = "reflect"):
        super().__init__()
        self.dim = dim
        self.num_adain_layers = 2 * n_res
        layers: list[nn.Module] = [nn.Dropout(dropout), ResBlocks(n_res, dim, "adain", activ, pad_type)]
        for _ in range(n_upsample):
            layers += [nn.Upsample(scale_factor=2),
                       ConvBlock(dim, dim // 2, 5, 1, 2, "ln", activ, pad_type)]
            dim //= 2
        layers += [ConvBlock(dim, dim, 3, 1, 1, "none", activ, pad_type),
                   ConvBlock(dim, dim, 3, 1, 1, "none", activ, pad_type),
                   ConvBlock(dim, output_dim, 1, 1, 0, "none", "none", pad_type)]
        self.model = nn.ModuleList(layers)

    @property
    def num_adain_params(self) -> int:
        """Scales (and, separately, biases) per sample: one per channel of each AdaIN layer."""
        return self.num_adain_layers * self.dim

    def forward(self, s: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
        """s: (B, dim, h, w); scales, biases: (B, num_adain_params), layer-major.

        AdaIN layer l (in module order) takes the values [l*dim, (l+1)*dim) of each.
        """
        if scales.shape[1] != self.num_adain_params or biases.shape != scales.shape:
            raise ValueError(f"the decoder needs {self.num_adain_params} AdaIN scales and biases per sample, "
                             f"got {tuple(scales.shape)} and {tuple(biases.shape)}")
        scales = scales.unflatten(1, (self.num_adain_layers, self.dim))
        biases = biases.unflatten(1, (self.num_adain_layers, self.dim))
        x = s
        for layer in self.model:
            x = layer(x, scales, biases) if isinstance(layer, ResBlocks) else layer(x)
        return x


def init_weights(module: nn.Module, init: str) -> None:
    """The original's `weights_init`: every Conv2d/Linear weight by `init`, every such bias to 0.

    gaussian N(0, 0.02); kaiming normal, fan_in; xavier normal, gain sqrt(2); orthogonal, gain sqrt(2);
    default keeps PyTorch's weight init (biases are still zeroed, as in the original).
    """
    if init not in INITS:
        raise ValueError(f"init {init!r} is not known: use one of {', '.join(INITS)}")
    for m in module.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if init == "gaussian":
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif init == "kaiming":
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
        elif init == "xavier":
            nn.init.xavier_normal_(m.weight, gain=2 ** 0.5)
        elif init == "orthogonal":
            nn.init.orthogonal_(m.weight, gain=2 ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """E_s + G [AdaINGen, `gen_a`]: `encode(x) -> s`, `decode(s, f) -> image` (also `forward(s, f)`).

    The appearance code f (B, 4*id_dim; id_dim = backbone width, 2048 for ResNet-50) is split into 4
    consecutive chunks. Chunk k feeds `mlp_wk` (AdaIN scales) and `mlp_bk` (biases); the 4 outputs of each
    kind are concatenated and handed to the decoder's AdaIN layers in order, `dim` values per layer. At the
    default n_res 4 each MLP emits 256 values: chunk k drives residual block k, as in the original. For
    another n_res each MLP emits n_res*dim/2 values, so the 4 chunks always cover the 2*n_res layers.
    """

    def __init__(self, input_dim: int = 1, dim: int = 16, n_downsample: int = 2, n_res: int = 4,
                 mlp_dim: int = 512, id_dim: int = 2048, activ: str = "lrelu", pad_type: str = "reflect",
                 dropout: float = 0.0, tanh: bool = False, init: str = "kaiming"):
        super().__init__()
        self.id_dim = id_dim
        self.enc_content = StructureEncoder(input_dim, dim, n_downsample, n_res, activ, pad_type, tanh)
        s_dim = self.enc_content.output_dim
        self.dec = Decoder(n_downsample, n_res, s_dim, 3, dropout, activ, pad_type)
        mlp_out = self.dec.num_adain_params // 4
        self.mlp_w1 = MLP(id_dim, mlp_out, mlp_dim, 3, activ)
        self.mlp_w2 = MLP(id_dim, mlp_out, mlp_dim, 3, activ)
        self.mlp_w3 = MLP(id_dim, mlp_out, mlp_dim, 3, activ)
        self.mlp_w4 = MLP(id_dim, mlp_out, mlp_dim, 3, activ)
        self.mlp_b1 = MLP(id_dim, mlp_out, mlp_dim, 3, activ)
        self.mlp_b2 = MLP(id_dim, mlp_out, mlp_dim, 3, activ)
        self.mlp_b3 = MLP(id_dim, mlp_out, mlp_dim, 3, activ)
        self.mlp_b4 = MLP(id_dim, mlp_out, mlp_dim, 3, activ)
        init_weights(self, init)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized RGB image (B, 3, H, W) -> structure code s (B, 128, H/4, W/4 at the defaults)."""
        return self.enc_content(x)

    def adain_params(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appearance code (B, 4*id_dim) -> (scales, biases), each (B, decoder.num_adain_params)."""
        if f.dim() != 2 or f.shape[1] != 4 * self.id_dim:
            raise ValueError(f"the appearance code must be (batch, {4 * self.id_dim}) for gen.id_dim "
                             f"{self.id_dim}, got {tuple(f.shape)}: gen.id_dim must be the backbone's width")
        chunks = f.split(self.id_dim, dim=1)
        mlps_w = (self.mlp_w1, self.mlp_w2, self.mlp_w3, self.mlp_w4)
        mlps_b = (self.mlp_b1, self.mlp_b2, self.mlp_b3, self.mlp_b4)
        scales = torch.cat([mlp(c) for mlp, c in zip(mlps_w, chunks)], dim=1)
        biases = torch.cat([mlp(c) for mlp, c in zip(mlps_b, chunks)], dim=1)
        return scales, biases

    def decode(self, s: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Structure code s and appearance code f -> image (B, 3, H, W), unbounded, normalized space."""
        return self.dec(s, *self.adain_params(f))

    def forward(self, s: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return self.decode(s, f)


# ---------------------------------------------------------------------------------------------------------
# Discriminator D and the adversarial losses
# ---------------------------------------------------------------------------------------------------------

class MsImageDis(nn.Module):
    """D [MsImageDis, `dis_a`]: `num_scales` PatchGAN nets, each on a 2x average-pooled copy of the last.

    Per scale (defaults): 1x1 conv 3->32, 3x3 conv, 3x3 conv stride 2, then (n_layer-1) x (3x3 conv, 3x3
    conv stride 2 doubling the width up to 512), `n_res` residual blocks, 1x1 conv to 1 map. N(0, 0.02)
    init. At 256x128 the outputs are 64x32, 32x16 and 16x8. `forward` returns the list of maps.
    """

    def __init__(self, input_dim: int = 3, dim: int = 32, n_layer: int = 2, n_res: int = 4,
                 num_scales: int = 3, norm: str = "none", activ: str = "lrelu", pad_type: str = "reflect"):
        super().__init__()
        self.cnns = nn.ModuleList()
        for _ in range(num_scales):
            net = self._make_net(input_dim, dim, n_layer, n_res, norm, activ, pad_type)
            init_weights(net, "gaussian")
            self.cnns.append(net)

    @staticmethod
    def _make_net(input_dim: int, dim: int, n_layer: int, n_res: int, norm: str, activ: str,
                  pad_type: str) -> nn.Sequential:
        layers: list[nn.Module] = [ConvBlock(input_dim, dim, 1, 1, 0, norm, activ, pad_type),
                                   ConvBlock(dim, dim, 3, 1, 1, norm, activ, pad_type),
                                   ConvBlock(dim, dim, 3, 2, 1, norm, activ, pad_type)]
        for _ in range(n_layer - 1):
            dim2 = min(dim * 2, 512)
            layers += [ConvBlock(dim, dim, 3, 1, 1, norm, activ, pad_type),
                       ConvBlock(dim, dim2, 3, 2, 1, norm, activ, pad_type)]
            dim = dim2
        layers += [ResBlock(dim, norm, activ, pad_type) for _ in range(n_res)]
        layers += [nn.Conv2d(dim, 1, 1, 1, 0)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for net in self.cnns:
            outputs.append(net(x))
            x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        return outputs


def _adv_term(out: torch.Tensor, target: float, gan_type: str) -> torch.Tensor:
    out = out.float()
    if gan_type == "lsgan":
        return (out - target).pow(2).mean()
    if gan_type == "nsgan":  # the original's BCE(sigmoid(out), target), in the stable logits form
        return F.binary_cross_entropy_with_logits(out, torch.full_like(out, target))
    raise ValueError(f"dis.gan_type {gan_type!r} is not known: use one of {', '.join(GAN_TYPES)}")


def dis_loss(dis: nn.Module, fake: torch.Tensor, real: torch.Tensor, gan_type: str = "lsgan",
             r1_weight: float = 0.01, r1_conv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """D's loss on one (fake, real) pair [MsImageDis.calc_dis_loss]; returns (loss, weighted R1), fp32.

    Summed over scales: mean(D(fake)^2) + mean((D(real) - 1)^2) (LSGAN) plus r1_weight * R1, where R1 =
    mean over the batch of sum over pixels of (d sum D_s(real) / d real)^2, per scale, taken with respect to
    the full-resolution real image (a one-sided penalty on reals). With nsgan, R1 is taken of
    sigmoid(D_s(real)), the probability the BCE reads, as in the original's latest release (its first release
    had no R1 there). `fake` is detached here, so the loss reaches D only; `real` is not
    modified (the original switched requires_grad on in place). At initialization (D ~ 0) the loss is ~3
    per call. The returned R1 term is already weighted, as the original printed it.

    R1 differentiates D's input gradient again (create_graph), which graphs from torch.compile cannot do
    (aot_autograd has no double backward): with r1_weight > 0, pass an uncompiled D. With R1 on, D's pass on
    the reals runs in fp32 even under autocast: the penalty is that pass's input gradient, which bf16 would
    round to 3 significant digits and fp16 can overflow (the original's fp16 R1 gave NaNs).

    r1_conv: D's convolutions on the reals differentiate twice on ordinary backward kernels (r1conv.py; the
    same values up to rounding), and R1's input-gradient pass skips their weight gradients.
    """
    routed = r1_conv and r1_weight > 0
    real = real.detach().float().requires_grad_(r1_weight > 0)
    outs_fake = dis(fake.detach())
    with torch.autocast(real.device.type, enabled=False) if r1_weight > 0 else nullcontext(), r1_convs(routed):
        outs_real = dis(real)
    loss = torch.zeros((), device=real.device)
    r1 = torch.zeros((), device=real.device)
    for out_fake, out_real in zip(outs_fake, outs_real):
        loss = loss + _adv_term(out_fake, 0.0, gan_type) + _adv_term(out_real, 1.0, gan_type)
        if r1_weight > 0:
            with weight_grads_skipped(routed):
                judged = out_real.float().sigmoid() if gan_type == "nsgan" else out_real.float()
                (grad,) = torch.autograd.grad(judged.sum(), real, create_graph=True)
            r1 = r1 + grad.float().pow(2).flatten(1).sum(1).mean()
    r1 = r1_weight * r1
    return loss + r1, r1


def gen_adv_loss(dis: nn.Module, fake: torch.Tensor, gan_type: str = "lsgan") -> torch.Tensor:
    """G's adversarial loss [MsImageDis.calc_gen_loss], fp32: sum over scales of 2 * mean((D(fake) - 1)^2).

    The factor 2 is the original's (LSGAN); nsgan is BCE with target 1. D runs through `frozen_call`, so
    the gradient reaches the generated image (and G) but never D's weights, which the original computed and
    then threw away. At initialization (D ~ 0) the LSGAN loss is ~6 per call.
    """
    scale = 2.0 if gan_type == "lsgan" else 1.0
    return sum(scale * _adv_term(out, 1.0, gan_type) for out in frozen_call(dis, fake))


# ---------------------------------------------------------------------------------------------------------
# Frozen-weight calls and the original's checkpoints
# ---------------------------------------------------------------------------------------------------------

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextmanager
def _modes(module: nn.Module, train_bn: bool | None) -> Iterator[None]:
    if train_bn is None:
        yield
        return
    saved = [(m, m.training) for m in module.modules()]
    module.eval()
    for m in module.modules():
        if isinstance(m, BATCH_NORMS):
            m.train(train_bn)
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def frozen_call(module: nn.Module, *args: Any, train_bn: bool | None = None, **kwargs: Any) -> Any:
    """Call `module(*args, **kwargs)` with its live weights, gradients stopped at the weights.

    The output is differentiable with respect to the inputs, but no parameter of `module` receives a
    gradient, and BatchNorm running statistics are neither updated nor copied: a BatchNorm in train mode
    normalizes by the batch's statistics as usual, with its running-statistics tracking off for the call
    (any other buffer is passed as a copy). This replaces the original's per-iteration deep copies of E_a
    (identity loss on generated images) and of E_s (structure re-encoding), without copying anything.

    train_bn: None calls the module in its current modes. True/False call it in eval mode (no dropout) with
    BatchNorm in train mode (batch statistics) or eval mode (running statistics): True is the original's
    frozen copy with `train_bn: true`. The modes are restored afterwards. A DDP wrapper is unwrapped: the
    call must not go through DDP's forward, since no gradient will reach its parameters.
    """
    while isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norm_buffers = {id(b) for m in norms for b in m.buffers(recurse=False)}
    state = {name: p.detach() for name, p in module.named_parameters()}
    state.update({name: b.clone() for name, b in module.named_buffers() if id(b) not in norm_buffers})
    with _modes(module, train_bn), _running_stats_off(norms):
        return torch.func.functional_call(module, state, args, kwargs)


@contextmanager
def _running_stats_off(norms: list[nn.Module]) -> Iterator[None]:
    """BatchNorms that neither read nor move their running statistics in train mode (eval mode still reads
    them). Cheaper than passing copies of the buffers: nothing is copied and no counter is bumped."""
    saved = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, tracked in zip(norms, saved):
            m.track_running_stats = tracked


def refused_pickle(exc: BaseException) -> bool:
    """Whether `torch.load(..., weights_only=True)` refused a real pickle that names a class or function (code
    in it), as opposed to bytes that are no checkpoint at all, which also raise UnpicklingError."""
    return isinstance(exc, pickle.UnpicklingError) and "global" in str(exc).lower()


def load_failure(exc: BaseException) -> str:
    """Why `torch.load(..., weights_only=True)` failed, in a few words. A refused pickle is named as such:
    PyTorch's own message suggests weights_only=False, which would run whatever code the file holds."""
    if refused_pickle(exc):
        return "it holds pickled Python objects, refused because loading them could run code"
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def read_original_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict saved by the original (`{'a': state_dict}`) or by DataParallel (`module.` keys)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or pickled objects that weights_only refuses
        reason = load_failure(exc)
        raise ValueError(f"could not read {path} as a state dict ({reason}): give a file saved with "
                         "torch.save(state_dict) or the original's {'a': state_dict}") from None
    if isinstance(state, dict) and set(state) == {"a"} and isinstance(state["a"], dict):
        state = state["a"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict: give a file saved with torch.save(state_dict)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = next((k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                and not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # a diverged run's weights: refused like our own checkpoints (utils.refuse_non_finite)
        raise ValueError(f"{path} holds NaN or infinity in {bad}: refused; use weights from before the run diverged")
    return state


def check_state_fits(module: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike,
                     hint: str) -> None:
    """Raise one ValueError line when `state` does not match `module` key for key and shape for shape."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what} {len(keys)} (e.g. {keys[0]})" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
                           if keys)
        raise ValueError(f"{path} does not fit this {type(module).__name__} ({detail}): {hint}")


def load_original_state(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an original `gen_*.pt` into `Generator` or `dis_*.pt` into `MsImageDis`, strictly.

    Key map (the only one): the original AdaIN layers' dummy buffers `...norm.running_mean/running_var`,
    which it never used, are dropped. Everything else must match name for name and shape for shape, so
    the configs must agree (e.g. gen.dim, gen.n_res, gen.id_dim; ValueError otherwise). Returns `module`.
    """
    state = read_original_state(path)
    own = module.state_dict()
    state = {k: v for k, v in state.items()
             if k in own or not k.endswith((".norm.running_mean", ".norm.running_var"))}
    check_state_fits(module, state, path, "the checkpoint was saved with a different network config "
                                          "(gen.*/dis.* keys)")
    module.load_state_dict(state, strict=True)
    return module


# ---------------------------------------------------------------------------------------------------------
# Builders from the config dict (configs/defaults.yaml)
# ---------------------------------------------------------------------------------------------------------

def _check(value: Any, key: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{key} is {value!r}: use one of {', '.join(options)}")


def build_generator(cfg: dict) -> Generator:
    """Generator from cfg["gen"] (dim, mlp_dim, id_dim, activ, n_downsample, n_res, pad_type, dropout,
    tanh, init) and cfg["input_dim_a"]."""
    g = cfg["gen"]
    _check(g["activ"], "gen.activ", ACTIVATIONS)
    _check(g["pad_type"], "gen.pad_type", tuple(PAD_MODES))
    _check(g["init"], "gen.init", INITS)
    _check(cfg["input_dim_a"], "input_dim_a", (1, 3))
    return Generator(input_dim=cfg["input_dim_a"], dim=g["dim"], n_downsample=g["n_downsample"],
                     n_res=g["n_res"], mlp_dim=g["mlp_dim"], id_dim=g["id_dim"], activ=g["activ"],
                     pad_type=g["pad_type"], dropout=g["dropout"], tanh=g["tanh"], init=g["init"])


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def check_image_size(cfg: dict) -> None:
    """Raise one ValueError line when G and D cannot take crop_image_height x crop_image_width images.

    - E_s halves the size `gen.n_downsample` times (rounding up) and the decoder doubles it back: the
      reconstruction has the input's size only when both sides are multiples of 2^n_downsample.
    - The ASPP's dilation-9 reflect/replicate padding needs the structure map larger than 9 on each side.
    - D pools each scale to half (rounding up) and halves it again `dis.n_layer` times; its 3x3 reflect
      paddings need at least 2 pixels on the smallest map.
    E_a and the teacher (ResNets with adaptive pooling) take any size.
    """
    h, w = cfg["crop_image_height"], cfg["crop_image_width"]
    g, d = cfg["gen"], cfg["dis"]
    multiple = 2 ** g["n_downsample"]
    if h % multiple or w % multiple:
        raise ValueError(f"crop_image_height x crop_image_width is {h}x{w}: use multiples of {multiple} for both "
                         f"(2^gen.n_downsample: only then does the decoder give back the input size), e.g. "
                         f"{_round_up(h, multiple)}x{_round_up(w, multiple)}")
    if g["pad_type"] != "zero" and min(h, w) // multiple <= 9:
        least = 10 * multiple
        raise ValueError(f"crop_image_height x crop_image_width is {h}x{w}: the structure map ({h // multiple}x"
                         f"{w // multiple}) is too small for the ASPP's {g['pad_type']} padding; use at least "
                         f"{max(h, least)}x{max(w, least)}, fewer gen.n_downsample stages, or gen.pad_type: zero")
    halvings = d["num_scales"] - 1 + d["n_layer"] - (0 if d["n_res"] > 0 else 1)
    if d["pad_type"] == "reflect" and -(-min(h, w) // 2 ** halvings) < 2:
        least = 2 ** halvings + 1
        raise ValueError(f"crop_image_height x crop_image_width is {h}x{w}: D's smallest map is under 2 pixels "
                         f"for its reflect padding; use at least {least} pixels a side, fewer dis.num_scales or "
                         "dis.n_layer, or dis.pad_type: zero")


def build_discriminator(cfg: dict) -> MsImageDis:
    """MsImageDis on RGB images from cfg["dis"] (dim, norm, activ, n_layer, n_res, num_scales, pad_type).

    gan_type and LAMBDA are loss settings: pass them to `dis_loss` / `gen_adv_loss`.
    """
    d = cfg["dis"]
    _check(d["activ"], "dis.activ", ACTIVATIONS)
    _check(d["norm"], "dis.norm", ("none", "bn", "in", "ln"))
    _check(d["pad_type"], "dis.pad_type", tuple(PAD_MODES))
    _check(d["gan_type"], "dis.gan_type", GAN_TYPES)
    return MsImageDis(input_dim=3, dim=d["dim"], n_layer=d["n_layer"], n_res=d["n_res"],
                      num_scales=d["num_scales"], norm=d["norm"], activ=d["activ"], pad_type=d["pad_type"])
