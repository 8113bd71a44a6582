"""FileLock (bgflow_mini.file_lock): one holder at a time, also when the holder removes
the lock file while another process waits on it."""

from __future__ import annotations

import threading
import time

from bgflow_mini.file_lock import FileLock


def test_one_holder_at_a_time(tmp_path) -> None:
    path = tmp_path / "x.lock"
    a, b = FileLock(path), FileLock(path)
    assert a.acquire(blocking=False) and a.held
    assert not b.acquire(blocking=False) and not b.held
    a.release()
    assert b.acquire(blocking=False)
    b.release(remove=True)
    assert not path.exists()
    with FileLock(path) as c:
        assert c.held and not FileLock(path).acquire(blocking=False)
    assert not c.held


def test_a_waiter_on_a_removed_lock_file_locks_the_path_anew(tmp_path) -> None:
    """B waits on the file A holds; A removes it and unlocks. B must then hold the lock
    on the file at the path (not on the removed one), so that C cannot take it too."""
    path = tmp_path / "x.lock"
    a, b, c = FileLock(path), FileLock(path), FileLock(path)
    assert a.acquire()
    waiter = threading.Thread(target=b.acquire)
    waiter.start()
    time.sleep(0.3)  # B has opened the old file and waits in flock
    assert waiter.is_alive()
    a.release(remove=True)
    waiter.join(timeout=10)
    assert b.held and path.exists()
    assert not c.acquire(blocking=False)
    b.release()
    assert c.acquire(blocking=False)
    c.release()
