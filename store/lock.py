"""The store's cross-process write lock: fcntl.flock on a file in the store directory.

Why a lock at all: lance commits are optimistic, and two concurrent merge_insert calls that
insert the SAME new id both succeed, leaving duplicate rows (measured with lancedb 0.40:
4 processes x the same 50 ids gave 53 rows). Serialising writes makes "upsert by id" true.

flock (not fcntl/lockf) because its lock belongs to the open file description: it is
released when that descriptor is closed — including when the process dies, even by
SIGKILL — and closing some other descriptor of the same file does not drop it.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".kyara-store.lock"


class LockTimeout(Exception):
    """The lock stayed held by someone else for longer than the timeout."""


@contextmanager
def flocked(lock_path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on lock_path (created 0600 if missing) for the block.

    Polls with LOCK_NB rather than blocking, so a hung holder gives LockTimeout, not a hang.
    OSError from opening the file (read-only store, permissions) propagates to the caller.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        pause = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{lock_path} held for more than {timeout:g}s") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        yield
    finally:
        os.close(fd)  # releases the lock
