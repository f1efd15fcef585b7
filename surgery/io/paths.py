"""Rules for file names that come from files we did not write, and for every file we create.

Checkpoints are downloaded from strangers: the shard names in `model.safetensors.index.json`
are data, and joining them onto a folder unchecked lets an index point reads (and, through the
rewriter's output names, writes) anywhere. Two helpers close that:

* `member(folder, name, where)`: the path of a file a checkpoint names (a shard, config.json,
  the index). A plain file name or one level of subfolder, no `..`, not absolute, no backslash,
  NUL or control characters; after resolving symbolic links it stays inside the folder, or it is
  a Hugging Face cache blob (`<repo>/snapshots/<rev>/<file>` -> `<repo>/blobs/<sha>`, see
  `_is_cache_blob`). Any other symbolic link out of the folder is refused.
* `inside(root, name)`: `root / name` for a plain file name only (no separators, not `.`/`..`);
  what every writer of an output file should build its target with.
* `contained(folder, path)`: whether a file of the folder (a side file to copy) resolves inside it.

Both raise `CheckpointError` with a one-line message. `show(path)` renders a path for such a message.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from surgery.errors import CheckpointError

__all__ = ["contained", "inside", "is_plain_name", "member", "short_repr", "show"]

MAX_NAME = 255  # bytes in one path component on every common filesystem


def show(path: str | os.PathLike) -> str:
    """A path as one line of text: as is when printable, else Python's quoted, escaped form."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    return text if text.isprintable() else repr(text)


def short_repr(value: object, limit: int = 120) -> str:
    """`repr(value)` on one line, cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _component_problem(part: str) -> str | None:
    if part == "":
        return "empty path component"
    if part in (".", ".."):
        return f"{part!r} path component"
    if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME:
        return "path component longer than 255 bytes"
    return None


def _name_problem(name: object, max_parts: int) -> str | None:
    """Why `name` is not a relative file name of at most `max_parts` components, or None."""
    if not isinstance(name, str):
        return f"not a string but {type(name).__name__}"
    if name == "":
        return "empty name"
    if "\x00" in name:
        return "NUL character"
    if "\\" in name:
        return "backslash"
    if not name.isprintable():
        return "control character"
    if name.startswith("/"):
        return "absolute path"
    parts = name.split("/")
    if len(parts) > max_parts:
        return "more than one folder level" if max_parts > 1 else "path separator"
    for part in parts:
        problem = _component_problem(part)
        if problem:
            return problem
    return None


def is_plain_name(name: object) -> bool:
    """True for a single file name: a non-empty string without `/`, `\\`, NUL or control characters,
    not `.` or `..`, at most 255 bytes."""
    return _name_problem(name, 1) is None


def inside(root: str | os.PathLike, name: str) -> Path:
    """`root / name` where `name` is a plain file name; anything else raises CheckpointError.

    The writers (`write_safetensors`, `write_safetensors_hashing`, `rewrite_shard`) only create
    files directly inside the temporary folder `atomic_output_dir` hands out, so a target built
    as `inside(tmp, name)` is what they accept; a name taken from an input checkpoint (which may
    hold `sub/x.safetensors`) must be flattened or renamed first.
    """
    problem = _name_problem(name, 1)
    if problem:
        raise CheckpointError(f"{show(Path(root))}: refusing to create {short_repr(name)} there: "
                              f"not a plain file name ({problem})")
    return Path(root) / name


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def _is_cache_blob(real: str, real_folder: str) -> bool:
    """Whether `real` is a Hugging Face cache blob of the repository holding `real_folder`.

    The cache keeps `<repo>/snapshots/<rev>/<file>` -> `../../blobs/<sha>`: the blob is a file named by
    a git sha1 or sha256 in a `blobs` folder whose parent is an ancestor of the checkpoint folder (up to
    three levels up, for a model in a subfolder of its repository).
    """
    blobs = os.path.dirname(real)
    if os.path.basename(blobs) != "blobs" or not _BLOB.fullmatch(os.path.basename(real)):
        return False
    ancestors = [os.path.dirname(real_folder)]
    for _ in range(2):
        ancestors.append(os.path.dirname(ancestors[-1]))
    return os.path.dirname(blobs) in ancestors


def contained(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether `path`, symbolic links resolved, stays inside `folder` or is a Hugging Face cache blob of
    it: what a copier of a checkpoint's side files (tokenizer, README...) should check before copying,
    so that a link like `tokenizer.json -> ~/.ssh/id_ed25519` is not copied (or pushed to the Hub)."""
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(path)
    return _within(real, real_folder) or _is_cache_blob(real, real_folder)


def member(folder: str | os.PathLike, name: object, where: str | os.PathLike | None = None,
           what: str = "shard") -> Path:
    """The path of a regular file a checkpoint folder names, checked (see the module docstring).

    `where` is the file that names it (the index) and leads the error message ("INDEX: names shard
    'x', which is missing"); without it the message leads with the file's own path ("DIR/config.json:
    missing"). `what` says what the name is ("shard").
    """
    path = Path(folder) / name if isinstance(name, str) else Path(folder)

    def fail(problem: str) -> CheckpointError:
        if where is None:
            return CheckpointError(f"{show(path)}: {problem}")
        return CheckpointError(f"{show(where)}: names {what} {short_repr(name)}, which is {problem}")

    problem = _name_problem(name, 2)
    if problem:
        raise fail(f"not a file name inside the checkpoint folder ({problem})")
    if not contained(folder, path):
        if not os.path.lexists(path) and not os.path.islink(path.parent):
            raise fail("missing")
        raise fail(f"a symbolic link to {show(os.path.realpath(path))}, outside the checkpoint folder "
                   "(refused: copy the file into the folder)")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise fail("a broken symbolic link" if os.path.lexists(path) else "missing") from None
    except OSError as e:
        raise fail(f"not readable ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise fail("a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise fail("not a regular file")
    return path
