"""Export a run's ReID model for deployment: an ONNX file that computes the feature test.py evaluates.

    python export.py --name RUN [--which_iter N|last|best] [--format onnx] [--out FILE] [--no-flip] [--ms 1,1.1]

The model is DG-Net's appearance encoder E_a (a DG-Net run) or the teacher (a `train.py --trainer baseline`
run), in eval mode, float32. The graph:

- input `image`, float32 (batch, 3, H, W): RGB, resized to H x W (bicubic, no crop), scaled to [0, 1] and
  normalized per channel with the ImageNet mean and std, exactly as test.py's loader does. The batch is
  dynamic; H and W are fixed (the run's crop_image_height and crop_image_width).
- output `features`, float32 (batch, D): test.py's feature. Each image and its horizontal flip go through
  the model and are summed (with `--no-flip`, the image alone). DG-Net: D = 1024, the primary then the
  fine-grained 512-d bottleneck, each half L2-normalized before and after the flip sum. Teacher: D = 512,
  its bottleneck, L2-normalized after the flip sum. With `--ms 1,1.1` (test.py's multi-scale feature) the
  graph also resizes the input to each scale's area (bicubic) and adds those passes to the sum.

So the flip, the scales and every normalization of the feature are in the graph; decoding, resizing and the input's
mean/std normalization are the caller's (they are recorded in the metadata), and so is DG-Net's query
weighting: queries' fine-grained half times alpha (0.5) before the dot product, which test.py applies to
queries only. `python test.py --name RUN --onnx FILE` evaluates the file with test.py's protocol.

Metadata (ONNX metadata_props, all strings; see `metadata`): the run, iteration, kind and dataset; the input
size, channel order, value range, mean and std; where the flip is; the feature's size, parts and
similarity; the exporter.

The TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`) writes the file: it runs on every
torch this project supports (2.4 on), needs only the `onnx` package, and this graph has no control flow and
one dynamic dimension, which is what it handles well. The torch.export-based exporter (the default since
torch 2.9) needs onnxscript as well and changed between those releases. onnx and onnxruntime are optional:
training never imports them (requirements-dev.txt lists them; `make test` installs it).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from features import HALF, check_scales, evaluated_feature, has_halves, load_model, load_run
from test import extraction_suffix
from utils import UserError, add_run_arguments, listed, numbers, one_line, plain_warnings

FORMATS = ("onnx",)
OPSET = 17  # supported by the TorchScript exporter of torch 2.4 and by every onnxruntime release since 1.14
FEATURE_FORMAT = "dgnet-reid-features/1"
INPUT, OUTPUT = "image", "features"


def require(module: str, what: str) -> ModuleType:
    """Import an optional package, or raise UserError with the one line that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the {module} package: pip install onnx onnxruntime "
                        "(pip install -r requirements-dev.txt, or make install-dev)") from None


