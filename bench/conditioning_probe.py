"""Can the quickstart's decoder read colour from f at all? The conditioning path alone, on the CPU.

The target colour (a random RGB offset in normalized space) is carried only by the appearance code: f is
the colour as its positive and negative parts (E_a's max-pooled ReLU features are never negative) tiled to
the code's length, plus noise. The generator is the quickstart's (configs/quickstart/dgnet.yaml's gen.*),
trained with its Adam settings (lr, betas, weight decay) on L1 to the target, batch 8; the table gives, on
64 fresh samples after each quarter of the steps, the L1, the colour error (the per-channel image mean
of output - target, in absolute value) and its chromatic part (less its mean over R, G, B: a grey error
from the structure's reconstruction does not count). A decoder that ignores f reaches a/2 = 1.0 on the
colour error (E|c|, c ~ U[-2, 2]); its chroma error is printed beside the table.

Options, and what each isolates:

--structure  what E_s sees, and so which part of the AdaIN path carries the colour.
    flat     a flat grey image (the default, the first probe): E_s's code is exactly 0, every instance norm
             in the decoder zeroes its map, so only each residual block's *second AdaIN bias* reaches the
             output; the target is the flat colour. E_s is not trained (nothing to learn from a constant).
    texture  a fresh smooth random grey texture per sample (mean 0, std 0.5); the target is that texture,
             grey, plus the colour. E_s trains; AdaIN scales and biases both act, as with real images.
    real     the quickstart's synthetic training pedestrians (datasets/synthetic, `python -m data --config
             configs/quickstart/dgnet.yaml` makes them), resized to the crop size, as grey, each shifted to
             zero mean (E_s cannot pass an image's mean brightness on); target as for texture. Fresh
             images per batch, 64 held-out ones for the table.
--variant    the model (the first three are the generator; linear and mlp are calibrations: the same
             optimizer on a model that is trivially right for a linear task):
    plain    the generator as built.
    no_ln    the decoder's LayerNorms dropped (is the LayerNorm what slows it?).
    one_plus AdaIN scales as 1 + MLP output, the MLPs' last layers zero-initialised (StyleGAN-style).
    res_head the MLPs and the AdaIN residual blocks, then a 1x1 conv straight to RGB, upsampled: the
             upsample/5x5 conv/LayerNorm/3x3 convs tail removed (is the signal lost after the AdaINs?).
    linear   calibration: one Linear f -> RGB, broadcast over the image (no generator at all).
    mlp      calibration: one of G's MLPs (id_dim -> mlp_dim -> mlp_dim, lrelu, kaiming) on f's first
             chunk with 3 outputs -> RGB, broadcast over the image.
--colour-range  the colour is drawn from U[-a, a] per channel (default 2, about the ImageNet-normalized
             range); a small a (0.25) is a chroma-sized signal, for which ignoring f costs only a/2.
--colours    1 (default): one colour for the whole image. 2: two colours, one for the pixels darker than
             the image's median grey and one for the others (not with flat): f holds both, so the decoder
             must combine f with the structure code to place each colour (per-part colours, as in a
             swap); the colour error is then taken per region. The calibrations get the region mask.
--f-scale    f multiplied by this (does f's magnitude matter?).
--f-norm     none, or unit: f divided per sample by its root mean square (scale-free f).
--decay-at   the iteration from which the learning rate is 10x smaller (DG-Net's multistep decay; 0: never).
             Below the table, the chroma slope: how much of the target's chroma the output carries (1 = all
             of it; below 1 = colours shrunk towards grey, as the swaps' garments are in part_judge.py).
--diag       before training and at the end, print f's statistics, the AdaIN scales/biases' spread (over
             samples and channels, and the part that varies with f), and the gradient norms reaching the
             MLPs, the decoder's convs and E_s, beside the weight-decay term of Adam's gradient.

    python bench/conditioning_probe.py [--iters 200] [--lr 1e-4 1e-3] [--structure flat|texture|real]
        [--variant plain] [--f-scale 1] [--f-norm none] [--decay-at 0] [--diag]
        [--json bench/results/conditioning_probe.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from networks import MLP, ConvBlock, LayerNorm, ResBlocks, build_generator, init_weights  # noqa: E402
from utils import load_config  # noqa: E402

VARIANTS = ("plain", "no_ln", "one_plus", "res_head", "linear", "mlp")
STRUCTURES = ("flat", "texture", "real")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_real(cfg: dict, size: tuple[int, int]) -> torch.Tensor:
    """The synthetic training images as grey maps (N, 1, H, W) in normalized space (channel mean)."""
    from PIL import Image

    files = sorted(Path(cfg["data_root"], "bounding_box_train").glob("*.jpg"))
    if not files:
        raise SystemExit(f"no images in {cfg['data_root']}/bounding_box_train: run "
                         "`python -m data --config configs/quickstart/dgnet.yaml` first")
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    out = []
    for f in files:
        img = Image.open(f).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size[0], size[1], 3)
        x = (x.permute(2, 0, 1).float() / 255 - mean) / std
        out.append(x.mean(0, keepdim=True))
    grey = torch.stack(out)
    # E_s's instance norms discard an image's mean brightness, which only f could carry: each image is
    # shifted to zero mean, so that the colour error measures the colour alone
    return grey - grey.mean((2, 3), keepdim=True)


class Task:
    """Draws (structure image, f, target) batches for one --structure."""

    def __init__(self, structure: str, code_dim: int, size: tuple[int, int], cfg: dict,
                 f_scale: float = 1.0, f_norm: str = "none", colour_range: float = 2.0, colours: int = 1):
        self.structure, self.code_dim, self.size = structure, code_dim, size
        self.colour_range, self.colours = colour_range, colours
        if colours == 2 and structure == "flat":
            raise SystemExit("--colours 2 needs a structure with regions: --structure texture or real")
        self.f_scale, self.f_norm = f_scale, f_norm
        self.images = load_real(cfg, size) if structure == "real" else None

    def batch(self, n: int, gen: torch.Generator, test: bool = False) -> tuple[torch.Tensor, ...]:
        colour = (torch.rand(n, 3 * self.colours, generator=gen) * 2 - 1) * self.colour_range  # normalized
        # the colour as its positive and negative parts, so that a non-negative f holds all of it
        parts = torch.cat([colour.clamp_min(0), (-colour).clamp_min(0)], dim=1)
        f = parts.repeat(1, self.code_dim // parts.shape[1] + 1)[:, :self.code_dim]
        f = (f + 0.1 * torch.randn(n, self.code_dim, generator=gen)).clamp_min(0)
        if self.f_norm == "unit":
            f = f / f.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-6)
        f = f * self.f_scale
        h, w = self.size
        if self.structure == "flat":
            grey = torch.zeros(n, 1, h, w)
        elif self.structure == "texture":
            grey = F.interpolate(torch.randn(n, 1, h // 8, w // 8, generator=gen), size=(h, w),
                                 mode="bilinear", align_corners=False)
            grey = grey - grey.mean((2, 3), keepdim=True)
            grey = 0.5 * grey / grey.std((2, 3), keepdim=True)
        else:  # real: the last 64 images are held out for the table
            pool = self.images[-64:] if test else self.images[:-64]
            grey = pool[torch.randint(len(pool), (n,), generator=gen)]
        structure = grey.expand(n, 3, h, w)
        if self.colours == 1:
            target = structure + colour[:, :, None, None]
        else:
            mask = region_mask(structure)
            target = structure + torch.where(mask, colour[:, :3, None, None], colour[:, 3:, None, None])
        return structure, f, target


class OnePlus(torch.nn.Module):
    """AdaIN scales as 1 + MLP output (the last layer zero-initialised): the StyleGAN-style alternative."""

    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.mlp = mlp
        last = mlp.model[-1].fc
        torch.nn.init.zeros_(last.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 + self.mlp(x)


class ResHead(torch.nn.Module):
    """The generator's E_s, MLPs and AdaIN residual blocks, then a 1x1 conv to RGB and a nearest upsample."""

    def __init__(self, g: torch.nn.Module):
        super().__init__()
        self.g = g
        self.head = torch.nn.Conv2d(g.dec.dim, 3, 1)
        init_weights(self.head, "kaiming")
        self.scale = 2 ** ((len(g.dec.model) - 5) // 2)  # n_upsample stages of (upsample, conv)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.g.encode(x)

    def decode(self, s: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        scales, biases = self.g.adain_params(f)
        dec = self.g.dec
        scales = scales.unflatten(1, (dec.num_adain_layers, dec.dim))
        biases = biases.unflatten(1, (dec.num_adain_layers, dec.dim))
        res = next(m for m in dec.model if isinstance(m, ResBlocks))
        x = self.head(res(s, scales, biases))
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


def region_means(err: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, R, 3): the mean of err over the whole image (R = 1, mask None) or over each colour's region."""
    if mask is None:
        return err.mean((2, 3))[:, None]
    return torch.stack([(err * m).sum((2, 3)) / m.sum((2, 3)) for m in (mask, 1 - mask)], 1)


def chroma(err: torch.Tensor, mask: torch.Tensor | None) -> float:
    """The chromatic part of the colour error: the region means less their mean over R, G, B. A grey
    error (the structure's own reconstruction error, the same in the 3 channels) does not count."""
    e = region_means(err, mask)
    return float((e - e.mean(2, keepdim=True)).abs().mean())


def chroma_slope(out: torch.Tensor, structure: torch.Tensor, target: torch.Tensor,
                 mask: torch.Tensor | None) -> float:
    """How much of the target's chroma the output carries: the least-squares slope of the output's region
    chroma (region mean of output - structure, less its R, G, B mean) on the target's. 1 = every colour at
    full strength; below 1 = colours shrunk towards grey, the way the swaps' garments are (part_judge.py)."""
    def part(x: torch.Tensor) -> torch.Tensor:
        e = region_means(x - structure, mask)
        return (e - e.mean(2, keepdim=True)).flatten()

    p, t = part(out), part(target)
    return float((p * t).sum() / (t * t).sum())


def region_mask(structure: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool: the pixels darker than the image's median grey (the first colour's region)."""
    grey = structure[:, :1]
    return grey < grey.flatten(1).median(1).values[:, None, None, None]


class Direct(torch.nn.Module):
    """Calibration: f (or its first chunk) -> RGB, broadcast over the image; no structure path."""

    def __init__(self, net: torch.nn.Module, in_dim: int, size: tuple[int, int], with_structure: bool):
        super().__init__()
        self.net, self.in_dim, self.size, self.with_structure = net, in_dim, size, with_structure

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, s: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        rgb = self.net(f[:, :self.in_dim])[:, :, None, None].expand(-1, -1, *self.size)
        if rgb.shape[1] == 6:  # two colours: the calibration is handed the region mask
            rgb = torch.where(region_mask(s), rgb[:, :3], rgb[:, 3:])
        # the structure part of the target is handed over as is: only the colour is to be learnt
        return rgb + s if self.with_structure else rgb


def build(cfg: dict, variant: str, size: tuple[int, int], structure: str, colours: int = 1) -> torch.nn.Module:
    """The generator as built (plain) or with one part of the conditioning path changed, or a calibration
    model; see the module docstring."""
    g = build_generator(cfg)
    id_dim, code_dim = cfg["gen"]["id_dim"], 4 * cfg["gen"]["id_dim"]
    if variant == "no_ln":
        for module in g.dec.modules():
            if isinstance(module, ConvBlock) and isinstance(module.norm, LayerNorm):
                module.norm = torch.nn.Identity()
    elif variant == "one_plus":
        for k in range(1, 5):
            setattr(g, f"mlp_w{k}", OnePlus(getattr(g, f"mlp_w{k}")))
    elif variant == "res_head":
        return ResHead(g)
    elif variant == "linear":
        return Direct(torch.nn.Linear(code_dim, 3 * colours), code_dim, size, structure != "flat")
    elif variant == "mlp":
        mlp = MLP(id_dim, 3 * colours, cfg["gen"]["mlp_dim"], 3, cfg["gen"]["activ"])
        init_weights(mlp, cfg["gen"]["init"])
        return Direct(mlp, id_dim, size, structure != "flat")
    elif variant != "plain":
        raise ValueError(f"unknown variant {variant!r}")
    return g


def _norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad.norm() ** 2 for p in params if p.grad is not None]
    return float(sum(grads) ** 0.5) if grads else 0.0


def diagnose(model: torch.nn.Module, task: Task, cfg: dict, seed: int, label: str) -> dict:
    """f's statistics, the AdaIN parameters' spread and the gradient norms on one batch of 64."""
    s, f, t = task.batch(64, torch.Generator().manual_seed(seed + 7))
    out: dict = {"when": label, "f_mean": float(f.mean()), "f_std_over_samples": float(f.std(0).mean())}
    g = model.g if isinstance(model, ResHead) else model
    if hasattr(g, "adain_params"):
        with torch.no_grad():
            scales, biases = g.adain_params(f)
        for name, v in (("scale", scales), ("bias", biases)):
            out[f"{name}_mean"] = float(v.mean())
            out[f"{name}_rms"] = float(v.pow(2).mean().sqrt())
            out[f"{name}_std_over_samples"] = float(v.std(0).mean())  # the part that depends on f
    model.zero_grad()
    with torch.set_grad_enabled(task.structure != "flat"):  # as in training: E_s is frozen on flat input
        code = model.encode(s)
    loss = (model.decode(code, f) - t).abs().mean()
    loss.backward()
    groups: dict[str, list] = {"mlps": [], "decoder_convs": [], "decoder_ln": [], "E_s": [], "other": []}
    for name, p in model.named_parameters():
        if "mlp_" in name:
            groups["mlps"].append(p)
        elif "dec." in name and ("gamma" in name or "beta" in name):
            groups["decoder_ln"].append(p)
        elif "dec." in name:
            groups["decoder_convs"].append(p)
        elif "enc_content" in name:
            groups["E_s"].append(p)
        else:
            groups["other"].append(p)
    wd = cfg["weight_decay"]
    for k, ps in groups.items():
        if not ps:
            continue
        n = sum(p.numel() for p in ps)
        grad = _norm(ps)
        decay = float(sum((wd * p.detach()).norm() ** 2 for p in ps) ** 0.5)
        out[f"grad_{k}"] = grad
        out[f"grad_{k}_per_param_rms"] = grad / n ** 0.5
        out[f"wd_term_{k}_per_param_rms"] = decay / n ** 0.5
    model.zero_grad()
    out["loss"] = float(loss.detach())
    print(label + ": " + ", ".join(f"{k} {v:.3g}" for k, v in out.items() if isinstance(v, float)))
    return out


def run(cfg: dict, lr: float, iters: int, checkpoints: list[int], seed: int = 0, variant: str = "plain",
        structure: str = "flat", f_scale: float = 1.0, f_norm: str = "none",
        diag: bool = False, colour_range: float = 2.0, colours: int = 1,
        decay_at: int = 0) -> tuple:
    torch.manual_seed(seed)
    size = (cfg["crop_image_height"], cfg["crop_image_width"])
    code_dim = 4 * cfg["gen"]["id_dim"]
    model = build(cfg, variant, size, structure, colours)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(cfg["beta1"], cfg["beta2"]),
                           weight_decay=cfg["weight_decay"])
    task = Task(structure, code_dim, size, cfg, f_scale, f_norm, colour_range, colours)
    mask_test = None
    data, test = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1000)
    s_test, f_test, t_test = task.batch(64, test, test=True)
    if colours == 2:
        mask_test = region_mask(s_test).float()
    chroma_ignoring_f = chroma(-(t_test - s_test), mask_test)
    diags = [diagnose(model, task, cfg, seed, "init")] if diag else []
    l1, colour, chromas, slopes = [], [], [], []
    for it in range(1, iters + 1):
        if it == decay_at:  # one step decay, as DG-Net's multistep schedule does
            for group in opt.param_groups:
                group["lr"] *= 0.1
        s, f, t = task.batch(8, data)
        if structure == "flat":
            with torch.no_grad():  # E_s of a flat image is a constant zero map: nothing to learn
                s = model.encode(s)
        else:
            s = model.encode(s)
        loss = (model.decode(s, f) - t).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it in checkpoints:
            with torch.no_grad():
                out = model.decode(model.encode(s_test), f_test)
            err = out - t_test
            slopes.append(chroma_slope(out, s_test, t_test, mask_test))
            l1.append(float(err.abs().mean()))
            colour.append(float(region_means(err, mask_test).abs().mean()))
            chromas.append(chroma(err, mask_test))
    if diag:
        diags.append(diagnose(model, task, cfg, seed, f"it {iters}"))
    return l1, colour, chromas, slopes, chroma_ignoring_f, diags


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart/dgnet.yaml")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--variant", default="plain", choices=VARIANTS)
    p.add_argument("--structure", default="flat", choices=STRUCTURES)
    p.add_argument("--colour-range", type=float, default=2.0)
    p.add_argument("--colours", type=int, default=1, choices=(1, 2))
    p.add_argument("--f-scale", type=float, default=1.0)
    p.add_argument("--f-norm", default="none", choices=("none", "unit"))
    p.add_argument("--diag", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decay-at", type=int, default=0, help="iteration from which the lr is 10x smaller (0: never)")
    p.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3])
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (gen.dim=16 ...)")
    p.add_argument("--json", default="bench/results/conditioning_probe.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.opts)
    checkpoints = sorted({max(1, args.iters * k // 4) for k in range(1, 5)})
    # what a decoder that ignores f reaches: the mean colour, i.e. E|c - 0| = a/2 for c ~ U[-a, a]
    mean_colour = args.colour_range / 2
    rows, start = [], time.time()
    for lr in args.lr:
        t0 = time.time()
        l1, colour, chromas, slopes, chroma_0, diags = run(
            cfg, lr, args.iters, checkpoints, args.seed, args.variant, args.structure, args.f_scale, args.f_norm,
            args.diag, args.colour_range, args.colours, args.decay_at)
        rows.append({"lr": lr, "l1": l1, "colour_l1": colour, "chroma_l1": chromas, "chroma_slope": slopes,
                     "chroma_ignoring_f": chroma_0, "seconds": round(time.time() - t0, 1),
                     "diagnostics": diags})
    print(f"structure {args.structure}, {args.colours} colour(s), variant {args.variant}, "
          f"f x{args.f_scale:g} (norm {args.f_norm}), "
          f"colour only in f; gen {cfg['gen']}; L1 / colour error / chroma error on 64 fresh samples "
          f"(ignoring f: - / {mean_colour:.3f} / {rows[0]['chroma_ignoring_f']:.3f})")
    print("lr        " + "".join(f"{'it ' + str(c):>23}" for c in checkpoints) + "    seconds")
    for r in rows:
        print(f"{r['lr']:<10g}" + "".join(f"{a:8.4f}/{b:.4f}/{c:.4f}"
                                          for a, b, c in zip(r["l1"], r["colour_l1"], r["chroma_l1"]))
              + f"   {r['seconds']:>7}")
        print("  chroma slope (1 = full strength) " + " / ".join(f"{v:.3f}" for v in r["chroma_slope"]))
    result = {"benchmark": "conditioning_probe", "date": date.today().isoformat(), "torch": torch.__version__,
              "config": args.config, "opts": args.opts, "variant": args.variant, "structure": args.structure,
              "colour_range": args.colour_range, "colours": args.colours, "f_scale": args.f_scale,
              "f_norm": args.f_norm, "seed": args.seed, "decay_at": args.decay_at, "gen": cfg["gen"],
              "checkpoints": checkpoints, "ignoring_f_l1": mean_colour, "rows": rows,
              "seconds": round(time.time() - start, 1),
              "command": "python bench/conditioning_probe.py " + " ".join(argv or sys.argv[1:])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
