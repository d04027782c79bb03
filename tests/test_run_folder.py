"""train.py's run folder under bad input: one writer at a time, resumes that continue the run's own kind
with what --opts can change, every bad value refused before anything is written, older checkpoints."""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import read_until
from test_train import run, tiny

import train
from utils import REPO_ROOT, RunLock, UserError, checkpoint_path, dump_config, load_checkpoint, load_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """A DG-Net run of 2 iterations, trained once; `copy_of` gives each test its own copy."""
    base = tmp_path_factory.mktemp("trained")
    assert run(base, "base", data_root, "max_iter=2") == 0
    return base / "outputs" / "base"


def copy_of(trained, tmp_path, name):
    shutil.copytree(trained, tmp_path / "outputs" / name)
    return tmp_path / "outputs" / name


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def start_training(tmp_path, data_root, name, *extra):
    """A train.py process that trains until it is stopped; returns once it has logged an iteration."""
    cmd = [sys.executable, "train.py", "--config", "configs/quickstart/dgnet.yaml", "--name", name,
           "--output_path", str(tmp_path), *tiny(data_root, "max_iter=100000", "snapshot_save_iter=100000",
                                                   "image_display_iter=100000", "image_save_iter=100000", *extra)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    read_until(proc, lambda line: line.startswith("[") and "/100000]" in line, 120, "training's first log line")
    return proc


# ---- one run per folder ----


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, data_root, capsys):
    first = start_training(tmp_path, data_root, "shared")
    try:
        run_dir = tmp_path / "outputs" / "shared"
        before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
        assert run(tmp_path, "shared", data_root, "max_iter=2") == 2
        err = one_error_line(capsys)
        assert "in use by another training process" in err and f"pid {first.pid}" in err
        assert run(tmp_path, "shared", data_root, "max_iter=2", args=("--trainer", "baseline")) == 2
        assert "in use by another training process" in one_error_line(capsys)
        assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing written
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # SIGKILL ran no cleanup: the lock file is still there, but the kernel dropped the lock with the process
    assert (tmp_path / "outputs" / "shared" / ".lock").is_file()
    assert run(tmp_path, "shared", data_root, "max_iter=1") == 0
    assert not (tmp_path / "outputs" / "shared" / ".lock").exists()


def _hold_forked_copy(ready, done) -> None:
    ready.set()
    done.wait(30)


def test_lock_is_released_on_exit_and_not_held_by_forked_children(tmp_path):
    run_dir = tmp_path / "out" / "outputs" / "x"
    lock = RunLock()
    lock.acquire(run_dir)
    with pytest.raises(UserError, match=f"in use by another training process \\(pid {os.getpid()} on "):
        RunLock().acquire(run_dir)
    ctx = mp.get_context("fork")  # what DataLoader workers are on Linux
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_forked_copy, args=(ready, done))
    child.start()
    try:
        assert ready.wait(30)
        lock.release()
        assert not run_dir.exists() and not (tmp_path / "out").exists()  # it created them, they were empty
        again = RunLock()
        again.acquire(run_dir)  # the forked child, still alive, does not hold the lock
        again.release()
    finally:
        done.set()
        child.join(30)


def test_resume_of_the_other_kind_is_refused(tmp_path, data_root, capsys):
    assert run(tmp_path, "teacher", data_root, "max_iter=2", args=("--trainer", "baseline")) == 0
    last = checkpoint_path(tmp_path / "outputs" / "teacher", 2)
    before = last.read_bytes()
    capsys.readouterr()
    assert run(tmp_path, "teacher", data_root, "max_iter=3", args=("--resume", "--trainer", "DGNet")) == 2
    err = one_error_line(capsys)
    assert "is a teacher (--trainer baseline) run and cannot continue as DG-Net" in err
    assert last.read_bytes() == before and not checkpoint_path(tmp_path / "outputs" / "teacher", 3).exists()
    # without --trainer, a resume continues the run's own kind
    assert run(tmp_path, "teacher", data_root, "max_iter=3", args=("--resume",)) == 0
    assert load_checkpoint(checkpoint_path(tmp_path / "outputs" / "teacher", 3))["kind"] == "baseline"


# ---- --resume --opts: applied, or refused; the record says what ran ----


def test_resume_applies_learning_rate_overrides(trained, tmp_path, data_root, capsys):
    copy_of(trained, tmp_path, "lr")
    assert run(tmp_path, "lr", data_root, "max_iter=3", "lr_g=5e-5", "lr2=0.001", "beta2=0.99",
               args=("--resume",)) == 0
    out = capsys.readouterr().out
    assert "applied to the restored optimizers" in out and "gen base lr 0.0001 -> 5e-05" in out
    run_dir = tmp_path / "outputs" / "lr"
    groups = load_checkpoint(checkpoint_path(run_dir, 3))["trainer"]["optimizers"]
    gen, dis, reid = (groups[k]["param_groups"] for k in ("gen", "dis", "id"))
    assert gen[0]["lr"] == 5e-5 and gen[0]["initial_lr"] == 5e-5 and tuple(gen[0]["betas"]) == (0.0, 0.99)
    assert dis[0]["lr"] == 1e-4  # lr_d was not changed
    assert reid[0]["lr"] == 0.001 and reid[1]["lr"] == pytest.approx(0.01)  # the heads keep 10 x lr2
    cfg = load_config(run_dir / "config.yaml")
    assert cfg["lr_g"] == 5e-5 and cfg["lr2"] == 0.001 and cfg["beta2"] == 0.99
    log = (run_dir / "config_changes.log").read_text()
    assert "resumed at iteration 2 with" in log and "lr_g 0.0001 -> 5e-05" in log


