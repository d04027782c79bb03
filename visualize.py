"""Look at what a DG-Net run generates, and measure it.

    python visualize.py swap     --name RUN   # appearance from one set, structure from another: swap_<it>.jpg
    python visualize.py rainbow  --name RUN   # N x N: a row per appearance, a column per structure
    python visualize.py smooth   --name RUN   # appearance-code and structure-code interpolation: JPEG + GIF
    python visualize.py generate --name RUN   # DG-Market-style data: every training image, new structures
    python visualize.py metrics  --name RUN   # swap fidelity, reconstruction, SSIM diversity, FID

Every subcommand takes --which_iter N|last|best, --output_path (runs are in OUTPUT_PATH/outputs), --opts k=v
(config overrides, e.g. data_root=...), --device, --seed, and --out (another destination: a .jpg or .png file
for swap and rainbow, a folder for smooth and generate, the JSON file for metrics). The figures (swap, rainbow,
smooth) also take --split (where inputs are picked from when none are given) and --zoom (pixel-exact
enlargement); all but metrics take --quality (JPEG). generate always reads the training split: it makes
training data. An option a subcommand cannot use is refused, not ignored.
Outputs go to outputs/RUN/visuals/ (metrics: outputs/RUN/results/generation_<iteration>.json and tensorboard).
Figures of other picks than the default (--seed, --split, --count, folders, --images) carry them in their names,
e.g. swap_<it>_seed3.jpg (folders and images by name and a short hash of their full paths), and outputs of
other data than the run trained on (--opts data_root=...) carry _on-<data folder>, as test.py's results do
(swap_<it>_on-Market.jpg, generation_<it>_on-Market.json), so they are written beside the default ones,
never over them.

The original release's checkpoints work too: `--original DIR`, DIR its run folder (config.yaml and
checkpoints/gen_<iteration>.pt, id_<iteration>.pt) or that checkpoints/ folder; figures then go to
outputs/<--name or DIR's name>/visuals/, and outputs of picked images always carry _on-<data folder> (the files
do not say what they trained on).

Images are shown as they are (clipped to [0, 1], no per-image contrast stretch) and enlarged with
nearest-neighbour sampling. Nothing is ever deleted; an explicit --out file that exists (swap, rainbow,
metrics) and a non-empty output folder (generate; smooth's --out) are refused unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

import quality
from data.datasets import DatasetSplits, Record, list_images
from data.loaders import image_size, load_splits
from test import other_data_tag
from utils import (
    UserError,
    built,
    check_run_checkpoint,
    ctrl_c_held,
    find_checkpoint,
    load_checkpoint,
    load_config,
    one_line,
    plain_warnings,
    run_folder,
    saved_config,
)

SPLITS = ("query", "gallery", "train")
GAP, HEADER_GAP = 2, 6  # pixels between figure cells, and after a header row/column


# ---------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # Each subcommand is offered only the options it uses, so one it cannot use is argparse's "unrecognized
    # arguments" error instead of being silently ignored.
    model = argparse.ArgumentParser(add_help=False)  # every subcommand: which model, where, on what data
    model.add_argument("--name", help="run name: OUTPUT_PATH/outputs/NAME (with --original: where outputs go)")
    model.add_argument("--original", metavar="DIR",
                       help="the original release's run folder: config.yaml and checkpoints/gen_*.pt, id_*.pt")
    model.add_argument("--which_iter", default="last",
                       help="checkpoint iteration, last (default) or best (the best validation mAP)")
    model.add_argument("--output_path", default=".", help="runs are in OUTPUT_PATH/outputs (default: .)")
    model.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                       help="config overrides; another data_root names the outputs _on-<its folder>")
    model.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ...")
    model.add_argument("--seed", type=int, help="seed of every random pick (default 0)")
    figure = argparse.ArgumentParser(add_help=False)  # swap, rainbow, smooth: figures of picked images
    figure.add_argument("--split", choices=SPLITS,
                        help="where input images are picked from when none are given (default: query)")
    figure.add_argument("--zoom", type=int, default=1, help="enlarge figures by this integer factor")
    jpeg = argparse.ArgumentParser(add_help=False)
    jpeg.add_argument("--quality", type=int, help="JPEG quality (default 95)")

    def output(p: argparse.ArgumentParser, metavar: str, out_help: str, overwrite_help: str) -> None:
        p.add_argument("--out", metavar=metavar, help=out_help)
        p.add_argument("--overwrite", action="store_true", help=overwrite_help + " (nothing is deleted)")

    figure_file = ("FILE", "write this .jpg/.jpeg (JPEG) or .png (lossless) file instead of outputs/NAME/visuals/...",
                   "allow writing over an existing --out")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{swap,rainbow,smooth,generate,metrics}")
    s = sub.add_parser("swap", parents=[model, figure, jpeg], help="appearance set x structure set, pair by pair")
    output(s, *figure_file)
    s.add_argument("--appearance", metavar="DIR", help="folder of appearance providers (paired in name order)")
    s.add_argument("--structure", metavar="DIR", help="folder of structure providers")
    s.add_argument("--count", type=int, help="pairs picked from --split (default 8), or the first COUNT pairs "
                                             "of the folders (default: all)")
    r = sub.add_parser("rainbow", parents=[model, figure, jpeg], help="N x N grid with header row and column")
    output(r, *figure_file)
    r.add_argument("--appearance", metavar="DIR", help="folder of appearance providers (rows)")
    r.add_argument("--structure", metavar="DIR", help="folder of structure providers (columns)")
    r.add_argument("--count", type=int, default=7, help="N (default 7)")
    m = sub.add_parser("smooth", parents=[model, figure, jpeg],
                       help="interpolate appearance codes, then structure codes")
    output(m, "DIR", "write into this folder instead of outputs/NAME/visuals/smooth",
           "allow writing into a non-empty --out, replacing files of the same name")
    m.add_argument("--images", nargs=2, metavar=("A", "B"), help="the two images (default: picked from --split)")
    m.add_argument("--steps", type=int, default=11, help="interpolation steps, ends included (default 11)")
    m.add_argument("--duration", type=int, default=150, help="GIF frame duration in ms (default 150)")
    # always the training split: its output is training data, and test identities in it would leak into training
    g = sub.add_parser("generate", parents=[model, jpeg], help="DG-Market-style dataset from the training split")
    output(g, "DIR", "write into this folder instead of outputs/NAME/visuals/dg-market_<iteration>",
           "allow writing into a non-empty output folder, replacing files of the same name")
    g.add_argument("--per_image", type=int, default=1, help="generated images per training image (default 1)")
    g.add_argument("--limit", type=int, help="only the first LIMIT training images (a preview)")
    g.add_argument("--batch_size", type=int, default=32, help="images per generator call (default 32)")
    q = sub.add_parser("metrics", parents=[model], help="generation quality -> results/generation_<iteration>.json")
    output(q, "FILE", "write the metrics JSON to this file instead of outputs/NAME/results/ (and nothing into the run "
              "folder: no tensorboard events)", "allow writing over an existing --out")
    q.add_argument("--pairs", type=int, default=64, help="seeded test pairs / images (default 64)")
    q.add_argument("--fid-weights", dest="fid_weights", metavar="PATH",
                   help="torchvision Inception v3 weights file; FID is computed only with it")
    q.add_argument("--fid-images", dest="fid_images", type=int, default=500, help="images per FID set")
    args = p.parse_args(argv)
    if not args.name and not args.original:
        p.error("give --name RUN (or --original DIR for the original release's checkpoints)")
    given = [o for o in ("appearance", "structure", "images") if getattr(args, o, None)]
    unused = [o for o in ("split", "seed") if given and getattr(args, o, None) is not None]
    if unused:  # they pick images from the data, which given images replace: they would change nothing
        names, one = " and ".join(f"--{o}" for o in unused), len(unused) == 1
        p.error(f"{names} pick{'s' if one else ''} images from the data; with images given (--{given[0]}), leave "
                f"{'it' if one else 'them'} out")
    if args.seed is None:
        args.seed = 0
    if getattr(args, "split", "") is None:
        args.split = "query"
    return args


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def positive(value: int, option: str) -> int:
    if value < 1:
        raise UserError(f"{option} must be at least 1, got {value}")
    return value


# ---------------------------------------------------------------------------------------------------
# models: a run of this project, or the original release's files


@dataclass
class Models:
    generator: nn.Module
    appearance_encoder: nn.Module
    cfg: dict[str, Any]
    iteration: int
    run_dir: Path  # where visuals/ and results/ go
    trained_on: dict[str, Any]  # the run's own config, for data_tag; {} for the original's files, which do not
    # say what they trained on, so their outputs always name the data (as test.py's results do)

    @property
    def size(self) -> tuple[int, int]:
        return image_size(self.cfg)


def load_run(run_dir: Path, which_iter: str, opts: Sequence[str], device: torch.device) -> Models:
    """G and E_a of a DG-Net run, in eval mode on `device` (as test.py loads a run)."""
    from networks import build_generator
    from reIDmodel import build_appearance_encoder

    path = find_checkpoint(run_dir, which_iter)
    state = check_run_checkpoint(load_checkpoint(path), path)
    if state.get("kind") != "DGNet":
        raise UserError(f"{path} is a {state.get('kind')} run, which has no generator: give a DG-Net run")
    config_file = run_dir / "config.yaml"
    cfg = load_config(config_file, opts) if config_file.is_file() else saved_config(state["config"], opts)
    weights = state["trainer"]["models"]
    generator = built(build_generator, cfg)
    head = weights["id"].get("classifier1.classifier.0.weight")
    if head is None:
        raise UserError(f"{path} has no appearance-encoder head (classifier1): it is not a DG-Net checkpoint of "
                        "train.py; give another --which_iter")
    encoder = built(build_appearance_encoder, cfg, head.shape[0], pretrained="none")
    try:
        generator.load_state_dict(weights["gen"])
        encoder.load_state_dict(weights["id"])
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the run's config ({one_line(err)[:200]}); drop the --opts that "
                        "change the networks") from None
    return Models(generator.to(device).eval(), encoder.to(device).eval(), cfg, int(state["iteration"]), run_dir,
                  saved_config(state["config"]))


def load_original(folder: Path, which_iter: str, opts: Sequence[str], device: torch.device,
                  run_dir: Path) -> Models:
    """G and E_a from the original's gen_<it>.pt / id_<it>.pt (original.py)."""
    import original

    config, checkpoints = original.locate(folder)
    cfg = original.original_config(config, opts)
    iteration, gen_path, id_path = original.checkpoint_files(checkpoints, which_iter)
    generator = original.generator(cfg, gen_path)
    encoder = original.appearance_encoder(cfg, id_path)
    return Models(generator.to(device).eval(), encoder.to(device).eval(), cfg, iteration, run_dir, {})


