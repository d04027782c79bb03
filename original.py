"""The original DG-Net release's files, read into this project's networks, so that its released models can
be looked at (visualize.py --original) and evaluated (test.py --original) with this project's protocol.

- A DG-Net run of the original: `outputs/<name>/config.yaml` and `outputs/<name>/checkpoints/gen_<iteration>.pt`,
  `id_<iteration>.pt` (`{'a': state_dict}`), given as `outputs/<name>` or its `checkpoints/` (or a folder
  holding all three); its config's keys that this project knows are kept.
- A baseline teacher (layumi's Person_reID_baseline): `net_last.pth`, with `opts.yaml` beside it for the
  last stride.

Every file is read with weights_only=True; a file that does not fit is one line (UserError).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from utils import UserError, built, checked_config, flatten, one_line, schema, unflatten


def original_config(path: Path, opts: Sequence[str]) -> dict[str, Any]:
    """Our config from the original release's config.yaml: the keys we know are kept, the rest ignored.

    The original is always ResNet-50 on the per-identity folder layout (`dataset: folder`); the number of
    identities comes from id_*.pt, so ID_class is not used. --opts override anything (e.g. data_root).
    """
    if not path.is_file():
        raise UserError(f"{path} does not exist: --original needs the folder with the original's config.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({one_line(err)[:160]})") from None
    known = schema().flat_defaults
    flat = flatten(raw) if isinstance(raw, dict) else {}
    kept = {k: v for k, v in flat.items() if k in known and k not in ("ID_class", "teacher", "pretrained")}
    kept = {"backbone": "resnet50", "dataset": "folder", **kept, "pretrained": "none", "ID_class": None}
    return checked_config([(unflatten(kept), str(path))], opts)


def _generators(folder: Path) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), p) for p in folder.glob("gen_*.pt")
                  if (m := re.fullmatch(r"gen_(\d+)\.pt", p.name)))


def locate(folder: Path) -> tuple[Path, Path]:
    """(config.yaml, the folder of gen_/id_*.pt) of an original DG-Net run given as its run folder
    (`outputs/<name>`, the checkpoints in `checkpoints/`), its `checkpoints/` folder (the config one level
    up), or one folder holding both."""
    checkpoints = folder / "checkpoints" if not _generators(folder) and (folder / "checkpoints").is_dir() else folder
    for config in (folder / "config.yaml", checkpoints / "config.yaml", folder.parent / "config.yaml"):
        if config.is_file():
            return config, checkpoints
    raise UserError(f"no config.yaml in {folder} or beside it: --original needs the original's run folder "
                    "(outputs/<name>, with config.yaml and checkpoints/)")


def checkpoint_files(folder: Path, which_iter: str) -> tuple[int, Path, Path]:
    """(iteration, gen_<it>.pt, id_<it>.pt) in an original DG-Net checkpoint folder; `which_iter` a number or
    last."""
    found = _generators(folder)
    if not found:
        raise UserError(f"no gen_<iteration>.pt in {folder}: --original needs the original's run folder "
                        "(outputs/<name>, with config.yaml and checkpoints/)")
    if which_iter == "last":
        iteration, gen_path = found[-1]
    elif which_iter.isdigit():
        iteration = int(which_iter)
        gen_path = folder / f"gen_{iteration:08d}.pt"
    else:
        raise UserError(f"--which_iter takes an iteration number or last with --original, got '{which_iter}'")
    id_path = gen_path.with_name("id_" + gen_path.name[len("gen_"):])
    for p in (gen_path, id_path):
        if not p.is_file():
            raise UserError(f"{p} does not exist: the original's folder needs gen_ and id_ files of one iteration")
    return iteration, gen_path, id_path


def appearance_encoder(cfg: dict[str, Any], id_path: Path) -> nn.Module:
    """E_a from an original id_*.pt, with as many identities as its head has."""
    import networks
    import reIDmodel

    head = built(networks.read_original_state, id_path).get("classifier1.classifier.0.weight")
    if head is None:
        raise UserError(f"{id_path} has no classifier1 head: it is not an original id_*.pt")
    encoder = built(reIDmodel.build_appearance_encoder, cfg, head.shape[0], pretrained="none")
    return built(reIDmodel.load_original_state, encoder, id_path)


def generator(cfg: dict[str, Any], gen_path: Path) -> nn.Module:
    import networks

    return built(networks.load_original_state, built(networks.build_generator, cfg), gen_path)


def is_baseline(path: Path) -> bool:
    """A baseline teacher's folder (net_last.pth) or such a .pth file."""
    return (path.is_dir() and (path / "net_last.pth").is_file()) or (path.is_file() and path.suffix == ".pth")


def baseline_teacher(path: Path, scale2: bool = True, num_classes: int | None = None) -> nn.Module:
    """The original baseline's ResNet-50 `ft_net` from net_last.pth (or the .pth given), with the last stride
    of the opts.yaml beside it (2 if none), for `num_classes` identities (a file with another count is one
    line) or, when None, as many as its classifier has."""
    import networks
    import reIDmodel

    weights = path / "net_last.pth" if path.is_dir() else path
    if num_classes is None:
        head = built(networks.read_original_state, weights).get("classifier.classifier.0.weight")
        if not isinstance(head, torch.Tensor):
            raise UserError(f"{weights} has no classifier.classifier.0.weight: it is not a baseline net_last.pth")
        num_classes = head.shape[0]
    opts_file = weights.parent / "opts.yaml"
    try:
        opts = yaml.safe_load(opts_file.read_text()) if opts_file.is_file() else None
    except yaml.YAMLError as err:
        raise UserError(f"{opts_file} is not valid YAML ({one_line(err)[:160]})") from None
    stride = int((opts or {}).get("stride", 2)) if isinstance(opts, dict) else 2
    teacher = built(reIDmodel.Teacher, num_classes, backbone="resnet50", last_stride=stride, pretrained="none",
                    scale2=scale2)
    return built(reIDmodel.load_original_state, teacher, weights)
