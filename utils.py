"""Small shared helpers: the user-facing error type, the config system, seeding.

Config files are YAML. `configs/defaults.yaml` lists every key once, with its default and a one-line
comment; a config file names only what it changes and may start from other files with `_base_`.
Values are typed by their defaults, so a typo or a wrong type is caught before anything runs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from networks import refused_pickle

try:
    import fcntl
except ImportError:  # Windows: runs go unlocked (RunLock says so)
    fcntl = None

REPO_ROOT = Path(__file__).resolve().parent
DEFAULTS_PATH = REPO_ROOT / "configs" / "defaults.yaml"
BASE_KEY = "_base_"
RESOLVED_HEADER = "# resolved config: every key, after _base_ files and --opts\n"
# Keys added after runs were first written whose default is not how a run whose resolved config lacks them was
# trained, with the value that is (before `scale2`, E_a and the teacher saw small images at their own size;
# before `f_grad_w`, f was always detached). Every other added key came with the old behaviour as its default
# (`dis.r1_every: 1`, `structure_jitter: 0`), which `saved_config` fills in.
ADDED_KEYS: dict[str, Any] = {"scale2": False, "f_grad_w": 0.0}


class UserError(Exception):
    """Bad input from the user (a missing folder, a config typo, a corrupt image).

    Command-line entry points print its message as one line and exit with status 2, without a
    traceback: the message must say what is wrong and what to do.
    """


class Notice(UserWarning):
    """Something the user of a command should know that does not stop it (skipped images, all-zero
    features): the commands print it as one `warning: ...` line (plain_warnings)."""


def plain_warnings() -> None:
    """Print Notice warnings as `warning: <message>`, without the file, line and source line Python adds
    (set by each command's entry point only, so a library user's warning display is left alone)."""
    default = warnings.formatwarning

    def formatted(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  line: str | None = None) -> str:
        if issubclass(category, Notice):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatted


def format_seconds(seconds: float) -> str:
    """h:mm:ss."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def first_line(err: BaseException, limit: int = 200) -> str:
    """The start of an exception's message, for quoting a library's long error inside one line of ours."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


def one_line(err: BaseException) -> str:
    """The message of `err` as one line, also when a DataLoader worker re-raised it with a traceback."""
    text = str(err).strip()
    if "Traceback" in text:  # DataLoader workers wrap the original message in their traceback text
        text = text.splitlines()[-1]
        text = re.sub(r"^[\w.]*UserError: ", "", text)
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------
# config: schema from defaults.yaml


def _schema_comments(path: Path) -> dict[str, str]:
    """Dotted key -> the comment written beside it in defaults.yaml (the key's documentation)."""
    comments: dict[str, str] = {}
    section: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    for line in path.read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z_]\w*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        section = [(i, k) for i, k in section if i < indent]
        dotted = ".".join([k for _, k in section] + [key])
        value_part, _, comment = rest.partition("#")
        if value_part.strip() == "":  # a mapping: its children follow, indented
            section.append((indent, key))
        comments[dotted] = comment.strip()
    return comments


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {"gen": {"dim": 16}} -> {"gen.dim": 16}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as a nested config, the inverse of `flatten`: {"gen.dim": 16} -> {"gen": {"dim": 16}};
    ValueError for a key below a value ("a=1" and "a.b=2")."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"'{key}' sets a key below a value")
        node[leaf] = value
    return tree


