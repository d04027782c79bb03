"""Image transforms of DG-Net (the original's data pipeline), with their randomness drawn from an explicit generator.

Training: horizontal flip (p 0.5), bicubic resize to (H, W), padding (edge, DG-Net's; or zero, the baseline
teacher's), random crop back to (H, W),
to tensor, ImageNet normalization. Random erasing (Zhong et al.; p `erasing_p`, 2-40 % of the area,
aspect 0.3-3.33, fill 0 in normalized space, i.e. the mean colour) is a separate step, because DG-Net
erases only the ReID branch's inputs, never the generator's inputs or targets.
Test: bicubic resize and normalization only.

Every random choice comes from a `torch.Generator` seeded per sample by the sampler, never from a
global RNG, so a sample's augmentation depends only on its stream position (exact resume).
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(gen: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, high: int) -> int:
    """Uniform in [0, high]."""
    return int(torch.randint(high + 1, (), generator=gen))


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def eval_transform(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize to (height, width), bicubic, and normalize."""
    return to_normalized_tensor(TF.resize(img, list(size), InterpolationMode.BICUBIC))


def train_transform(img: Image.Image, size: tuple[int, int], pad: int, gen: torch.Generator,
                    pad_mode: str = "edge") -> torch.Tensor:
    """Flip, resize, pad (`pad_mode` edge: DG-Net's loader; zero: black, the baseline teacher's) and
    random-crop, normalize."""
    if _uniform(gen) < 0.5:
        img = TF.hflip(img)
    img = TF.resize(img, list(size), InterpolationMode.BICUBIC)
    if pad > 0:
        img = TF.pad(img, [pad], fill=0, padding_mode="edge" if pad_mode == "edge" else "constant")
        top, left = _randint(gen, 2 * pad), _randint(gen, 2 * pad)
        img = TF.crop(img, top, left, size[0], size[1])
    return to_normalized_tensor(img)


def random_erasing(x: torch.Tensor, p: float, gen: torch.Generator, area: tuple[float, float] = (0.02, 0.4),
                   min_aspect: float = 0.3, attempts: int = 100) -> torch.Tensor:
    """Erase one random rectangle of a (C, H, W) tensor with probability `p`; returns a new tensor."""
    if p <= 0 or _uniform(gen) >= p:
        return x
    _, height, width = x.shape
    for _ in range(attempts):
        target = _uniform(gen, *area) * height * width
        aspect = _uniform(gen, min_aspect, 1 / min_aspect)
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            top, left = _randint(gen, height - h), _randint(gen, width - w)
            out = x.clone()
            out[:, top:top + h, left:left + w] = 0.0
            return out
    return x
