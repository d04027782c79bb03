"""Generation quality: SSIM, L1, swap fidelity against the synthetic ground truth, reconstruction, SSIM
diversity and (optionally) FID.

All image measures work on [0, 1] RGB tensors (B, 3, H, W). Generated images live in ImageNet-normalized
space; `to_unit` maps them back and clips.

- `ssim`: Wang et al.'s SSIM with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data range 1,
  on the valid region (no padding), averaged over channels and pixels: one value per image.
- `swap_fidelity`: on the synthetic dataset, G(structure of B, appearance of A) against
  `data.synthetic.render(A, B)` (A's identity drawn in B's exact structure, JPEG-encoded as B's file was),
  over a fixed, seeded list of test pairs of different identities; beside the same figures for the two
  trivial answers, B's image itself and A's image itself. Each is measured on the whole image and on the
  person alone (`person_ssim`, `person_l1`: the true swap's person mask). Outside the person the true swap
  *is* B's image, so the whole-image figures favour B's image by construction (its background, in colour,
  while E_s sees a grey image); the person figures measure what the swap is for, the clothing. The person
  L1 is also split into luma and chroma (YCbCr): E_s sees the structure image's grey levels, so a swap
  starts from the structure provider's brightness, and the chroma figure isolates the colours. Two
  reference answers from above give the scale: the true swap itself at 1/4 and at 1/8 of the resolution
  (average-pooled, then resized back), i.e. exact colours in the right places, only blurred; and the true
  swap's colours on the structure image's brightness (its chroma, the structure image's luma): a perfect
  colour transfer that keeps the grey levels E_s was given. One reference answer from below gives the floor:
  a flat image of the pairs' mean colour, the same for every pair (`flat_mean_colour`). A swap that does
  not beat it on the person L1 has learned nothing about where the clothing goes. One more answer from
  above shows what the task asks and that it is reachable: A's part colours on the true parts
  (`appearance_part_colours`), the structure image with each visible body part of the true swap filled
  flat with the mean colour of that part in A's image (the synthetic data's part labels): what a swap
  scores that has learned where B's parts are and A's colour for each, and nothing finer.
- `identity_judge` (inside `swap_fidelity`): whose clothes each swap wears. Every test identity is drawn in
  B's exact structure; the swap is pooled through each candidate's body parts, and the candidate whose
  per-part mean colours (CIELAB) are nearest is the verdict. It reports top-1 and top-5 accuracy for A, the
  share judged as B and A's mean rank, in full CIELAB and on chroma alone (a*b*), for the swap and for the
  references (the true swap, the structure image, the appearance image, the flat floor, the true swap's
  colours on B's brightness, A's colours on B's parts). Chance is 1 / number of test identities.
- `reconstruction`: G(E_s(x), E_a(x)) against x on test images.
- `ssim_diversity`: the intra-identity SSIM the DG-Net paper reports: the mean SSIM over pairs of images
  generated with one appearance and different structures, beside the same for pairs of real images of one
  identity (the reference row of the paper's table, about 0.35 on Market). Lower means more varied.
- `fid`: Frechet Inception Distance with torchvision's Inception v3 loaded from a local weights file
  (never downloaded). It is not the TF-Inception of the TTUR code, so values compare only among runs
  measured here.

`swap_fidelity` is cheap (64 pairs at the quickstart's size take well under a second on a CPU after the
first call, which renders and caches the targets) and leaves the networks in the modes it found them in,
so training can call it periodically.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

from data.datasets import DatasetSplits, Record
from data.loaders import image_size, read_image
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from networks import load_failure
from utils import UserError

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
INCEPTION_SIZE = 299


# ---------------------------------------------------------------------------------------------------
# image measures


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized images (B, 3, H, W) -> [0, 1], clipped, fp32."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() * std + mean).clamp(0, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> ImageNet-normalized (the networks' input space)."""
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def _gaussian(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    return (g / g.sum()).to(device=device)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, mask: torch.Tensor | None = None
         ) -> torch.Tensor:
    """SSIM per image (B,) of two batches (B, C, H, W) in [0, data_range].

    Images smaller than the 11-pixel window use the largest odd window that fits (same sigma). With a
    boolean `mask` (B, 1, H, W), the SSIM map is averaged over the masked window centres only.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) batches of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    size = min(SSIM_WINDOW, x.shape[2], x.shape[3])
    size -= 1 - size % 2  # odd, so the window has a centre
    g = _gaussian(size, SSIM_SIGMA, x.device)
    channels = x.shape[1]
    rows, cols = g.view(1, 1, size, 1).repeat(channels, 1, 1, 1), g.view(1, 1, 1, size).repeat(channels, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region only
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    # float64: E[x^2] - E[x]^2 in float32 loses about 1e-7, which C2 (9e-4) turns into 1e-4 on flat regions
    x, y = x.double(), y.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    if mask is None:
        return index.mean(dim=(1, 2, 3)).float()
    r = (size - 1) // 2  # the valid region's window centres
    m = mask[:, :, r:mask.shape[2] - r, r:mask.shape[3] - r].to(index.dtype)
    return ((index * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * channels).clamp_min(1)).float()


def l1(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute difference per image (B,); with a boolean `mask` (B, 1, H, W), over its pixels only."""
    diff = (x.float() - y.float()).abs()
    if mask is None:
        return diff.mean(dim=(1, 2, 3))
    m = mask.float()
    return (diff * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * diff.shape[1]).clamp_min(1)


