"""Can the quickstart's decoder read colour from f at all? The conditioning path alone, on the CPU.

The structure input is a flat grey image (no colour, no shape: E_s's instance norms turn it into a zero
code), and the target is a flat image of a random colour that only the appearance code carries: f is the
target colour (3 values, normalized space, as its positive and negative parts) tiled to the code's
length, plus noise. Only the 8 MLPs ->
AdaIN scales/biases path can produce the colour; E_s is not trained (its code of a flat image is constant,
where the LayerNorm's std has no gradient). The generator is the quickstart's (configs/quickstart/
dgnet.yaml's gen.*), trained with its Adam settings on L1 to the target; the table gives the L1 on fresh
colours after each step count, beside predicting the mean colour (what a decoder that ignores f reaches).

    python bench/conditioning_probe.py [--iters 200] [--lr 1e-4 1e-3] [--json bench/results/conditioning_probe.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from networks import ConvBlock, LayerNorm, build_generator  # noqa: E402
from utils import load_config  # noqa: E402


def batch(n: int, code_dim: int, size: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    colour = torch.rand(n, 3, generator=gen) * 4 - 2  # normalized space, about the ImageNet-normalized range
    # E_a's code is a max-pool of ReLU features, never negative: the colour goes in as its positive and
    # negative parts, so that f holds all of it (clamping the colour itself would lose every negative value)
    parts = torch.cat([colour.clamp_min(0), (-colour).clamp_min(0)], dim=1)
    f = parts.repeat(1, code_dim // 6 + 1)[:, :code_dim]
    f = (f + 0.1 * torch.randn(n, code_dim, generator=gen)).clamp_min(0)
    structure = torch.zeros(n, 3, *size)
    target = colour[:, :, None, None].expand(n, 3, *size)
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


def apply_variant(g: torch.nn.Module, variant: str) -> torch.nn.Module:
    """The generator as built (plain) or with one part of the conditioning path changed, to find which
    part slows it: no_ln drops the decoder's LayerNorms; one_plus uses 1 + gamma AdaIN scales."""
    if variant == "no_ln":
        for module in g.dec.modules():
            if isinstance(module, ConvBlock) and isinstance(module.norm, LayerNorm):
                module.norm = torch.nn.Identity()
    elif variant == "one_plus":
        for k in range(1, 5):
            setattr(g, f"mlp_w{k}", OnePlus(getattr(g, f"mlp_w{k}")))
    elif variant != "plain":
        raise ValueError(f"unknown variant {variant!r}")
    return g


def run(cfg: dict, lr: float, iters: int, checkpoints: list[int], seed: int = 0,
        variant: str = "plain") -> list[float]:
    torch.manual_seed(seed)
    g = apply_variant(build_generator(cfg), variant)
    opt = torch.optim.Adam(g.parameters(), lr=lr, betas=(cfg["beta1"], cfg["beta2"]),
                           weight_decay=cfg["weight_decay"])
    size = (cfg["crop_image_height"], cfg["crop_image_width"])
    code_dim = 4 * cfg["gen"]["id_dim"]
    data, test = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1000)
    s_test, f_test, t_test = batch(64, code_dim, size, test)
    out = []
    for it in range(1, iters + 1):
        s, f, t = batch(8, code_dim, size, data)
        with torch.no_grad():  # E_s of a flat image is a constant map, where its LayerNorm's std has no gradient
            s = g.encode(s)
        loss = (g.decode(s, f) - t).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it in checkpoints:
            with torch.no_grad():
                out.append(float((g.decode(g.encode(s_test), f_test) - t_test).abs().mean()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart/dgnet.yaml")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--variant", default="plain", choices=("plain", "no_ln", "one_plus"))
    p.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3])
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (gen.dim=16 ...)")
    p.add_argument("--json", default="bench/results/conditioning_probe.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.opts)
    checkpoints = sorted({max(1, args.iters * k // 4) for k in range(1, 5)})
    # what a decoder that ignores f reaches: the mean colour, i.e. E|c - 0| for c ~ U[-2, 2] per channel
    mean_colour = 1.0
    rows, start = [], time.time()
    for lr in args.lr:
        t0 = time.time()
        l1 = run(cfg, lr, args.iters, checkpoints, variant=args.variant)
        rows.append({"lr": lr, "l1": l1, "seconds": round(time.time() - t0, 1)})
    print(f"flat grey structure, colour only in f; gen {cfg['gen']}; L1 on 64 fresh colours "
          f"(ignoring f: {mean_colour:.2f})")
    print("lr        " + "".join(f"{'it ' + str(c):>10}" for c in checkpoints))
    for r in rows:
        print(f"{r['lr']:<10g}" + "".join(f"{v:10.4f}" for v in r["l1"]))
    result = {"benchmark": "conditioning_probe", "date": date.today().isoformat(), "torch": torch.__version__,
              "config": args.config, "opts": args.opts, "variant": args.variant, "gen": cfg["gen"],
              "checkpoints": checkpoints,
              "ignoring_f_l1": mean_colour, "rows": rows, "seconds": round(time.time() - start, 1),
              "command": "python bench/conditioning_probe.py " + " ".join(argv or sys.argv[1:])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
