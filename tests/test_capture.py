"""capture.py: DG-Net's and the teacher's iterations in the graph-safe form that CUDA graphs record, checked on
the CPU (the same result as the eager step, no host read inside the step, exact resume), the `cuda_graph` key,
and on a CUDA device (skipped elsewhere) the captured iterations themselves."""
from __future__ import annotations

import copy
import io
import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as torch_mp
from conftest import bench_module
from test_fast_path import BATCH, CPU, NUM_CLASSES, batch, tiny_cfg  # the tiny DG-Net and batches, every term on

import capture
import train
from capture import CapturedStep, make_capturable, resolve_cuda_graph
from distributed import Dist, end_process_group, free_port
from reIDmodel import Teacher
from trainer import BaselineTrainer, DGNet_Trainer
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


def dgnet_batches(it: int) -> tuple[dict, ...]:
    return batch(2 * it), batch(2 * it + 1)


def teacher_batches(it: int) -> tuple[dict, ...]:
    labels = torch.arange(BATCH) % 2  # two identities: every anchor has a positive and a negative
    return (dict(batch(it), label=labels),)


def run(step, iters: range, batches=dgnet_batches) -> list[dict[str, torch.Tensor]]:
    """Iterations `iters`, each on its own batches after seeding the CPU generator as train.py's seed would."""
    out = []
    for it in iters:
        torch.manual_seed(100 + it)
        out.append(step(it, *batches(it)))
    return out


def assert_same_parameters(x: DGNet_Trainer, y: DGNet_Trainer) -> None:
    for name in x.parts:
        for (key, p), q in zip(x.parts[name].module.state_dict().items(), y.parts[name].module.state_dict().values()):
            assert torch.equal(p, q), (name, key)


@pytest.mark.parametrize("f_grad", ["f_grad_w=0", "f_grad_w=0.5"])
def test_graph_safe_step_equals_the_eager_step(monkeypatch, f_grad: str) -> None:
    """Four iterations with every loss term on, the coin falling both ways: the graph-safe form (static input
    buffers, the coin drawn before the iteration, each key captured at its first iteration here and replayed
    after) gives the eager step's losses and parameters bit for bit, with f detached (the original) or
    carrying gradient. Both run the same operators on the same values, so exact equality is expected, not a
    tolerance."""
    monkeypatch.setattr(capture, "WARMUP", 0)
    eager, safe = dgnet(f_grad, dropout=False), dgnet(f_grad, dropout=False)
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
    if f_grad == "f_grad_w=0":
        # the GPU tests' check (follows_in_lockstep) holds here, and fails when a step leaves an update out
        follows_in_lockstep(eager, safe, step, range(4, 5))
        monkeypatch.setattr(safe.parts["gen"].optimizer, "step", lambda *args, **kwargs: None)
        with pytest.raises(AssertionError, match="gen"):
            follows_in_lockstep(eager, safe, step, range(5, 6))


@pytest.mark.parametrize("r1_conv", ["never", "always"])
def test_graph_safe_step_makes_no_host_read(r1_conv: str) -> None:
    """The function a CUDA graph records reads nothing on the host (bench/train_bench.py's SyncCounter) with
    the fused optimizers that a GPU uses, with R1 on either convolution path; the eager step reads at least
    its coin."""
    bench = bench_module("train_bench")
    trainer = dgnet("fused_optim=always", f"r1_conv={r1_conv}")
    recorded = host_reads(bench, CapturedStep(trainer, graphs=False), lambda step: run(step, range(2)))
    assert len(recorded) == 2 and all(not sites for sites in recorded), recorded
    with bench.SyncCounter() as counter:
        run(trainer.train_step, range(2, 3))
    assert any("draw_coin" in site for site, *_ in counter.sites), counter.sites


COUNTED_BACKEND = "aot_eager_counted"
compiled_calls: list[int] = []