# RGB -> YCbCr (ITU-R BT.601, full range, no offset): luma, then the two chroma channels
_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def luma_chroma(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[0, 1] RGB (B, 3, H, W) -> luma Y (B, 1, H, W) and chroma CbCr (B, 2, H, W)."""
    ycc = torch.einsum("ij,bjhw->bihw", _YCBCR.to(images.device), images.float())
    return ycc[:, :1], ycc[:, 1:]


def from_luma_chroma(luma: torch.Tensor, chroma: torch.Tensor) -> torch.Tensor:
    """The inverse of `luma_chroma`, clipped to [0, 1]."""
    ycc = torch.cat([luma, chroma], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_YCBCR).to(ycc.device), ycc).clamp(0, 1)


def score(images: torch.Tensor, targets: torch.Tensor, person: torch.Tensor | None = None) -> dict[str, float]:
    """Mean SSIM and L1 of `images` against `targets`, both [0, 1]; with a `person` mask, also both
    measures over the person's pixels alone (`person_ssim`, `person_l1`), and that L1 split into luma and
    chroma (`person_luma_l1`, `person_chroma_l1`: brightness vs colour, YCbCr)."""
    out = {"ssim": float(ssim(images, targets).mean()), "l1": float(l1(images, targets).mean())}
    if person is not None:
        out["person_ssim"] = float(ssim(images, targets, mask=person).mean())
        out["person_l1"] = float(l1(images, targets, mask=person).mean())
        (y, c), (ty, tc) = luma_chroma(images), luma_chroma(targets)
        out["person_luma_l1"] = float(l1(y, ty, mask=person).mean())
        out["person_chroma_l1"] = float(l1(c, tc, mask=person).mean())
    return out


# ---------------------------------------------------------------------------------------------------
# running the generator


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block; each submodule's own mode restored afterwards."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def swap(generator: nn.Module, appearance_encoder: nn.Module, structure: torch.Tensor, appearance: torch.Tensor,
         batch_size: int = 64) -> torch.Tensor:
    """G(E_s(structure), E_a(appearance)) for normalized batches of equal length, in [0, 1], on the CPU.

    Call it with the networks in eval mode (see `eval_mode`).
    """
    device, out = _device_of(generator), []
    for start in range(0, len(structure), batch_size):
        s = generator.encode(structure[start:start + batch_size].to(device))
        f = appearance_encoder(appearance[start:start + batch_size].to(device))[0]
        out.append(to_unit(generator.decode(s, f)).cpu())
    return torch.cat(out)


def load_unit(path: str, size: tuple[int, int]) -> torch.Tensor:
    """An image file resized as the test transform does (bicubic), as a [0, 1] tensor (3, H, W)."""
    return TF.to_tensor(TF.resize(read_image(path), list(size), InterpolationMode.BICUBIC))


def _test_people(splits: DatasetSplits) -> list[Record]:
    """Test images of real identities (no junk, no distractors), in a fixed order."""
    return sorted((r for r in splits.query + splits.gallery if r.pid > 0), key=lambda r: r.path)


def _pairs(records: Sequence[Record], n: int, seed: int) -> list[tuple[Record, Record]]:
    """n seeded (appearance, structure) pairs of different identities."""
    if len({r.pid for r in records}) < 2:
        raise UserError("the test split needs at least two identities to measure swaps")
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < n:
        a, b = (records[int(i)] for i in rng.integers(len(records), size=2))
        if a.pid != b.pid:
            pairs.append((a, b))
    return pairs


# ---------------------------------------------------------------------------------------------------
# swap fidelity (synthetic data only)


@dataclass
class FidelitySet:
    """Fixed test pairs: appearance and structure images ([0, 1]) and the true swaps ([0, 1])."""

    appearance: torch.Tensor
    structure: torch.Tensor
    target: torch.Tensor
    person: torch.Tensor  # (N, 1, H, W) bool: where the true swap shows the person (occluders excluded)
    target_parts: torch.Tensor  # (N, H, W) uint8: the true swap's part labels (synthetic.PART_NAMES)
    appearance_parts: torch.Tensor  # (N, H, W) uint8: the appearance image's part labels
    structure_parts: torch.Tensor  # (N, H, W) uint8: the structure image's own part labels (B's, not A's in B)
    pairs: list[tuple[str, str]]  # (appearance file, structure file) names


_FIDELITY_CACHE: dict[tuple, FidelitySet] = {}


def has_ground_truth(cfg: dict[str, Any]) -> bool:
    """Whether the config's dataset is the synthetic one, whose swaps have a true answer."""
    return cfg["dataset"] == "synthetic"


def _true_swap(meta: Any, appearance: Record, structure: Record, size: tuple[int, int]) -> torch.Tensor:
    """A's identity in B's structure, JPEG-encoded with B's settings as the dataset's files are, resized."""
    from data import synthetic

    entry_b = meta[structure.path]
    drawn = synthetic.render(meta[appearance.path], entry_b)
    with Image.open(io.BytesIO(synthetic.jpeg_bytes(drawn, entry_b["structure"]))) as img:
        img = img.convert("RGB")
    return TF.to_tensor(TF.resize(img, list(size), InterpolationMode.BICUBIC))


def _true_parts(meta: Any, appearance: Record, structure: Record, size: tuple[int, int]) -> torch.Tensor:
    """The part labels of A drawn in B's structure (H, W), resized (nearest) to the images' size."""
    from data import synthetic

    labels = synthetic.part_labels(meta[appearance.path], meta[structure.path])
    return torch.from_numpy(np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST)).copy())