def built(build: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a network builder or loader, turning its one-line errors (ValueError, FileNotFoundError: a config
    it cannot build, a file it cannot read) into UserError."""
    try:
        return build(*args, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None


_NULL_TYPE_TAG = re.compile(r"^\((int|float|str)\)\s*")
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}


@dataclass(frozen=True)
class Range:
    """The values a numeric config key can take: [low, high], either end open or absent. NaN and the
    infinities are outside every range."""

    low: float | None = None
    high: float | None = None
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and value < self.low:
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, kind: type) -> str:
        noun = "an integer" if kind is int else "a finite number"
        if self.high is None:
            return f"{noun} of {self.low:g} or more" if self.low is not None else noun
        top = f"below {self.high:g}" if self.high_open else f"{self.high:g}"
        return f"{noun} from {self.low:g} to {top}"


COUNT, SIZE, PROBABILITY = Range(1), Range(0), Range(0, 1)
# Every int and float key of defaults.yaml is listed (tests/test_config.py checks): a value outside its
# range is refused when the config is read, before anything runs or is written.
RANGES: dict[str, Range] = {
    "crop_image_height": COUNT, "crop_image_width": COUNT, "pad": SIZE, "erasing_p": PROBABILITY,
    "batch_size": COUNT, "num_instances": COUNT, "num_workers": SIZE, "seed": SIZE,
    "synthetic.ids": Range(2), "synthetic.test_ids": COUNT, "synthetic.images_per_id": Range(4),
    "synthetic.height": Range(32), "synthetic.width": Range(16), "synthetic.difficulty": PROBABILITY,
    "synthetic.seed": SIZE,
    "ID_class": COUNT, "ID_stride": Range(1, 2), "input_dim_a": Range(1, 3),
    "gen.dim": COUNT, "gen.mlp_dim": COUNT, "gen.id_dim": COUNT, "gen.n_downsample": COUNT,
    "gen.n_res": COUNT,  # the AdaIN layers live in the residual blocks: 0 would ignore the appearance code
    "gen.dropout": PROBABILITY,
    "dis.dim": COUNT, "dis.n_layer": COUNT, "dis.n_res": SIZE, "dis.num_scales": COUNT, "dis.LAMBDA": SIZE,
    "dis.r1_every": COUNT,
    **{key: SIZE for key in ("gan_w", "recon_x_w", "recon_xp_w", "recon_id_w", "id_w", "pid_w", "recon_s_w",
                             "recon_f_w", "recon_x_cyc_w", "teacher_w", "max_w", "max_cyc_w", "max_teacher_w",
                             "B_w", "T_w", "warm_iter", "warm_teacher_iter", "warm_scale", "triplet_w",
                             "triplet_margin", "lr_g", "lr_d", "lr2", "weight_decay", "gamma", "gamma2")},
    "teacher_style": Range(0, 4), "structure_jitter": PROBABILITY, "use_encoder_again": PROBABILITY,
    "f_grad_w": SIZE,
    "label_smoothing": Range(0, 1, high_open=True), "beta1": Range(0, 1, high_open=True),
    "beta2": Range(0, 1, high_open=True), "step_size": COUNT, "max_iter": COUNT, "lr_warmup_iter": SIZE,
    "log_iter": COUNT, "image_display_iter": COUNT, "image_save_iter": COUNT, "display_size": COUNT,
    "snapshot_save_iter": COUNT, "keep_last": SIZE, "val_ids": SIZE, "eval_iter": COUNT,
    "fidelity_iter": SIZE,  # 0 = off
}
# String keys with a fixed set of values, refused otherwise when the config is read (other such keys are checked
# where they are used, also before any file is written).
CHOICES: dict[str, tuple[str, ...]] = {"pad_mode": ("edge", "zero")}


class Schema:
    """Keys, defaults, types and comments, all read from one file (configs/defaults.yaml)."""

    def __init__(self, path: Path = DEFAULTS_PATH):
        with open(path) as f:
            self.defaults: dict[str, Any] = yaml.safe_load(f)
        self.comments = _schema_comments(path)
        self.flat_defaults = flatten(self.defaults)
        self.types: dict[str, type | None] = {}
        for key, default in self.flat_defaults.items():
            if default is None:  # a null default says its type in the comment, e.g. "(int) ..."
                tag = _NULL_TYPE_TAG.match(self.comments.get(key, ""))
                self.types[key] = {"int": int, "float": float, "str": str}[tag.group(1)] if tag else str
            else:
                self.types[key] = type(default)

    def sections(self) -> set[str]:
        return {k for k in self.comments if k not in self.flat_defaults}

    def closest(self, key: str) -> str:
        known = list(self.flat_defaults) + sorted(self.sections())
        leaf = key.rsplit(".", 1)[-1]
        matches = difflib.get_close_matches(key, known, n=1, cutoff=0.5) or difflib.get_close_matches(
            leaf, known, n=1, cutoff=0.5
        )
        if not matches:  # a key given at the wrong level (`dim` instead of `gen.dim`)
            matches = [k for k in known if k.rsplit(".", 1)[-1].lower() == leaf.lower()]
        return f" (did you mean '{matches[0]}'?)" if matches else ""

    def check(self, key: str, value: Any, where: str) -> Any:
        """Return `value` converted to the key's type, or raise UserError naming the key."""
        if key not in self.types:
            raise UserError(f"{where}: unknown config key '{key}'{self.closest(key)}")
        want = self.types[key]
        nullable = self.flat_defaults[key] is None
        if value is None and nullable:
            return None
        if want is float and isinstance(value, str):
            try:  # YAML reads 1e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # a name or path that happens to be a number (--opts data_root=2024)
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        rule = RANGES.get(key)
        if not ok:
            kind = _TYPE_NAMES.get(want, want.__name__) + (" or null" if nullable else "")
            hint = ""
            if want is str and isinstance(value, bool):  # YAML 1.1: on/off/yes/no are booleans
                hint = (" (YAML reads yes/no/on/off as true/false: quote a word meant as text"
                        + (f"; use {rule.describe(want)}" if rule is not None else "") + ")")
            raise UserError(f"{where}: config key '{key}' must be {kind}, got {value!r}{hint}")
        if rule is not None and not rule.holds(value):
            raise UserError(f"{where}: config key '{key}' is {value!r}: use {rule.describe(want)}")
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"{where}: config key '{key}' is {value!r}: use {' or '.join(CHOICES[key])}")
        return value


