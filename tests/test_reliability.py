"""How a run ends when something goes wrong: promptly, with one line and a non-zero code, loader workers
gone, no checkpoint holding NaN, nothing good overwritten, no temporary file left behind."""
from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import read_until
from test_train import run, tiny

import distributed
import runlog
import test as test_script
import train
import visualize
from utils import (
    REPO_ROOT,
    NonFiniteState,
    Notice,
    UserError,
    checkpoint_path,
    ctrl_c_held,
    load_checkpoint,
    load_config,
    plain_warnings,
    quiet_handover_errors,
    save_checkpoint,
)

CONFIG = str(REPO_ROOT / "configs" / "quickstart" / "dgnet.yaml")
PROMPT_S = 300  # a hang shows as a timeout; generous, for a busy machine: a healthy end takes seconds


def train_cmd(tmp_path: Path, name: str, data_root: Path, *extra: str, kind: str = "DGNet") -> list[str]:
    return [sys.executable, "train.py", "--config", CONFIG, "--trainer", kind, "--name", name, "--output_path",
            str(tmp_path), *tiny(data_root, *extra)]


def start(cmd: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


def wait_for_training(proc: subprocess.Popen) -> None:
    """Read the output until the first log line: the loop runs, and its loader workers with it."""
    read_until(proc, lambda line: line.startswith("[") and "/100000]" in line, PROMPT_S, "training's first log line")


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip() and "Warning" not in line]


def leftovers(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob(".*.tmp"))


def copy_of(data_root: Path, tmp_path: Path) -> Path:
    """The shared tiny dataset, copied: these tests damage their images."""
    return Path(shutil.copytree(data_root, tmp_path / "data"))


def second_batch_only_image(root: Path, kind: str) -> Path:
    """A training image that the first iteration does not read and the second does (for DG-Net, positives
    included): a failure there comes after one finished iteration, which can be saved."""
    cfg = load_config(CONFIG, tiny(root)[1:])
    splits = train.load_splits(cfg)
    loaders = train.build_loaders(kind, cfg, splits, distributed.Dist(device=torch.device("cpu")))

    def read(batch: dict) -> set[int]:
        return {int(i) for key in ("index", "pos_index") if key in batch for i in batch[key]}

    first = set().union(*(read(next(loader)) for loader in loaders.values()))
    second = set().union(*(read(next(loader)) for loader in loaders.values()))
    return Path(splits.train[min(second - first)].path)


@pytest.mark.parametrize("kind", ["baseline", "DGNet"])
def test_corrupt_image_in_a_worker_ends_the_run(tmp_path, data_root, kind):
    """A truncated JPEG met by a loader worker: the message, exit 2, no hang (multiprocessing's exit hook
    waited forever for workers that let its SIGTERM pass), and the iteration before it saved."""
    root = copy_of(data_root, tmp_path)
    bad = second_batch_only_image(root, kind)
    bad.write_bytes(bad.read_bytes()[:300])
    proc = start(train_cmd(tmp_path, "corrupt", root, "num_workers=2", "max_iter=20", kind=kind))
    out, err = proc.communicate(timeout=PROMPT_S)
    assert proc.returncode == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: cannot read image") and bad.name in lines[0], err
    assert "skip_corrupt_images" in lines[0]
    run_dir = tmp_path / "outputs" / "corrupt"
    saved = load_checkpoint(checkpoint_path(run_dir, 1))
    assert f"saved {checkpoint_path(run_dir, 1)} before stopping" in out
    assert all(state == {"batches_taken": 1} for state in saved["loaders"].values())
    assert not leftovers(run_dir)