def load_models(args: argparse.Namespace, device: torch.device) -> Models:
    if args.original:
        folder = Path(args.original).expanduser()
        run_dir = Path(args.output_path) / "outputs" / (args.name or folder.resolve().name)
        return load_original(folder, args.which_iter, args.opts, device, run_dir)
    return load_run(run_folder(args.output_path, args.name), args.which_iter, args.opts, device)


# ---------------------------------------------------------------------------------------------------
# inputs


def pick(records: Sequence[Record], n: int, seed: int) -> list[Record]:
    """n seeded images, each of another identity while identities last (junk and distractors left out)."""
    people = sorted((r for r in records if r.pid > 0), key=lambda r: r.path) or sorted(records, key=lambda r: r.path)
    if not people:
        raise UserError("the split has no images to pick from; choose another --split or give folders")
    rng = np.random.default_rng(seed)
    by_pid: dict[int, list[Record]] = defaultdict(list)
    for r in people:
        by_pid[r.pid].append(r)
    pids = sorted(by_pid)
    if len(pids) >= n:
        return [by_pid[pids[i]][int(rng.integers(len(by_pid[pids[i]])))] for i in rng.permutation(len(pids))[:n]]
    return [people[int(i)] for i in rng.choice(len(people), size=n, replace=len(people) < n)]


