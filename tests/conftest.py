"""Shared fixtures, and the CPU's instruction set for the suite."""
from __future__ import annotations

import os

# oneDNN's AMX kernels (bf16 convolutions, on CPUs that have AMX) gave run-to-run different results and
# sometimes NaNs on the 2-core virtual machines that run this suite, where the same bf16 convolutions
# without AMX are exact and repeatable (2026-11-29, torch 2.14.1): a virtual CPU may not keep AMX's tile
# state. Set before torch loads oneDNN; fp32 never uses AMX, so only the bf16 tests see a difference.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from utils import REPO_ROOT  # noqa: E402


def bench_module(name: str):  # noqa: ANN201
    """bench/NAME.py as a module, for the tests that call a bench script's functions or its main in-process
    (the scripts import each other by their own names, so bench/ goes on the path)."""
    folder = str(REPO_ROOT / "bench")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def read_until(proc: subprocess.Popen, match: Callable[[str], bool], timeout: float, what: str) -> str:
    """The first line of `proc`'s stdout that `match` accepts. Read on a thread, which stops at that line (so
    `proc.communicate()` reads the rest as usual): a run that hangs without printing fails after `timeout`
    seconds, killed, instead of blocking the suite. `what`: the awaited event, for the failure."""
    found: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            if match(line):
                found.append(line)
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout):
        proc.kill()
        raise AssertionError(f"{what}: nothing after {timeout:.0f} s; the process was killed")
    if not found:
        raise AssertionError(f"the run ended before {what}: {proc.communicate()[1][-2000:]}")
    return found[0]


@pytest.fixture(autouse=True)
def grad_mode_kept():
    """A test (or a command's main() it calls) that leaves autograd off would fail every later test that trains,
    far from the cause: it fails itself instead."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left autograd off (torch.set_grad_enabled(False) outside a with block)")


@pytest.fixture(scope="module")
def no_onednn():
    """oneDNN's per-shape kernel creation and thread spinning dominate tiny CPU convolutions (several times
    slower on a busy 2-core machine); the plain kernels compute the same convolutions."""
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = saved


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Tiny synthetic pedestrians (8 identities, 64x32) for the training and DDP tests."""
    from data import synthetic

    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthetic.generate(root, ids=8, images_per_id=6, height=64, width=32, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_dgnet_run(tmp_path_factory):
    """A DG-Net run trained for 2 iterations on tiny synthetic data (64x32), for tools that read runs. Its
    E_a doubles its input as the original's does at this height (`scale2`, which the quickstart turns off),
    so every tool is tried on such a run.

    Returns (output_path, name, data_root): the run is output_path/outputs/name.
    """
    import train
    from data import synthetic
    from utils import REPO_ROOT

    base = tmp_path_factory.mktemp("tiny_dgnet")
    data_root = base / "data"
    synthetic.generate(data_root, ids=8, images_per_id=6, height=64, width=32, seed=1)
    opts = ["dataset=synthetic", f"data_root={data_root}", "crop_image_height=64", "crop_image_width=32", "pad=2",
            "batch_size=4", "num_workers=0", "backbone=resnet18", "pretrained=none", "gen.dim=4", "gen.mlp_dim=16",
            "gen.id_dim=512", "gen.n_downsample=1", "dis.dim=8", "dis.n_res=1", "display_size=2", "max_iter=2",
            "log_iter=1", "image_display_iter=2", "image_save_iter=2", "snapshot_save_iter=2",
            "max_teacher_w=0.0", "ID_class=null", "scale2=true"]
    code = train.main(["--config", str(REPO_ROOT / "configs" / "quickstart" / "dgnet.yaml"), "--name", "tiny",
                       "--output_path", str(base), "--opts", *opts])
    assert code == 0
    return base, "tiny", data_root