def test_exit_ends_workers_an_error_left_running(tmp_path, data_root):
    """A test loader's worker fails and the error, holding the loader's iterator, lives on to the end: the
    process still exits at once."""
    root = copy_of(data_root, tmp_path)
    for image in sorted((root / "query").glob("*.jpg"))[:2]:
        image.write_bytes(image.read_bytes()[:300])
    script = textwrap.dedent(f"""
        import sys
        from data.loaders import build_test_loader, load_splits
        from utils import UserError, load_config
        cfg = load_config({CONFIG!r}, {tiny(root, 'num_workers=2')[1:]!r})
        try:
            for batch in build_test_loader(cfg, load_splits(cfg).query, batch_size=2):
                pass
        except UserError as err:
            kept = err  # its traceback holds the DataLoader iterator, whose workers still run
            print("failed as expected", flush=True)
        sys.exit(2)
    """)
    proc = start([sys.executable, "-c", script])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "failed as expected" in out, err


@pytest.mark.parametrize("validation", [(), ("val_ids=1", "eval_iter=1")], ids=["snapshot", "validation"])
def test_diverged_state_is_never_saved(tmp_path, data_root, capsys, no_onednn, validation):
    """A learning rate that blows up the weights: at the second snapshot the logged loss is still finite but
    BatchNorm's running variance is NaN. That snapshot is refused, and the one the message names is good. With
    validation every iteration, the first validation (before the first snapshot) already finds the features
    non-finite and stops the run the same way, before anything is written (it was a one-line evaluation error,
    exit 2, and under DDP the other processes waited for rank 0)."""
    code = run(tmp_path, "diverged", data_root, "lr2=1e10", "batch_size=8", "num_instances=2",
               "snapshot_save_iter=1", "max_iter=3", *validation, args=("--trainer", "baseline"))
    err = capsys.readouterr().err
    assert code == 3, err
    lines = error_lines(err)
    run_dir = tmp_path / "outputs" / "diverged"
    if validation:
        assert len(lines) == 1 and "validation at 1: the model's features hold NaN or infinity" in lines[0], err
        assert "no checkpoint was written" in lines[0] and not list((run_dir / "checkpoints").glob("*.pt"))
    else:
        assert len(lines) == 1 and "the run has diverged" in lines[0] and "holds NaN or infinity" in lines[0], err
        named = lines[0].split("the last good checkpoint is ")[1].rstrip(")")
        assert load_checkpoint(named)["iteration"] == 1
    for path in (run_dir / "checkpoints").glob("*.pt"):
        load_checkpoint(path)  # every checkpoint written is finite (loading refuses any other)
    assert not leftovers(run_dir)


def poisoned_copy(tiny_dgnet_run, tmp_path: Path) -> tuple[Path, Path]:
    """The shared tiny DG-Net run, copied, with a NaN in its newest checkpoint (as an older release wrote)."""
    base, name, _ = tiny_dgnet_run
    run_dir = Path(shutil.copytree(base / "outputs" / name, tmp_path / "outputs" / name))
    path = checkpoint_path(run_dir, 2)
    state = load_checkpoint(path)
    weight = next(iter(state["trainer"]["models"]["gen"].values()))
    weight.view(-1)[0] = float("nan")
    torch.save(state, path)
    return run_dir, path


def test_non_finite_checkpoint_is_refused_by_every_loader(tmp_path, tiny_dgnet_run, capsys):
    run_dir, path = poisoned_copy(tiny_dgnet_run, tmp_path)
    with pytest.raises(NonFiniteState, match=r"trainer\.models\.gen\..* holds NaN or infinity.*refused"):
        load_checkpoint(path)
    _, name, data_root = tiny_dgnet_run
    capsys.readouterr()
    assert train.main(["--resume", "--name", name, "--output_path", str(tmp_path), "--opts", "max_iter=3"]) == 2
    assert test_script.main(["--name", name, "--output_path", str(tmp_path)]) == 2
    assert visualize.main(["swap", "--name", name, "--output_path", str(tmp_path)]) == 2
    for err in capsys.readouterr().err.strip().split("\n"):
        assert err.startswith("error: ") and "holds NaN or infinity" in err, err
    from trainer import load_teacher

    with pytest.raises(NonFiniteState):
        load_teacher(str(path), 4, torch.device("cpu"))