def split_records(models: Models, split: str) -> list[Record]:
    splits = load_splits(models.cfg)
    records = getattr(splits, split)
    if not records:
        raise UserError(f"the {split} split of {models.cfg['data_root']} is empty; choose another --split")
    return records


def folder_images(folder: str, option: str) -> list[str]:
    paths = list_images(folder)
    if not paths:
        raise UserError(f"{option} {folder} holds no images")
    return paths


def load_set(paths: Sequence[str], size: tuple[int, int]) -> torch.Tensor:
    return torch.stack([quality.load_unit(p, size) for p in paths])


def provider_sets(args: argparse.Namespace, models: Models, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(appearance, structure) images in [0, 1]: from the folders, or 2*count identities of --split."""
    if bool(args.appearance) != bool(args.structure):
        raise UserError("give both --appearance DIR and --structure DIR, or neither (images are then picked "
                        "from --split)")
    if args.appearance:
        a, s = folder_images(args.appearance, "--appearance"), folder_images(args.structure, "--structure")
        return load_set(a, models.size), load_set(s, models.size)
    picked = pick(split_records(models, args.split), 2 * count, args.seed)
    return load_set([r.path for r in picked[:count]], models.size), load_set([r.path for r in picked[count:]],
                                                                              models.size)


# ---------------------------------------------------------------------------------------------------
# figures


def to_pil(image: torch.Tensor, zoom: int = 1) -> Image.Image:
    """A [0, 1] image (3, H, W) as a PIL image, enlarged `zoom` times with nearest-neighbour sampling."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(array)
    return img.resize((img.width * zoom, img.height * zoom), Image.NEAREST) if zoom > 1 else img


def compose(rows: list[list[torch.Tensor | None]], zoom: int, header: bool = False) -> Image.Image:
    """Cells of equal size on white, `GAP` apart; None leaves a cell blank. With `header`, the first row and
    the first column are set apart by a wider gap."""
    first = next(c for row in rows for c in row if c is not None)
    h, w = first.shape[1] * zoom, first.shape[2] * zoom
    n_rows, n_cols = len(rows), max(len(row) for row in rows)

    def offset(i: int, cell: int) -> int:
        return i * (cell + GAP) + (HEADER_GAP - GAP if header and i > 0 else 0)

    canvas = Image.new("RGB", (offset(n_cols, w) - GAP, offset(n_rows, h) - GAP), "white")
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell is not None:
                canvas.paste(to_pil(cell, zoom), (offset(j, w), offset(i, h)))
    return canvas


IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def image_format(path: Path) -> str:
    """The file format a figure's name asks for: JPEG for .jpg/.jpeg, PNG (lossless) for .png."""
    try:
        return IMAGE_FORMATS[path.suffix.lower()]
    except KeyError:
        raise UserError(f"--out {path}: name the figure .jpg, .jpeg or .png") from None


def save_image(image: Image.Image, path: Path, jpeg_quality: int = 95) -> Path:
    """Write a figure in the format its suffix names, through a temporary name, so a half-written file never
    appears."""
    fmt = image_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format=fmt, **({"quality": jpeg_quality} if fmt == "JPEG" else {}))
    os.replace(tmp, path)
    return path


