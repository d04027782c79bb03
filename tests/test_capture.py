"""capture.py: DG-Net's iteration in the graph-safe form that CUDA graphs record, checked on the CPU (the same
result as the eager step, no host read inside the step, exact resume), the `cuda_graph` key, and on a CUDA
device (skipped elsewhere) the captured iteration itself."""
from __future__ import annotations

import importlib.util
import io

import pytest
import torch
from test_fast_path import CPU, NUM_CLASSES, batch, tiny_cfg  # the tiny DG-Net and batches, every term on

import capture
import train
from capture import CapturedStep, make_capturable, resolve_cuda_graph
from reIDmodel import Teacher
from trainer import DGNet_Trainer
from utils import REPO_ROOT, UserError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny CPU steps run several times faster on one thread than fighting for a busy machine's cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def dgnet(*opts: str, device: torch.device = CPU, dropout: bool = True) -> DGNet_Trainer:
    torch.manual_seed(0)
    teacher = Teacher(NUM_CLASSES, backbone="resnet18", last_stride=2)
    trainer = DGNet_Trainer(tiny_cfg(*opts), NUM_CLASSES, device, teacher=teacher)
    if not dropout:
        # On a CUDA device the coin is the only draw of the CPU generator in an iteration; on the CPU, E_a's
        # dropout draws from it too, before the coin. Dropout at p=0 draws nothing, which gives the CPU the
        # GPU's situation: drawing the coin before the iteration then leaves every random number in place.
        for m in trainer.id_a.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    trainer.train()
    return trainer


def run(step, iters: range) -> list[dict[str, torch.Tensor]]:
    """Iterations `iters`, each on its own batches after seeding the CPU generator as train.py's seed would."""
    out = []
    for it in iters:
        torch.manual_seed(100 + it)
        out.append(step(it, batch(2 * it), batch(2 * it + 1)))
    return out


def assert_same_parameters(x: DGNet_Trainer, y: DGNet_Trainer) -> None:
    for name in x.parts:
        for (key, p), q in zip(x.parts[name].module.state_dict().items(), y.parts[name].module.state_dict().values()):
            assert torch.equal(p, q), (name, key)


def test_graph_safe_step_equals_the_eager_step(monkeypatch) -> None:
    """Four iterations with every loss term on, the coin falling both ways: the graph-safe form (static input
    buffers, the coin drawn before the iteration, each key captured at its first iteration here and replayed
    after) gives the eager step's losses and parameters bit for bit. Both run the same operators on the same
    values, so exact equality is expected, not a tolerance."""
    monkeypatch.setattr(capture, "WARMUP", 0)
    eager, safe = dgnet(dropout=False), dgnet(dropout=False)
    step = CapturedStep(safe, graphs=False)
    iters = range(4)
    expected, got = run(eager.train_step, iters), run(step, iters)
    for it, (e, g) in enumerate(zip(expected, got)):
        assert e.keys() == g.keys()
        for key in e:
            assert torch.equal(e[key].float(), g[key]), (it, key, e[key], g[key])
    for key in ("D", "R1", "gan", "x", "xp", "s", "f", "cyc", "recon_id", "id", "pid", "teacher"):
        assert all(float(e[key]) > 0 for e in expected), key
    assert_same_parameters(eager, safe)
    assert eager.learning_rates() == safe.learning_rates()
    counts = step.counts
    assert counts == {"captured": 2, "replayed": 2}, counts  # seeds 100-103 give both coins
    assert {key[1] for key in step.captured} == {True, False}