def _person(parts: torch.Tensor) -> torch.Tensor:
    """Where part labels show the person: any body part, not the background or an occluder (1, H, W)."""
    from data import synthetic

    return ((parts > 0) & (parts < synthetic.PART_NAMES.index("occluder")))[None]


def fidelity_set(cfg: dict[str, Any], splits: DatasetSplits, n_pairs: int = 64, seed: int = 0) -> FidelitySet:
    """The seeded test pairs of a synthetic dataset with their true swaps; built once, then cached."""
    from data import synthetic

    if not has_ground_truth(cfg):
        raise UserError(f"swap fidelity needs the synthetic dataset (its swaps have a true answer); "
                        f"dataset is {cfg['dataset']}")
    size = image_size(cfg)
    key = (str(Path(splits.root).resolve()), size, n_pairs, seed)
    if key not in _FIDELITY_CACHE:
        meta = synthetic.load_metadata(cfg["data_root"])
        pairs = _pairs(_test_people(splits), n_pairs, seed)
        target_parts = torch.stack([_true_parts(meta, a, b, size) for a, b in pairs])
        _FIDELITY_CACHE[key] = FidelitySet(
            appearance=torch.stack([load_unit(a.path, size) for a, _ in pairs]),
            structure=torch.stack([load_unit(b.path, size) for _, b in pairs]),
            target=torch.stack([_true_swap(meta, a, b, size) for a, b in pairs]),
            person=torch.stack([_person(p) for p in target_parts]),
            target_parts=target_parts,
            appearance_parts=torch.stack([_true_parts(meta, a, a, size) for a, _ in pairs]),
            structure_parts=torch.stack([_true_parts(meta, b, b, size) for _, b in pairs]),
            pairs=[(Path(a.path).name, Path(b.path).name) for a, b in pairs])
    return _FIDELITY_CACHE[key]


BLUR_FACTORS = (4, 8)  # the reference rows "true swap at 1/4 and 1/8 resolution"


def blurred_key(factor: int) -> str:
    """The swap_fidelity key of the true swap at 1/factor resolution."""
    return f"true_swap_blur{factor}"


# swap_fidelity's answers in display order, with their labels (visualize.py metrics prints them)
ANSWER_LABELS = {"swap": "generated swap", "structure_image": "structure image",
                 "appearance_image": "appearance image",
                 **{blurred_key(k): f"true swap at 1/{k}" for k in BLUR_FACTORS},
                 "true_colours_structure_luma": "true colours, B's luma",
                 "flat_mean_colour": "flat mean-colour image",
                 "appearance_part_colours": "A's colours, B's parts"}