_SCHEMA: Schema | None = None


def schema() -> Schema:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = Schema()
    return _SCHEMA


# ---------------------------------------------------------------------------------------------------
# config: files, inheritance, overrides


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file in UTF-8; a config file is YAML text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{at} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of keys to values")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any], where: str, prefix: str = "") -> None:
    """Merge `update` into `base` in place, checking every key and value against the schema."""
    sch = schema()
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if dotted in sch.sections():
            if not isinstance(value, dict):
                raise UserError(f"{where}: config key '{dotted}' is a section; give its keys ({dotted}.…)")
            _merge(base[key], value, where, dotted + ".")
        else:
            base[key] = sch.check(dotted, value, where)


def _load_chain(path: Path, seen: tuple[Path, ...]) -> list[tuple[Path, dict[str, Any]]]:
    """The file and its `_base_` ancestors, oldest first."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise UserError(f"config files inherit from each other in a loop: {chain}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"{path}: {BASE_KEY} names the config file(s) to start from: a path or a list of "
                        f"paths, got {bases!r}")
    chain: list[tuple[Path, dict[str, Any]]] = []
    for base in bases:
        chain += _load_chain((path.parent / base), (*seen, path))
    return chain + [(path, data)]


def parse_opts(opts: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["gen.dim=8", "lr_g=1e-4"]` -> a nested dict; values are read as YAML (`true`, `[1, 2]`, `null`)."""
    flat: dict[str, Any] = {}
    for item in opts:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--opts takes key=value pairs, got '{item}' (e.g. --opts gen.dim=8 max_iter=100)")
        try:
            flat[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            flat[key.strip()] = raw
    try:
        return unflatten(flat)
    except ValueError as err:
        raise UserError(f"--opts: {err}") from None


def checked_config(layers: Iterable[tuple[dict[str, Any], str]], opts: list[str] | tuple[str, ...] = ()
                   ) -> dict[str, Any]:
    """Defaults, then each (keys, where) layer checked against the schema (`where` names it in errors), then
    `--opts`: `load_config`'s files, or a config that is not a file of this project (the original's)."""
    cfg = copy.deepcopy(schema().defaults)
    for data, where in layers:
        _merge(cfg, data, where)
    if opts:
        _merge(cfg, parse_opts(opts), "--opts")
    return cfg


def load_config(path: str | os.PathLike | None = None, opts: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Defaults, then the `_base_` chain of `path`, then the file, then `--opts` overrides.

    Returns the resolved config: a nested dict holding every key of defaults.yaml.
    """
    layers = []
    for file, data in _load_chain(Path(path), ()) if path is not None else []:
        if file.read_text().startswith(RESOLVED_HEADER):  # a run's own config: every key it knew
            data = saved_config(data)
        layers.append((data, str(file)))
    return checked_config(layers, opts)


def saved_config(cfg: dict[str, Any], opts: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A config a run wrote (its config.yaml or its checkpoint's), complete: every key added since takes the
    value the run was trained with (ADDED_KEYS), else today's default (a key added with the old behaviour
    as its default). So a resumed run reports only the changes it makes, and every key reads. `opts`
    (`--opts` overrides) apply on top, checked as in `load_config`."""
    full = copy.deepcopy(schema().defaults)
    _overlay(full, ADDED_KEYS)  # scalars only: nothing of it is shared
    _overlay(full, copy.deepcopy(cfg))
    if opts:
        _merge(full, parse_opts(opts), "--opts")
    return full


def _overlay(base: dict[str, Any], update: dict[str, Any]) -> None:
    """`update`'s values over `base`'s, section by section, unchecked (a run's config was checked when written;
    a key it has that today's schema lacks is kept as it is)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _overlay(base[key], value)
        else:
            base[key] = value


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` through a temporary file renamed into place: a kill mid-write leaves the previous file whole
    (or none), never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def dump_config(cfg: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the resolved config; `load_config` of the file gives `cfg` back unchanged."""
    write_text_atomic(path, RESOLVED_HEADER + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False))


def config_help() -> str:
    """Every key with its default and its comment, for `--help-config`."""
    sch = schema()
    width = max(len(k) for k in sch.flat_defaults)
    lines = []
    for key, default in sch.flat_defaults.items():
        value = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"{key.ljust(width)}  {value:<12}  {sch.comments.get(key, '')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# seeding


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# checkpoints: one file per snapshot holding the whole run state

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^(\d{8})\.pt$")


def checkpoint_path(run_dir: str | os.PathLike, iteration: int) -> Path:
    """`<run>/checkpoints/<iteration:08d>.pt`: the state after `iteration` iterations."""
    return Path(run_dir) / CHECKPOINT_DIR / f"{iteration:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, path) of every complete checkpoint of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / m.group(0)) for p in folder.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


class NonFiniteState(UserError):
    """A run state holding NaN or infinity (a diverged run): never written, and refused when loaded."""


def named_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in `tree` (nested dicts, lists, tuples) with its dotted key."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from named_tensors(value, f"{prefix}[{i}]")


def first_non_finite(tree: Any, prefix: str = "") -> str | None:
    """The dotted key of the first floating-point tensor in `tree` (nested dicts, lists) holding a NaN or an
    infinity, or None. One device sync per device: the per-tensor flags are reduced before being read."""
    found = [(where, torch.isfinite(t).all()) for where, t in named_tensors(tree, prefix)
             if (t.is_floating_point() or t.is_complex()) and t.numel()]
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, flag) in enumerate(found):
        by_device.setdefault(flag.device, []).append(i)
    for indices in by_device.values():
        flags = torch.stack([found[i][1] for i in indices])
        if not bool(flags.all()):
            return found[indices[int((~flags).nonzero()[0])]][0]
    return None


