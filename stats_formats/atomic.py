"""Atomic writes: a temporary file in the target folder, renamed over the target once complete.

* The temporary file is `.{name}.stats-tmp-{pid}-{hex}` beside the target; those of runs that died
  (their pid is gone) are removed by the next write of the same target.
* SIGTERM during the write (main thread, default handler) removes the temporary file, then exits 143.
* The file gets mode 0o666 & ~umask, like any file the user makes; the folder is fsynced after the rename.
* Every OSError (disk full, read-only file system, permission...) is a one-line StatsError naming the target.

Never imports surgery (the format package stands alone).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

from safetensors import SafetensorError

from stats_formats.errors import StatsError, one_line

PathLike = str | os.PathLike[str]

TMP_TAG = "stats-tmp"


def _umask() -> int:
    """The process umask, read without changing it where /proc says it (else set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user counts as alive): dead runs' temporaries may go."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _remove_stale(path: Path) -> None:
    """Temporary files of dead runs writing `path`."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{TMP_TAG}-(\d+)-[0-9a-f]+")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m and int(m[1]) != os.getpid() and not process_alive(int(m[1])):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While writing, SIGTERM raises SystemExit(143) in the main thread so the cleanup runs."""
    installed = False
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _raise_exit)
                installed = True
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _error(path: Path, e: OSError) -> StatsError:
    what = e.strerror or errno.errorcode.get(e.errno or 0) or type(e).__name__
    return StatsError(f"{path}: cannot write ({one_line(what)})")


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder then rename, so readers never see half a file."""
    path = Path(path)
    _remove_stale(path)
    tmp: str | None = None
    with _sigterm_raises():
        try:
            for _ in range(100):
                tmp = os.fspath(path.parent / f".{path.name}.{TMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}")
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
                except FileExistsError:
                    tmp = None
                    continue
                os.close(fd)
                break
            if tmp is None:
                raise StatsError(f"{path}: cannot write (no free temporary name beside it)")
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            _fsync_folder(path.parent)
        except OSError as e:
            raise _error(path, e) from None
        except SafetensorError as e:  # the Rust writer reports the OS error as text ("... (os error 28)")
            m = re.search(r"os error (\d+)", str(e))
            what = os.strerror(int(m[1])) if m else one_line(e)
            raise StatsError(f"{path}: cannot write ({what})") from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Exports go through the same temp-and-rename path as statistics files."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