def save_gif(frames: list[Image.Image], path: Path, duration: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0)
    os.replace(tmp, path)
    return path


def picks_tag(args: argparse.Namespace, default_count: int | None = None) -> str:
    """'' for the default picks (seed 0 of the query split), else '_' and what picked the images instead, so
    that a figure of other people is written beside the default one rather than over it. Settings that only
    change how the same people are drawn (--zoom, --steps, --quality) are not part of the name."""
    images = getattr(args, "images", None)
    if images:
        return "_" + "-".join(Path(p).stem for p in images) + _where(images)
    count = getattr(args, "count", None)
    parts = [] if count is None or count == default_count else [f"n{count}"]
    if getattr(args, "appearance", None):
        folders = (args.appearance, args.structure)
        parts.insert(0, "-".join(Path(f).name for f in folders) + _where(folders))
    else:
        parts[:0] = [p for p, on in ((args.split, args.split != "query"), (f"seed{args.seed}", args.seed != 0)) if on]
    return "".join(f"_{p}" for p in parts)


def data_tag(models: Models, from_data: bool = True) -> str:
    """'_on-<data folder>' when the images come from other data than the run trained on (test.py's
    other_data_tag), so outputs of other data are written beside the run's own, never over them; '' for images
    given as folders or files, which no data_root changes."""
    return other_data_tag(models.cfg, models.trained_on) if from_data else ""