def _counted_aot_eager(gm, example_inputs, **kwargs):  # noqa: ANN001, ANN202
    """aot_eager, and a record of every run of the graphs it compiled: proof that compiled code ran."""
    from torch._dynamo.backends.registry import lookup_backend

    compiled = lookup_backend("aot_eager")(gm, example_inputs, **kwargs)

    def run(*args):  # noqa: ANN002, ANN202
        compiled_calls.append(1)
        return compiled(*args)

    run._boxed_call = getattr(compiled, "_boxed_call", False)  # dynamo's calling convention for it, passed on
    return run


def test_compiled_graph_safe_step_follows_the_eager_step(monkeypatch) -> None:
    """compile: true inside the captured step: G and E_a traced by dynamo (compile_backend aot_eager: the same
    tracing and autograd as inductor without its C++ code generation), compiled during the warm-ups, then
    the graph-safe form gives the losses and weights of the same compiled trainer run eagerly, bit for bit.

    Not checked here: (1) the host reads of the compiled step. Under a dispatch mode (the host-read counter
    is one) dynamo compiles nothing and runs the module eagerly, so that check would see uncompiled code (and
    torch 2.4's aot_eager fails under one); on a GPU, capture itself fails on any read (gpu_run.sh's
    compile_tests). (2) Equality with the uncompiled step: aot_eager's backward differs from eager's by about
    1e-8, which these tiny sizes amplify within two or three iterations (batch statistics over 4 images, Adam's
    normalized steps on gradients near zero): gradients 1e-2 apart at the second iteration with a batch of 4,
    2.6e-6 with 8 (and 6e-2 one iteration later; 2026-12-07). The
    GPU's numerics step compares captured runs with the fp32 reference at the real sizes."""
    from torch._dynamo.backends.registry import register_backend

    if COUNTED_BACKEND not in torch._dynamo.list_backends(exclude_tags=()):
        register_backend(_counted_aot_eager, COUNTED_BACKEND)
    monkeypatch.setattr(capture, "WARMUP", 1)
    opts = ("fused_optim=always", "compile=true", f"compile_backend={COUNTED_BACKEND}")
    eager, compiled = dgnet(*opts, dropout=False), dgnet(*opts, dropout=False)
    step = CapturedStep(compiled, graphs=False)
    iters = range(4)
    expected = run(eager.train_step, iters)
    compiled_calls.clear()
    got = run(step, iters)
    assert len(compiled_calls) >= 4 * len(iters), len(compiled_calls)  # the step ran compiled graphs (G's, E_a's)
    assert step.counts["captured"] >= 1 and step.counts["replayed"] >= 1, step.counts
    for it, (e, g) in enumerate(zip(expected, got)):
        for key in e:
            assert torch.equal(e[key].float(), g[key]), (it, key, e[key], g[key])
    assert_same_parameters(eager, compiled)


def test_compile_backend_key() -> None:
    with pytest.raises(UserError, match="compile_backend is 'inducter': use inductor, or one of .*aot_eager"):
        dgnet("compile=true", "compile_backend=inducter")
    assert dgnet("compile_backend=inducter").compile_backend is None  # read only when compile is on