class FeatureGraph(nn.Module):
    """The ReID model with test.py's feature convention around it: (B, 3, H, W) normalized -> (B, D)."""

    def __init__(self, model: nn.Module, halves: bool, flip: bool = True, scales: Sequence[float] = (1.0,)):
        super().__init__()
        self.model, self.halves, self.flip, self.scales = model, halves, flip, tuple(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return evaluated_feature(self.model, x, self.halves, self.flip, scales=self.scales)


def metadata(state: dict[str, Any], cfg: dict[str, Any], run: str, halves: bool, flip: bool,
             scales: Sequence[float] = (1.0,)) -> dict[str, str]:
    """What a caller needs to feed the graph and use its output, as ONNX metadata_props (strings)."""
    dim = 2 * HALF if halves else HALF
    if halves:
        feature = ("primary 512-d bottleneck, then fine-grained 512-d bottleneck; each half L2-normalized "
                   "after the flip sum")
        similarity = ("dot product, the query's fine-grained half (columns 512:1024) multiplied by query_alpha "
                      "first (DG-Net's score: s_primary + alpha s_fine)")
    else:
        feature, similarity = "512-d bottleneck, L2-normalized after the flip sum", "dot product (cosine)"
    return {
        "feature_format": FEATURE_FORMAT,
        "run": run,
        "iteration": str(state["iteration"]),
        "kind": state["kind"],
        "model": "appearance_encoder" if halves else "teacher",
        "dataset": str(cfg["dataset"]),
        "backbone": str(cfg["backbone"]),
        "input_name": INPUT,
        "input_height": str(cfg["crop_image_height"]),
        "input_width": str(cfg["crop_image_width"]),
        "input_layout": "NCHW float32, batch dynamic",
        "channel_order": "RGB",
        "value_range": "0..1 (8-bit value / 255), before normalization",
        "mean": ",".join(str(m) for m in IMAGENET_MEAN),
        "std": ",".join(str(s) for s in IMAGENET_STD),
        "preprocessing": "caller: resize to input_height x input_width (bicubic, no crop), scale to 0..1, "
                         "(x - mean) / std per channel",
        "flip": "graph" if flip else "none",
        "scales": listed(scales),  # areas the graph also resizes the input to, summed
        "output_name": OUTPUT,
        "feature_dim": str(dim),
        "feature_parts": "2" if halves else "1",
        "feature": feature,
        "similarity": similarity,
        "exporter": f"torch {torch.__version__} TorchScript exporter, opset {OPSET}",
    } | ({"query_alpha": "0.5"} if halves else {})


def export_onnx(model: nn.Module, halves: bool, size: tuple[int, int], out: str | os.PathLike,
                props: dict[str, str], flip: bool = True, scales: Sequence[float] = (1.0,)) -> Path:
    """Write `model`'s feature graph to `out` with `props` as metadata; through a temporary file, so an
    interrupted export leaves no half-written model."""
    onnx = require("onnx", "export")
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(f"{out.parent} is not writable")
    except OSError as err:
        raise UserError(f"cannot write {out} ({one_line(err)}): choose another --out") from None
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    graph = FeatureGraph(model.float().cpu().eval(), halves, flip, scales).eval()
    example = torch.zeros(2, 3, *size)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The deprecation notice of this exporter (see the module docstring for why it is the one used)
            warnings.simplefilter("ignore", DeprecationWarning)
            # scale2's test of the input height becomes a constant of the graph: right, as the height is fixed
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(graph, (example,), str(tmp), dynamo=False, input_names=[INPUT],
                              output_names=[OUTPUT], opset_version=OPSET,
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, props)
        proto.doc_string = __doc__.split("\n")[0]
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


class OnnxReID:
    """An exported model run by onnxruntime on the CPU: `features(images)` gives what the graph computes."""

    def __init__(self, path: str | os.PathLike):
        ort = require("onnxruntime", "running an exported model")
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no ONNX file {path}; write one with python export.py --name RUN")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            raise UserError(f"cannot load {path} with onnxruntime ({one_line(err)[:200]})") from None
        self.path = path
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.metadata.get("feature_format") != FEATURE_FORMAT:
            raise UserError(f"{path} was not written by export.py (no feature_format {FEATURE_FORMAT} in its "
                            "metadata); export the run again")

    @property
    def size(self) -> tuple[int, int]:
        return int(self.metadata["input_height"]), int(self.metadata["input_width"])

    @property
    def halves(self) -> bool:
        return self.metadata["feature_parts"] == "2"

    @property
    def flip(self) -> bool:
        return self.metadata["flip"] == "graph"

    @property
    def scales(self) -> list[float]:
        """The areas the graph sums the image at (files written before `--ms`: the image alone)."""
        return [float(s) for s in self.metadata.get("scales", "1").split(",")]

    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) float32, preprocessed as the metadata says -> (B, D) float32."""
        x = images.numpy() if isinstance(images, torch.Tensor) else images
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]


def default_out(run_dir: Path, name: str, iteration: int, args: argparse.Namespace) -> Path:
    """export/NAME_<iteration>[_noflip][_ms<scales>].onnx: the feature's options in the name, as test.py's
    saved features carry them."""
    return run_dir / "export" / f"{name}_{iteration:08d}{extraction_suffix(args)}.onnx"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "run name: outputs/NAME (DG-Net or a teacher run)")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="file format (default: onnx)")
    p.add_argument("--out", help="file to write (default: outputs/NAME/export/NAME_<iteration>.onnx)")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="leave the flipped image out of the graph (half the compute; test.py --no-flip's feature)")
    p.add_argument("--ms", type=numbers, default=[1.0], metavar="S[,S...]",
                   help="multi-scale: the graph also sums the image resized to S times its area (test.py --ms's "
                        "feature, e.g. 1,1.1; default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p.parse_args(argv)


def run_export(args: argparse.Namespace) -> tuple[Path, str]:
    """Export the run; (the file, a line comparing onnxruntime with PyTorch on a random batch)."""
    require("onnx", "export")
    state, cfg, run_dir = load_run(args.name, args.output_path, args.which_iter)
    size = (cfg["crop_image_height"], cfg["crop_image_width"])
    check_scales(args.ms, size, cfg.get("scale2", False))
    out = Path(args.out) if args.out else default_out(run_dir, args.name, state["iteration"], args)
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--out {out}: give a file name ending in .onnx")
    if out.is_dir() or (out.exists() and not args.overwrite):
        raise UserError(f"--out {out} already exists; choose another file or add --overwrite")
    model = load_model(state, cfg, torch.device("cpu"))
    halves = has_halves(model)
    export_onnx(model, halves, size, out, metadata(state, cfg, args.name, halves, args.flip, args.ms), args.flip,
                args.ms)
    try:
        exported = OnnxReID(out)
    except UserError as err:  # onnxruntime is optional for writing the file
        return out, f"not run with onnxruntime ({err})"
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = FeatureGraph(model, halves, args.flip, args.ms)(x).numpy()
    diff = float(np.abs(exported.features(x) - expected).max())
    return out, f"onnxruntime vs PyTorch on a random batch of 3: largest difference {diff:.1e}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out, check = run_export(args)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"written: {out}")
    print(check)
    return 0


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