def _where(paths: Sequence[str]) -> str:
    """Six hex digits of the inputs' full paths: two `query` folders (or two `0001.jpg`) elsewhere on disk give
    other names."""
    resolved = "\0".join(str(Path(p).expanduser().resolve()) for p in paths)
    return "-" + hashlib.sha1(resolved.encode()).hexdigest()[:6]


def output_file(args: argparse.Namespace, models: Models, default_name: str) -> Path:
    """--out (refused when it exists, unless --overwrite), else visuals/<default_name> of the run."""
    if args.out:
        path = Path(args.out)
        if path.exists() and not args.overwrite:
            raise UserError(f"{path} exists; pick another --out or add --overwrite")
        return path
    return models.run_dir / "visuals" / default_name


def output_folder(args: argparse.Namespace, models: Models, default_name: str, allow_existing: bool) -> Path:
    """--out or visuals/<default_name>; a non-empty folder is refused unless allowed or --overwrite."""
    folder = Path(args.out) if args.out else models.run_dir / "visuals" / default_name
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (allow_existing or args.overwrite):
        raise UserError(f"{folder} already holds files; pick another --out, or add --overwrite (files of the "
                        "same name are replaced, nothing is deleted)")
    return folder


# ---------------------------------------------------------------------------------------------------
# subcommands


def cmd_swap(args: argparse.Namespace, models: Models) -> list[Path]:
    """One column per pair: appearance image, structure image, G(s_B, f_A), G(s_A, f_B)."""
    count = 8 if args.count is None else positive(args.count, "--count")
    appearance, structure = provider_sets(args, models, count)
    n = min(len(appearance), len(structure))
    if args.count is not None:  # folders give all their pairs unless --count asks for fewer
        n = min(n, count)
    appearance, structure = appearance[:n], structure[:n]
    g, e = models.generator, models.appearance_encoder
    a_in_b = quality.swap(g, e, quality.normalize(structure), quality.normalize(appearance))
    b_in_a = quality.swap(g, e, quality.normalize(appearance), quality.normalize(structure))
    columns = [[appearance[i], structure[i], a_in_b[i], b_in_a[i]] for i in range(n)]
    rows = [list(r) for r in zip(*columns)]
    tag = data_tag(models, from_data=not args.appearance)
    path = output_file(args, models, f"swap_{models.iteration:08d}{tag}{picks_tag(args, 8)}.jpg")
    return [save_image(compose(rows, args.zoom), path, args.quality)]


def cmd_rainbow(args: argparse.Namespace, models: Models) -> list[Path]:
    """Header row: the structures; each row: an appearance image, then it in every structure."""
    n = positive(args.count, "--count")
    if args.appearance or args.structure:
        appearance, structure = provider_sets(args, models, n)
        appearance, structure = appearance[:n], structure[:n]
    else:  # one set of N people for both: the diagonal is each person's own reconstruction
        picked = pick(split_records(models, args.split), n, args.seed)
        appearance = structure = load_set([r.path for r in picked], models.size)
    g, e = models.generator, models.appearance_encoder
    rows: list[list[torch.Tensor | None]] = [[None, *structure]]
    for a in appearance:
        out = quality.swap(g, e, quality.normalize(structure), quality.normalize(a.expand_as(structure)))
        rows.append([a, *out])
    tag = data_tag(models, from_data=not args.appearance)
    name = f"rainbow_{len(appearance)}x{len(structure)}_{models.iteration:08d}{tag}{picks_tag(args, args.count)}.jpg"
    path = output_file(args, models, name)
    return [save_image(compose(rows, args.zoom, header=True), path, args.quality)]


