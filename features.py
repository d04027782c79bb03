"""A run's re-ID model and its evaluated features: the checkpoint's model (E_a of DG-Net, or a teacher), the
flip- and multi-scale-summed features of DG-Net's protocol (the original's reid_eval/test_2label.py), and the
weighting of DG-Net's two halves by alpha. test.py scores them; export.py traces `evaluated_feature`; training
validates with them."""
from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data.datasets import Record
from data.loaders import build_test_loader
from reIDmodel import SCALE2_MAX_HEIGHT, AppearanceEncoder, build_appearance_encoder, build_teacher
from utils import (
    UserError,
    check_once,
    check_run_checkpoint,
    find_checkpoint,
    listed,
    load_checkpoint,
    load_config,
    mismatch_reason,
    run_folder,
    saved_config,
)

HALF = 512  # each head's bottleneck width


def load_run(name: str, output_path: str = ".", which_iter: str = "last", config: str | None = None,
             opts: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(checkpoint state, config, run folder) of a run; `config` replaces the run's config.yaml."""
    run_dir = run_folder(output_path, name)
    path = find_checkpoint(run_dir, which_iter)
    state = check_run_checkpoint(load_checkpoint(path), path)
    cfg_file = Path(config) if config else run_dir / "config.yaml"
    if config and not cfg_file.is_file():
        raise UserError(f"--config {config}: no such file")
    cfg = load_config(cfg_file, list(opts)) if cfg_file.is_file() else saved_config(state["config"], list(opts))
    return state, cfg, run_dir


def load_model(state: dict[str, Any], cfg: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The run's ReID model: E_a of a DG-Net run, or the teacher of a baseline run, in eval mode."""
    models = state["trainer"]["models"]
    try:
        if state["kind"] == "baseline":
            weights = models["teacher"]
            model = build_teacher(cfg, weights["classifier.classifier.0.weight"].shape[0], pretrained="none")
        else:
            weights = models["id"]
            model = build_appearance_encoder(cfg, weights["classifier1.classifier.0.weight"].shape[0],
                                             pretrained="none")
        model.load_state_dict(weights)
    except (KeyError, RuntimeError, ValueError) as err:  # another network's weights, or --opts that change it
        reason = mismatch_reason(err)
        raise UserError(f"the checkpoint's {state['kind']} weights do not fit the network of its config "
                        f"({reason}); a --config or --opts that changes the network must be left out") from None
    return model.to(device).eval()


def has_halves(model: torch.nn.Module) -> bool:
    """DG-Net's E_a gives two 512-d halves (primary, fine-grained); a teacher gives one feature."""
    model = getattr(model, "module", model)  # DDP
    return isinstance(getattr(model, "_orig_mod", model), AppearanceEncoder)  # torch.compile


class Progress:
    """A one-line progress bar on stderr (no dependency); silent when `label` is None."""

    def __init__(self, total: int, label: str | None, width: int = 30):
        self.total, self.label, self.width, self.done = total, label, width, 0
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if self.label is None:
            return
        filled = self.width * self.done // max(self.total, 1)
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        end = "\n" if self.done >= self.total else ""
        print(f"\r{self.label:>12} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
              f"{rate:.0f} img/s", end=end, file=sys.stderr, flush=True)


def normalize_halves(f: torch.Tensor) -> torch.Tensor:
    """Each 512-d half of DG-Net's feature L2-normalized on its own."""
    return torch.cat([F.normalize(h, dim=1) for h in f.split(HALF, dim=1)], dim=1)


def inference_context(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for extraction on a GPU; nothing on the CPU (float32)."""
    # float16 rather than bfloat16: more mantissa for the features, and inference activations stay in range
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


def scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` resized to `scale` times its area: each side times sqrt(scale), rounded down, bicubic (the meaning of
    the re-ID baseline's --ms, so that its `--ms 1,1.1` compares)."""
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=math.sqrt(scale), mode="bicubic", align_corners=False)


MIN_SCALED_SIDE = 32  # pixels: the backbones downsample by 16 or 32, so below this a feature map is a pixel or less


def check_scales(scales: Sequence[float], size: tuple[int, int] | None = None, doubles_small: bool = False
                 ) -> None:
    """One line for scales that cannot run: not positive and finite, given twice, or, for (height, width)
    `size` images, shrinking a side below MIN_SCALED_SIDE pixels. `doubles_small` (the config's scale2): the
    network doubles an input at most SCALE2_MAX_HEIGHT pixels high, so the scaled images must all be doubled
    or all not, or one scale would be seen at twice the size of the next."""
    for s in scales:
        if not 0 < s < math.inf:
            raise UserError(f"--ms: each scale must be a positive number (of the image's area), got {s}")
    check_once(scales, "--ms", "scale")
    if size is None:
        return
    doubled = {s: doubles_small and math.floor(size[0] * math.sqrt(s)) <= SCALE2_MAX_HEIGHT for s in scales}
    if len(set(doubled.values())) > 1:
        raise UserError(f"--ms {listed(scales)}: with scale2 the network doubles images at most "
                        f"{SCALE2_MAX_HEIGHT} pixels high, which would double the {size[0]}x{size[1]} images at "
                        f"scales {listed([s for s in scales if doubled[s]])} but not at the others; give "
                        "scales all on one side of that height")
    smallest = min(scales)
    side = min(math.floor(n * math.sqrt(smallest)) for n in size) * (2 if doubled[smallest] else 1)
    if side < MIN_SCALED_SIDE:
        raise UserError(f"--ms {smallest:g} makes the {size[0]}x{size[1]} images {side} pixels on a side, too "
                        f"small for the network (at least {MIN_SCALED_SIDE}); use larger scales")


def evaluated_feature(model: torch.nn.Module, x: torch.Tensor, halves: bool, flip: bool = True,
                      context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                      scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """The evaluated feature of a batch of normalized images: the image and its mirror image, at each of
    `scales` (`scaled`), summed (DG-Net: each 512-d half normalized before and after the sum; a teacher: its raw
    features, normalized after). `context` wraps each call of the model (autocast); export.py traces this
    function into its graph."""
    total = 0
    for scale in scales:
        x_s = scaled(x, scale)
        for view in ([x_s, x_s.flip(3)] if flip else [x_s]):
            with context():
                f = model.features(view).float()
            total = total + (normalize_halves(f) if halves else f)
    return normalize_halves(total) if halves else F.normalize(total, dim=1)


@torch.no_grad()
def extract_features(model: torch.nn.Module, cfg: dict[str, Any], records: Sequence[Record], device: torch.device,
                     *, flip: bool = True, scales: Sequence[float] = (1.0,), batch_size: int = 128,
                     label: str | None = None) -> torch.Tensor:
    """Flip- (and scale-) summed, normalized features (float32, CPU) of `records` in order (`evaluated_feature`);
    `label` shows a progress bar."""
    halves = has_halves(model)
    loader = build_test_loader(cfg, records, batch_size, pin_memory=device.type == "cuda")
    progress = Progress(len(records), label)
    feats = []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        feats.append(evaluated_feature(model, x, halves, flip, lambda: inference_context(device), scales).cpu())
        progress.update(len(x))
    width = 2 * HALF if halves else HALF
    return torch.cat(feats) if feats else torch.empty(0, width)


def check_alpha(alpha: float) -> None:
    """One line for an --alpha that weights nothing meaningful."""
    if not math.isfinite(alpha) or (alpha < 0 and alpha != -1):
        raise UserError(f"--alpha must be at least 0 and finite, or -1 for the fine-grained half alone (the "
                        f"original's meaning), got {alpha}")


def half_weights(alpha: float, both_sides: bool = False) -> torch.Tensor:
    """Per-dimension weights of DG-Net's two halves for score = s_prim + alpha s_fine: the fine-grained half
    times alpha on the query (alpha -1, as in the original's evaluation: the fine-grained half alone, the
    primary half zeroed). `both_sides`: the square root of alpha on query and gallery alike, so that every pair
    of images, gallery pairs included, scores s_prim + alpha s_fine. What re-ranking needs: it compares gallery
    with gallery and query with query as well as query with gallery, and assumes one metric for all (weighting
    the query alone would score query pairs with alpha squared and gallery pairs with 1)."""
    check_alpha(alpha)
    weight = torch.ones(2 * HALF)
    if alpha == -1:
        weight[:HALF] = 0
    else:
        weight[HALF:] = alpha ** 0.5 if both_sides else alpha
    return weight


def weight_query(qf: torch.Tensor, halves: bool, alpha: float) -> torch.Tensor:
    """DG-Net's query weighting (`half_weights`); a teacher's single feature is left as it is."""
    return qf * half_weights(alpha).to(qf.device, qf.dtype) if halves else qf


def weighted_both_sides(qf: torch.Tensor, gf: torch.Tensor, halves: bool, alpha: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and gallery features weighted alike for re-ranking (`half_weights(alpha, both_sides=True)`)."""
    if not halves:
        return qf, gf
    weight = half_weights(alpha, both_sides=True)
    return qf * weight.to(qf.device, qf.dtype), gf * weight.to(gf.device, gf.dtype)

