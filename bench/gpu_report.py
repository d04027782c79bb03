"""bench/gpu_run.sh's bookkeeping: the environment, one record per step, and the report it refreshes after
every step (results.json and summary.md), so that a run cut short still leaves every figure measured so far.

    python bench/gpu_report.py env WORK                     # WORK/env.json: device, driver, torch, ...
    python bench/gpu_report.py step WORK NAME STATUS RC SECONDS LIMIT -- COMMAND...   # one step's record
    python bench/gpu_report.py report WORK OUT              # OUT/results.json and OUT/summary.md

Never imports torch: it runs between the steps and must cost nothing.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# the measured steps; each writes WORK/NAME.json (train_bench's JSON)
SPEED_STEPS = ("dgnet_default", "dgnet_captured", "dgnet_r1_conv", "dgnet_compiled", "teacher_default",
               "quickstart_sizes", "dgnet_lazy_r1")
STEPS = (*SPEED_STEPS, "r1_bench", "profile", "syncs", "numerics", "eval_gpu")


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_env(work: Path) -> dict[str, Any]:
    """What the machine is, without importing torch (seconds on a busy CPU); the CUDA and cuDNN versions and
    the device as torch sees it come from the benches' own JSON (the report merges them)."""
    gpu = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    name, driver, memory = ([x.strip() for x in gpu.splitlines()[0].split(",")] + [None] * 3)[:3] if gpu else (
        None, None, None)
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "nvidia_smi_name": name, "driver": driver, "gpu_memory": memory,
        "torch": _version("torch"), "torchvision": _version("torchvision"),
        # only train.py needs tensorboardX (the quickstart step), not the benches
        "tensorboardX": _version("tensorboardX"),
        "git_commit": _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or None,
    }
    (work / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    return env


def add_step(work: Path, name: str, status: str, rc: int, seconds: float, limit: int, command: list[str]) -> None:
    record = {"name": name, "status": status, "rc": rc, "seconds": round(seconds, 1), "limit_s": limit,
              "command": " ".join(command)}
    with open(work / "steps.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _speed_rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in bench.get("runs", []):
        if "error" in r:  # a mode that failed: in `failed` (figures), not among the measured rows
            continue
        rows.append({"model": r["model"], "mode": r["mode"], "size": bench.get("size"),
                     "batch_size": r.get("batch_size"), "settings": r["settings"],
                     "iterations_per_s": r["iterations_per_s"], "images_per_s": r["images_per_s"],
                     "ms_per_iteration": round(1000 / r["iterations_per_s"], 2),
                     "peak_memory_gib": r["peak_memory_gib"], "peak_memory_kind": r["peak_memory_kind"],
                     "data_share": r["data_share"], "iters": r["iters"], "warmup": r["warmup"],
                     "first_iteration": r["first_iteration"], "capture_counts": r.get("capture_counts"),
                     "dynamo": r.get("dynamo")})
    return rows


def figures(work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(headline figures per step, each step's full JSON)."""
    raw = {name: _load(work / f"{name}.json") for name in STEPS if (work / f"{name}.json").is_file()}
    raw = {k: v for k, v in raw.items() if v is not None}
    out: dict[str, Any] = {}
    for name in SPEED_STEPS:
        if name in raw:
            out[name] = {"rows": _speed_rows(raw[name]), "speedup": raw[name].get("speedup", {}),
                         "speedup_captured": raw[name].get("speedup_captured", {}),
                         "failed": [{k: r[k] for k in ("model", "mode", "error")}
                                    for r in raw[name].get("runs", []) if "error" in r],
                         "command": raw[name].get("command")}
    if "numerics" in raw:
        n = raw["numerics"]["numerics"]
        keys = ("mean_abs_reference", "max_rel_diff", "first_iteration_rel_diff", "max_window_rel_diff")
        terms = {k: {key: t[key] for key in keys} for k, t in n["terms"].items()}
        for extra in ("eager_terms", "captured_vs_eager"):  # a captured run's third curve: the fast mode, eager
            for k, t in n.get(extra, {}).items():
                terms[k][f"{extra}_window_rel_diff"] = t["max_window_rel_diff"]

        def worst(key: str) -> float | None:
            finite = [t[key] for t in terms.values() if key in t and math.isfinite(t[key])]
            return max(finite) if finite else None

        out["numerics"] = {"iters": n["iters"], "iters_asked": n.get("iters_asked", n["iters"]),
                           "seconds": n.get("seconds"), "first_iteration": n["first_iteration"],
                           "window": n["window"], "reference": n["reference"], "fast": n["fast"],
                           "compared": n.get("compared", "fast"), "capture_counts": n.get("capture_counts"),
                           "worst_window_rel_diff": worst("max_window_rel_diff"),
                           "eager_worst_window_rel_diff": worst("eager_terms_window_rel_diff"),
                           "captured_vs_eager_worst_window_rel_diff": worst("captured_vs_eager_window_rel_diff"),
                           "terms": terms, "command": raw["numerics"].get("command")}
    if "r1_bench" in raw:  # bench/r1_bench.py's own JSON: D's step alone, built-in vs r1conv.py
        r = raw["r1_bench"]
        out["r1_bench"] = {key: r.get(key) for key in ("size", "batch", "iters", "rows", "speedup",
                                                        "max_rel_grad_diff", "command")}
    if "profile" in raw:
        p = raw["profile"]["profile"]
        busy = p.get("device_busy_ms")
        fig = {"ms_per_iteration_profiled": p["ms_per_iteration"], "device_busy_ms": busy,
               "busy_share_profiled": round(busy / p["ms_per_iteration"], 4) if busy else None,
               "busy_share_unprofiled": None, "phases": p["phases"], "top": p["top"][:15],
               "settings": p.get("settings"), "command": raw["profile"].get("command")}
        # the profiler slows the host: the share of an unprofiled iteration is the one that says what paces it
        fast = [r for r in out.get("dgnet_default", {}).get("rows", []) if r["mode"] == "fast"]
        if busy and fast:
            fig["busy_share_unprofiled"] = round(busy / fast[0]["ms_per_iteration"], 4)
        out["profile"] = fig
    if "syncs" in raw:
        s = raw["syncs"]["syncs"]
        out["syncs"] = {"per_iteration": s["syncs_per_iteration"], "by_device": s["by_device"],
                        "sites": s["sites"], "settings": s.get("settings"), "command": raw["syncs"].get("command")}
    if "eval_gpu" in raw:  # bench/eval_bench.py's JSON: one row per case
        e = raw["eval_gpu"]
        out["eval_gpu"] = {"cases": e["cases"], "device": e["meta"].get("device"), "command": e["meta"].get("command")}
    quick = work / "quickstart"
    if quick.is_dir():  # bench/gpu_quickstart.sh's own JSON files, whatever they hold
        out["quickstart"] = {str(p.relative_to(quick)): _load(p) for p in sorted(quick.rglob("*.json"))}
    return out, raw


def _settings_text(s: dict[str, Any]) -> str:
    captured = {"graphs": ", CUDA graphs", "graph-safe": ", graph-safe eager"}.get(s.get("captured", "no"), "")
    compiled = f", compiled ({s['compile']})" if s["compile"] else ""  # the backend's name
    return (f"{s['amp']}, {'NHWC' if s['channels_last'] else 'NCHW'}, "
            f"{'fused' if s['fused_optim'] else 'per-param'}{compiled}{captured}"
            f"{', r1_conv' if s.get('r1_conv') else ''}")


def _maybe(value: float | None) -> str:
    """A figure to 3 significant digits, or `-` where the run has none."""
    return "-" if value is None else f"{value:.3g}"


def _table(columns: Sequence[str], rows: Iterable[str]) -> list[str]:
    """A markdown table: the header, its rule, and each row given as its cells joined by ' | '."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *(f"| {row} |" for row in rows)]


def summary(env: dict[str, Any], steps: list[dict[str, Any]], figs: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# bench/gpu_run.sh, {env.get('date', '?')}", "",
             f"- device: {env.get('device_name') or env.get('nvidia_smi_name')} (driver {env.get('driver')}, "
             f"{env.get('gpu_memory_gib')} GiB, capability {env.get('capability')}), {env.get('cpus')} CPUs",
             f"- software: torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), "
             f"torchvision {env.get('torchvision')}, Python {env.get('python')}, "
             f"tensorboardX {env.get('tensorboardX')}",
             f"- command: `{meta.get('command')}` (commit {env.get('git_commit')}); "
             f"budget {meta.get('budget_s')} s, {meta.get('elapsed_s')} s used"
             + (" (tiny sizes)" if meta.get("tiny") else ""),
             "", *_table(("step", "status", "seconds", "limit", "command"),
                     [f"{s['name']} | {s['status']} | {s['seconds']} | {s['limit_s']} | `{s['command'][:160]}`"
                      for s in steps])]
    rows = [(name, r) for name in SPEED_STEPS for r in figs.get(name, {}).get("rows", [])]
    if rows:
        lines += ["", "## Training speed", "", *_table(
            ("step", "model", "size", "batch", "mode", "settings", "it/s", "ms/it", "images/s", "data wait",
             "peak GiB"),
            [f"{name} | {r['model']} | {r['size']} | {r['batch_size']} | {r['mode']} | "
             f"{_settings_text(r['settings'])} | {r['iterations_per_s']:.3f} | {r['ms_per_iteration']:.1f} | "
             f"{r['images_per_s']:.1f} | {r['data_share']:.1%} | {r['peak_memory_gib']:.2f}" for name, r in rows])]
    failed = [(name, r) for name in SPEED_STEPS for r in figs.get(name, {}).get("failed", [])]
    if failed:
        lines += ["", "## Modes that failed", "", *_table(
            ("step", "model", "mode", "error"),
            [f"{name} | {r['model']} | {r['mode']} | {r['error'][:200].replace('|', '/')}" for name, r in failed])]
    if rows:
        for name in SPEED_STEPS:
            for model, x in figs.get(name, {}).get("speedup", {}).items():
                lines.append(f"\n{name}: {model} fast path {x:.2f}x the reference")
            for model, x in figs.get(name, {}).get("speedup_captured", {}).items():
                lines.append(f"\n{name}: {model} captured iterations {x:.2f}x the eager fast path")
    if "r1_bench" in figs:
        r = figs["r1_bench"]
        lines += ["", f"## D's step with R1 alone: {r['batch']} reals at {r['size']} (bench/r1_bench.py)", "",
                  *_table(("R1 double backward", "ms/step", "peak GiB"),
                          [f"{'r1conv.py' if x['r1_conv'] else 'built-in'} | {x['ms_per_step']:.2f} | "
                           f"{x['peak_memory_gib'] if x['peak_memory_gib'] is not None else '-'}" for x in r["rows"]])]
        lines.append(f"\nr1conv.py {r['speedup']:.2f}x the built-in; D's gradients agree to "
                     f"{r['max_rel_grad_diff']:.2e} (relative to the largest)")
    if "profile" in figs:
        p = figs["profile"]
        busy = p["device_busy_ms"]
        lines += ["", "## Profile of the fast iteration", "",
                  f"{p['ms_per_iteration_profiled']:.1f} ms per iteration under the profiler"
                  + (f"; GPU busy {busy:.1f} ms ({p['busy_share_profiled']:.0%} of the profiled iteration"
                     + (f", {p['busy_share_unprofiled']:.0%} of an unprofiled fast one" if p["busy_share_unprofiled"]
                        else "") + ")" if busy else "; no GPU time on this device"),
                  "", *_table(("operator", "ms", "share", "calls"),
                              [f"{op['name'][:60]} | {op['ms']:.3f} | {op['share']:.1%} | {op['calls_per_iteration']:g}"
                               for op in p["top"][:12]])]
    if "syncs" in figs:
        s = figs["syncs"]
        lines += ["", f"## Host-device syncs: {s['per_iteration']:g} per iteration "
                      f"(by tensor device: {s['by_device']})",
                  "", *_table(("per iteration", "op", "device", "site", "via"),
                              [f"{x['per_iteration']:g} | {x['op']} | {x['device']} | {x['site']} | {x['via']}"
                               for x in s["sites"]])]
    if "numerics" in figs:
        n = figs["numerics"]
        lines += ["", f"## Numerics: {n['compared']} ({_settings_text(n['fast'])}) vs fp32 reference, "
                      f"{n['iters']} iterations (of {n['iters_asked']} asked) from {n['first_iteration']}, "
                      f"windows of {n['window']}", "",
                  *_table(("term", "mean abs ref", "max rel diff", "first iteration", "windows",
                           "windows, fast eager vs ref", "windows, captured vs fast eager"),
                          [f"{k} | {t['mean_abs_reference']:.4g} | {t['max_rel_diff']:.3g} | "
                           f"{t['first_iteration_rel_diff']:.3g} | {t['max_window_rel_diff']:.3g} | "
                           f"{_maybe(t.get('eager_terms_window_rel_diff'))} | "
                           f"{_maybe(t.get('captured_vs_eager_window_rel_diff'))}"
                           for k, t in n["terms"].items()])]
    if "eval_gpu" in figs:
        e = figs["eval_gpu"]
        lines += ["", f"## Evaluation on {e['device']} (bench/eval_bench.py)", "",
                  *_table(("case", "Q × G", "dim", "seconds", "mAP", "R1", "peak RSS MB"),
                          [f"{c['case']} | {c['queries']} × {c['gallery']} | {c['dim']} | {c['seconds']:.2f} | "
                           f"{c['mAP']:.4f} | {c['R1']:.4f} | {c['peak_rss_mb']}" for c in e["cases"]])]
    if "quickstart" in figs:
        lines += ["", f"## Quickstart: {len(figs['quickstart'])} JSON files from bench/gpu_quickstart.sh "
                      "(in results.json)"]
    return "\n".join(lines) + "\n"


def write_report(work: Path, out: Path) -> dict[str, Any]:
    env = _load(work / "env.json") or {}
    # gpu_run.sh's own facts, passed in its environment
    start = float(os.environ.get("GPU_RUN_START", "0") or 0)
    meta = {"command": os.environ.get("GPU_RUN_COMMAND"), "budget_s": int(os.environ.get("GPU_RUN_BUDGET", "0")),
            "tiny": os.environ.get("GPU_RUN_TINY") == "1",
            "elapsed_s": round(datetime.datetime.now().timestamp() - start) if start else None}
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()
             if line.strip()] if (work / "steps.jsonl").is_file() else []
    figs, raw = figures(work)
    for bench in raw.values():  # what torch saw, from the first bench that ran
        for key in ("torch", "device_name", "cuda", "cudnn", "capability", "gpu_memory_gib"):
            if bench.get(key) is not None:
                env.setdefault(key, bench[key])
                if key == "torch":
                    env["torch"] = bench["torch"]  # the full version string, +cu130 included
    result = {"benchmark": "gpu_run", "env": env, "meta": meta, "steps": steps, "figures": figs, "raw": raw}
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, text: str) -> None:
        tmp = out / f".{name}.tmp"  # renamed into place: a kill mid-write leaves the last whole report
        tmp.write_text(text)
        os.replace(tmp, out / name)

    write("results.json", json.dumps(result, indent=1) + "\n")  # first: a summary that fails loses no figure
    write("summary.md", summary(env, steps, figs, meta))
    return result


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "env":
        write_env(Path(argv[1]))
    elif len(argv) >= 8 and argv[0] == "step" and argv[7] == "--":
        work, name, status, rc, seconds, limit = argv[1:7]
        add_step(Path(work), name, status, int(rc), float(seconds), int(limit), argv[8:])
    elif len(argv) == 3 and argv[0] == "report":
        write_report(Path(argv[1]), Path(argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