def downsampled(images: torch.Tensor, factor: int) -> torch.Tensor:
    """`images` at 1/factor of their resolution (average pooling), resized back (bilinear)."""
    small = F.adaptive_avg_pool2d(images, (max(1, images.shape[2] // factor), max(1, images.shape[3] // factor)))
    return F.interpolate(small, size=images.shape[2:], mode="bilinear", align_corners=False)


def part_colours(appearance: torch.Tensor, appearance_parts: torch.Tensor, canvas: torch.Tensor,
                 target_parts: torch.Tensor) -> torch.Tensor:
    """`canvas` (N, 3, H, W) with each body part of `target_parts` filled flat with the mean colour of
    that part in `appearance` (by `appearance_parts`); a part the appearance image does not show (hidden
    by the pose or an occluder) takes the appearance image's mean person colour. Labels are (N, H, W)."""
    from data import synthetic

    out = canvas.clone()
    body = range(1, synthetic.PART_NAMES.index("occluder"))
    for i in range(len(out)):
        shown = _person(appearance_parts[i])[0]
        person_mean = appearance[i][:, shown].mean(1) if shown.any() else appearance[i].mean((1, 2))
        for part in body:
            where = target_parts[i] == part
            if where.any():
                source = appearance_parts[i] == part
                colour = appearance[i][:, source].mean(1) if source.any() else person_mean
                out[i][:, where] = colour[:, None]
    return out


def swap_fidelity(generator: nn.Module, appearance_encoder: nn.Module, cfg: dict[str, Any],
                  splits: DatasetSplits, device: torch.device | None = None, n_pairs: int = 64,
                  seed: int = 0, judge: bool = True) -> dict[str, Any]:
    """SSIM and L1 of the swaps against the ground truth, beside the two trivial answers and reference answers:
    from above, the truth blurred, the truth's colours on the structure image's brightness, and A's part
    colours on the true parts; from below, one flat mean-colour image.

    Returns {"pairs", "seed", "swap": {"ssim", "l1", "person_ssim", "person_l1", "person_luma_l1",
    "person_chroma_l1"}, "structure_image": {...},
    "appearance_image": {...}, "true_swap_blur4": {...}, "true_swap_blur8": {...},
    "true_colours_structure_luma": {...}, "flat_mean_colour": {...}, "appearance_part_colours": {...},
    "identity_judge": {...}} (with `judge`: `identity_judge` on the swaps, on B's own reconstructions, whose
    "as_structure" is how often G reproduces B's clothes from B's code, and on the references).
    `device` is accepted for symmetry with the training loop; the networks run where their weights are.
    The networks are used in eval mode and left in the modes they were in; nothing is trained.
    """
    data = fidelity_set(cfg, splits, n_pairs, seed)
    with eval_mode(generator, appearance_encoder):
        generated = swap(generator, appearance_encoder, normalize(data.structure), normalize(data.appearance))
        # B's own reconstruction G(s_B, f_B), for the judge: a swap can hardly paint A's colours more
        # faithfully than G reproduces B's from B's own code
        rebuilt = swap(generator, appearance_encoder, normalize(data.structure), normalize(data.structure)) \
            if judge else None
    out = {"pairs": n_pairs, "seed": seed, "swap": score(generated, data.target, data.person),
           "structure_image": score(data.structure, data.target, data.person),
           "appearance_image": score(data.appearance, data.target, data.person)}
    for k in BLUR_FACTORS:
        out[blurred_key(k)] = score(downsampled(data.target, k), data.target, data.person)
    recoloured = from_luma_chroma(luma_chroma(data.structure)[0], luma_chroma(data.target)[1])
    out["true_colours_structure_luma"] = score(recoloured, data.target, data.person)
    # from below: one flat image of the mean colour of every image of the pairs, for every pair
    flat = torch.cat([data.structure, data.appearance]).mean(dim=(0, 2, 3), keepdim=True)
    out["flat_mean_colour"] = score(flat.expand_as(data.target), data.target, data.person)
    # from above: B's parts (the truth's labels) filled with A's mean colour of each part, over B's image
    painted = part_colours(data.appearance, data.appearance_parts, data.structure, data.target_parts)
    out["appearance_part_colours"] = score(painted, data.target, data.person)
    if judge:
        candidates = judge_set(cfg, splits, n_pairs, seed)
        if candidates.references is None:  # the references do not change as G trains: judged once
            candidates.references = identity_judge(
                {"true_swap": data.target, "structure_image": data.structure, "appearance_image": data.appearance,
                 "flat_mean_colour": flat.expand_as(data.target), "true_colours_structure_luma": recoloured,
                 "appearance_part_colours": painted}, candidates)
        out["identity_judge"] = {**identity_judge({"swap": generated, "reconstruction": rebuilt}, candidates),
                                 **candidates.references}
    return out


# ---------------------------------------------------------------------------------------------------
# the identity judge: whose clothes does the swap wear? (synthetic data only)


def srgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] sRGB (..., 3) -> CIELAB (..., 3) under D65: L in [0, 100], a and b about [-110, 110]."""
    rgb = images.float().clamp(0, 1)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.to(rgb.device).T / _D65_WHITE.to(rgb.device)
    eps, kappa = 216 / 24389, 24389 / 27
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), (kappa * xyz + 16) / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_srgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of `srgb_to_lab`: CIELAB (..., 3) under D65 -> sRGB (..., 3), clipped to [0, 1] where the
    colour lies outside the sRGB gamut."""
    fy = (lab[..., 0] + 16) / 116
    f = torch.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    eps, kappa = 216 / 24389, 24389 / 27
    xyz = torch.where(f ** 3 > eps, f ** 3, (116 * f - 16) / kappa) * _D65_WHITE.to(lab.device)
    linear = (xyz @ torch.linalg.inv(_RGB_TO_XYZ).to(lab.device).T).clamp(0, 1)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear.clamp_min(1e-12) ** (1 / 2.4) - 0.055)


_RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


@dataclass
class JudgeSet:
    """Every test identity drawn in the structure of each fixed pair's structure image B.

    candidate_parts: (N, K, H, W) uint8, identity k's part labels in B's structure; candidate_lab: (N, K,
    P, 3), the mean CIELAB colour of each body part (1..P) of that drawing (0 where the part is absent);
    appearance_index / structure_index: (N,) the candidates that are A's and B's identities.
    """

    pids: list[int]
    candidate_parts: torch.Tensor
    candidate_lab: torch.Tensor
    appearance_index: torch.Tensor
    structure_index: torch.Tensor
    bins: tuple[torch.Tensor, int] | None = None  # _part_bins(candidate_parts), made on first use
    references: dict[str, Any] | None = None  # swap_fidelity's reference answers, judged once


_JUDGE_CACHE: dict[tuple, JudgeSet] = {}


def _body_parts() -> int:
    """The number of body-part labels (skin .. bag): 1..P in synthetic.PART_NAMES, before the occluder."""
    from data import synthetic

    return synthetic.PART_NAMES.index("occluder") - 1


def _part_bins(parts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Part labels (N, K, H, W) -> a flat bin index per pixel, (n, k, label), and the bins per (n, k)."""
    n, k = parts.shape[:2]
    bins = _body_parts() + 2  # labels 0..P and the occluder; only 1..P are kept
    labels = parts.flatten(2).long().clamp(max=bins - 1)
    return (torch.arange(n * k).view(n, k, 1) * bins + labels).flatten(), bins


def part_means_lab(images: torch.Tensor, parts: torch.Tensor,
                   bins: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CIELAB colour of each body part. images: (N, 3, H, W) in [0, 1]; parts: (N, K, H, W) labels.

    Returns (means (N, K, P, 3), pixel counts (N, K, P)), parts 1..P (background and occluder left out):
    image n's colours pooled over each of the K layouts of `parts[n]`, so one image is read through every
    candidate's silhouette at once. One bincount per channel over N*K*H*W pixels; `bins` is
    `_part_bins(parts)` when the caller keeps it.
    """
    n, k = parts.shape[:2]
    index, per = bins if bins is not None else _part_bins(parts)
    lab = srgb_to_lab(images.permute(0, 2, 3, 1)).flatten(1, 2)  # (N, H*W, 3)
    counts = torch.bincount(index, minlength=n * k * per).view(n, k, per).float()
    sums = torch.stack([torch.bincount(index, weights=lab[:, None, :, c].expand(n, k, -1).flatten(),
                                       minlength=n * k * per) for c in range(3)], -1).view(n, k, per, 3)
    counts, sums = counts[:, :, 1:per - 1], sums[:, :, 1:per - 1].float()
    return sums / counts.clamp_min(1).unsqueeze(-1), counts


def _judge_cache_file(cfg: dict[str, Any], size: tuple[int, int], n_pairs: int, seed: int) -> Path:
    return Path(cfg["data_root"]) / f".identity-judge-{size[0]}x{size[1]}-{n_pairs}-{seed}.pt"


def _metadata_stamp(cfg: dict[str, Any]) -> list[int]:
    """Size and modification time of the dataset's metadata: a regenerated dataset invalidates the cache."""
    from data import synthetic

    info = (Path(cfg["data_root"]) / synthetic.METADATA_FILE).stat()
    return [info.st_size, info.st_mtime_ns]


def _draw_candidates(cfg: dict[str, Any], splits: DatasetSplits, data: FidelitySet) -> JudgeSet:
    from data import synthetic

    size = image_size(cfg)
    meta = synthetic.load_metadata(cfg["data_root"])
    people = _test_people(splits)
    first: dict[int, Record] = {}
    for r in people:
        first.setdefault(r.pid, r)  # appearance belongs to the identity: any of its images draws it
    pids = sorted(first)
    by_name = {Path(r.path).name: r for r in people}
    parts, labs, a_index, b_index = [], [], [], []
    for a_name, b_name in data.pairs:
        b = by_name[b_name]
        drawn = torch.stack([_true_swap(meta, first[p], b, size) for p in pids])
        layout = torch.stack([_true_parts(meta, first[p], b, size) for p in pids])
        parts.append(layout)
        labs.append(part_means_lab(drawn, layout.unsqueeze(1))[0][:, 0])
        a_index.append(pids.index(by_name[a_name].pid))
        b_index.append(pids.index(b.pid))
    return JudgeSet(pids=pids, candidate_parts=torch.stack(parts), candidate_lab=torch.stack(labs),
                    appearance_index=torch.tensor(a_index), structure_index=torch.tensor(b_index))


def judge_set(cfg: dict[str, Any], splits: DatasetSplits, n_pairs: int = 64, seed: int = 0) -> JudgeSet:
    """The identity judge's candidates for `fidelity_set`'s pairs: every test identity drawn in each B's
    structure, JPEG-encoded as B's file was (as the true swaps are).

    Drawing them takes n_pairs * identities renders (about 20 ms each at 64x32 on a CPU, a minute or more
    for 64 pairs of 60 identities), so they are kept in memory and in a file beside the dataset
    (`.identity-judge-HxW-PAIRS-SEED.pt`, a few MB), valid while the dataset's metadata is unchanged: a
    training run and `visualize.py metrics` on the same data draw them once between them, and the judge
    then costs only the comparison.
    """
    data = fidelity_set(cfg, splits, n_pairs, seed)
    size = image_size(cfg)
    key = (str(Path(splits.root).resolve()), size, n_pairs, seed)
    if key in _JUDGE_CACHE:
        return _JUDGE_CACHE[key]
    path, stamp = _judge_cache_file(cfg, size, n_pairs, seed), _metadata_stamp(cfg)
    judge = None
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("stamp") == stamp and saved.get("pairs") == [list(p) for p in data.pairs]:
                judge = JudgeSet(**saved["judge"])
        except Exception:  # unreadable or from another version: draw again and overwrite it
            judge = None
    if judge is None:
        judge = _draw_candidates(cfg, splits, data)
        try:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            fields = {k: v for k, v in vars(judge).items() if k not in ("bins", "references")}
            torch.save({"stamp": stamp, "pairs": [list(p) for p in data.pairs], "judge": fields}, tmp)
            os.replace(tmp, path)
        except OSError:  # a read-only dataset: keep the candidates in memory only
            pass
    _JUDGE_CACHE[key] = judge
    return judge


def judge_distances(images: torch.Tensor, judge: JudgeSet,
                    parts: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) distances of each image (N, 3, H, W; [0, 1]) to each candidate identity drawn in its pair's
    structure, in full CIELAB and on chroma alone: over the candidate's own body parts, the colour difference
    (CIE76 Delta E; a*b* alone for chroma) between the image's and the candidate's mean colour of that part,
    weighted by the part's share of the candidate's person pixels. `parts`: the body-part labels to judge
    on (synthetic.PART_NAMES indices, e.g. (3, 4) for the garments); all of them when None."""
    if judge.bins is None:  # the same for every image judged against this set
        judge.bins = _part_bins(judge.candidate_parts)
    means, counts = part_means_lab(images, judge.candidate_parts, judge.bins)
    if parts is not None:  # counts are over labels 1..P: keep the chosen ones' weights
        chosen = torch.zeros(counts.shape[-1], dtype=torch.bool)
        chosen[[p - 1 for p in parts]] = True
        counts = counts * chosen
    diff = means - judge.candidate_lab
    weights = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return (diff.norm(dim=-1) * weights).sum(-1), (diff[..., 1:].norm(dim=-1) * weights).sum(-1)


def judge_verdicts(distances: torch.Tensor, judge: JudgeSet) -> dict[str, float]:
    """From (N, K) distances: top1 / top5, the share of pairs whose nearest (5 nearest) candidate is A's
    identity; as_structure, the share whose nearest is B's; mean_rank_appearance, A's mean rank (1 best)."""
    order = distances.argsort(dim=1, stable=True)
    rank_a = (order == judge.appearance_index[:, None]).float().argmax(1) + 1
    return {"top1": float((rank_a == 1).float().mean()), "top5": float((rank_a <= 5).float().mean()),
            "as_structure": float((order[:, 0] == judge.structure_index).float().mean()),
            "mean_rank_appearance": float(rank_a.float().mean())}


# the judge's answers in display order, with their labels
JUDGE_LABELS = {"swap": "generated swap", "reconstruction": "B rebuilt, G(s_B, f_B)", "true_swap": "true swap",
                "structure_image": "structure image", "appearance_image": "appearance image",
                "flat_mean_colour": "flat mean-colour image", "true_colours_structure_luma": "true colours, B's luma",
                "appearance_part_colours": "A's colours, B's parts"}


def identity_judge(answers: dict[str, torch.Tensor], judge: JudgeSet) -> dict[str, Any]:
    """Judge each answer (N, 3, H, W in [0, 1], one image per pair): which test identity's clothes it wears,
    in full CIELAB and on chroma alone (a*b*).

    Why per-part mean colours and not pixels: a synthetic identity *is* its part colours (skin, hair, upper,
    lower, shoes, bag; a pattern averages to its mean), and a swap is judged on what a viewer reads, whose
    clothes. Pixel distances would be dominated by alignment and sharpness (a blurred true swap would lose
    to a sharp wrong identity), and the decoder only ever sees B's shape. Each candidate is drawn in B's
    exact structure, so its part means already carry B's lighting and colour cast, and the image is pooled
    through that candidate's own silhouette (its build, sleeves and skirt differ). CIELAB is close to
    perceptually uniform, so a Delta E means the same at every colour; the chroma variant drops L*, which
    DG-Net's grey structure input hands to the decoder from B by design.
    """
    out: dict[str, Any] = {"identities": len(judge.pids), "chance": 1 / len(judge.pids)}
    for key, images in answers.items():
        full, chroma = judge_distances(images, judge)
        out[key] = {**judge_verdicts(full, judge),
                    **{f"chroma_{k}": v for k, v in judge_verdicts(chroma, judge).items()}}
    return out


# ---------------------------------------------------------------------------------------------------
# reconstruction and diversity (any dataset)


def reconstruction(generator: nn.Module, appearance_encoder: nn.Module, cfg: dict[str, Any],
                   splits: DatasetSplits, n_images: int = 64, seed: int = 0) -> dict[str, Any]:
    """SSIM and L1 of G(E_s(x), E_a(x)) against x over seeded test images."""
    records = _test_people(splits)
    if not records:
        raise UserError("the test split has no images of real identities to reconstruct")
    picked = np.random.default_rng(seed).choice(len(records), size=min(n_images, len(records)), replace=False)
    x = torch.stack([load_unit(records[int(i)].path, image_size(cfg)) for i in sorted(picked)])
    with eval_mode(generator, appearance_encoder):
        out = swap(generator, appearance_encoder, normalize(x), normalize(x))
    return {"images": len(x), **score(out, x)}


def _mean_pairwise_ssim(groups: list[torch.Tensor]) -> float:
    """Mean SSIM over all unordered pairs inside each group (each (n, 3, H, W), n >= 2)."""
    values = []
    for g in groups:
        i, j = torch.triu_indices(len(g), len(g), offset=1)
        values.append(ssim(g[i], g[j]))
    return float(torch.cat(values).mean())


def ssim_diversity(generator: nn.Module, appearance_encoder: nn.Module, cfg: dict[str, Any],
                   splits: DatasetSplits, n_appearances: int = 16, n_structures: int = 8,
                   seed: int = 0) -> dict[str, Any]:
    """Intra-identity SSIM of generated images (one appearance, several structures) and of real images."""
    records = _test_people(splits)
    by_pid: dict[int, list[Record]] = {}
    for r in records:
        by_pid.setdefault(r.pid, []).append(r)
    if len(by_pid) < 2:
        raise UserError("the test split needs at least two identities to measure diversity")
    rng = np.random.default_rng(seed)
    size = image_size(cfg)
    pids = sorted(by_pid)
    chosen = [pids[int(i)] for i in rng.permutation(len(pids))[:n_appearances]]
    generated = []
    with eval_mode(generator, appearance_encoder):
        for pid in chosen:
            appearance = by_pid[pid][int(rng.integers(len(by_pid[pid])))]
            others = [r for r in records if r.pid != pid]
            structures = [others[int(i)] for i in rng.choice(len(others), size=n_structures, replace=False)]
            s = torch.stack([load_unit(r.path, size) for r in structures])
            a = load_unit(appearance.path, size).expand_as(s)
            generated.append(swap(generator, appearance_encoder, normalize(s), normalize(a)))
    real = []
    for pid in chosen:
        own = by_pid[pid]
        if len(own) >= 2:
            pick = rng.permutation(len(own))[:n_structures]
            real.append(torch.stack([load_unit(own[int(i)].path, size) for i in pick]))
    return {"identities": len(chosen), "structures_per_identity": n_structures,
            "generated": _mean_pairwise_ssim(generated), "real": _mean_pairwise_ssim(real) if real else None}


# ---------------------------------------------------------------------------------------------------
# FID (only with local Inception weights)


def fid_hint() -> str:
    from torchvision.models import Inception_V3_Weights

    url = Inception_V3_Weights.IMAGENET1K_V1.url
    return f"FID: off; to enable it, download {url} once and pass --fid-weights PATH"


def load_inception(path: str | Path, device: torch.device) -> nn.Module:
    """torchvision's Inception v3 from a local state dict, returning 2048-d pool features; never downloads."""
    from torchvision.models import inception_v3

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--fid-weights {path} does not exist; {fid_hint().split('; ', 1)[1]}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
        model.load_state_dict(state)
    except Exception as err:  # unreadable file or another network's weights: one line either way
        reason = load_failure(err)
        raise UserError(f"--fid-weights {path} are not torchvision's Inception v3 weights ({reason[:160]}); "
                        f"{fid_hint().split('; ', 1)[1]}") from None
    model.fc = nn.Identity()
    return model.to(device).eval()


@torch.no_grad()
def inception_features(model: nn.Module, images: torch.Tensor, batch_size: int = 50) -> np.ndarray:
    """(N, 2048) float64 pool features of [0, 1] images, resized to 299x299 (bilinear)."""
    device, feats = _device_of(model), []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        feats.append(model(normalize(x)).double().cpu())
    return torch.cat(feats).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), (M, D):
    |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2)).

    No general matrix square root (tens of seconds at D = 2048): the square roots of the eigenvalues of
    C_a C_b are the singular values of X_b X_a^T / sqrt((N-1)(M-1)) (X: centred features), an M x N problem
    when there are fewer images than dimensions, and otherwise those of the symmetric C_a^(1/2) C_b C_a^(1/2).
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least two samples per set")
    xa, xb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    if min(len(a), len(b)) <= a.shape[1]:
        trace_root = np.linalg.svd(xb @ xa.T, compute_uv=False).sum() / math.sqrt(na * nb)
    else:
        cov_a, cov_b = xa.T @ xa / na, xb.T @ xb / nb
        w, v = np.linalg.eigh(cov_a)
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        m = root_a @ cov_b @ root_a
        trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + (xa**2).sum() / na + (xb**2).sum() / nb - 2 * trace_root)


