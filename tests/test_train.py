"""train.py end to end on tiny synthetic data: the run folder, exact resume, safe stop, bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_until

import preflight
import train
from utils import REPO_ROOT, UserError, checkpoint_path, dump_config, load_checkpoint, load_config, save_checkpoint


def tiny(data_root, *extra):
    """A DG-Net small enough for a CPU test, every loss switched on from the second iteration."""
    return ["--opts", "dataset=synthetic", f"data_root={data_root}", "crop_image_height=64", "crop_image_width=32",
            "pad=2", "batch_size=4", "num_workers=0", "backbone=resnet18", "pretrained=none", "gen.dim=4",
            "gen.mlp_dim=16", "gen.id_dim=512", "gen.n_downsample=1", "dis.dim=8", "dis.n_res=1", "display_size=4",
            "log_iter=1", "image_display_iter=2", "image_save_iter=2", "snapshot_save_iter=2", "max_iter=4",
            "warm_iter=1", "warm_teacher_iter=1", "warm_scale=0.5", "max_teacher_w=0.0", "ID_class=null",
            "fidelity_iter=0", *extra]


def run(tmp_path, name, data_root, *extra, args=()):
    return train.main(["--config", str(REPO_ROOT / "configs" / "quickstart" / "dgnet.yaml"), "--name", name,
                       "--output_path", str(tmp_path), *args, *tiny(data_root, *extra)])


def models_of(path):
    return load_checkpoint(path)["trainer"]["models"]


def assert_same_state(x, y, where=""):
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_same_state(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (a, b) in enumerate(zip(x, y)):
            assert_same_state(a, b, f"{where}[{i}]")
    else:
        assert x == y, where


def test_dgnet_run_folder(tmp_path, data_root, capsys):
    assert run(tmp_path, "tiny", data_root) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "outputs" / "tiny"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "src" / "train.py").is_file()
    assert (run_dir / "src" / "data" / "loaders.py").is_file()
    assert checkpoint_path(run_dir, 4).is_file() and checkpoint_path(run_dir, 2).is_file()
    for split in ("train", "test"):
        for direction in ("a2b", "b2a"):
            assert (run_dir / "images" / f"gen_{direction}_{split}_00000004.jpg").is_file()
    html = (run_dir / "images" / "index.html").read_text()
    assert "gen_a2b_train_00000004.jpg" in html and "iteration 4" in html
    assert any(p.name.startswith("events") for p in (run_dir / "logs").iterdir())
    assert "[4/4]" in out and "it/s" in out and "eta" in out
    cfg = load_config(run_dir / "config.yaml")
    assert cfg["max_iter"] == 4 and cfg["gen"]["dim"] == 4
    state = load_checkpoint(checkpoint_path(run_dir, 4))
    assert state["iteration"] == 4 and state["kind"] == "DGNet" and state["config"] == cfg
    assert state["loaders"] == {"a": {"batches_taken": 4}, "b": {"batches_taken": 4}}


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_is_exact(tmp_path, data_root, capsys):
    assert run(tmp_path, "straight", data_root, "max_iter=4", "snapshot_save_iter=100") == 0
    assert run(tmp_path, "split", data_root, "max_iter=2", "snapshot_save_iter=100") == 0
    # a dry run of the resume in between (with a change) writes nothing and leaves the resume exact
    before = folder_contents(tmp_path / "outputs" / "split")
    capsys.readouterr()
    assert run(tmp_path, "split", data_root, "max_iter=4", "snapshot_save_iter=100", "lr_g=0.001",
               args=("--resume", "--dry_run", "1")) == 0
    out = capsys.readouterr().out
    assert "dry run: resumed at iteration 2 with lr_g 0.0001 -> 0.001, max_iter 2 -> 4 (not recorded)" in out
    assert "dry run: iterations 3 of 4 ran" in out and "nothing was written" in out
    assert folder_contents(tmp_path / "outputs" / "split") == before
    assert run(tmp_path, "split", data_root, "max_iter=4", args=("--resume",)) == 0
    straight = load_checkpoint(checkpoint_path(tmp_path / "outputs" / "straight", 4))
    resumed = load_checkpoint(checkpoint_path(tmp_path / "outputs" / "split", 4))
    assert_same_state(straight["trainer"], resumed["trainer"], "trainer")
    assert_same_state(straight["rng"], resumed["rng"], "rng")


def test_dry_run_runs_the_start_and_every_loss_term_and_writes_nothing(tmp_path, data_root, capsys):
    """--dry_run: two iterations at the start and two where every ramped term is at full weight (here the
    cycle's ramp, 0 to 2 by 0.5 after warm_iter 5, ends last: from iteration 10), each one's console line, then
    the whole run's time and its checkpoints' space; no run folder is made."""
    assert run(tmp_path, "dry", data_root, "max_iter=100", "warm_iter=5", "warm_teacher_iter=5",
               args=("--dry_run",)) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "outputs").exists()
    lines = {int(line[1:line.index("/")]): line for line in out.splitlines() if line.startswith("[")}
    assert sorted(lines) == [1, 2, 11, 12]
    assert " cyc 0 " in lines[1] and " cyc 0 " not in lines[11]  # the term is on in the second phase
    assert "dry run: iterations 1-2 and 11-12 of 100 ran" in out and "(from iteration 11)" in out
    assert "checkpoints: about " in out and "up to 4 at once (keep_last 3, one being written)" in out
    # the iterations: within max_iter, half from the start, and in one piece when the run is past its warm-ups
    cfg = load_config(None, ["max_iter=100", "warm_iter=5", "warm_teacher_iter=5", "warm_scale=0.5"])
    assert preflight.dry_run_iterations(cfg, "DGNet", 0, 5) == [0, 1, 2, 10, 11]
    assert preflight.dry_run_iterations(cfg, "DGNet", 0, 1) == [0]
    assert preflight.dry_run_iterations(cfg, "DGNet", 9, 4) == [9, 10, 11, 12]  # it reaches full weight on its own
    assert preflight.dry_run_iterations(cfg, "DGNet", 50, 4) == [50, 51, 52, 53]
    assert preflight.dry_run_iterations(cfg, "DGNet", 98, 4) == [98, 99]
    assert preflight.dry_run_iterations({**cfg, "max_iter": 12}, "DGNet", 0, 4) == [0, 1, 10, 11]
    assert preflight.dry_run_iterations(cfg, "baseline", 0, 4) == [0, 1, 2, 3]
    for bad in (["--dry_run", "0"], ["--dry_run", "--resume", "--evaluate"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


def test_fresh_run_never_overwrites(tmp_path, data_root, capsys):
    assert run(tmp_path, "once", data_root, "max_iter=2") == 0
    before = checkpoint_path(tmp_path / "outputs" / "once", 2).read_bytes()
    assert run(tmp_path, "once", data_root, "max_iter=2") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert checkpoint_path(tmp_path / "outputs" / "once", 2).read_bytes() == before


def test_bad_input_writes_nothing(tmp_path, data_root, capsys):
    if not torch.cuda.is_available():
        assert run(tmp_path, "gpu", data_root, args=("--gpu_ids", "0")) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert run(tmp_path, "noteacher", data_root, "max_teacher_w=2.0", f"teacher={tmp_path / 'none'}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--trainer baseline" in err and len(err.strip().splitlines()) == 1
    assert run(tmp_path, "typo", data_root, "gen.dimm=3") == 2
    assert "did you mean 'gen.dim'" in capsys.readouterr().err
    assert run(tmp_path, "again", data_root, args=("--resume",)) == 2
    assert not (tmp_path / "outputs").exists()


def test_teacher_then_dgnet(tmp_path, data_root, capsys):
    teacher_args = ("--trainer", "baseline")
    assert run(tmp_path, "teacher", data_root, "batch_size=8", "num_instances=2", "triplet_w=1.0",
               args=teacher_args) == 0
    state = load_checkpoint(checkpoint_path(tmp_path / "outputs" / "teacher", 4))
    assert state["kind"] == "baseline" and "teacher" in state["trainer"]["models"]
    capsys.readouterr()
    assert run(tmp_path, "student", data_root, "max_teacher_w=2.0", f"teacher={tmp_path / 'outputs' / 'teacher'}",
               "max_iter=2") == 0
    # the console says how far the teacher trained, and how to evaluate it (teacher_report)
    assert (f"teacher: iteration 4 of its run's 4; not evaluated yet (python test.py --name teacher --output_path "
            f"{tmp_path})") in capsys.readouterr().out
    # the configs' relative teacher: outputs/<name> is found under --output_path, where the teacher was written
    assert not Path("outputs/teacher").exists()
    assert run(tmp_path, "relative", data_root, "max_teacher_w=2.0", "teacher=outputs/teacher", "max_iter=2") == 0
    # ... and pinned: config.yaml names the checkpoint the run started from, which a resume loads again even
    # after the teacher's run went on (the same command with --resume included)
    first = str(checkpoint_path(tmp_path / "outputs" / "teacher", 4))
    assert load_config(tmp_path / "outputs" / "relative" / "config.yaml")["teacher"] == first
    assert f"teacher: {first}" in capsys.readouterr().out
    assert run(tmp_path, "teacher", data_root, "batch_size=8", "num_instances=2", "triplet_w=1.0", "max_iter=6",
               args=(*teacher_args, "--resume")) == 0
    assert run(tmp_path, "relative", data_root, "max_teacher_w=2.0", "teacher=outputs/teacher", "max_iter=4",
               args=("--resume",)) == 0
    assert load_config(tmp_path / "outputs" / "relative" / "config.yaml")["teacher"] == first
    assert "teacher" not in (tmp_path / "outputs" / "relative" / train.CHANGES_FILE).read_text()  # max_iter only
    # its file gone, a resume says so; the newest teacher is a change to ask for, and recorded
    Path(first).rename(Path(first).with_suffix(".moved"))
    capsys.readouterr()
    assert run(tmp_path, "relative", data_root, "max_teacher_w=2.0", "max_iter=6", args=("--resume",)) == 2
    assert f"--resume: the teacher {first} is gone" in capsys.readouterr().err
    newest = str(checkpoint_path(tmp_path / "outputs" / "teacher", 6))
    assert run(tmp_path, "relative", data_root, "max_teacher_w=2.0", f"teacher={newest}", "max_iter=6",
               args=("--resume",)) == 0
    assert "teacher: iteration 6 of its run's 6; not evaluated yet" in capsys.readouterr().out  # the new one's
    assert f"teacher '{first}' -> '{newest}'" in (tmp_path / "outputs" / "relative" / train.CHANGES_FILE).read_text()
    Path(first).with_suffix(".moved").rename(first)
    # pretrained: found under --output_path too, pinned, and not read by a resume (the checkpoint has them)
    assert run(tmp_path, "warm", data_root, "pretrained=outputs/teacher", "max_iter=2") == 0
    assert load_config(tmp_path / "outputs" / "warm" / "config.yaml")["pretrained"] == newest
    Path(newest).rename(Path(newest).with_suffix(".moved"))
    assert run(tmp_path, "warm", data_root, "pretrained=outputs/teacher", "max_iter=4", args=("--resume",)) == 0
    Path(newest).with_suffix(".moved").rename(newest)
    # a student holding identities out that its teacher trained on: the error says how the two must agree
    capsys.readouterr()
    assert run(tmp_path, "heldout", data_root, "max_teacher_w=2.0", "teacher=outputs/teacher", "val_ids=2") == 2
    err = capsys.readouterr().err
    assert "classes but the data has" in err and "trained with val_ids: 2 and seed" in err


def test_teacher_report_names_its_figures_and_a_run_stopped_short(tmp_path, monkeypatch):
    """A fresh DG-Net run prints its teacher's iteration of its run's max_iter with the test.py figures written
    for it, and warns when the teacher's run stopped short of max_iter, with the command that finishes it."""
    from trainer import BaselineTrainer

    run_dir = tmp_path / "outputs" / "t"
    cfg = load_config(None, ["max_iter=10", "ID_class=null", "backbone=resnet18", "pretrained=none"])
    (run_dir / "checkpoints").mkdir(parents=True)
    dump_config(cfg, run_dir / "config.yaml")
    state = {"kind": "baseline", "iteration": 4, "config": cfg,
             "trainer": BaselineTrainer(cfg, 3, torch.device("cpu")).state_dict()}
    for it in (4, 6):
        save_checkpoint({**state, "iteration": it}, checkpoint_path(run_dir, it))
    monkeypatch.chdir(tmp_path)
    line, warning = preflight.teacher_report(str(checkpoint_path(run_dir, 4)))
    assert line == "teacher: iteration 4 of its run's 10; not evaluated yet (python test.py --name t --which_iter 4)"
    assert "stopped at iteration 4 of 10" in warning and "(python train.py --resume --name t)" in warning
    (run_dir / "results").mkdir()
    (run_dir / "results" / "00000006.json").write_text(json.dumps({"R1": 0.875, "mAP": 0.5}))
    cfg["max_iter"] = 6
    save_checkpoint({**state, "iteration": 6, "config": cfg}, checkpoint_path(run_dir, 6))
    line, warning = preflight.teacher_report(str(checkpoint_path(run_dir, 6)))
    assert line.startswith("teacher: iteration 6 of its run's 6; test.py on it: R1 87.50 %, mAP 50.00 %")
    assert warning is None
    # a DG-Net checkpoint or another file: nothing to say here (load_teacher names what is wrong)
    assert preflight.teacher_report(str(run_dir / "config.yaml")) == (None, None)
    save_checkpoint({**state, "kind": "DGNet"}, tmp_path / "dgnet.pt")
    assert preflight.teacher_report(str(tmp_path / "dgnet.pt")) == (None, None)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root, monkeypatch, capsys):
    from trainer import DGNet_Trainer

    real_step = DGNet_Trainer.train_step

    def diverging(self, it, *batches):
        losses = real_step(self, it, *batches)
        if it >= 2:
            losses["gan"] = torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(DGNet_Trainer, "train_step", diverging)
    assert run(tmp_path, "nan", data_root, "snapshot_save_iter=2") == 3
    err = capsys.readouterr().err
    assert "non-finite loss at iteration 3" in err and "gan=nan" in err and "00000002.pt" in err
    assert checkpoint_path(tmp_path / "outputs" / "nan", 2).is_file()
    assert not checkpoint_path(tmp_path / "outputs" / "nan", 4).exists()


