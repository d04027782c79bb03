"""A run's plain-text record beside tensorboard, for whoever has no tensorboard at hand (a cluster job, a
script, a bug report):

- `metrics.jsonl`: one JSON line per iteration at which anything was logged, holding every scalar that
  went to tensorboard at it (`loss/...`, `lr/...`, `speed/...`, `val/...`, `generation/...`);
- `log.txt`: what rank 0 printed, errors included;
- `env.json`: one entry per start (the first and every resume): when, the command, the iteration, and
  the software and hardware it ran on.

Each start keeps the lines up to its iteration and drops the rest (a resume from an older checkpoint, or a
run started again after it stopped before its first snapshot), as tensorboard's `purge_step` does, so the
record is the run's one history.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import platform
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch

from utils import REPO_ROOT, UserError, ctrl_c_held, one_line, write_text_atomic

METRICS_FILE, LOG_FILE, ENV_FILE = "metrics.jsonl", "log.txt", "env.json"


def _keep_until(path: Path, last: int) -> None:
    """Rewrite `path` without the lines of iterations after `last` (an abandoned continuation)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] > last:
                continue
        except (ValueError, KeyError, TypeError):  # a line cut by a kill: dropped
            continue
        kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


class ScalarRecord:
    """A tensorboard writer that also appends its scalars to metrics.jsonl, one line per iteration (written
    at `end_iteration`, or when a scalar of a later iteration comes).

    Every call into the tensorboard writer holds back a Ctrl-C until it returns (`ctrl_c_held`: one that
    lands inside can leave the writer unable to close)."""

    def __init__(self, writer: Any, path: Path, start: int):
        _keep_until(path, start)
        self.writer, self.path = writer, path
        self.file = open(path, "a")
        self.step: int | None = None
        self.row: dict[str, float] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if step != self.step:
            self.flush()
            self.step = step
        self.row[tag] = float(value)
        with ctrl_c_held():
            self.writer.add_scalar(tag, value, step)

    def add_image(self, *args: Any, **kwargs: Any) -> None:
        with ctrl_c_held():
            self.writer.add_image(*args, **kwargs)

    def end_iteration(self) -> None:
        self.flush()

    def flush(self) -> None:
        if self.row:
            self.file.write(json.dumps({"iteration": self.step, **self.row}) + "\n")
            self.file.flush()
            self.row = {}

    def close(self) -> None:
        try:
            self.flush()
            self.file.close()
        finally:
            with ctrl_c_held():
                self.writer.close()


class _Tee:
    """A text stream that writes to the console stream and to the log file."""

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding: the console's
        return getattr(self.stream, name)


@contextlib.contextmanager
def console_log(path: Path) -> Iterator[None]:
    """Copy stdout and stderr into `path` (appended) while the block runs; a UserError that ends the block is
    written there too, as the line the console shows after it."""
    with open(path, "a") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)  # type: ignore[assignment]
        try:
            yield
        except UserError as error:
            log.write(f"error: {one_line(error)}\n")
            raise
        except Exception:  # a bug's traceback, which the console shows after the block
            log.write(traceback.format_exc())
            raise
        finally:
            sys.stdout, sys.stderr = out, err


def _git_commit() -> str | None:
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    """What this start runs on: software versions, the device, the processes, the code's commit."""
    import torchvision

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "host": socket.gethostname(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "device": str(device), "gpu": gpu, "world_size": world_size, "threads": torch.get_num_threads(),
            "git_commit": _git_commit()}


def record_start(path: Path, iteration: int, device: torch.device, world_size: int) -> None:
    """Append this start to env.json (a list; an unreadable file is kept aside, not lost)."""
    starts: list[Any] = []
    if path.is_file():
        try:
            starts = json.loads(path.read_text())
            if not isinstance(starts, list):
                raise ValueError("not a list")
        except ValueError:
            path.rename(path.with_name(path.name + ".unreadable"))
            starts = []
    starts.append({"iteration": iteration, **environment(device, world_size)})
    write_text_atomic(path, json.dumps(starts, indent=2) + "\n")