def test_graph_safe_step_makes_no_host_read() -> None:
    """The function a CUDA graph records reads nothing on the host (bench/train_bench.py's SyncCounter) with
    the fused optimizers that a GPU uses; the eager step reads at least its coin."""
    spec = importlib.util.spec_from_file_location("train_bench", REPO_ROOT / "bench" / "train_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    trainer = dgnet("fused_optim=always")
    step = CapturedStep(trainer, graphs=False)
    recorded = []
    inner = step.step_function

    def counted(*args):
        with bench.SyncCounter() as counter:
            out = inner(*args)
        recorded.append(counter.sites)
        return out

    step.step_function = counted
    run(step, range(2))
    assert len(recorded) == 2 and all(not sites for sites in recorded), recorded
    with bench.SyncCounter() as counter:
        run(trainer.train_step, range(2, 3))
    assert any("draw_coin" in site for site, *_ in counter.sites), counter.sites


def test_graph_safe_resume_is_exact() -> None:
    """A run in the graph-safe form, saved after one iteration and resumed into a new trainer and step,
    ends where the uninterrupted one does."""
    straight = dgnet()
    run(CapturedStep(straight, graphs=False), range(3))
    first = dgnet()
    run(CapturedStep(first, graphs=False), range(1))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = dgnet()
    second.load_state_dict(torch.load(buffer, weights_only=True))
    run(CapturedStep(second, graphs=False), range(1, 3))
    assert_same_parameters(straight, second)


def test_capturable_is_not_part_of_a_checkpoint() -> None:
    """A checkpoint of a captured run (Adam capturable) resumes eagerly with the optimizers as built."""
    trainer = dgnet()
    run(trainer.train_step, range(1))
    for part in trainer.parts.values():
        for group in part.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
    state = trainer.state_dict()
    other = dgnet()
    other.load_state_dict(state)
    groups = [g for part in other.parts.values() for g in part.optimizer.param_groups if "capturable" in g]
    assert groups and not any(g["capturable"] for g in groups)
    make_capturable(other.parts["gen"].optimizer)  # the CPU's step counts stay on the parameters' device
    assert all(g["capturable"] for g in other.parts["gen"].optimizer.param_groups)


def test_cuda_graph_key(tmp_path, data_root, capsys) -> None:
    cuda = torch.device("cuda")
    assert tiny_cfg()["cuda_graph"] == "auto"
    assert not resolve_cuda_graph(tiny_cfg(), CPU) and not resolve_cuda_graph(tiny_cfg(), cuda)  # auto: never yet
    assert not resolve_cuda_graph(tiny_cfg("cuda_graph=never"), cuda)
    assert resolve_cuda_graph(tiny_cfg("cuda_graph=always"), cuda)
    with pytest.raises(UserError, match=r"^cuda_graph: always needs a CUDA device, the device is cpu"):
        resolve_cuda_graph(tiny_cfg("cuda_graph=always"), CPU)
    with pytest.raises(UserError, match="cuda_graph is 'sometimes'"):
        resolve_cuda_graph(tiny_cfg("cuda_graph=sometimes"), CPU)
    always = tiny_cfg("cuda_graph=always")
    for cfg, kind, world in ((always, "baseline", 1), (always, "DGNet", 2), (tiny_cfg("cuda_graph=always", "amp=fp16"),
                                                                               "DGNet", 1)):
        with pytest.raises(UserError, match="cuda_graph"):
            resolve_cuda_graph(cfg, cuda, kind, world)
    with pytest.raises(UserError, match="needs a CUDA device"):
        CapturedStep(dgnet())
    # train.py: one line, nothing written
    code = train.main(["--config", str(REPO_ROOT / "configs" / "quickstart" / "dgnet.yaml"), "--name", "graph",
                       "--output_path", str(tmp_path), "--opts", "dataset=synthetic", f"data_root={data_root}",
                       "crop_image_height=64", "crop_image_width=32", "ID_class=null", "max_teacher_w=0.0",
                       "cuda_graph=always"])
    err = capsys.readouterr().err
    assert code == 2 and "cuda_graph: always needs a CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------------------------------
# on a CUDA device


@CUDA
def test_captured_iterations_follow_the_eager_ones_on_a_gpu(monkeypatch) -> None:
    """Captured and replayed iterations against eager ones from the same state: the same losses up to the
    GPU's own run-to-run differences (atomics in some backward kernels), and a resumed captured run
    continues where the uninterrupted one goes."""
    monkeypatch.setattr(capture, "WARMUP", 1)
    cuda = torch.device("cuda")
    opts = ("fused_optim=always", "amp=none", "dis.r1_every=2", "use_encoder_again=1.0")
    eager, captured = dgnet(*opts, device=cuda), dgnet(*opts, device=cuda)
    step = CapturedStep(captured)
    iters = range(6)
    expected, got = run(eager.train_step, iters), run(step, iters)
    assert step.counts["replayed"] >= 2 and step.counts["captured"] == 2, step.counts
    for e, g in zip(expected, got):
        for key in e:
            torch.testing.assert_close(g[key], e[key].float(), rtol=1e-3, atol=1e-5, msg=key)

    state = captured.state_dict()
    resumed = dgnet(*opts, device=cuda)
    resumed.load_state_dict(state)
    more = range(6, 9)
    after, again = run(step, more), run(CapturedStep(resumed), more)
    for e, g in zip(after, again):
        for key in e:
            torch.testing.assert_close(g[key], e[key], rtol=1e-3, atol=1e-5, msg=key)
