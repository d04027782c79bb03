"""DDP on the CPU with gloo: two processes train a tiny DG-Net and its teacher, stay in step, resume, stop
together, and fail clearly. The runs start real processes (the launcher or torchrun), so they are slower
than the rest of the suite; each is a few iterations of the smallest networks."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as torch_mp
from conftest import read_until
from test_train import tiny

import distributed as distributed_module
import train
from data.loaders import build_dgnet_loaders, load_splits
from distributed import Dist, end_process_group, free_port, plan_launch
from utils import REPO_ROOT, UserError, checkpoint_path, load_checkpoint, load_config

CONFIG = str(REPO_ROOT / "configs" / "quickstart" / "dgnet.yaml")
TIMEOUT = 300  # no run here should take a minute; a hang must fail the test, not the CI job


def opts(data_root, *extra):
    """test_train's tiny DG-Net, with the teacher term on (hard static labels: no teacher network needed)."""
    return tiny(data_root, "max_teacher_w=1.0", "teacher_style=2", *extra)


def launch(tmp_path, *args, torchrun=False, port=None, check=True):
    """train.py in fresh processes: the project's launcher, or torchrun with two workers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(port or free_port())] if torchrun else [sys.executable]
    cmd = [*prefix, "train.py", "--config", CONFIG, "--output_path", str(tmp_path), *args]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def models(run_dir, it):
    return load_checkpoint(checkpoint_path(run_dir, it))["trainer"]["models"]


def test_two_processes_stay_identical_and_resume_exactly(tmp_path, data_root):
    """Launcher: 4 iterations straight; torchrun: 2, then --resume to 4. Both end bit for bit the same. f_grad_w > 0
    (its clean E_a pass with autograd is one more DDP forward before the backward) keeps the processes in step
    too; the other runs here train without it."""
    straight = launch(tmp_path, "--name", "straight", "--nproc_per_machine", "2", *opts(data_root, "f_grad_w=0.5"))
    assert "on 2 processes (cpu)" in straight.stdout
    assert "parameters identical on all 2 processes" in straight.stdout
    assert straight.stdout.count("[4/4]") == 1  # rank 0 alone logs
    state = load_checkpoint(checkpoint_path(tmp_path / "outputs" / "straight", 4))
    assert len(state["rng_ranks"]) == 2 and state["loaders"]["a"] == {"batches_taken": 4}
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])  # own streams

    launch(tmp_path, "--name", "split", *opts(data_root, "f_grad_w=0.5", "max_iter=2"), torchrun=True)
    resumed = launch(tmp_path, "--name", "split", "--resume", "--opts", "max_iter=4", torchrun=True)
    assert "resumed" in resumed.stdout and "parameters identical on all 2 processes" in resumed.stdout
    a, b = models(tmp_path / "outputs" / "straight", 4), models(tmp_path / "outputs" / "split", 4)
    for part in a:
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"

    # a 2-process run continues on one process (fewer GPUs than before): it says what does not carry over
    alone = launch(tmp_path, "--name", "straight", "--resume", "--opts", "max_iter=5")
    assert "written by 2 process(es), this run has 1" in alone.stdout
    state = load_checkpoint(checkpoint_path(tmp_path / "outputs" / "straight", 5))
    assert state["iteration"] == 5 and "rng_ranks" not in state and state["loaders"]["a"] == {"batches_taken": 5}


def test_ranks_partition_each_epoch(data_root):
    cfg = load_config(CONFIG, [o for o in opts(data_root) if o != "--opts"])
    splits = load_splits(cfg)
    n = len(splits.train)
    per_rank = n // 2 // 2  # batches of 2 per rank that make one epoch
    seen = []
    for rank in (0, 1):
        a, _ = build_dgnet_loaders(cfg, splits, rank=rank, world_size=2)
        seen.append(np.concatenate([next(a)["index"].numpy() for _ in range(per_rank)]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(n))


def test_sigterm_to_the_launcher_stops_every_process_with_a_checkpoint(tmp_path, data_root):
    cmd = [sys.executable, "train.py", "--config", CONFIG, "--output_path", str(tmp_path), "--name", "stop",
           "--nproc_per_machine", "2", *opts(data_root, "max_iter=100000", "snapshot_save_iter=100000",
                                             "image_display_iter=100000", "image_save_iter=100000")]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # two iterations done: both processes are in the loop
        read_until(proc, lambda line: re.match(r"\[\s*2/", line) is not None, TIMEOUT, "iteration 2's log line")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()  # the workers notice that the launcher is gone and stop too
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped = [line for line in out.splitlines() if line.startswith("stopped at iteration")]
    assert len(stopped) == 1 and "--resume --name stop" in stopped[0]
    it = int(stopped[0].split()[3].rstrip(";"))
    state = load_checkpoint(checkpoint_path(tmp_path / "outputs" / "stop", it))
    assert state["iteration"] == it and len(state["rng_ranks"]) == 2


def test_a_crash_on_one_process_stops_all_without_hanging(tmp_path, data_root):
    broken = tmp_path / "broken"
    shutil.copytree(data_root, broken)
    # one unreadable training image: whichever process draws it first fails mid-run
    victim = sorted((broken / "bounding_box_train").iterdir())[5]
    victim.write_bytes(b"not a jpeg")
    start = time.monotonic()
    done = launch(tmp_path, "--name", "crash", "--nproc_per_machine", "2",
                  *opts(broken, "skip_corrupt_images=false", "max_iter=50"), check=False)
    assert done.returncode != 0
    assert "cannot read image" in done.stderr and victim.name in done.stderr
    assert time.monotonic() - start < TIMEOUT


def test_bad_setups_fail_on_every_process_before_writing(tmp_path, data_root):
    done = launch(tmp_path, "--name", "bad", "--nproc_per_machine", "2", *opts(data_root, "batch_size=3"),
                  check=False)
    assert done.returncode == 2
    assert done.stderr.count("must divide evenly over 2 processes") == 1  # reported once, by rank 0
    assert not (tmp_path / "outputs" / "bad").exists()
    # refused in setup, which every process runs (as above, where processes share the refusal); in-process here
    args = train.parse_args(["--config", CONFIG, "--output_path", str(tmp_path), "--name", "bad",
                             *opts(data_root, "sync_bn=true")])
    with pytest.raises(UserError, match="sync_bn: true needs GPUs"):
        train.setup(args, Dist(device=torch.device("cpu"), rank=1, world_size=2), None)
    assert not (tmp_path / "outputs" / "bad").exists()


def test_launch_errors_come_before_any_process(tmp_path, data_root, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = train.main(["--config", CONFIG, "--output_path", str(tmp_path), "--nproc_per_machine", "2",
                           "--dist_url", f"tcp://127.0.0.1:{port}", *opts(data_root)])
    assert code == 2 and f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args, message", [
    (["--gpu_ids", "0,1"], "CUDA is not available"),
    (["--num_machines", "2"], "several machines need --dist_url"),
    (["--num_machines", "2", "--machine_rank", "2", "--dist_url", "tcp://127.0.0.1:29500"], "--machine_rank 2"),
    (["--dist_url", "http://x:1"], "use tcp://HOST:PORT"),
    (["--nproc_per_machine", "0"], "use 1 or more"),
])
def test_plan_errors(args, message):
    if torch.cuda.is_available() and args[0] == "--gpu_ids":
        pytest.skip("this machine has CUDA")
    with pytest.raises(train.UserError, match=message):
        plan_launch(train.parse_args(args))


def test_plan_auto_port_and_world_size():
    plan = plan_launch(train.parse_args(["--nproc_per_machine", "2"]))
    assert plan.world_size == 2 and plan.dist_url.startswith("tcp://127.0.0.1:")
    assert plan.backend == ("nccl" if torch.cuda.is_available() else "gloo")
    single = plan_launch(train.parse_args([]))
    assert single.dist_url is None and single.world_size == 1
    forced = plan_launch(train.parse_args(["--dist_url", "auto"]))  # a process group of one (DDP overhead)
    assert forced.dist_url is not None and forced.world_size == 1
    machines = plan_launch(train.parse_args(["--num_machines", "3", "--machine_rank", "1", "--nproc_per_machine",
                                             "2", "--dist_url", "tcp://10.0.0.1:29500"]))
    assert machines.world_size == 6  # machine 1 does not bind machine 0's port


def machines(tmp_path, data_root, name, per_machine=((), ()), args=()):
    """Two machines on this one: a launcher per --machine_rank, each with one process, `args` and its own --opts."""
    url = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return [subprocess.Popen([sys.executable, "train.py", "--config", CONFIG, "--output_path", str(tmp_path), "--name",
                              name, "--num_machines", "2", "--machine_rank", str(rank), "--nproc_per_machine", "1",
                              "--dist_url", url, *args, *opts(data_root, *extra)], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank, extra in enumerate(per_machine)]


def test_two_machines_train_one_run(tmp_path, data_root):
    """The teacher, on identity batches with the triplet loss (DG-Net's processes are checked above)."""
    teacher = ("batch_size=8", "triplet_w=1.0", "num_instances=2")
    procs = machines(tmp_path, data_root, "pair", (teacher, teacher), args=("--trainer", "baseline"))
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "joined pair as process 1 of 2, from iteration 0" in outputs[1][0]
    assert "finished 4 iterations" in outputs[0][0] and "finished" not in outputs[1][0]  # machine 0 reports
    assert "parameters identical on all 2 processes" in outputs[0][0] and "triplet" in outputs[0][0]
    assert sorted(p.name for p in (tmp_path / "outputs" / "pair" / "checkpoints").iterdir()) == [
        "00000002.pt", "00000004.pt"]
    assert len(load_checkpoint(checkpoint_path(tmp_path / "outputs" / "pair", 4))["rng_ranks"]) == 2


def test_machines_with_other_settings_stop_before_training(tmp_path, data_root):
    procs = machines(tmp_path, data_root, "differ", (("max_iter=6",), ("max_iter=3",)))
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2]
    assert "process 1 runs other settings than process 0: max_iter 3 (process 0: 6)" in outputs[0][1]
    assert "machine 0 of 2: training starts when every machine has joined" in outputs[0][0]
    assert not (tmp_path / "outputs" / "differ").exists()