@torch.no_grad()
def interpolate(models: Models, x: torch.Tensor, steps: int, code: str) -> torch.Tensor:
    """(2, steps, 3, H, W): row r keeps image r's structure (code "appearance") or appearance (code
    "structure") while the other code goes from image 0's (w = 0) to image 1's (w = 1)."""
    g, e = models.generator, models.appearance_encoder
    device = next(g.parameters()).device
    xn = quality.normalize(x).to(device)
    s, f = g.encode(xn), e(xn)[0]
    w = torch.linspace(0, 1, steps, device=device).view(-1, 1)
    rows = []
    for r in range(2):
        if code == "appearance":
            f_mix = (1 - w) * f[0] + w * f[1]
            s_mix = s[r].expand(steps, *s.shape[1:])
        else:
            s_mix = (1 - w.view(-1, 1, 1, 1)) * s[0] + w.view(-1, 1, 1, 1) * s[1]
            f_mix = f[r].expand(steps, -1)
        rows.append(quality.to_unit(g.decode(s_mix, f_mix)).cpu())
    return torch.stack(rows)


def gif_frames(strip: torch.Tensor, zoom: int) -> list[Image.Image]:
    """One frame per step: the two rows' images side by side, over a bar that shows the step (which also
    keeps consecutive frames distinct, so the GIF writer never merges them)."""
    steps = strip.shape[1]
    frames = []
    for k in range(steps):
        pair = compose([[strip[0, k], strip[1, k]]], zoom)
        frame = Image.new("RGB", (pair.width, pair.height + 4), "white")
        frame.paste(pair, (0, 0))
        bar = round(pair.width * (k + 1) / steps)
        ImageDraw.Draw(frame).rectangle((0, pair.height + 1, bar - 1, pair.height + 3), fill=(40, 40, 40))
        frames.append(frame)
    return frames


def cmd_smooth(args: argparse.Namespace, models: Models) -> list[Path]:
    steps = args.steps
    if steps < 2:
        raise UserError(f"--steps must be at least 2 (both ends), got {steps}")
    if args.images:
        x = load_set(args.images, models.size)
    else:
        x = load_set([r.path for r in pick(split_records(models, args.split), 2, args.seed)], models.size)
    folder = output_folder(args, models, "smooth", allow_existing=not args.out)
    written = []
    for code in ("appearance", "structure"):
        with quality.eval_mode(models.generator, models.appearance_encoder):
            strip = interpolate(models, x, steps, code)
        rows = [[x[0], *strip[r], x[1]] for r in range(2)]
        stem = f"smooth_{code}_{models.iteration:08d}{data_tag(models, from_data=not args.images)}{picks_tag(args)}"
        written.append(save_image(compose(rows, args.zoom), folder / f"{stem}.jpg", args.quality))
        written.append(save_gif(gif_frames(strip, args.zoom), folder / f"{stem}.gif", args.duration))
    return written


def generated_name(appearance: Record, structure: Record) -> str:
    """`<appearance file stem>__s_<structure file stem>.jpg`: both providers in the name."""
    return f"{Path(appearance.path).stem}__s_{Path(structure.path).stem}.jpg"


def structure_providers(train: Sequence[Record], per_image: int, seed: int) -> list[list[Record]]:
    """For each training image, `per_image` distinct seeded structure providers of other identities
    (any other image when the split holds one identity only). Rejection sampling: no per-image list."""
    rng = np.random.default_rng(seed)
    count = defaultdict(int)
    for r in train:
        count[r.pid] += 1
    single = len(count) == 1
    providers = []
    for i, r in enumerate(train):
        want = min(per_image, len(train) - (1 if single else count[r.pid]))
        if want < 1:
            raise UserError("the training split has a single image; nothing to take a structure from")
        chosen: list[int] = []
        while len(chosen) < want:
            j = int(rng.integers(len(train)))
            if (j != i if single else train[j].pid != r.pid) and j not in chosen:
                chosen.append(j)
        providers.append([train[j] for j in chosen])
    return providers


