"""Output folders that appear whole or not at all: a locked, pid-named temporary folder beside the output,
renamed into place at the end; dead runs' leftovers removed; SIGTERM cleans up; OS errors are one line.

Writers (surgery.io.writer) create files only directly inside a folder handed out here (`open_target`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from pathlib import Path
from typing import Iterator

from stats_formats.atomic import process_alive
from surgery.io.paths import is_plain_name, show
from surgery.io.safetensors_file import CheckpointError


_ACTIVE: dict[tuple[int, int], int] = {}


_ACTIVE_LOCK = threading.Lock()


def open_target(path: str | os.PathLike) -> int:
    """Create `path` for writing, only directly inside a temporary folder of atomic_output_dir.

    The name must be a plain file name; the file is created relative to the folder's descriptor
    with O_EXCL | O_NOFOLLOW, so neither `..`, an absolute name, a symbolic link planted at the
    target, nor an existing file (an input shard, say) can be written through.
    """
    path = Path(path)
    if not is_plain_name(path.name) or path.name != os.path.basename(os.fspath(path)):
        raise CheckpointError(f"{show(path)}: refusing to write: not a plain file name inside the output folder")
    try:
        st = os.stat(path.parent)
    except OSError as e:
        raise CheckpointError(f"{show(path)}: refusing to write: {e.strerror} ({show(path.parent)})") from None
    with _ACTIVE_LOCK:
        dirfd = _ACTIVE.get((st.st_dev, st.st_ino))
    if dirfd is None:
        raise CheckpointError(f"{show(path)}: refusing to write outside the temporary output folder "
                              "(writers create files only directly inside the folder atomic_output_dir hands out)")
    try:
        return os.open(path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                       dir_fd=dirfd)
    except FileExistsError:
        raise CheckpointError(f"{show(path)}: refusing to write: the name already exists in the new output folder "
                              "(two output files with one name?)") from None


TMP_TAG = "moe-surgery-tmp"


OLD_TAG = "moe-surgery-old"


LOCK_TAG = "moe-surgery-lock"


_ENVIRONMENT = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO,
                errno.EMFILE, errno.ENFILE, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.ELOOP,
                errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV, errno.EBUSY, errno.ENOENT, errno.EMLINK}


def _key(name: str) -> str:
    """`name` as the middle of our side files' names `.{key}.moe-surgery-...`, short enough for any
    filesystem (long names are cut and get a hash so that different outputs stay apart)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= 180:
        return name
    return raw[:120].decode("utf-8", "ignore") + "~" + hashlib.sha256(raw).hexdigest()[:16]


def _side_files(out: Path) -> re.Pattern:
    """Our temporary and replaced folders beside `out`: `.{key}.moe-surgery-{tmp|old}-{pid}-{hex}`, and the
    `.{name}.old-{pid}` folders of earlier versions."""
    return re.compile(rf"\.(?:{re.escape(_key(out.name))}\.{TMP_TAG}-(?P<tpid>\d+)-[0-9a-f]+"
                      rf"|{re.escape(_key(out.name))}\.{OLD_TAG}-(?P<opid>\d+)-[0-9a-f]+"
                      rf"|{re.escape(out.name)}\.old-(?P<lpid>\d+))")


def _os_error(out: Path, e: OSError, doing: str) -> CheckpointError:
    what = e.strerror or e.__class__.__name__
    where = f" ({show(e.filename)})" if e.filename and os.fspath(e.filename) != os.fspath(out) else ""
    return CheckpointError(f"{show(out)}: {doing} failed: {what}{where}")


def _rmtree(path: str | os.PathLike) -> None:
    """Remove a folder we made (or a link or file in its place), read-only subfolders included."""
    path = os.fspath(path)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            sub = os.path.join(root, d)
            sst = os.lstat(sub)
            if stat.S_ISDIR(sst.st_mode):
                os.chmod(sub, stat.S_IMODE(sst.st_mode) | stat.S_IRWXU)
    shutil.rmtree(path)


