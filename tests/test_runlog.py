"""The run's plain-text record (runlog.py): metrics.jsonl holds every logged scalar once per iteration and
keeps one history across resumes, log.txt the console and its last error, env.json every start."""
from __future__ import annotations

import json

import pytest
from test_train import run

import runlog
from utils import UserError


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_writes_its_record_and_a_resume_from_an_older_checkpoint_rewrites_the_rest(tmp_path, data_root):
    assert run(tmp_path, "rec", data_root, "max_iter=3", "snapshot_save_iter=1", "val_ids=1", "eval_iter=2") == 0
    run_dir = tmp_path / "outputs" / "rec"
    rows = lines(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert {"loss/D", "loss/total", "lr/gen", "speed/iterations_per_s"} <= rows[0].keys()
    assert "val/mAP" in rows[1] and "val/mAP" not in rows[0]  # validation joins its iteration's line
    log = (run_dir / "log.txt").read_text()
    assert "[1/3]" in log and "validation at 2:" in log and "finished 3 iterations" in log
    [start] = json.loads((run_dir / "env.json").read_text())
    assert start["iteration"] == 0 and start["torch"] and start["device"] == "cpu" and start["world_size"] == 1

    first = rows[0]
    assert run(tmp_path, "rec", data_root, "max_iter=3", "snapshot_save_iter=1", "val_ids=1", "eval_iter=2",
               args=("--resume", "--which_iter", "1")) == 0
    again = lines(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in again] == [1, 2, 3]  # 2 and 3 of the abandoned continuation dropped
    assert again[0] == first
    assert [s["iteration"] for s in json.loads((run_dir / "env.json").read_text())] == [0, 1]
    log = (run_dir / "log.txt").read_text()
    assert log.count("finished 3 iterations") == 2  # appended
    assert "moved 3 newer checkpoint(s) (00000002.pt, 00000003.pt, best.pt)" in log  # best.pt was chosen at 2


def test_a_run_started_again_before_its_first_snapshot_keeps_no_stale_lines(tmp_path, data_root):
    run_dir = tmp_path / "outputs" / "again"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"iteration": 5, "loss/D": 1.0}\n')  # an attempt that stopped early
    assert run(tmp_path, "again", data_root, "max_iter=2") == 0
    assert [r["iteration"] for r in lines(run_dir / "metrics.jsonl")] == [1, 2]


def test_console_log_keeps_the_error_that_ends_the_run(tmp_path, capsys):
    log = tmp_path / "log.txt"
    with pytest.raises(UserError), runlog.console_log(log):
        print("working")
        raise UserError("the disk is full")
    assert log.read_text() == "working\nerror: the disk is full\n"
    assert capsys.readouterr().out == "working\n"
    print("after")  # the console is itself again
    assert log.read_text().endswith("full\n")


def test_a_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "a": 1.0}\n{"iteration": 2, "a": 2.0}\n{"iterat')
    record = runlog.ScalarRecord(NullWriter(), path, start=2)
    record.add_scalar("a", 3.0, 3)
    record.close()
    assert [r["iteration"] for r in lines(path)] == [1, 2, 3]


class NullWriter:
    def add_scalar(self, *args):
        pass

    def close(self):
        pass
