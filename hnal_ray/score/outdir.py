"""The output folder of a scoring job: checked before any work, and held by one writer at a time.

The lock is an OS file lock (`flock`) on `DIR/.lock`, held for the whole run and released by the
kernel when the process dies, so a killed run never leaves a stale lock behind.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path

from hnal_ray.config import ScoreInputs
from hnal_ray.io import InputError


def check_out(out: Path, inputs: ScoreInputs) -> None:
    """A usable --out: a directory (or creatable), writable, not inside an input's directory (a
    re-run would read its own outputs as input), and holding no input (an output would replace it);
    both checked on resolved paths, through symlinks."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out exists and is not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{parent}: --out {out} is not writable")
    resolved = out.resolve()
    for role, path in (("paired images", inputs.paired_images), ("paired texts", inputs.paired_texts),
                       ("pool", inputs.pool)):
        p = Path(path).resolve()
        if p.is_dir() and (resolved == p or p in resolved.parents):
            raise InputError(f"{out}: --out is inside the {role} directory {path}; choose another --out")
        if resolved in p.parents:
            raise InputError(f"{out}: the {role} input {path} is inside --out, where outputs would replace it; "
                             f"choose another --out")


@contextlib.contextmanager
def out_lock(out: Path, wait: bool = False):
    """Hold `out`'s lock for the block; another holder makes this raise at once (or wait, with
    `wait`). A folder this call created is removed again if the block fails on bad input."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise InputError(f"{out}: another run (pid {holder}) is writing this --out; wait for it, "
                             f"or pass --wait") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        except InputError:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
    finally:
        os.close(fd)
