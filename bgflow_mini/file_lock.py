"""An exclusive lock on a file between processes (POSIX ``flock``), safe to remove.

The MD cache and MD checkpoints use it so that two processes never make or resume the same
run at once. A lock file may be removed by its holder when it is done (no stray files);
a process that was waiting on the old file then finds that the path names another file (or
none) and locks the path again, so two processes never both believe they hold the lock.

``flock`` locks are per open file and released by the kernel when the holder exits or is
killed, so a crash never leaves a stale lock. On file systems without locks (some network
or FUSE mounts) and off POSIX, :meth:`FileLock.acquire` raises ``OSError``; on NFS mounted
with local locks (``-o local_lock``), the lock is per machine: processes on different machines
do not see each other's locks.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["FileLock", "NO_LOCKS"]

#: ``errno`` values of :meth:`FileLock.acquire`'s ``OSError`` that mean "this file system has
#: no locks" (callers may go on unlocked); any other error is a real one.
NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


class FileLock:
    """An exclusive advisory lock on ``path`` (the file is created when needed).

    Use :meth:`acquire` / :meth:`release`, or ``with FileLock(path):`` (blocking).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fh: IO[str] | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fh is not None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock: ``True`` once held; ``False`` when ``blocking`` is off and
        another process holds it. ``OSError`` where the file system has no locks (its
        ``errno`` in :data:`NO_LOCKS`) or the file cannot be opened."""
        if self._fh is not None:
            return True
        if fcntl is None:  # pragma: no cover - not POSIX
            raise OSError(errno.ENOTSUP, "file locks need POSIX fcntl.flock")
        while True:
            # read-write: NFS emulates flock with fcntl locks, which want a writable file
            fh = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666), "r+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                fh.close()
                return False
            except BaseException:  # no locks here, or interrupted while waiting
                fh.close()
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            except BaseException:
                fh.close()
                raise
            if same:
                self._fh = fh
                return True
            fh.close()  # the holder removed this file while we waited: lock the path anew

    def release(self, remove: bool = False) -> None:
        """Release the lock (nothing when not held); ``remove`` deletes the lock file
        first, while it is still held."""
        fh, self._fh = self._fh, None
        if fh is None:
            return
        try:
            if remove:
                self.path.unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            fh.close()

    def __enter__(self) -> FileLock:
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
