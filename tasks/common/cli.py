"""Command-line plumbing shared by the task scripts: config dataclass -> argparse flags, one-line
errors, output folders and files written atomically."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import torch

T = TypeVar("T")

__all__ = [
    "UserError",
    "append_csv",
    "atomic_save",
    "atomic_write_text",
    "check_device",
    "check_out",
    "check_ranges",
    "parse_config",
    "remove_stale_temps",
    "run_main",
    "write_json",
]


class UserError(Exception):
    """A mistake in the command line or the environment: printed as one line, exit status 2."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _flag_type(tp: Any) -> tuple[Callable | None, dict]:
    origin = get_origin(tp)
    if origin is not None and type(None) in get_args(tp):  # Optional[X]
        inner = next(a for a in get_args(tp) if a is not type(None))
        return _flag_type(inner)
    if origin in (list, tuple):
        inner = get_args(tp)[0]
        return inner, {"nargs": "+"}
    return tp, {}


def parse_config(
    cls: type[T], argv: Sequence[str] | None = None, *, description: str | None = None
) -> T:
    """Build an argparse parser from the fields of dataclass ``cls`` and parse ``argv``.

    Each field ``name`` becomes ``--name`` (and ``--na-me`` when the name has underscores); its
    default, type, ``choices`` (field metadata) and help text (field metadata ``help``) come
    from the dataclass. ``bool`` fields become ``--flag / --no-flag``.
    """
    parser = _OneLineParser(description=description or cls.__doc__)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        names = [f"--{f.name}"]
        if "_" in f.name:
            names.append(f"--{f.name.replace('_', '-')}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict[str, Any] = {"default": default, "help": f.metadata.get("help", "")}
        if kw["help"] is not None:
            kw["help"] += f" (default: {default})"
        tp = hints[f.name]
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            conv, extra = _flag_type(tp)
            kw["type"] = conv
            kw.update(extra)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(*names, dest=f.name, **kw)
    ns = parser.parse_args(argv)
    cfg = cls(**vars(ns))
    try:
        for name, value in vars(cfg).items():  # NaN passes every `<` check: refuse it here
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{name} must be a finite number, got {value}")
        check = getattr(cfg, "validate", None)
        if check is not None:
            check()
        if getattr(cfg, "device", None) is not None:
            check_device(cfg.device)
        if getattr(cfg, "out", None):
            check_out(cfg.out)
    except (ValueError, UserError) as err:
        parser.error(str(err))
    return cfg


def check_ranges(
    cfg: Any, *, at_least: dict[str, float] | None = None, above: dict[str, float] | None = None
) -> None:
    """Raise ``ValueError`` naming the first flag below its bound: ``at_least`` (``>=``) or
    ``above`` (``>``); a list flag is checked value by value. ``not >=``, so NaN fails too."""
    for bounds, op, ok in ((at_least or {}, ">=", float.__ge__), (above or {}, ">", float.__gt__)):
        for name, low in bounds.items():
            value = getattr(cfg, name)
            if not all(
                ok(float(v), float(low)) for v in (value if isinstance(value, list) else [value])
            ):
                raise ValueError(f"--{name} must be {op} {low:g}, got {value}")


def check_device(device: str) -> None:
    """``--device`` names a device this machine has (a one-line error, not a driver traceback)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(
            f"--device {device!r} is not a torch device (cpu, cuda, cuda:0 ...)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {device} but this machine has {count} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(f"--device {device}: only cpu and cuda devices are supported")


def check_out(out: str | Path) -> None:
    """``--out`` is a folder this process can create or write into: not a file, not below a
    file, and writable (checked before anything is written)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    existing = path
    while not existing.exists():  # the nearest ancestor that exists
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {existing} is not writable")


def run_main(main: Callable[[], Any]) -> None:
    """Run a task's ``main``: user mistakes print one line and exit 2, Ctrl-C exits 130."""
    try:
        main()
        _leave_process_group()
    except (UserError, FileNotFoundError) as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
        sys.exit(130)


def _leave_process_group() -> None:
    """Under torchrun, leave the process group before exiting: a rank that exits with gloo's
    threads still running can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files (``.<name>.<random>.tmp``) that a write killed mid-way left in
    ``folder``; the files they were to replace are intact. Returns those removed."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.glob(".*.*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file and a rename, so a crash keeps the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def set_up_torch(threads: int, device: str = "cpu") -> None:
    """What every benchmark does first: apply ``--threads`` (0 keeps torch's default) and check
    that ``--device`` exists here (a one-line error, not a traceback, when CUDA is missing)."""
    if threads:
        torch.set_num_threads(threads)
    check_device(device)


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts, possibly with different keys: the header is their union in first
    seen order, missing cells empty) as one CSV file, atomically; floats with 6 significant
    digits."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def append_csv(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` to a CSV file, writing the header when the file is new. A row with columns
    the file lacks (a run resumed by a newer version of its script) rewrites the file with them,
    the older rows left blank there, instead of misaligning the columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict[str, str]] = []
    if path.exists():
        with open(path, newline="") as fh:
            old = list(csv.DictReader(fh))
    if old and not set(row) <= set(old[0]):  # new columns: blank in the older rows
        old = [r | {k: "" for k in row if k not in r} for r in old]
        write_csv(path, old)
    header = list(old[0]) if old else list(row)
    with open(path, "a" if old else "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header, restval="")
        if not old:
            w.writeheader()
        w.writerow(row)
        fh.flush()
        os.fsync(fh.fileno())
