"""The one way this package reads an artifact file: regular files only, size bounded, checked first.

`read_file(path, max_bytes)` stats the path (following symlinks) before opening it: missing, a
dangling or looping symlink, a FIFO, a device, a socket or a directory is a `NotRegularFileError`,
a file over `max_bytes` an `OversizedFileError`, both naming the file. It then opens without
blocking (a FIFO swapped in meanwhile cannot hang it), checks the opened file is the one it
stat'ed, and reads at most `max_bytes` (a file growing meanwhile is refused, not read whole).
`check_output_file(path)`: a path a command will write its results to is absent or a regular file
(writing to a FIFO blocks; replacing a device node or following a dangling symlink is never meant).
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import CorruptFileError, NotRegularFileError, OversizedFileError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular(path: str | Path, max_bytes: int) -> os.stat_result:
    """stat(path) of a regular file of at most max_bytes, else the typed error."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotRegularFileError(path, "a dangling symlink" if os.path.islink(path) else "missing") from None
    except OSError as e:
        what = "a symlink loop" if e.errno == errno.ELOOP else f"cannot stat: {e.strerror or e}"
        raise NotRegularFileError(path, what) from None
    _check_stat(path, st, max_bytes)
    return st


def _check_stat(path: Path, st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise NotRegularFileError(path, f"{kind}, not a regular file")
    if st.st_size > max_bytes:
        raise OversizedFileError(path, f"file is {st.st_size} bytes, over the {max_bytes}-byte limit "
                                       "for this kind of file")


def check_output_file(path: str | Path) -> None:
    """Nothing at `path` yet, or a regular file (symlinks followed); else NotRegularFileError."""
    if os.path.lexists(path):
        check_regular(path, 1 << 62)


def read_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes (typed errors otherwise, see the module)."""
    path = Path(path)
    st = check_regular(path, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CorruptFileError(path, f"cannot read: {e.strerror or e}") from None
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise CorruptFileError(path, "replaced while being opened; try again")
        _check_stat(path, now, max_bytes)
        chunks, n = [], 0
        while n <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        if n > max_bytes:
            raise OversizedFileError(path, f"file grew past the {max_bytes}-byte limit while being read")
        return b"".join(chunks)
    except OSError as e:
        raise CorruptFileError(path, f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