def test_resume_of_a_run_written_before_newer_keys_reports_only_its_own_changes(trained, tmp_path, data_root):
    """A run written before `dis.r1_every` and `structure_jitter` existed was trained as their defaults train;
    its resume must not list them as changes from None."""
    run_dir = copy_of(trained, tmp_path, "older")
    last = checkpoint_path(run_dir, 2)
    state = load_checkpoint(last)
    del state["config"]["dis"]["r1_every"], state["config"]["structure_jitter"]
    torch.save(state, last)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    del cfg["dis"]["r1_every"], cfg["structure_jitter"]
    dump_config(cfg, run_dir / "config.yaml")
    assert run(tmp_path, "older", data_root, "max_iter=3", args=("--resume",)) == 0
    log = (run_dir / "config_changes.log").read_text()
    assert "max_iter 2 -> 3" in log and "r1_every" not in log and "structure_jitter" not in log


def test_resume_refuses_what_it_cannot_apply(trained, tmp_path, data_root, capsys):
    config = (copy_of(trained, tmp_path, "fixed") / "config.yaml").read_bytes()
    for opt in ("seed=5", "pretrained=imagenet", "gen.init=xavier", "lr_policy=constant", "ID_stride=2", "pool=avg",
                "dataset=market1501", "val_ids=1", "crop_image_height=128", "batch_size=2", "num_instances=2"):
        assert run(tmp_path, "fixed", data_root, "max_iter=3", opt, args=("--resume",)) == 2
        key = opt.split("=")[0]
        assert f"--resume: {key} cannot change" in one_error_line(capsys)
    assert (tmp_path / "outputs" / "fixed" / "config.yaml").read_bytes() == config
    assert not checkpoint_path(tmp_path / "outputs" / "fixed", 3).exists()


def test_resume_with_another_config_file_says_it_is_not_applied(trained, tmp_path, data_root, capsys):
    copy_of(trained, tmp_path, "cfgnote")
    assert run(tmp_path, "cfgnote", data_root, "max_iter=3", args=("--resume",)) == 0
    assert "note: --resume" not in capsys.readouterr().err  # the config it started from: nothing to say
    other = tmp_path / "other.yaml"
    other.write_text(f"_base_: {REPO_ROOT / 'configs' / 'quickstart' / 'dgnet.yaml'}\nlr_g: 0.5\n")
    code = train.main(["--config", str(other), "--name", "cfgnote", "--output_path", str(tmp_path), "--resume",
                       *tiny(data_root, "max_iter=4")])
    err = capsys.readouterr().err
    assert code == 0 and "(1 keys: lr_g: 0.5) it is not applied: give such changes as --opts" in err
    assert load_config(tmp_path / "outputs" / "cfgnote" / "config.yaml")["lr_g"] != 0.5


def test_a_run_stopped_before_its_first_checkpoint_starts_again(trained, tmp_path, data_root, capsys):
    run_dir = copy_of(trained, tmp_path, "early")
    shutil.rmtree(run_dir / "checkpoints")  # as a run that failed on its first batch leaves it
    capsys.readouterr()
    assert run(tmp_path, "early", data_root, "max_iter=2", args=("--resume",)) == 2
    assert "has no checkpoint yet (it stopped before saving one): start it again without --resume" in \
        one_error_line(capsys)
    assert run(tmp_path, "early", data_root, "max_iter=2") == 0
    assert checkpoint_path(run_dir, 2).is_file()


def test_a_run_that_lost_its_config_resumes_from_the_checkpoints_config(trained, tmp_path, data_root, capsys):
    run_dir = copy_of(trained, tmp_path, "lost")
    config = load_config(run_dir / "config.yaml")
    (run_dir / "config.yaml").unlink()
    capsys.readouterr()
    assert run(tmp_path, "lost", data_root, "max_iter=3", args=("--resume",)) == 0
    assert "config.yaml is missing; the run continues with the config saved in" in capsys.readouterr().err
    assert checkpoint_path(run_dir, 3).is_file()
    assert load_config(run_dir / "config.yaml") == {**config, "max_iter": 3}  # written again, with --opts
    assert "max_iter 2 -> 3" in (run_dir / "config_changes.log").read_text()
    (run_dir / "config.yaml").unlink()
    assert run(tmp_path, "lost", data_root, "max_iter=4", "seed=9", args=("--resume",)) == 2
    note, error = capsys.readouterr().err.strip().splitlines()
    assert note.startswith("note: ") and error.startswith("error: --resume: seed cannot change")  # still checked
    assert not (run_dir / "config.yaml").exists()
    shutil.rmtree(run_dir / "checkpoints")
    assert run(tmp_path, "lost", data_root, "max_iter=4", args=("--resume",)) == 2
    assert "no config.yaml, no checkpoint" in one_error_line(capsys)