def host_reads(bench, step: CapturedStep, drive) -> list[list]:
    """The host reads (bench/train_bench.py's SyncCounter) of each call of `step`'s captured function while
    `drive(step)` runs iterations."""
    recorded = []
    inner = step.step_function

    def counted(*args):
        with bench.SyncCounter() as counter:
            out = inner(*args)
        recorded.append(counter.sites)
        return out

    step.step_function = counted
    drive(step)
    return recorded


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
    assert resolve_cuda_graph(tiny_cfg("cuda_graph=always"), cuda, 2)  # one process per GPU
    assert resolve_cuda_graph(tiny_cfg("cuda_graph=always", "sync_bn=true"), cuda, 1)  # no SyncBatchNorm in one
    for cfg, world in ((tiny_cfg("cuda_graph=always", "sync_bn=true"), 2),
                       (tiny_cfg("cuda_graph=always", "amp=fp16"), 1)):
        with pytest.raises(UserError, match="cuda_graph"):
            resolve_cuda_graph(cfg, cuda, world)
    for trainer in (dgnet(), teacher()):
        with pytest.raises(UserError, match="needs a CUDA device"):
            CapturedStep(trainer)
        trainer.scaler = torch.amp.GradScaler("cpu")  # fp16's, which only a CUDA trainer gets
        with pytest.raises(UserError, match="cannot capture fp16's loss scaling"):
            CapturedStep(trainer, graphs=False)
    # train.py: one line, nothing written
    code = train.main(["--config", str(REPO_ROOT / "configs" / "quickstart" / "dgnet.yaml"), "--name", "graph",
                       "--output_path", str(tmp_path), "--opts", "dataset=synthetic", f"data_root={data_root}",
                       "crop_image_height=64", "crop_image_width=32", "ID_class=null", "max_teacher_w=0.0",
                       "cuda_graph=always"])
    err = capsys.readouterr().err
    assert code == 2 and "cuda_graph: always needs a CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------------------------------
# the teacher


def teacher(*opts: str, device: torch.device = CPU) -> BaselineTrainer:
    """The tiny teacher with every term on (triplet, label smoothing) and an LR decay at iteration 3."""
    torch.manual_seed(0)
    cfg = tiny_cfg("triplet_w=1.0", "label_smoothing=0.1", "lr_policy=step", "step_size=3", *opts)
    trainer = BaselineTrainer(cfg, NUM_CLASSES, device)
    trainer.train()
    return trainer


def test_graph_safe_teacher_step_equals_the_eager_step(monkeypatch) -> None:
    """The teacher's graph-safe step (static input buffers, the learning rate its key) gives the eager step's
    losses and weights bit for bit over an LR decay, which starts a new key; its dropout masks are the eager
    ones (nothing is drawn on the host before the step)."""
    monkeypatch.setattr(capture, "WARMUP", 1)
    eager, safe = teacher(), teacher()
    step = CapturedStep(safe, graphs=False)
    iters = range(6)
    expected, got = run(eager.train_step, iters, teacher_batches), run(step, iters, teacher_batches)
    for it, (e, g) in enumerate(zip(expected, got)):
        assert e.keys() == g.keys() == {"ce", "triplet", "acc", "total"}
        for key in e:
            assert torch.equal(e[key].float(), g[key]), (it, key, e[key], g[key])
    assert all(float(e["triplet"]) > 0 for e in expected)
    assert_same_parameters(eager, safe)
    assert eager.learning_rates() == safe.learning_rates()
    # iterations 0-2 at the first LR, 3-5 at a tenth of it: per key one eager warm-up, a capture, a replay
    assert step.counts == {"eager": 2, "captured": 2, "replayed": 2}, step.counts
    assert len({key for key in step.captured}) == 2
    step.release()  # what train.py does at the end of a run: no graph outlives it
    assert not step.captured


def test_graph_safe_teacher_step_makes_no_host_read() -> None:
    """The teacher's captured function reads nothing on the host, with the foreach SGD a GPU uses."""
    recorded = host_reads(bench_module("train_bench"), CapturedStep(teacher("fused_optim=always"), graphs=False),
                          lambda step: run(step, range(2), teacher_batches))
    assert len(recorded) == 2 and all(not sites for sites in recorded), recorded


# ---------------------------------------------------------------------------------------------------------
# several processes: the step averages its own gradients (gloo on the CPU)


