"""D's step with R1, alone: the built-in double backward against r1conv.py's (config key `r1_conv`).

    python bench/r1_bench.py                          # 256x128, batch 16 (8 + 8 reals, as DG-Net's D step)
    python bench/r1_bench.py --device cpu --height 128 --width 64 --iters 3

Times one D step as DG-Net runs it (networks.dis_loss on fakes and reals, R1 on every scale, backward): each
variant warms up first, a GPU is synchronized before the clock is read. Also checks that the two variants
agree (loss, R1 and D's weight gradients). Prints a table; writes JSON (bench/results/r1_bench.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from networks import MsImageDis, dis_loss  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def d_step(dis: MsImageDis, fake: torch.Tensor, real: torch.Tensor, r1_conv: bool) -> tuple[torch.Tensor, ...]:
    dis.zero_grad(set_to_none=True)
    loss, r1 = dis_loss(dis, fake, real, "lsgan", 0.01, r1_conv=r1_conv)
    loss.backward()
    return loss.detach(), r1.detach()


def measure(dis: MsImageDis, fake: torch.Tensor, real: torch.Tensor, r1_conv: bool, iters: int, warmup: int,
            device: torch.device) -> dict[str, Any]:
    for _ in range(warmup):
        d_step(dis, fake, real, r1_conv)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tick = time.perf_counter()
    for _ in range(iters):
        loss, r1 = d_step(dis, fake, real, r1_conv)
    sync(device)
    seconds = time.perf_counter() - tick
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"r1_conv": r1_conv, "ms_per_step": round(1000 * seconds / iters, 3), "loss": float(loss),
            "r1": float(r1), "peak_memory_gib": round(peak, 3) if peak is not None else None,
            "grads": [p.grad.detach().clone() for p in dis.parameters()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="real images in the step (DG-Net: 2 x batch_size)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "r1_bench.json")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        print("error: --iters must be at least 1 and --warmup at least 0", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: no CUDA device here; use --device cpu", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True  # as training runs
    torch.manual_seed(0)
    dis = MsImageDis().to(device)  # the default D: 3 scales, dim 32, 4 residual blocks
    shape = (args.batch, 3, args.height, args.width)
    fake, real = torch.randn(shape, device=device), torch.randn(shape, device=device)
    rows = [measure(dis, fake, real, routed, args.iters, args.warmup, device) for routed in (False, True)]
    builtin, routed = rows
    rel = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
              for a, b in zip(routed.pop("grads"), builtin.pop("grads")))
    result = {"benchmark": "r1_bench", "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "size": [args.height, args.width], "batch": args.batch, "iters": args.iters, "warmup": args.warmup,
              "command": "python bench/r1_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows, "speedup": round(builtin["ms_per_step"] / routed["ms_per_step"], 3),
              "max_rel_grad_diff": rel}
    print(f"D step with R1, {args.batch} reals at {args.height}x{args.width} on {result['device']}, torch "
          f"{torch.__version__}")
    print(f"{'R1 double backward':<28} {'ms/step':>9} {'peak GiB':>9}")
    for r in rows:
        peak = f"{r['peak_memory_gib']:>9.2f}" if r["peak_memory_gib"] is not None else f"{'-':>9}"
        print(f"{'r1conv.py' if r['r1_conv'] else 'built-in':<28} {r['ms_per_step']:>9.2f} {peak}")
    print(f"r1conv.py: {result['speedup']:.2f}x the built-in; D's gradients agree to {rel:.2e} (relative to the "
          "largest)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