def require_finite(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise NonFiniteState when a checkpoint's state holds NaN or infinity in any tensor."""
    bad = first_non_finite(state)
    if bad is not None:
        raise NonFiniteState(f"{path}: {bad} holds NaN or infinity (a diverged run)")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write to a temporary file, flush it to disk, then rename: a kill mid-save never leaves a broken file.

    A state holding NaN or infinity is refused (NonFiniteState) before anything is written. A failed write (a
    full disk, say) removes the temporary file, leaves the file at `path` as it was, and raises UserError.
    """
    path = Path(path)
    require_finite(state, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # also a signal or Ctrl-C mid-write: no temporary file stays behind
        tmp.unlink(missing_ok=True)
        if interrupted(err):
            raise KeyboardInterrupt from None
        if isinstance(err, (OSError, RuntimeError)):  # torch.save reports a failed write as RuntimeError
            reason = err.strerror if isinstance(err, OSError) and err.strerror else one_line(err)[:200]
            raise UserError(f"cannot write checkpoint {path} ({reason}); nothing was replaced: free space (or "
                            "fix the folder), then resume from the newest checkpoint") from None
        raise
    _sync_folder(path.parent)


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """A block that a Ctrl-C must not cut: a SIGINT that comes inside reaches the handler in force (Python's
    KeyboardInterrupt, or train.StopRequest's stop-then-abort) when the block ends, over any error the block
    raised; a second one inside the block sends both at once (the way out of a block that hangs).

    For every call into tensorboard's writer. It hands events to its thread through a multiprocessing.Queue,
    which wakes its feeder thread with threading.Condition.notify; an interrupt between notify's
    waiter.release() and waiters.remove() leaves a waiter that the woken thread takes again, so the next
    notify, the one for the close's stop event, wakes nobody and the close waits forever (CPython gh-92530
    covers only the waiter not taken). A no-op outside the main thread, which alone runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def release() -> None:
        signal.signal(signal.SIGINT, previous)
        while held:
            signal.raise_signal(held.pop(0))  # runs the handler in force before it returns

    def hold(signum: int, frame: Any) -> None:
        held.append(signum)
        if len(held) > 1:
            release()

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is hold:
            release()


def interrupted(err: BaseException | None) -> bool:
    """Whether `err` is a Ctrl-C, or came while one was handled (torch.save's cleanup then fails on its own)."""
    while err is not None:
        if isinstance(err, KeyboardInterrupt):
            return True
        err = err.__context__
    return False


def quiet_handover_errors() -> None:
    """Drop the EOFError and ConnectionError tracebacks of multiprocessing's helper threads from now on. A
    loader worker hands each batch's tensors to the main process as file descriptors, served by the worker's
    resource-sharer thread; when a Ctrl-C to the whole process group interrupts the main process in that
    handshake, the worker (which may outlive both presses: two signals before its handler runs count once)
    prints the reset connection's traceback under the main process's one line. That thread reports through
    sys.excepthook, other threads through threading.excepthook: both are filtered, the main thread's errors
    never. Called in every loader worker (the main process reports what went wrong there) and in the main
    process once a stop signal came."""
    quiet = (EOFError, ConnectionError)
    thread_hook, sys_hook = threading.excepthook, sys.excepthook

    def from_thread(args: threading.ExceptHookArgs) -> None:
        if not issubclass(args.exc_type, quiet):
            thread_hook(args)

    def reported(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if threading.current_thread() is threading.main_thread() or not issubclass(exc_type, quiet):
            sys_hook(exc_type, exc, tb)

    threading.excepthook, sys.excepthook = from_thread, reported


def _sync_folder(folder: Path) -> None:
    """Make a rename durable (the folder entry reaches the disk too); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def peek_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """A checkpoint's state mapped, not read (its iteration or config without loading its tensors, which
    stay on disk until touched; `weights_only`, like load_checkpoint); None when the file is not a readable
    checkpoint, for callers that leave such a file alone or to load_checkpoint to name."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated, not a checkpoint, pickled: whatever torch raises
        return None
    return state if isinstance(state, dict) else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    instead: str = "use an older one (--which_iter N)") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers only, never pickled code.
    `instead`: what the user can do when it cannot be read (its errors end with it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, empty, not a checkpoint, or a refused pickle: torch raises many kinds
        if refused_pickle(err):
            raise UserError(f"{path} holds pickled Python objects, which are refused (they can run code when "
                            "loaded); re-save it as a plain state dict of tensors") from None
        raise UserError(f"cannot read checkpoint {path} ({type(err).__name__}: {one_line(err)[:200]}); it may "
                        f"be truncated or not a checkpoint: {instead}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint (it holds a {type(state).__name__}, not a dict of its "
                        f"parts); {instead}")
    refuse_non_finite(state, path)
    return state


def mismatch_reason(err: BaseException) -> str:
    """What `load_state_dict` found wrong, in one line: its first size mismatch, missing or unexpected key
    (PyTorch's first line, "Error(s) in loading state_dict for X:", says only that something was), and for a
    classifier whose size differs, the identity counts."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    detail = next((line for line in lines if not line.startswith("Error(s) in loading state_dict")), "")
    size = re.search(r"size mismatch for (\S*classifier\S*weight): copying a param with shape "
                     r"torch.Size\(\[(\d+), \d+\]\) from checkpoint, the shape in current model is "
                     r"torch.Size\(\[(\d+), \d+\]\)", detail)
    if size:
        return f"its classifier has {size.group(2)} identities, this config's data {size.group(3)}"
    return (detail or (lines[0] if lines else type(err).__name__))[:200]


def refuse_non_finite(state: Any, path: str | os.PathLike) -> None:
    """A checkpoint holding NaN or infinity is refused as a diverged run's, whoever loads it."""
    if isinstance(state, dict):
        try:
            require_finite(state, path)
        except NonFiniteState as err:
            raise NonFiniteState(f"{err}: refused; use a checkpoint from before the run diverged") from None


RUN_PARTS = {"DGNet": ("gen", "dis", "id"), "baseline": ("teacher",)}
BEST_NAME = "best.pt"


def run_folder(output_path: str | os.PathLike, name: str) -> Path:
    """`<output_path>/outputs/<name>`; `name` must be one plain folder name (no separators, not empty)."""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise UserError(f"--name {name!r}: use one plain folder name such as market_dgnet (no '/', not empty, "
                        "no surrounding spaces)")
    return Path(output_path) / "outputs" / name


def add_run_arguments(parser: Any, name_help: str = "run name: outputs/NAME", every_iteration: bool = False,
                      name_required: bool = True) -> None:
    """The arguments that pick a finished run's checkpoint (test.py, export.py): --name, --output_path and
    --which_iter, resolved by `run_folder` and `find_checkpoint` (`every_iteration`: the caller also takes
    `all`, every snapshot in turn; `name_required` False: the caller checks --name itself)."""
    parser.add_argument("--name", required=name_required, help=name_help)
    parser.add_argument("--output_path", default=".", help="the runs are in OUTPUT_PATH/outputs (default: .)")
    parser.add_argument("--which_iter", default="last",
                        help="checkpoint iteration, last (default), or best (the best validation mAP, with val_ids)"
                             + ("; all: every snapshot in turn, and the curve" if every_iteration else ""))


def numbers(text: str) -> list[float]:
    """A list of numbers separated by commas: `--alpha 0.5,0,-1`, `--ms 1,1.1`, `--roc 1e-4,1e-3` (each option
    checks its values in `_check_args`)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"give numbers separated by commas, e.g. 0.5 or 1,1.1; got {text!r}") \
            from None


def listed(values: Sequence[float], sep: str = ",") -> str:
    """Numbers as `numbers` reads them (1,1.1), or joined by `sep` for a file name (_ms1_1.1)."""
    return sep.join(f"{v:g}" for v in values)


def check_once(values: Sequence[float], option: str, noun: str = "value") -> None:
    """A comma list naming a value twice (--alpha 0.5,0,0.5) is a slip: one line."""
    if len(set(values)) < len(values):
        raise UserError(f"{option} gives a {noun} twice ({listed(values)}); give each once")



def find_checkpoint(run_dir: str | os.PathLike, which_iter: str) -> Path:
    """The checkpoint `--which_iter` names: an iteration number, last (the newest) or best (the best
    validation mAP, written when training validates)."""
    run_dir = Path(run_dir)
    if which_iter == "last":
        path = latest_checkpoint(run_dir)
        if path is None:
            if (run_dir / "config.yaml").is_file():  # started, but stopped before its first snapshot
                raise UserError(f"the run in {run_dir} has no checkpoint yet (it stopped before saving one): start "
                                "it again without --resume, or check --name and --output_path")
            raise UserError(f"no checkpoint in {run_dir / CHECKPOINT_DIR}; check --name and --output_path")
        return path
    if which_iter == "best":
        path = run_dir / CHECKPOINT_DIR / BEST_NAME
        if not path.is_file():
            raise UserError(f"{run_dir} has no {BEST_NAME}: it is written when training validates (val_ids > 0)")
        return path
    if not which_iter.isdigit():
        raise UserError(f"--which_iter must be an iteration number, last or best, got {which_iter!r}")
    path = checkpoint_path(run_dir, int(which_iter))
    if not path.is_file():
        have = ", ".join(str(it) for it, _ in list_checkpoints(run_dir)) or "none"
        raise UserError(f"no checkpoint of iteration {int(which_iter)} in {run_dir / CHECKPOINT_DIR} (there are: "
                        f"{have}); give one of those to --which_iter")
    return path


def check_run_checkpoint(state: Any, path: str | os.PathLike) -> dict[str, Any]:
    """`state` if it is a whole-run checkpoint of train.py (kind, iteration, config, the kind's networks),
    else UserError in one line: a file of the right format with other contents must not fail later with a
    KeyError deep inside a loader."""
    def refuse(what: str) -> UserError:
        return UserError(f"{path} is not a checkpoint written by train.py ({what}); give a run's "
                         "checkpoints/<iteration>.pt, or another --which_iter")

    if not isinstance(state, dict):
        raise refuse(f"it holds a {type(state).__name__}, not a run state")
    missing = [k for k in ("kind", "iteration", "config", "trainer") if k not in state]
    if missing:
        raise refuse(f"no {', '.join(repr(k) for k in missing)}")
    if state["kind"] not in RUN_PARTS:
        raise refuse(f"unknown kind {state['kind']!r}")
    models = state["trainer"].get("models") if isinstance(state["trainer"], dict) else None
    lacking = [p for p in RUN_PARTS[state["kind"]] if not isinstance(models, dict) or p not in models]
    if lacking or not isinstance(state["config"], dict) or not isinstance(state["iteration"], int):
        raise refuse(f"a {state['kind']} run state without {', '.join(lacking) or 'a valid config or iteration'}")
    return state


# ---------------------------------------------------------------------------------------------------
# image grids


def write_grid(rows: list[torch.Tensor], path: str | os.PathLike, quality: int = 95) -> np.ndarray:
    """Save rows of images (each (N, C, H, W), normalized space) as one JPEG, one row per tensor.

    Returns the grid as an (H, W, 3) uint8 array (for tensorboard).

    Each image is min-max scaled on its own (as the original's `scale_each`), so generated images with
    an unbounded range are visible; 1-channel images (structure inputs) are shown as gray.
    """
    from PIL import Image  # imported here: only image writing needs Pillow and torchvision
    from torchvision.utils import make_grid

    images = torch.cat([r.detach().float().cpu().expand(-1, 3, -1, -1) for r in rows])
    grid = make_grid(images, nrow=rows[0].shape[0], padding=2, normalize=True, scale_each=True)
    array = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    Image.fromarray(array).save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)
    return array


def write_image_index(image_dir: str | os.PathLike, title: str) -> Path:
    """`images/index.html`: the newest grid of every kind with its iteration, then the older ones."""
    image_dir = Path(image_dir)
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for p in image_dir.glob("*.jpg"):
        m = re.match(r"^(.*)_(\d{8})\.jpg$", p.name)
        if m:
            by_kind.setdefault(m.group(1), []).append((int(m.group(2)), p.name))
    parts = [f"<!doctype html><meta charset='utf-8'><title>{title}</title>",
             "<style>body{font-family:sans-serif;background:#fafafa}img{max-width:100%;image-rendering:pixelated}"
             "h2{margin-top:1.5em}</style>", f"<h1>{title}</h1>"]
    for kind in sorted(by_kind):
        shots = sorted(by_kind[kind], reverse=True)
        it, name = shots[0]
        parts.append(f"<h2>{kind} &mdash; iteration {it}</h2><img src='{name}' alt='{kind} {it}'>")
        if len(shots) > 1:
            older = " ".join(f"<a href='{n}'>{i}</a>" for i, n in shots[1:])
            parts.append(f"<p>earlier: {older}</p>")
    out = image_dir / "index.html"
    tmp = image_dir / ".index.html.tmp"
    tmp.write_text("\n".join(parts) + "\n")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------
# run folders: one writer at a time

LOCK_NAME = ".lock"


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """A blocking `flock` on `path` for the block (other processes wait their turn); where the system or the
    filesystem has no locks (some network mounts), the block runs unlocked, as RunLock's run does."""
    with open(path, "a") as lock:
        locked = fcntl is not None
        try:
            if locked:
                fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(lock, fcntl.LOCK_UN)


class RunLock:
    """An exclusive `flock` on `<run>/.lock`, held by the one process that writes the run folder.

    flock rather than a pid file: the kernel drops the lock when its holder dies, even by SIGKILL, so a
    stale lock cannot exist and nothing has to guess whether a recorded pid is still alive (a pid seen from
    another machine or container, or reused by an unrelated process, would fool that guess). The file
    records who holds it, for the refusal message only. Loader workers forked while the lock is held close
    their copy of it, so the lock ends with the run's own process. Where the filesystem has no locks (some
    network mounts), the run goes on with a warning.

    `acquire` creates the missing folders on the way; `release` (safe to call at any time, and more than
    once) removes the lock file and every folder it created that is still empty, so a run refused before it
    wrote anything leaves nothing behind.
    """

    def __init__(self) -> None:
        self.run_dir, self.path = Path(), Path(LOCK_NAME)
        self.fd: int | None = None
        self.created: list[Path] = []
        os.register_at_fork(after_in_child=self._forget_in_child)

    def acquire(self, run_dir: str | os.PathLike) -> None:
        """Create `run_dir` as needed and lock it, or raise UserError naming the process that holds it."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._make_folders()
        for _ in range(10):  # the holder may remove the file between our open and lock: lock the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is None:
                    raise OSError(0, "file locks are not available on this system")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.release()
                raise UserError(f"{self.run_dir} is in use by another training process{self._holder()}: wait "
                                "for it to end, or choose another --name") from None
            except OSError as err:
                self.fd = fd  # unlocked, but removed on release like a locked one
                print(f"warning: cannot lock {self.path} ({err.strerror}); make sure no other run writes to "
                      "this folder", file=sys.stderr, flush=True)
                return
            if _same_file(fd, self.path):
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
                return
            os.close(fd)
        raise UserError(f"cannot lock {self.path}: it keeps being replaced; check what else writes to {self.run_dir}")

    def release(self) -> None:
        """Unlock and remove the lock file (before unlocking: a process that opened the old file sees it gone
        and locks a new one), then the folders this lock created that are still empty, deepest first."""
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):  # not empty (the run wrote in it) or already gone
                folder.rmdir()
        self.created = []

    def _make_folders(self) -> None:
        missing = []
        for folder in (self.run_dir, *self.run_dir.parents):
            if folder.is_dir():
                break
            missing.append(folder)
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                if not folder.is_dir():
                    raise UserError(f"cannot create the run folder {self.run_dir}: {folder} is a file") from None
                continue
            except OSError as err:
                self.release()
                raise UserError(f"cannot create the run folder {self.run_dir} ({err.strerror}): choose a writable "
                                "--output_path") from None
            self.created.append(folder)

    def _holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return ""
        return f" ({text})" if text else ""

    def _forget_in_child(self) -> None:
        # A forked loader worker shares the lock; closing its copy leaves the parent's lock in place.
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.created = []


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open `fd` is still the file at `path` (not one removed and created again meanwhile)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Raise UserError unless `folder` exists as a writable folder or can be created: the nearest existing
    ancestor must be a folder this process may write in. Writes nothing."""
    folder = Path(folder)
    for existing in (folder, *folder.parents):
        if existing.exists():
            break
    else:
        existing = Path(".")
    if not existing.is_dir():
        raise UserError(f"{what} {folder} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {folder} cannot be written ({existing} is read-only to this user); choose "
                        "another location")