def _ranks_worker(rank: int, port: int, results) -> None:
    """One of two gloo ranks: three iterations of DG-Net under eager DDP and in the graph-safe form with the
    step's own gradient averaging, on this rank's batches; then the coins a captured step would use."""
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out = {}
        for mode in ("ddp", "in_step"):
            d = Dist(device=CPU, rank=rank, world_size=2)
            trainer = dgnet("use_encoder_again=1.0", dropout=False)  # one coin for every rank and both modes
            trainer.distribute(d, in_step=mode == "in_step")
            step = CapturedStep(trainer, graphs=False) if mode == "in_step" else trainer.train_step
            losses = []
            for it in range(3):
                torch.manual_seed(100 + 10 * rank + it)
                d.sync_buffers()
                a, b = batch(4 * it + 2 * rank), batch(4 * it + 2 * rank + 1)
                losses.append({k: v.float() for k, v in step(it, a, b).items()})
            out[mode] = (losses, {name: part.module.state_dict() for name, part in trainer.parts.items()})
        trainer = dgnet("use_encoder_again=0.5")
        trainer.distribute(Dist(device=CPU, rank=rank, world_size=2), in_step=True)
        torch.manual_seed(rank)  # each rank its own CPU stream, as train.py seeds them
        own = []
        coins = []
        for it in range(12):
            state = torch.get_rng_state()
            own.append(trainer.draw_coin())
            torch.set_rng_state(state)
            coins.append(trainer.capture_plan(it)[0][1])
        buffer = io.BytesIO()  # bytes, not tensors: a queue's tensors live in this process's shared memory
        torch.save(out, buffer)
        results.put((rank, buffer.getvalue(), own, coins))
    except Exception as exc:  # reported to the test instead of leaving it waiting
        results.put((rank, repr(exc), None, None))
    finally:
        end_process_group()