def test_ctrl_c_while_waiting_for_another_machine_stops_at_once(tmp_path, data_root):
    [alone] = machines(tmp_path, data_root, "alone", ((),))  # machine 1 never comes
    try:
        read_until(alone, lambda line: line.startswith("machine 0 of 2"), TIMEOUT, "the launcher's first line")
        time.sleep(2)  # its worker is now blocked waiting in the rendezvous, where Python's handlers do not run
        alone.send_signal(signal.SIGINT)
        out, err = alone.communicate(timeout=60)
    finally:
        alone.kill()
    assert alone.returncode == 128 + signal.SIGINT
    assert "stopped before every process joined the run" in err and "Traceback" not in err


def test_launcher_reports_and_helpers():
    assert distributed_module._exit_status(-signal.SIGKILL) == 137 and distributed_module._exit_status(0) == 0
    args = train.parse_args(["--num_machines", "2", "--machine_rank", "1", "--dist_url", "tcp://10.0.0.1:29500",
                             "--output_path", "/runs"])
    assert train.resume_command(args, "big") == ("python train.py --resume --name big --output_path /runs "
                                                 "--num_machines 2 --machine_rank 1 --dist_url tcp://10.0.0.1:29500 "
                                                 "(on every machine, each with its own --machine_rank)")
    assert train.resume_command(train.parse_args([]), "one") == "python train.py --resume --name one"
    same = {"kind": "DGNet", "run": "a", "start": 0, "batch_size": 8}
    assert train.fingerprint_mismatch([same, dict(same)]) is None
    assert "process 1 runs other settings than process 0: run 'b' (process 0: 'a')" in train.fingerprint_mismatch(
        [same, {**same, "run": "b"}])
    assert "the teacher's run saved a checkpoint while this run started" in train.fingerprint_mismatch(
        [{**same, "teacher": "00000004.pt"}, {**same, "teacher": "00000006.pt"}])
    assert train.peer_lost(RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [1.2.3.4]"))
    assert not train.peer_lost(RuntimeError("CUDA out of memory"))
    lost = RuntimeError("Connection reset by peer")
    message = str(train.as_user_error(lost, "python train.py --resume", several=True))
    assert "connection to another process of the run was lost" in message and "--resume" in message
    assert train.as_user_error(lost, "python train.py --resume") is lost  # one process: not another's death


def _buffer_worker(rank: int, port: int, results, switches: list[dict]) -> None:
    """One of two gloo ranks: for each DDP switch, a BatchNorm net whose running mean differs per rank, wrapped
    by Dist."""
    import distributed

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        d = Dist(device=torch.device("cpu"), rank=rank, world_size=2)
        for i, switch in enumerate(switches):
            distributed._NO_FORWARD_BUFFER_SYNC = switch
            net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
            ddp = d.wrap(net)
            net[1].running_mean.fill_(rank + 1.0)  # after wrapping, which may sync buffers once
            x = torch.randn(2, 3, 8, 8)
            (ddp(x).sum() + ddp(x + 1).sum()).backward()  # two forwards, one backward: DG-Net's pattern
            after_forwards = net[1].running_mean.tolist()
            d.sync_buffers()
            results.put((rank, i, after_forwards, net[1].running_mean.tolist()))
    except Exception as exc:  # reported to the test instead of leaving it waiting
        results.put((rank, -1, repr(exc), None))
    finally:
        end_process_group()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_forwards_leave_buffers_alone_and_sync_buffers_spreads_rank_0s():
    """DDP's in-place buffer broadcast before every forward is what breaks DG-Net's several forwards per
    backward on CUDA; with it off, a forward keeps each rank's own statistics, and sync_buffers (once per
    iteration) gives every rank rank 0's. (With DDP's default broadcast, rank 1 ends the forwards with 1.0.)
    Both switches: the one this torch has (the module's choice), and the one older torch releases need."""
    switches = [distributed_module._NO_FORWARD_BUFFER_SYNC, {"broadcast_buffers": False}]
    ctx = torch_mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_buffer_worker, args=(rank, port, results, switches)) for rank in range(2)]
    for proc in procs:
        proc.start()
    got = {}
    while len(got) < 2 * len(switches):
        rank, i, forwards, synced = results.get(timeout=TIMEOUT)
        assert i >= 0, f"rank {rank}: {forwards}"
        got[rank, i] = forwards, synced
    for proc in procs:
        proc.join(TIMEOUT)
        assert proc.exitcode == 0
    for i, switch in enumerate(switches):
        assert got[1, i][0] == [2.0] * 4, switch  # no broadcast in the forwards
        assert got[0, i][1] == got[1, i][1] == [1.0] * 4, switch
