"""Can the quickstart's decoder read colour from f at all? The conditioning path alone, on the CPU.

The structure input is a flat grey image (no colour, no shape: E_s's instance norms turn it into a zero
code), and the target is a flat image of a random colour that only the appearance code carries: f is the
target colour (3 values, normalized space) tiled to the code's length, plus noise. Only the 8 MLPs ->
AdaIN scales/biases path can produce the colour. The generator is the quickstart's (configs/quickstart/
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

from networks import build_generator  # noqa: E402
from utils import load_config  # noqa: E402


def batch(n: int, code_dim: int, size: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    colour = torch.rand(n, 3, generator=gen) * 4 - 2  # normalized space, about the ImageNet-normalized range
    f = colour.repeat(1, code_dim // 3 + 1)[:, :code_dim] + 0.1 * torch.randn(n, code_dim, generator=gen)
    f = f.clamp_min(0)  # E_a's code is a max-pool of ReLU features: never negative
    structure = torch.zeros(n, 3, *size)
    target = colour[:, :, None, None].expand(n, 3, *size)
    return structure, f, target


def run(cfg: dict, lr: float, iters: int, checkpoints: list[int], seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    g = build_generator(cfg)
    opt = torch.optim.Adam(g.parameters(), lr=lr, betas=(cfg["beta1"], cfg["beta2"]),
                           weight_decay=cfg["weight_decay"])
    size = (cfg["crop_image_height"], cfg["crop_image_width"])
    code_dim = 4 * cfg["gen"]["id_dim"]
    data, test = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1000)
    s_test, f_test, t_test = batch(64, code_dim, size, test)
    out = []
    for it in range(1, iters + 1):
        s, f, t = batch(8, code_dim, size, data)
        loss = (g.decode(g.encode(s), f) - t).abs().mean()
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
        rows.append({"lr": lr, "l1": run(cfg, lr, args.iters, checkpoints), "seconds": round(time.time() - t0, 1)})
    print(f"flat grey structure, colour only in f; gen {cfg['gen']}; L1 on 64 fresh colours "
          f"(ignoring f: {mean_colour:.2f})")
    print("lr        " + "".join(f"{'it ' + str(c):>10}" for c in checkpoints))
    for r in rows:
        print(f"{r['lr']:<10g}" + "".join(f"{v:10.4f}" for v in r["l1"]))
    result = {"benchmark": "conditioning_probe", "date": date.today().isoformat(), "torch": torch.__version__,
              "config": args.config, "opts": args.opts, "gen": cfg["gen"], "checkpoints": checkpoints,
              "ignoring_f_l1": mean_colour, "rows": rows, "seconds": round(time.time() - start, 1),
              "command": "python bench/conditioning_probe.py " + " ".join(argv or sys.argv[1:])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
