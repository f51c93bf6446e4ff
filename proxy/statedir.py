"""One gateway per ``state.dir``: a lock file held for the process's life.

The files there (``keys.json``, ``quota.json``, ``instance-id``) are each written by one process
that keeps their content in memory and rewrites them whole: two gateways on one folder would
overwrite each other's keys and quota counts without a word, and share one instance id (so one
quota share) on Redis. A second ``tollway serve`` with the same ``state.dir`` therefore refuses
to start, naming the process that holds it. The lock is ``flock``: the kernel drops it when its
holder dies, however it dies, so a killed gateway never leaves a folder locked. With
``--workers`` the parent holds it and each worker holds its own ``worker-K`` folder below it.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path

LOCK_NAME = "tollway.lock"
INSTANCE_FILE = "instance-id"


class StateDirInUse(Exception):
    """Another live process holds the folder's lock; the message names it."""


def hold(folder: str | Path) -> int:
    """Take ``folder``'s lock (creating the folder) and write this pid into it; returns the
    descriptor to keep open for the process's life. Raises StateDirInUse."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise StateDirInUse(f"state.dir {folder} is in use by pid {holder}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def instance_id(folder: Path | None) -> str:
    """This instance's stable name on shared state (its quota and budget shares, its webhook
    claims): kept in ``folder/instance-id``, written by whichever part asks first, so every
    part names the instance alike and a restart keeps the name; new per process without a
    folder. Each instance needs a ``state.dir`` of its own (``hold``)."""
    if folder is None:
        return "i-" + secrets.token_hex(6)
    path = folder / INSTANCE_FILE
    if path.exists():
        return path.read_text().strip()
    folder.mkdir(parents=True, exist_ok=True)
    name = "i-" + secrets.token_hex(6)
    path.write_text(name + "\n")
    return name