def cmd_generate(args: argparse.Namespace, models: Models) -> list[Path]:
    """DG-Market: every training image's appearance in random other structures, one folder per identity
    (`train_all/<pid>/`, readable with `dataset: folder`)."""
    per_image, batch = positive(args.per_image, "--per_image"), positive(args.batch_size, "--batch_size")
    folder = output_folder(args, models, f"dg-market_{models.iteration:08d}{data_tag(models)}", allow_existing=False)
    train = sorted(split_records(models, "train"), key=lambda r: r.path)
    providers = structure_providers(train, per_image, args.seed)
    if args.limit is not None:
        positive(args.limit, "--limit")
        train, providers = train[:args.limit], providers[:args.limit]
    jobs = [(a, b) for a, bs in zip(train, providers) for b in bs]
    g, e = models.generator, models.appearance_encoder
    print(f"generating {len(jobs)} images from {len(train)} training images into {folder}", flush=True)
    every = max(1, -(-len(jobs) // batch) // 10)  # about ten progress lines
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        a = load_set([j[0].path for j in chunk], models.size)
        b = load_set([j[1].path for j in chunk], models.size)
        out = quality.swap(g, e, quality.normalize(b), quality.normalize(a), batch_size=batch)
        for (app, struct), img in zip(chunk, out):
            path = folder / "train_all" / f"{app.pid:04d}" / generated_name(app, struct)
            save_image(to_pil(img), path, args.quality)
        done = start + len(chunk)
        if done == len(jobs) or (start // batch + 1) % every == 0:
            print(f"  {done}/{len(jobs)}", flush=True)
    manifest = {"run": str(models.run_dir), "iteration": models.iteration, "data_root": str(models.cfg["data_root"]),
                "seed": args.seed, "per_image": per_image, "images": len(jobs),
                "identities": len({a.pid for a, _ in jobs}),
                "naming": "train_all/<appearance pid>/<appearance image>__s_<structure image>.jpg"}
    (folder / "dg-market.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return [folder]


def cmd_metrics(args: argparse.Namespace, models: Models) -> list[Path]:
    """results/generation_<iteration>.json and tensorboard's generation/... scalars; with --out, that file only."""
    pairs = positive(args.pairs, "--pairs")
    # other data, then other picks than the default (seed 0, 64 pairs): beside the default results, not over them
    tag = data_tag(models) + (f"_seed{args.seed}" if args.seed else "") + (f"_pairs{pairs}" if pairs != 64 else "")
    if args.out:  # checked before the metrics are computed, as swap's --out is before its figure
        out = Path(args.out)
        if out.is_dir():
            raise UserError(f"--out {out} is a folder; give the name of the JSON file to write")
        if out.exists() and not args.overwrite:
            raise UserError(f"{out} exists; pick another --out or add --overwrite")
    else:
        out = models.run_dir / "results" / f"generation_{models.iteration:08d}{tag}.json"  # one file per checkpoint
    inception = quality.load_inception(args.fid_weights, next(models.generator.parameters()).device) \
        if args.fid_weights else None
    splits: DatasetSplits = load_splits(models.cfg)
    result = quality.generation_metrics(models.generator, models.appearance_encoder, models.cfg, splits,
                                        n_pairs=pairs, seed=args.seed, inception=inception,
                                        fid_images=positive(args.fid_images, "--fid-images"))
    summary = {"run": models.run_dir.name, "iteration": models.iteration, "dataset": splits.name,
               "data_root": str(models.cfg["data_root"]), "image_size": list(models.size), **result}
    print(format_metrics(summary), flush=True)  # first: a folder that cannot be written loses nothing computed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.out:  # another destination: the run folder is left as it is
        return [out]
    from tensorboardX import SummaryWriter

    # Other data's scalars under their own tags (generation_on-<data folder>/...), not on the run's own curves,
    # and in a file of their own: tensorboardX names event files by the second, so two writers started within
    # one second would share a name and the second would replace the first's file (the process id too: two
    # measurements within a second).
    with ctrl_c_held(), SummaryWriter(str(models.run_dir / "logs"),
                                      filename_suffix=f".generation{tag}.{os.getpid()}") as writer:  # start, close
        for name, value in quality.scalars(result, f"generation{tag}").items():
            writer.add_scalar(name, value, models.iteration)
    return [out]


def format_metrics(s: dict[str, Any]) -> str:
    lines = [f"{s['run']} (iteration {s['iteration']}) on {s['dataset']}, {s['image_size'][0]}x{s['image_size'][1]}"]
    fidelity = s["swap_fidelity"]
    if fidelity:
        lines.append(f"swap fidelity over {fidelity['pairs']} test pairs, against the true swap "
                     "(SSIM: higher is better; L1: lower):")
        lines.append(f"{'':<26}whole image       person alone")
        lines.append(f"{'':<26}SSIM      L1      SSIM      L1     luma L1  chroma L1")
        for key, label in quality.ANSWER_LABELS.items():
            f = fidelity[key]
            lines.append(f"  {label:<22} {f['ssim']:6.4f}  {f['l1']:6.4f}    {f['person_ssim']:6.4f}  "
                         f"{f['person_l1']:6.4f}  {f['person_luma_l1']:6.4f}   "
                         f"{f['person_chroma_l1']:6.4f}")
        judge = fidelity.get("identity_judge")
        if judge:
            lines.extend(format_judge(judge))
    else:
        lines.append("swap fidelity: needs the synthetic dataset (its swaps have a true answer)")
    rec = s["reconstruction"]
    lines.append(f"reconstruction ({rec['images']} test images): SSIM {rec['ssim']:.4f}  L1 {rec['l1']:.4f}")
    div = s["ssim_diversity"]
    real = f"{div['real']:.4f}" if div["real"] is not None else "n/a"
    lines.append(f"SSIM diversity (mean SSIM within an identity; lower = more varied): generated "
                 f"{div['generated']:.4f}, real {real}")
    lines.append(f"FID ({s['fid']['images']} images): {s['fid']['fid']:.2f}" if s["fid"] else quality.fid_hint())
    return "\n".join(lines)


def format_judge(judge: dict[str, Any]) -> list[str]:
    """The identity judge's table: top-1/top-5 for A, share judged B, in CIELAB and on chroma alone."""
    lines = [f"identity judge: whose clothes does each answer wear, among {judge['identities']} test identities "
             f"drawn in B's structure (chance {judge['chance']:.4f}):",
             f"{'':<26}full CIELAB                 chroma (a*b*) alone",
             f"{'':<26}top-1  top-5  judged B       top-1  top-5  judged B"]
    for key, label in quality.JUDGE_LABELS.items():
        j = judge[key]
        lines.append(f"  {label:<22} {j['top1']:6.3f} {j['top5']:6.3f}  {j['as_structure']:6.3f}       "
                     f"{j['chroma_top1']:6.3f} {j['chroma_top5']:6.3f}  {j['chroma_as_structure']:6.3f}")
    return lines


COMMANDS = {"swap": cmd_swap, "rainbow": cmd_rainbow, "smooth": cmd_smooth, "generate": cmd_generate,
            "metrics": cmd_metrics}


def run(args: argparse.Namespace) -> list[Path]:
    if args.command in ("swap", "rainbow", "smooth"):
        positive(args.zoom, "--zoom")
    if args.command == "smooth":
        positive(args.duration, "--duration")
    if args.out and args.command in ("swap", "rainbow"):
        lossless = image_format(Path(args.out)) == "PNG"  # a bad name stops before any model is loaded
        if lossless and args.quality is not None:
            raise UserError(f"--quality is for JPEG; --out {args.out} is a PNG (lossless): leave --quality out")
    if args.command != "metrics":  # it writes no image
        if args.quality is None:
            args.quality = 95
        if not 1 <= args.quality <= 100:
            raise UserError(f"--quality must be 1..100, got {args.quality}")
    device = select_device(args.device)
    models = load_models(args, device)
    with torch.no_grad():
        return COMMANDS[args.command](args, models)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        written = run(args)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a figure or result file that cannot be written
        print(f"error: could not write {err.filename or 'the output'} ({err.strerror or err}); choose a writable "
              "--out or --output_path", file=sys.stderr)
        return 2
    if args.command != "metrics":
        for path in written:
            print(f"written {path}")
    else:
        print(f"written to {written[0]}")
    return 0


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