def test_two_processes_average_gradients_in_the_step_as_ddp_does() -> None:
    """Two ranks with different batches: the step that averages its own gradients (what a captured step runs
    in several processes) gives eager DDP's losses and weights up to summation order, leaves the ranks with
    identical weights, and every rank replays rank 0's coin."""
    ctx = torch_mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ranks_worker, args=(rank, port, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    got = {rank: rest for rank, *rest in (results.get(timeout=300) for _ in procs)}
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert all(isinstance(out, bytes) for out, _, _ in got.values()), got  # else a worker's exception
    for rank, (out, own, coins) in got.items():
        got[rank] = (torch.load(io.BytesIO(out), weights_only=True), own, coins)
    for out, _, _ in got.values():
        (ddp_losses, ddp_weights), (losses, weights) = out["ddp"], out["in_step"]
        for e, g in zip(ddp_losses, losses):
            for key in e:
                torch.testing.assert_close(g[key], e[key], rtol=1e-5, atol=1e-6, msg=key)
        for name in ddp_weights:
            for key, value in ddp_weights[name].items():
                torch.testing.assert_close(weights[name][key], value, rtol=1e-4, atol=1e-6, msg=(name, key))
    other = got[1][0]["in_step"][1]
    for name, state in got[0][0]["in_step"][1].items():  # the weights; BatchNorm statistics are each rank's own
        weights = [key for key in state if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert all(torch.equal(state[key], other[name][key]) for key in weights), name
    (_, own0, coins0), (_, own1, coins1) = got[0], got[1]
    assert coins0 == coins1 == own0 and own1 != own0  # rank 1 drew its own coins, and replays rank 0's


# ---------------------------------------------------------------------------------------------------------
# on a CUDA device


def part_vectors(trainer) -> dict[str, torch.Tensor]:
    """Every network's parameters as one flat vector, copied."""
    return {name: torch.cat([p.detach().float().flatten() for p in part.module.parameters()])
            for name, part in trainer.parts.items()}


def follows_in_lockstep(eager, captured, step, iters: range, batches=dgnet_batches, rtol: float = 1e-3,
                        atol: float = 1e-5, update_rtol: float = 0.1) -> None:
    """Each iteration of `step` (`captured`'s CapturedStep) against the eager step from the same state: the
    captured trainer's state is copied into `eager` (never the other way: loading into `captured` would move
    its optimizers' state tensors away from its graphs), then both step on the same batches and seeds. Their
    losses agree to rtol/atol, and each network's update (its parameters' change in the step) to
    `update_rtol` of the update's norm: a step left out of a graph, or run twice, misses by 100 %.

    One step at a time, because on a GPU two runs of the same step differ in the last bits (atomics in some
    backward kernels, reflection padding's among them), and over several iterations these tiny networks
    amplify that past any tolerance (1e-7 noise in the gradients: some losses 1-60 % apart by the fifth
    iteration, 2026-12-07). The CPU tests above hold the graph-safe form to exact equality over whole runs."""
    for it in iters:
        eager.load_state_dict(copy.deepcopy(captured.state_dict()))
        before = part_vectors(captured)
        (e,), (g,) = run(eager.train_step, range(it, it + 1), batches), run(step, range(it, it + 1), batches)
        assert e.keys() == g.keys()
        for key in e:
            torch.testing.assert_close(g[key], e[key].float(), rtol=rtol, atol=atol, msg=f"iteration {it}: {key}")
        got, expected = part_vectors(captured), part_vectors(eager)
        for name, start in before.items():
            update, miss = expected[name] - start, got[name] - expected[name]
            assert float(miss.norm()) <= update_rtol * float(update.norm()) + 1e-12, (it, name, float(miss.norm()),
                                                                                         float(update.norm()))


def captured_and_resumed_follow_eager(device: torch.device, opts: tuple[str, ...], graphs: bool = True,
                                      **tol: float) -> None:
    """A captured run in lockstep with eager steps (each of two keys, R1 on and off: its capture.WARMUP eager
    iterations, captured, replayed), then resumed from a copy of its state as from a checkpoint: the resumed
    run's first iteration gives the uninterrupted run's, and its own iterations (each key again eager,
    captured, replayed) follow eager ones."""
    dropout = device.type == "cuda"  # on the CPU, dropout's draws would come before the coin (see dgnet)
    eager, captured = dgnet(*opts, device=device, dropout=dropout), dgnet(*opts, device=device, dropout=dropout)
    step = CapturedStep(captured, graphs=graphs)
    n = 2 * (capture.WARMUP + 2)
    follows_in_lockstep(eager, captured, step, range(n), **tol)
    assert step.counts["captured"] == 2 and step.counts["replayed"] == 2, step.counts
    # a copy, as a checkpoint file is: load_state_dict keeps optimizer state tensors already on their device,
    # which the captured run's replays would then advance for both
    resumed = dgnet(*opts, device=device, dropout=dropout)
    resumed.load_state_dict(copy.deepcopy(captured.state_dict()))
    again = CapturedStep(resumed, graphs=graphs)
    (after,), (first,) = run(step, range(n, n + 1)), run(again, range(n, n + 1))
    for key in after:
        torch.testing.assert_close(first[key], after[key], rtol=tol.get("rtol", 1e-3), atol=tol.get("atol", 1e-5),
                                   msg=key)
    follows_in_lockstep(eager, resumed, again, range(n + 1, 2 * n), **tol)
    assert again.counts["captured"] == 2 and again.counts["replayed"] == 2, again.counts


@pytest.mark.skipif(not os.environ.get("DGNET_SLOW_TESTS"),
                    reason="15 s on 2 cores, a check of the GPU test's own code; set DGNET_SLOW_TESTS=1 to run it")
def test_the_captured_and_resumed_check_on_the_cpu(monkeypatch) -> None:
    """test_captured_iterations_follow_the_eager_ones_on_a_gpu's body, in the graph-safe form on the CPU."""
    monkeypatch.setattr(capture, "WARMUP", 0)
    captured_and_resumed_follow_eager(CPU, ("amp=none", "dis.r1_every=2", "use_encoder_again=1.0"), graphs=False)


@pytest.fixture
def cudnn_deterministic(monkeypatch):
    """cuDNN's deterministic algorithms (autotuning still on): fewer run-to-run differences to tolerate."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)


@CUDA
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_captured_iterations_follow_the_eager_ones_on_a_gpu(monkeypatch, cudnn_deterministic, amp) -> None:
    """Captured and replayed iterations against eager ones from the same state, and a resumed captured run
    (follows_in_lockstep). bf16 is the GPU's default (amp: auto): its autocast regions, and their cache of
    cast weights, open and close inside the captured step."""
    monkeypatch.setattr(capture, "WARMUP", 1)
    tol = {"rtol": 1e-3, "atol": 1e-5} if amp == "none" else {"rtol": 2e-2, "atol": 1e-3}
    opts = ("fused_optim=always", f"amp={amp}", "dis.r1_every=2", "use_encoder_again=1.0")
    captured_and_resumed_follow_eager(torch.device("cuda"), opts, **tol)


@CUDA
def test_captured_compiled_iterations_follow_the_eager_ones_on_a_gpu(monkeypatch, cudnn_deterministic) -> None:
    """compile: true (inductor) inside the captured step, bf16 as on a GPU by default: inductor's kernels,
    compiled during the warm-ups on the side stream, captured and replayed, against the same compiled
    trainer run eagerly from the same state."""
    monkeypatch.setattr(capture, "WARMUP", 2)
    cuda = torch.device("cuda")
    opts = ("fused_optim=always", "amp=bf16", "compile=true", "dis.r1_every=2", "use_encoder_again=1.0")
    eager, captured = dgnet(*opts, device=cuda), dgnet(*opts, device=cuda)
    step = CapturedStep(captured)
    # two keys (R1 on, off), each eager twice, then captured, then replayed
    follows_in_lockstep(eager, captured, step, range(8), rtol=2e-2, atol=1e-3)
    assert step.counts["captured"] == 2 and step.counts["replayed"] == 2, step.counts


@CUDA
def test_captured_teacher_iterations_follow_the_eager_ones_on_a_gpu(monkeypatch, cudnn_deterministic) -> None:
    """The teacher's captured iterations against eager ones from the same state, over an LR decay."""
    monkeypatch.setattr(capture, "WARMUP", 1)
    cuda = torch.device("cuda")
    eager, captured = teacher("fused_optim=always", "amp=none", device=cuda), teacher(
        "fused_optim=always", "amp=none", device=cuda)
    step = CapturedStep(captured)
    # the LR decays at 3 (and again at 6): two keys, each eager once, captured, replayed
    follows_in_lockstep(eager, captured, step, range(6), teacher_batches)
    assert step.counts == {"eager": 2, "captured": 2, "replayed": 2}, step.counts


@CUDA
def test_captured_iterations_with_the_all_reduce_in_the_graph_on_a_gpu(monkeypatch, cudnn_deterministic) -> None:
    """A process group of one on NCCL: the captured step averages its gradients with an all-reduce inside the
    graph (what one process per GPU runs), and follows the eager step as in one process without a group. With
    one rank NCCL may launch no kernel for the all-reduce: this proves the capture of its plumbing (streams,
    the watchdog), not that ranks agree."""
    monkeypatch.setattr(capture, "WARMUP", 1)
    cuda = torch.device("cuda")
    opts = ("fused_optim=always", "amp=none", "use_encoder_again=1.0")
    eager, step = dgnet(*opts, device=cuda), None
    torch_dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                  device_id=torch.device("cuda", torch.cuda.current_device()))  # an index: required
    try:
        captured = dgnet(*opts, device=cuda)
        captured.distribute(Dist(device=cuda), in_step=True)
        assert captured.in_step_sync is not None and captured.run_dis is captured.dis_a  # no DDP wrapper
        step = CapturedStep(captured)
        follows_in_lockstep(eager, captured, step, range(5))
        assert step.counts["replayed"] >= 2, step.counts
    finally:
        if step is not None:  # NCCL's teardown waits for graphs holding its collectives
            step.release()
        end_process_group()