class Payload:
    """An arbitrary class: unpickling it would run code, so weights_only loading must refuse it."""


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(UserError, match="pickled Python objects"):
        load_checkpoint(path)


@pytest.mark.parametrize("sig, group", [(signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["sigint-to-the-process", "sigterm-to-the-group-with-loader-workers"])
def test_signal_saves_and_resumes(tmp_path, data_root, sig, group):
    """Ctrl-C, or SIGTERM to the whole process group as `timeout` and job schedulers send it: the loader
    workers get it too, and must leave the stop to the main process."""
    cmd = [sys.executable, "train.py", "--config", "configs/quickstart/dgnet.yaml", "--name", "sig",
           "--output_path", str(tmp_path), *tiny(data_root, "max_iter=100000", "snapshot_save_iter=1000",
                                                   "image_display_iter=1000", "image_save_iter=1000",
                                                   f"num_workers={int(group)}")]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=group)
    read_until(proc, lambda line: line.startswith("[") and "/100000]" in line, 120, "training's first log line")
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "resume with: python train.py --resume --name sig" in out
    ckpts = sorted((tmp_path / "outputs" / "sig" / "checkpoints").glob("*.pt"))
    assert len(ckpts) == 1
    saved = load_checkpoint(ckpts[0])["iteration"]
    assert run(tmp_path, "sig", data_root, f"max_iter={saved + 1}", args=("--resume",)) == 0
    assert checkpoint_path(tmp_path / "outputs" / "sig", saved + 1).is_file()


def test_validation_best_checkpoint_and_swap_fidelity(tmp_path, data_root, capsys):
    assert run(tmp_path, "val", data_root, "val_ids=1", "eval_iter=2", "fidelity_iter=2") == 0
    out = capsys.readouterr().out
    assert "validation at 2:" in out and "validation at 4:" in out and "1 held-out identities" in out
    assert "swap fidelity at 4: person L1" in out and "structure image" in out and "true swap at 1/8" in out
    assert "3 identities" in out  # one of the 4 training identities is held out
    run_dir = tmp_path / "outputs" / "val"
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    last = load_checkpoint(checkpoint_path(run_dir, 4))
    assert best["iteration"] in (2, 4) and last["best_val_mAP"] == best["best_val_mAP"] >= 0
    # the best checkpoint is not a snapshot: resume and keep_last ignore it. The run's last iteration off the
    # eval_iter schedule is validated for the log but chooses nothing: continued later, the run must choose
    # among the points it would have had in one go
    assert run(tmp_path, "val", data_root, "max_iter=5", args=("--resume",)) == 0
    out = capsys.readouterr().out
    assert "validation at 5:" in out and "off the eval_iter schedule (2): not a candidate for best.pt" in out
    again = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert again["iteration"] == best["iteration"] and again["best_val_mAP"] == best["best_val_mAP"]
    # resumed from iteration 2, a best.pt chosen later (iteration 4's state, here) belongs to the abandoned
    # continuation and moves with it
    shutil.copy(checkpoint_path(run_dir, 4), run_dir / "checkpoints" / "best.pt")
    assert run(tmp_path, "val", data_root, "max_iter=3", args=("--resume", "--which_iter", "2")) == 0
    assert "best.pt" in capsys.readouterr().out
    (moved,) = (run_dir / "checkpoints").glob("superseded_*/best.pt")
    assert load_checkpoint(moved)["iteration"] == 4


def test_hold_out_validation_identities():
    from data.datasets import DatasetSplits, Record, hold_out_validation

    records = [Record(f"/x/{pid}_{cam}_{i}.jpg", pid, cam) for pid in range(1, 7) for cam in (1, 2, 3)
               for i in range(2)] + [Record("/x/7_1_0.jpg", 7, 1), Record("/x/7_1_1.jpg", 7, 1)]
    splits = DatasetSplits("t", "/x", list(records), [], [])
    hold_out_validation(splits, 3, seed=0)
    held = {r.pid for r in splits.val_query}
    assert len(held) == 3 and 7 not in held and not held & {r.pid for r in splits.train}
    assert splits.num_classes == 4 and sorted(set(splits.train_labels)) == [0, 1, 2, 3]
    assert len(splits.val_query) == 9 and len(splits.val_gallery) == 9  # first image per camera is a query
    again = DatasetSplits("t", "/x", list(records), [], [])
    hold_out_validation(again, 3, seed=0)
    assert again.val_query == splits.val_query
    with pytest.raises(UserError, match="lower val_ids"):
        hold_out_validation(DatasetSplits("t", "/x", list(records), [], []), 7, seed=0)
    with pytest.raises(UserError, match="training needs at least 2 left"):  # one class would train
        hold_out_validation(DatasetSplits("t", "/x", list(records), [], []), 6, seed=0)
    no_cameras = [r._replace(camid=-1) for r in records]  # one's own data named without cameras
    with pytest.raises(UserError, match="no training image has a camera in its name.*set val_ids: 0"):
        hold_out_validation(DatasetSplits("t", "/x", no_cameras, [], []), 2, seed=0)


def test_hold_out_validation_every_query_has_a_match_in_another_camera():
    from data.datasets import DatasetSplits, Record, hold_out_validation

    # pid 8: five images in camera 1, one in camera 2; pid 9: one image in each of two cameras; 10 and 11 train
    records = ([Record(f"/x/8_1_{i}.jpg", 8, 1) for i in range(5)] + [Record("/x/8_2_0.jpg", 8, 2)]
               + [Record("/x/9_1_0.jpg", 9, 1), Record("/x/9_2_0.jpg", 9, 2), Record("/x/10_1_0.jpg", 10, 1),
                  Record("/x/11_1_0.jpg", 11, 1)])
    splits = DatasetSplits("t", "/x", list(records), [], [])
    hold_out_validation(splits, 2, seed=0)
    assert {r.pid for r in splits.val_query} == {8, 9}  # every held identity keeps a query
    for q in splits.val_query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in splits.val_gallery), q.path
    assert sorted(r.path for r in splits.val_query + splits.val_gallery) == sorted(r.path for r in records[:-2])
    assert [r.pid for r in splits.train] == [10, 11]


def test_resume_evaluate(tmp_path, data_root, capsys):
    assert run(tmp_path, "ev", data_root, "max_iter=2") == 0
    capsys.readouterr()
    assert run(tmp_path, "ev", data_root, args=("--resume", "--evaluate")) == 0
    out = capsys.readouterr().out
    assert "mAP" in out and "iteration 2" in out
    assert not checkpoint_path(tmp_path / "outputs" / "ev", 3).exists()
    assert run(tmp_path, "ev2", data_root, args=("--evaluate",)) == 2
    assert "use it with --resume" in capsys.readouterr().err