@pytest.mark.parametrize("content", [b"junk\n", b"", b"\xff\xd8\xff\xe0" + bytes(range(100)), "tensor"])
def test_a_file_that_is_not_a_checkpoint_is_one_line_for_every_loader(tmp_path, tiny_dgnet_run, capsys, content):
    base, name, _ = tiny_dgnet_run
    run_dir = Path(shutil.copytree(base / "outputs" / name, tmp_path / "outputs" / name))
    path = checkpoint_path(run_dir, 2)
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    capsys.readouterr()
    assert test_script.main(["--name", name, "--output_path", str(tmp_path)]) == 2
    assert visualize.main(["swap", "--name", name, "--output_path", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().split("\n")
    assert len(errors) == 2 and all(e.startswith("error: ") and str(path) in e for e in errors), errors
    from trainer import load_teacher

    with pytest.raises(UserError, match="not a (PyTorch )?checkpoint|cannot read"):
        load_teacher(str(path), 4, torch.device("cpu"))


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, data_root, monkeypatch, capsys,
                                                              no_onednn):
    """ENOSPC halfway through the second snapshot: one line, exit 2, the first snapshot intact, no
    temporary file."""
    real_save = torch.save
    saves = []

    def full_disk(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    assert run(tmp_path, "full", data_root, "snapshot_save_iter=2") == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "cannot write checkpoint" in lines[0] and "No space left on device" in lines[0]
    run_dir = tmp_path / "outputs" / "full"
    assert load_checkpoint(checkpoint_path(run_dir, 2))["iteration"] == 2
    assert not checkpoint_path(run_dir, 4).exists() and not leftovers(run_dir)


def test_out_of_gpu_memory_is_one_line_and_keeps_the_checkpoints(tmp_path, data_root, monkeypatch, capsys):
    """torch's OutOfMemoryError (raised here on the CPU where a GPU would raise it) in the third iteration: one
    line saying what to do, exit 2, the snapshot at 2 intact; in a dry run, the same line names no resume."""
    from trainer import DGNet_Trainer

    real_step = DGNet_Trainer.train_step

    def out_of_memory(self, it, *batches):
        if it >= limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, it, *batches)

    monkeypatch.setattr(DGNet_Trainer, "train_step", out_of_memory)
    limit = 2
    assert run(tmp_path, "oom", data_root, "snapshot_save_iter=2") == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in lines[0]
    assert "python train.py --resume --name oom" in lines[0] and "smaller batch_size" in lines[0]
    assert load_checkpoint(checkpoint_path(tmp_path / "outputs" / "oom", 2))["iteration"] == 2
    limit = 0
    assert run(tmp_path, "oom-dry", data_root, args=("--dry_run",)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "resume (the same command)" in line and not (tmp_path / "outputs" / "oom-dry").exists()


def test_ctrl_c_during_a_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A Ctrl-C mid-write, after which torch.save's own cleanup fails too: still a Ctrl-C (the quiet abort),
    not a write error, and the temporary file is gone."""
    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("unexpected pos")  # what torch.save's zip writer says on its way out

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"x": torch.zeros(2)}, tmp_path / "00000001.pt")
    assert not list(tmp_path.iterdir())


def test_write_failure_with_workers_ends_the_run(tmp_path, data_root):
    """A file-size limit below a checkpoint's size (the kernel refuses the write, as a full disk does), with
    loader workers running: one line and exit 2, at once."""
    def limit_file_size():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    proc = start(train_cmd(tmp_path, "limited", data_root, "num_workers=2", "max_iter=20", "snapshot_save_iter=1",
                           kind="baseline"), preexec_fn=limit_file_size)
    out, err = proc.communicate(timeout=PROMPT_S)
    assert proc.returncode == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and "cannot write checkpoint" in lines[0] and "00000001.pt" in lines[0], err
    assert not leftovers(tmp_path / "outputs" / "limited")


def test_killed_loader_worker_ends_the_run(tmp_path, data_root):
    """A worker killed by SIGKILL (the out-of-memory killer): one line naming it, exit 2, no traceback."""
    proc = start(train_cmd(tmp_path, "oom", data_root, "num_workers=2", "max_iter=100000",
                           "snapshot_save_iter=1000", kind="baseline"))
    wait_for_training(proc)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(children[0]), signal.SIGKILL)
    out, err = proc.communicate(timeout=PROMPT_S)
    assert proc.returncode == 2, err
    lines = error_lines(err)
    # torch notices the death in its SIGCHLD handler (killed by signal) or when the batch is late (exited)
    assert len(lines) == 1 and "data loader worker" in lines[0] and "died" in lines[0], err
    assert "lower num_workers" in lines[0] and "Traceback" not in err


def test_a_broken_off_handover_is_not_a_traceback(monkeypatch):
    """Ctrl-C reaches the loader workers too; a main process interrupted while a worker hands it a batch leaves
    multiprocessing's resource-sharer thread (in the worker) with a reset connection, which it reports through
    sys.excepthook, other threads through threading.excepthook. After quiet_handover_errors (a worker's start,
    the main process's stop signal) both drop EOFError and ConnectionError from threads; any other error, and
    the main thread's own, are reported."""
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(("thread", args.exc_type)))
    monkeypatch.setattr(sys, "excepthook", lambda exc_type, exc, tb: seen.append(("sys", exc_type)))
    quiet_handover_errors()

    def fail(exc: type[BaseException]) -> None:
        raise exc()

    def served(exc: type[BaseException]) -> None:  # the resource sharer's _serve: a bare except, then sys.excepthook
        try:
            raise exc()
        except BaseException:
            sys.excepthook(*sys.exc_info())

    for target in (fail, served):
        for exc in (EOFError, ConnectionResetError, ValueError):
            worker = threading.Thread(target=target, args=(exc,))
            worker.start()
            worker.join()
    sys.excepthook(ConnectionResetError, ConnectionResetError(), None)  # the main thread's
    assert seen == [("thread", ValueError), ("sys", ValueError), ("sys", ConnectionResetError)]


def test_a_stop_signal_during_a_console_write_is_announced(monkeypatch):
    """The stop signal's handler can run inside the main thread's own write to the console (tee'd to log.txt),
    where writing again is a reentrant call that raises (seen in the suite: the run died of it instead of
    stopping). Here every write from the main thread raises so: the handler still takes the stop, and the
    notice comes out."""
    class Busy(io.StringIO):
        def write(self, text: str) -> int:
            if threading.current_thread() is threading.main_thread():
                raise RuntimeError("reentrant call inside <_io.BufferedWriter name='log.txt'>")
            return super().write(text)

    busy = Busy()
    monkeypatch.setattr(sys, "stdout", busy)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # quiet_handover_errors replaces it
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    with train.StopRequest() as stop:
        before = set(threading.enumerate())
        stop._handle(signal.SIGTERM, None)
        for thread in set(threading.enumerate()) - before:
            thread.join(10)
    assert stop.signal == signal.SIGTERM
    assert "SIGTERM: finishing this iteration, then saving a checkpoint" in busy.getvalue()


def test_second_ctrl_c_aborts_quietly(tmp_path, data_root):
    """Ctrl-C twice in a terminal (to the whole process group, loader workers included): the second one
    aborts without a traceback."""
    proc = start(train_cmd(tmp_path, "twice", data_root, "num_workers=1", "max_iter=100000",
                           "snapshot_save_iter=1000", kind="baseline"), start_new_session=True)
    wait_for_training(proc)
    os.killpg(proc.pid, signal.SIGINT)
    read_until(proc, lambda line: line.startswith("SIGINT: finishing this iteration"), PROMPT_S,
               "the first Ctrl-C's answer")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=PROMPT_S)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "aborted without saving" in err, err
    assert not leftovers(tmp_path / "outputs" / "twice")


@pytest.fixture
def stop_request(monkeypatch):
    """A StopRequest that has had its first SIGINT (the run is stopping), as the loop would hold it; the
    process's signal handlers and thread hook are put back afterwards."""
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    sigchld = signal.getsignal(signal.SIGCHLD)
    with train.StopRequest(quiet=True) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == signal.SIGINT
        yield stop
    signal.signal(signal.SIGCHLD, sigchld)


def test_an_abort_inside_a_held_block_comes_when_the_block_ends(stop_request):
    """A second Ctrl-C inside `ctrl_c_held()` (nested too) lets the block finish, then aborts; outside one it
    aborts at once."""
    done = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_held():
            with ctrl_c_held():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("inner")
            done.append("outer")
    assert done == ["inner", "outer"]
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        done.append("after")
    assert done == ["inner", "outer"]
    with pytest.raises(KeyboardInterrupt):  # a third press does not wait (a writer stuck on a full queue)
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("second")
            os.kill(os.getpid(), signal.SIGINT)
            done.append("third")
    assert done == ["inner", "outer", "second"]
    with pytest.raises(KeyboardInterrupt) as abort:  # the abort, not the block's own error, ends the run
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            raise OSError("disk full")
    assert isinstance(abort.value.__context__, OSError)
    with ctrl_c_held():  # nothing pending is left behind
        done.append("quiet")


def test_an_abort_never_cuts_a_hand_over_to_tensorboard(stop_request, tmp_path):
    """A second Ctrl-C while the run record hands a scalar or an image to tensorboard's writer (whose queue an
    interrupt can leave unable to close) comes once the writer call has returned."""
    calls = []

    class SignalledWriter:
        def add_scalar(self, tag, value, step):
            os.kill(os.getpid(), signal.SIGINT)
            calls.append(tag)

        def add_image(self, tag, *args, **kwargs):
            self.add_scalar(tag, 0.0, 0)

        def close(self):
            calls.append("closed")

    record = runlog.ScalarRecord(SignalledWriter(), tmp_path / "metrics.jsonl", 0)
    for call, args in ((record.add_scalar, ("loss/total", 1.5, 1)), (record.add_image, ("images/train", None))):
        with pytest.raises(KeyboardInterrupt):
            call(*args)
    record.close()
    assert calls == ["loss/total", "images/train", "closed"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iteration": 1, "loss/total": 1.5}\n'


def test_a_first_ctrl_c_inside_a_held_block_stops_the_run_when_the_block_ends(monkeypatch):
    """The press held back reaches the handler in force: the training loop's stop request, not an abort."""
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    with train.StopRequest(quiet=True) as stop:
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal is None
        assert stop.signal == signal.SIGINT


def test_a_tools_ctrl_c_waits_for_its_tensorboard_block():
    """visualize.py's tensorboard writes: a Ctrl-C inside comes when the block (the writer's close included)
    ends, a second one at once; the previous SIGINT handler is back afterwards."""
    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("written")
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("never")
    with ctrl_c_held():
        done.append("quiet")
    assert done == ["written", "quiet"] and signal.getsignal(signal.SIGINT) is before


def test_reading_a_run_fails_in_time_when_it_prints_nothing():
    """The suite's own guard (conftest.read_until): a process that hangs silently is killed after the time-out
    and fails the test, instead of blocking it; one that ends first says so."""
    silent = start([sys.executable, "-c", "import time; time.sleep(60)"])
    began = time.monotonic()
    with pytest.raises(AssertionError, match="nothing after 1 s"):
        read_until(silent, lambda line: True, 1, "a line")
    assert time.monotonic() - began < 30 and silent.wait(timeout=30) != 0
    brief = start([sys.executable, "-c", "print('hello')"])
    with pytest.raises(AssertionError, match="the run ended before a goodbye"):
        read_until(brief, lambda line: line.startswith("goodbye"), 30, "a goodbye")
    assert read_until(start([sys.executable, "-c", "print('a'); print('b')"]), lambda line: line == "b\n", 30,
                      "b") == "b\n"


def test_commands_print_a_notice_as_one_line(monkeypatch):
    """The commands' warnings for their user (skipped images, all-zero features) are one `warning:` line, without
    the file and source line Python adds; other warnings keep Python's form."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    plain_warnings()
    assert warnings.formatwarning("skipped 2 unreadable image(s)", Notice, "/x/loaders.py", 70) == \
        "warning: skipped 2 unreadable image(s)\n"
    assert "loaders.py:70: UserWarning: other" in warnings.formatwarning("other", UserWarning, "/x/loaders.py", 70)