def test_resume_of_a_complete_run_trains_nothing_and_never_goes_back(trained, tmp_path, data_root, capsys):
    run_dir = copy_of(trained, tmp_path, "done")
    config = (run_dir / "config.yaml").read_bytes()
    assert run(tmp_path, "done", data_root, "max_iter=2", args=("--resume",)) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert run(tmp_path, "done", data_root, "max_iter=1", args=("--resume",)) == 2
    assert "past max_iter 1" in one_error_line(capsys)
    assert (run_dir / "config.yaml").read_bytes() == config


# ---- every bad value refused before anything is written ----


@pytest.mark.parametrize("opts, key", [
    (["batch_size=0"], "batch_size"),
    (["batch_size=-4"], "batch_size"),
    (["log_iter=0"], "log_iter"),
    (["snapshot_save_iter=0"], "snapshot_save_iter"),
    (["image_display_iter=0"], "image_display_iter"),
    (["num_workers=-1"], "num_workers"),
    (["display_size=0"], "display_size"),
    (["crop_image_height=101", "crop_image_width=33"], "crop_image_height x crop_image_width"),
    (["lr_g=.nan"], "lr_g"),
    (["lr_d=.inf"], "lr_d"),
    (["lr2=-1"], "lr2"),
    (["erasing_p=1.5"], "erasing_p"),
    (["use_encoder_again=-0.1"], "use_encoder_again"),
    (["max_iter=-1"], "max_iter"),
    (["gen.n_res=0"], "gen.n_res"),
])
def test_bad_values_are_refused_before_any_folder_exists(tmp_path, data_root, capsys, opts, key):
    assert run(tmp_path, "bad", data_root, *opts) == 2
    err = one_error_line(capsys)
    assert key in err and "use " in err
    assert not (tmp_path / "outputs").exists()


def test_bad_locations_are_refused_before_anything_is_written(tmp_path, data_root, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert train_main(["--output_path", str(a_file / "below"), "--name", "x"], data_root) == 2
    assert f"{a_file} is a file" in one_error_line(capsys)
    for name in ("a/b", "", ".."):
        assert train_main(["--output_path", str(tmp_path), "--name", name], data_root) == 2
        assert "--name" in one_error_line(capsys)
    assert train_main(["--output_path", str(tmp_path), "--name", "x"], data_root, f"data_root={a_file}") == 2
    err = one_error_line(capsys)
    assert "data_root" in err and "is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def train_main(args, data_root, *extra):
    import train

    return train.main(["--config", str(REPO_ROOT / "configs" / "quickstart" / "dgnet.yaml"), *args,
                       *tiny(data_root, *extra)])


# ---- checkpoints: pick an older one, refuse one of another shape ----


def test_resume_from_an_older_checkpoint_past_a_truncated_one(tmp_path, data_root, capsys):
    fast = ("max_iter=3", "snapshot_save_iter=1", "image_display_iter=100", "image_save_iter=100")
    assert run(tmp_path, "older", data_root, *fast) == 0
    run_dir = tmp_path / "outputs" / "older"
    newest = checkpoint_path(run_dir, 3)
    newest.write_bytes(newest.read_bytes()[:1000])  # a truncated file, as a full disk leaves
    capsys.readouterr()
    assert run(tmp_path, "older", data_root, *fast, args=("--resume",)) == 2
    assert "use an older one (--which_iter N)" in one_error_line(capsys)
    assert run(tmp_path, "older", data_root, *fast, args=("--resume", "--which_iter", "7")) == 2
    assert "there are: 1, 2, 3" in one_error_line(capsys)
    assert run(tmp_path, "older", data_root, *fast, args=("--resume", "--which_iter", "2")) == 0
    assert "moved 1 newer checkpoint(s) (00000003.pt)" in capsys.readouterr().out
    assert load_checkpoint(checkpoint_path(run_dir, 3))["iteration"] == 3  # written again, whole
    kept = list((run_dir / "checkpoints").glob("superseded_*/00000003.pt"))
    assert len(kept) == 1 and len(kept[0].read_bytes()) == 1000  # moved aside, not deleted


def test_checkpoint_with_other_contents_is_one_line_everywhere(trained, tmp_path, data_root, capsys):
    import test as evaluation
    import visualize

    torch.save({"weights": torch.zeros(2)}, checkpoint_path(copy_of(trained, tmp_path, "keys"), 3))
    assert run(tmp_path, "keys", data_root, "max_iter=4", args=("--resume",)) == 2
    assert "is not a checkpoint written by train.py (no 'kind', 'iteration', 'config', 'trainer')" in \
        one_error_line(capsys)
    assert evaluation.main(["--name", "keys", "--output_path", str(tmp_path)]) == 2
    assert "not a checkpoint written by train.py" in one_error_line(capsys)
    assert visualize.main(["swap", "--name", "keys", "--output_path", str(tmp_path)]) == 2
    assert "not a checkpoint written by train.py" in one_error_line(capsys)