def _make_parent(out: Path) -> None:
    parent = out.parent
    probe = parent
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if os.path.lexists(probe) and not os.path.isdir(probe):
        kind = "a file" if os.path.isfile(probe) else "not a folder"
        raise CheckpointError(f"{show(out)}: cannot create the output folder: {show(probe)} is {kind}, not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise _os_error(out, e, "creating the output folder") from None


class _OutputLock:
    """An exclusive `flock` on `.{name}.moe-surgery-lock` beside the output, for the whole write.

    The lock file is removed while still locked; a run that opened it just before checks, once it
    holds the lock, that the file it locked is still the one at the path, and starts over if not.
    """

    def __init__(self, out: Path):
        self.path = out.parent / f".{_key(out.name)}.{LOCK_TAG}"
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            except OSError as e:
                raise _os_error(out, e, "locking the output") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CheckpointError(f"{show(out)}: another moe-surgery run is writing {show(out)}") from None
            except OSError:
                pass  # a filesystem without flock: go on unlocked rather than refuse to work there
            try:
                now = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            mine = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                self.fd = fd
                return
            os.close(fd)  # removed or replaced by the run that held it: lock the new one

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


class _Signals:
    """SIGTERM (and SIGINT) raise in the main thread while an output is being written, so the
    cleanup runs; inside `hold()` (cleanup, the final renames) they are deferred to its end."""

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.holding = 0
        self.pending: int | None = None

    def _handler(self, signum: int, frame: object) -> None:
        if self.holding:
            self.pending = signum
            return
        self._raise(signum)

    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            current = signal.getsignal(signum)
            if signum == signal.SIGINT and current is not signal.default_int_handler:
                continue  # someone chose how SIGINT behaves: leave it
            if signum == signal.SIGTERM and current not in (signal.SIG_DFL, None):
                continue  # an application handler: leave it
            try:
                signal.signal(signum, self._handler)
            except (ValueError, OSError):
                continue
            self.previous[signum] = current

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous.clear()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
        if not self.holding and self.pending is not None:
            signum, self.pending = self.pending, None
            self._raise(signum)


def _check_target(out: Path, overwrite: bool) -> None:
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    except OSError as e:
        raise _os_error(out, e, "checking the output folder") from None
    if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
        if not overwrite:
            raise CheckpointError(f"{show(out)}: output folder already exists (use --overwrite to replace it)")
        return
    raise CheckpointError(f"{show(out)}: is a file, not a folder"
                          + (" (--overwrite replaces only folders; remove the file yourself)" if overwrite else ""))


def _remove_stale(out: Path) -> None:
    """Temporary and replaced folders of runs that died (their pid is gone) beside `out`. A replaced
    folder goes back to `out` if a run died between moving it aside and putting the new one there."""
    pattern = _side_files(out)
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return
    olds, tmps = [], []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m:
            continue
        pid = int(m["tpid"] or m["opid"] or m["lpid"])
        if pid != os.getpid() and process_alive(pid):
            continue
        (tmps if m["tpid"] else olds).append(entry.path)
    if olds and not os.path.lexists(out):
        newest = max(olds, key=lambda p: os.lstat(p).st_mtime)
        with contextlib.suppress(OSError):
            os.rename(newest, out)
            olds.remove(newest)
    for path in tmps + olds:
        with contextlib.suppress(OSError):
            _rmtree(path)


def _make_tmp(out: Path) -> Path:
    """A new folder beside `out`, mode 0o777 & ~umask like any folder the user makes."""
    for _ in range(100):
        tmp = out.parent / f".{_key(out.name)}.{TMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise _os_error(out, e, "creating the temporary output folder") from None
    raise CheckpointError(f"{show(out)}: cannot find a free temporary folder name beside it")


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the finished folder at `out`; with `overwrite`, the previous one is moved aside, then removed."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        os.rename(tmp, out)
        return
    if not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"{show(out)}: is a file, not a folder (it appeared while the output was written)")
    if not overwrite:
        raise CheckpointError(f"{show(out)}: output folder already exists (it appeared while the output was written)")
    old = out.parent / f".{_key(out.name)}.{OLD_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    try:
        _rmtree(old)
    except OSError as e:
        raise _os_error(out, e, f"the new output is in place, but removing the previous one ({show(old)})") from None


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside `out`; rename it to `out` only if the block succeeds.

    * Only one run writes a given `out` at a time (a `flock` beside it); the second gets a one-line error.
    * The folder is `.{name}.moe-surgery-tmp-{pid}-{hex}`, mode 0o777 & ~umask; those of dead runs
      (and their `.{name}.moe-surgery-old-...` folders) are removed first.
    * Writers (`write_safetensors`, `write_safetensors_hashing`, `rewrite_shard`) only create files
      directly inside it: build their targets with `surgery.io.paths.inside(tmp, name)`.
    * On any exception, SIGTERM or Ctrl-C the temporary folder is removed; OSErrors of the place
      written to (read-only, permission, disk full...) become one-line CheckpointErrors naming `out`.
    * With `overwrite` an existing output folder (or symbolic link) is replaced; a file is refused.
    """
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise CheckpointError(f"{show(out)}: give the output folder a name of its own (not {str(out)!r})")
    _make_parent(out)
    lock = _OutputLock(out)
    signals = _Signals()
    tmp: Path | None = None
    key: tuple[int, int] | None = None
    try:
        _remove_stale(out)
        _check_target(out, overwrite)
        signals.install()
        tmp = _make_tmp(out)
        try:
            dirfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            dst = os.fstat(dirfd)
        except OSError as e:
            raise _os_error(out, e, "opening the temporary output folder") from None
        key = (dst.st_dev, dst.st_ino)
        with _ACTIVE_LOCK:
            _ACTIVE[key] = dirfd
        try:
            yield tmp
        except BaseException as e:
            with signals.hold():
                _unregister(key)
                key = None
                with contextlib.suppress(OSError):
                    _rmtree(tmp)
                tmp = None
            if isinstance(e, OSError) and not isinstance(e, CheckpointError) and e.errno in _ENVIRONMENT:
                raise _os_error(out, e, "writing the output") from None
            raise
        with signals.hold():
            _unregister(key)
            key = None
            try:
                _commit(tmp, out, overwrite)
                tmp = None
            except OSError as e:
                raise _os_error(out, e, "moving the finished output into place") from None
    finally:
        try:
            with signals.hold():
                if key is not None:
                    _unregister(key)
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        _rmtree(tmp)
                lock.release()
        finally:
            signals.restore()


def _unregister(key: tuple[int, int]) -> None:
    with _ACTIVE_LOCK:
        fd = _ACTIVE.pop(key, None)
    if fd is not None:
        os.close(fd)

