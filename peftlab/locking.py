"""One process per folder: an exclusive lock on DIR/.lock for a run's or a sweep's whole life.

``fcntl.flock`` on a lock file inside the folder, non-blocking: a second ``peftlab run`` (or sweep)
into a folder in use stops at once with one line naming the holder's pid, which the holder writes
into the lock file ("<pid> <run|sweep|...>"). The kernel releases the lock when its holder exits,
however it ends (kill -9 included), so a stale lock file never blocks a later run. The file stays in the folder once it
holds anything else: unlinking a lock file that another process may be about to lock would let two
processes hold "the" lock. A folder this process created and that is left holding only the lock
file (a run that stopped on a user mistake before writing anything) is removed again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from peftlab.diskio import writing
from peftlab.errors import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def folder_lock(directory: str | Path, what: str = "run") -> Iterator[None]:
    """Hold DIR/.lock exclusively while the block runs; UserError when another process holds it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file, not a folder; choose another --out")
    created = _missing_ancestors(directory)
    path = directory / LOCK_FILE
    try:
        with writing(path):
            directory.mkdir(parents=True, exist_ok=True)
            fd = _locked(path, what)
    except BaseException:
        _remove(None, created)
        raise
    try:
        with writing(path):  # who holds it, for the message of a process refused (see _holder)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        yield
    finally:
        if created and _holds_only_lock(directory):
            _remove(path, created)
        os.close(fd)


def _locked(path: Path, what: str) -> int:
    """An open descriptor of the lock file with the lock taken, retried if the file was replaced meanwhile."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(f"{path.parent} is in use by another peftlab process ({holder}); wait for it to end, "
                            f"or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder may have removed the file (see _remove) after this process opened it
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _holder(fd: int) -> str:
    """"pid 123, a sweep" from the lock file's "<pid> <what>" line."""
    try:
        pid, _, what = os.pread(fd, 128, 0).decode("ascii", "replace").strip().partition(" ")
    except OSError:
        pid, what = "", ""
    if not pid.isdigit():
        return "pid not yet written"
    return f"pid {pid}" + (f", a {what}" if what else "")


def _missing_ancestors(directory: Path) -> list[Path]:
    """The folders mkdir will create for ``directory``, deepest first."""
    missing = []
    for folder in (directory, *directory.absolute().parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _holds_only_lock(directory: Path) -> bool:
    try:
        return [entry.name for entry in directory.iterdir()] == [LOCK_FILE]
    except OSError:
        return False


def _remove(path: Path | None, created: list[Path]) -> None:
    """Remove the lock file (still held) and the folders made for it, deepest first, while empty."""
    with contextlib.suppress(OSError):
        if path is not None:
            path.unlink()
        for folder in created:
            folder.rmdir()