def fid(generator: nn.Module, appearance_encoder: nn.Module, cfg: dict[str, Any], splits: DatasetSplits,
        inception: nn.Module, n_images: int = 500, seed: int = 0) -> dict[str, Any]:
    """FID between real test images and as many swaps of seeded test pairs (appearance A, structure B)."""
    records, size = _test_people(splits), image_size(cfg)
    picked = np.random.default_rng(seed).choice(len(records), size=min(n_images, len(records)), replace=False)
    real = torch.stack([load_unit(records[int(i)].path, size) for i in sorted(picked)])
    pairs = _pairs(records, len(real), seed + 1)
    a = torch.stack([load_unit(p.path, size) for p, _ in pairs])
    b = torch.stack([load_unit(q.path, size) for _, q in pairs])
    with eval_mode(generator, appearance_encoder):
        generated = swap(generator, appearance_encoder, normalize(b), normalize(a))
    value = frechet_distance(inception_features(inception, real), inception_features(inception, generated))
    return {"images": len(real), "fid": value if math.isfinite(value) else None}


# ---------------------------------------------------------------------------------------------------
# everything at once, and tensorboard


def generation_metrics(generator: nn.Module, appearance_encoder: nn.Module, cfg: dict[str, Any],
                       splits: DatasetSplits, n_pairs: int = 64, seed: int = 0,
                       inception: nn.Module | None = None, fid_images: int = 500) -> dict[str, Any]:
    """Swap fidelity (synthetic data only, else None), reconstruction, SSIM diversity, FID (with Inception)."""
    return {
        "swap_fidelity": swap_fidelity(generator, appearance_encoder, cfg, splits, n_pairs=n_pairs, seed=seed)
        if has_ground_truth(cfg) else None,
        "reconstruction": reconstruction(generator, appearance_encoder, cfg, splits, n_images=n_pairs, seed=seed),
        "ssim_diversity": ssim_diversity(generator, appearance_encoder, cfg, splits, seed=seed),
        "fid": fid(generator, appearance_encoder, cfg, splits, inception, fid_images, seed)
        if inception is not None else None,
    }


def scalars(metrics: dict[str, Any], prefix: str = "generation") -> dict[str, float]:
    """Flatten nested metrics into tensorboard tags (`generation/swap_fidelity/swap/ssim`), numbers only.

    Counts and seeds (pairs, images, seed, ...) are settings, not measurements: they are left out.
    """
    settings = {"pairs", "seed", "images", "identities", "structures_per_identity", "chance"}
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in settings:
            flat[f"{prefix}/{key}"] = float(value)
    return flat
