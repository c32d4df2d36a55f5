"""Writing run and sweep files: atomic replacement, and a disk that refuses a write as one line.

A full, read-only or forbidden disk is the user's to fix, not a bug: ``writing(path)`` turns the
OSError (or safetensors' wrapped one) into a UserError that names the path and the system's reason,
and ``write_atomic`` writes a temp file beside the target and renames it over the target, removing
the temp file when anything fails, so neither a kill nor a full disk leaves half a file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from peftlab.errors import UserError

# full, over quota, too large, read-only, no permission: what the user can fix
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


class DiskError(UserError):
    """A write the disk refused (full, read-only, no permission): the user's to fix, one line."""


_WRAPPED_ERRNO = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) words the OS error it wraps


def disk_errno(error: BaseException) -> int | None:
    """The errno of a refused write, also when a library wrapped the OSError in its own type."""
    if isinstance(error, OSError):
        return error.errno
    found = _WRAPPED_ERRNO.search(str(error))
    return int(found.group(1)) if found else None


def disk_message(path: str | Path, code: int) -> str:
    return f"cannot write {path}: {os.strerror(code)} ({errno.errorcode.get(code, code)})"


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Report a write the disk refuses (DISK_ERRNOS) as a one-line UserError naming ``path``."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised unless it is a refused write
        code = disk_errno(error)
        if code not in DISK_ERRNOS:
            raise
        raise DiskError(disk_message(path, code)) from None


def temporary_path(path: Path) -> Path:
    """The temp file beside ``path`` that an atomic write renames into place (per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` by temp file + rename: a reader, a kill or a full disk never leaves half a file."""
    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)

    write_atomic_by(path, write)


def write_atomic_by(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` fills the temp file beside ``path`` (safetensors' save_file, say), then it is
    renamed into place: the one atomic writer, whatever the format. On failure the temp file is removed
    and ``path`` keeps what it held (a previous checkpoint survives a full disk)."""
    path = Path(path)
    temporary = temporary_path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(temporary)
            os.replace(temporary, path)
        except BaseException:
            remove_quietly(temporary)
            raise


def remove_quietly(path: Path) -> None:
    """Remove a temp file if it is there; a failure to remove it must not hide the error being raised."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def append_line(path: Path, line: str) -> None:
    """Append one line; when the disk refuses part of it, cut the file back so no torn line is left."""
    with writing(path):
        size = path.stat().st_size if path.exists() else 0
        try:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        except BaseException:
            with contextlib.suppress(OSError):
                if path.exists() and path.stat().st_size > size:
                    os.truncate(path, size)
            raise


def read_json_object(path: Path) -> dict | None:
    """A JSON object read back from ``path``, or None when it is missing, torn or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
