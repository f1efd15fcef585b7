"""Hostile checkpoints and hostile places to write: surgery.io must answer with one-line
CheckpointErrors, never read or write outside the folders it was given, and never leave
temporary folders behind.

* Fuzzing: a seeded mutation loop over safetensors headers and over shard indexes.
* The shard index: `..`, absolute names, symbolic links out of the folder (Hugging Face cache
  blobs excepted), wrong types, subfolders, directories.
* Writers: only directly inside atomic_output_dir's temporary folder, never through a link.
* atomic_output_dir: parent or output is a file, read-only / permission / disk full, stale
  folders of dead runs, a lock against a second writer, SIGTERM, the folder mode, --overwrite.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest

import surgery.io.output_dir as output_dir
from surgery.io import (
    INDEX_NAME,
    Checkpoint,
    CheckpointError,
    OutTensor,
    SafetensorsFile,
    atomic_output_dir,
    inside,
    is_plain_name,
    rewrite_shard,
    write_safetensors,
    write_safetensors_hashing,
)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# helpers


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert message and "\n" not in message and "\r" not in message, message
    return message


def overwrite(path: Path, data: bytes) -> None:
    """Replace a file's bytes in place (write, then cut to length): truncating to zero on every fuzz
    iteration costs a millisecond on some filesystems, this costs microseconds."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def side_files(folder: Path, out_name: str) -> list[str]:
    """Our temporary, replaced and lock files beside an output called `out_name`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{out_name}."))


TENSORS = [
    ("a.weight", "F32", (2, 3)),
    ("b.bias", "BF16", (5,)),
    ("c.scale", "U8", (4, 2)),
    ("d.empty", "F16", (0, 7)),
]


def tensors(seed: int = 0) -> list[OutTensor]:
    rng = random.Random(seed)
    out = []
    for name, dtype, shape in TENSORS:
        t = OutTensor(name, dtype, shape)
        t.data = bytes(rng.randrange(256) for _ in range(t.nbytes))
        out.append(t)
    return out


def make_shards(folder: Path, names: dict[str, list[OutTensor]]) -> Path:
    """Write safetensors files with the real writer (through atomic_output_dir) into a new `folder`."""
    with atomic_output_dir(folder) as tmp:
        for name, ts in names.items():
            write_safetensors(inside(tmp, name), ts, {"format": "pt"})
    return folder


def valid_shard_bytes(tmp_path: Path) -> bytes:
    folder = make_shards(tmp_path / "seed", {"model.safetensors": tensors()})
    return (folder / "model.safetensors").read_bytes()


def split_tensors(prefix: str) -> list[OutTensor]:
    ts = tensors()
    for t in ts:
        t.name = f"{prefix}.{t.name}"
    return ts


def make_checkpoint(folder: Path, shards: dict[str, str] | None = None) -> Path:
    """A two-shard checkpoint: config.json, model.safetensors.index.json and the shards, optionally
    stored under other names (`shards` maps the index's name to the file's path inside `folder`)."""
    shards = shards or {}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    made = make_shards(folder.parent / f".{folder.name}-shards", {
        "model-00001-of-00002.safetensors": split_tensors("x"),
        "model-00002-of-00002.safetensors": split_tensors("y"),
    })
    weight_map = {}
    for original in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        name = next((k for k, v in shards.items() if v == original), original)
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made / original, target)
        for t in SafetensorsFile(made / original).tensors:
            weight_map[t] = name
    shutil.rmtree(made)
    write_index(folder, weight_map)
    return folder


def write_index(folder: Path, weight_map: object, **extra: object) -> None:
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map, **extra}))


def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX_NAME).read_text())["weight_map"]


def remap(folder: Path, old: str, new: str) -> None:
    write_index(folder, {k: new if v == old else v for k, v in weight_map(folder).items()})


SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


# ---------------------------------------------------------------------------------------------
# fuzzing the header parser


JUNK = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"null", b"true", b"-", b"1e999", b"NaN", b"Infinity",
        b"-Infinity", b"\\u0000", b"\\ud800", b"\\", b"\x00", b"\xff", b"\xc0\x80", "é\u202e".encode(),
        b"9" * 5000, b"1" * 30, b"[" * 5000, b'"__metadata__":', b'"dtype":', b'"shape":[-1]',
        b'"data_offsets":[0,0]', b" " * 9, b"\n"]

WRONG = [None, True, 1.5, -1, 0, 2**64, 10**30, -(10**30), "F32", "", "\ud800", "a\nb", [], {}, [1, 2, 3],
         [-1], [1.0], [True], ["1"], [2**63], [2**64, 0], [[1]], {"a": 1}, [0] * 2000, [2**40] * 40]


def _encode(rng: random.Random, header: object) -> bytes:
    raw = json.dumps(header, ensure_ascii=rng.random() < 0.5, allow_nan=True).encode("utf-8", "surrogatepass")
    return raw + b" " * (-len(raw) % 8)


def mutate_header(rng: random.Random, base: bytes) -> bytes:
    """One hostile variant of a valid safetensors file."""
    (hlen,) = struct.unpack("<Q", base[:8])
    header_raw, data = base[8:8 + hlen], base[8 + hlen:]
    kind = rng.randrange(9)
    if kind == 0:  # bit flips anywhere in the length or the header
        raw = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(8 + hlen)
            raw[i] ^= 1 << rng.randrange(8)
        return bytes(raw)
    if kind == 1:  # truncation
        return base[:rng.randrange(len(base))]
    if kind == 2:  # another header length
        new = rng.choice([0, 1, 7, hlen - 1, hlen + 1, hlen + 8, len(base), 2**63, 2**64 - 1,
                          100 * 1024 * 1024 + 1, rng.randrange(2**64)])
        return struct.pack("<Q", new) + base[8:]
    if kind == 3:  # JSON junk inserted (length adjusted, so the JSON parser sees it)
        raw = bytearray(header_raw)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(raw) + 1)
            raw[i:i] = rng.choice(JUNK)
        return struct.pack("<Q", len(raw)) + bytes(raw) + data
    if kind == 4:  # bytes deleted or replaced inside the header (length adjusted)
        raw = bytearray(header_raw)
        i = rng.randrange(len(raw))
        j = min(len(raw), i + rng.randint(1, 20))
        raw[i:j] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 4)))
        return struct.pack("<Q", len(raw)) + bytes(raw) + data
    # structured edits of the parsed header
    header = json.loads(header_raw)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    if kind == 5:  # a field of the wrong type or value
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][field] = rng.choice(WRONG + [rng.choice(["F8_E4M3", "F4", "F6_E2M3", "C64", "I64"])])
    elif kind == 6:  # overlapping, reversed or out-of-range offsets, or shapes that disagree with them
        entry = header[name]
        b, e = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b - 1, e - 1], [e, b], [b, e + len(data)], [0, e - b],
                                            [b + 2, e + 2], [-8, e], [b, 2**64]])
        if rng.random() < 0.3:
            entry["shape"] = [-d for d in entry["shape"]] or [-1]
    elif kind == 7:  # the whole header or an entry replaced, metadata of the wrong type
        choice = rng.randrange(5)
        if choice == 0:
            header = rng.choice(WRONG)
        elif choice == 1:
            header[name] = rng.choice(WRONG)
        elif choice == 2:
            header["__metadata__"] = rng.choice(WRONG)
        elif choice == 3:
            del header[name][rng.choice(["dtype", "shape", "data_offsets"])]
        else:
            header = {"__metadata__": {"k": [[[[1]]]]}, **{k: v for k, v in header.items() if k != "__metadata__"}}
    else:  # unicode and odd tensor names, duplicated keys
        entry = header.pop(name)
        new = rng.choice(["", "\ud800", "a\nb", "\u202e\u0000x", "é" * 300, "__metadata__", "../x", "名前"])
        header[new] = entry
        if rng.random() < 0.5:
            raw = _encode(rng, header)
            empty = b':{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
            dup = b"{" + json.dumps(new).encode("utf-8", "surrogatepass") + empty + raw[1:]
            return struct.pack("<Q", len(dup)) + dup + data
    raw = _encode(rng, header)
    return struct.pack("<Q", len(raw)) + raw + data


def test_fuzz_safetensors_header(tmp_path: Path) -> None:
    base = valid_shard_bytes(tmp_path)
    assert len(SafetensorsFile(tmp_path / "seed" / "model.safetensors").tensors) == len(TENSORS)
    rng = random.Random(20261203)
    path = tmp_path / "fuzz.safetensors"
    accepted = refused = 0
    slowest = 0.0
    for i in range(20_000):
        blob = mutate_header(rng, base)
        overwrite(path, blob)
        start = time.perf_counter()
        try:
            f = SafetensorsFile(path)
        except CheckpointError as e:
            slowest = max(slowest, time.perf_counter() - start)
            message = str(e)
            assert "\n" not in message and "\r" not in message, (i, message)
            assert message.startswith(str(path)), (i, message)
            refused += 1
            continue
        except BaseException as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"mutation {i}: {type(e).__name__}: {e!r} on {blob[:200]!r}")
        accepted += 1
        # whatever is accepted is consistent: every tensor inside the file, no two overlapping
        spans = sorted((t.begin, t.end) for t in f.tensors.values())
        assert all(8 <= b <= e <= len(blob) for b, e in spans), i
        assert all(e0 <= b1 for (_, e0), (b1, _) in zip(spans, spans[1:])), i
    print(f"header fuzz: {refused} refused, {accepted} accepted")
    assert refused > 15_000 and accepted > 0, (refused, accepted)
    assert slowest < 2.0, f"a hostile header took {slowest:.1f} s to refuse"  # no quadratic blow-ups


@pytest.mark.parametrize("case", ["nan", "infinity", "float dim", "bool dim", "string shape", "list dtype",
                                  "duplicate key", "deep nesting", "huge integer", "fifo"])
def test_header_cases_the_old_parser_let_through(tmp_path: Path, case: str) -> None:
    """Each of these crashed (OverflowError, TypeError, RecursionError, ValueError), hung, or was accepted."""
    base = valid_shard_bytes(tmp_path)
    (hlen,) = struct.unpack("<Q", base[:8])
    header = json.loads(base[8:8 + hlen])
    data = base[8 + hlen:]
    raw: bytes
    if case == "nan":
        raw = json.dumps(header).encode().replace(b"[0, 24]", b"[NaN, 24]")
        assert b"NaN" in raw
    elif case == "infinity":
        raw = json.dumps(header).encode().replace(b"[0, 24]", b"[0, Infinity]")
        assert b"Infinity" in raw
    elif case == "float dim":
        header["a.weight"]["shape"] = [2.0, 3.0]
        raw = json.dumps(header).encode()
    elif case == "bool dim":
        header["b.bias"]["shape"] = [5, True]
        raw = json.dumps(header).encode()
    elif case == "string shape":
        header["b.bias"]["shape"] = "5"
        raw = json.dumps(header).encode()
    elif case == "list dtype":
        header["a.weight"]["dtype"] = ["F32"]
        raw = json.dumps(header).encode()
    elif case == "duplicate key":
        text = json.dumps(header)
        raw = ('{"a.weight": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, ' + text[1:]).encode()
    elif case == "deep nesting":
        raw = b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    elif case == "huge integer":
        raw = json.dumps(header).replace("[2, 3]", "[2, " + "9" * 5000 + "]").encode()
    else:
        path = tmp_path / "pipe.safetensors"
        os.mkfifo(path)
        with pytest.raises(CheckpointError, match="not a regular file") as e:
            SafetensorsFile(path)
        one_line(e)
        return
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "case.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    assert str(path) in one_line(e)


# ---------------------------------------------------------------------------------------------
# fuzzing the index parser


def mutate_index(rng: random.Random, base: bytes, pool: list[object]) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:
        raw = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return bytes(raw)
    if kind == 1:
        return base[:rng.randrange(len(base))]
    if kind == 2:
        raw = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(raw) + 1)
            raw[i:i] = rng.choice(JUNK)
        return bytes(raw)
    doc = json.loads(base)
    wm = doc["weight_map"]
    if kind == 3:  # a shard name replaced by a hostile one, for one tensor or all of a shard
        shard = rng.choice(sorted(set(wm.values())))
        value = rng.choice(pool)
        for k in [k for k, v in wm.items() if v == shard][: rng.choice([1, 100])]:
            wm[k] = value
    elif kind == 4:  # wrong types at every level
        where = rng.randrange(4)
        if where == 0:
            doc = rng.choice(WRONG)
        elif where == 1:
            doc["weight_map"] = rng.choice(WRONG)
        elif where == 2:
            doc["metadata"] = rng.choice(WRONG)
        else:
            wm[rng.choice(sorted(wm))] = rng.choice(WRONG)
    elif kind == 5:  # tensors added, removed or renamed
        k = rng.choice(sorted(wm))
        if rng.random() < 0.5:
            del wm[k]
        else:
            wm[k + rng.choice(["x", "\ud800", "\n", ""])] = wm[k]
    else:
        del doc[rng.choice(["weight_map", "metadata"])]
    return json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def test_fuzz_index(tmp_path: Path) -> None:
    outside = make_checkpoint(tmp_path / "outside")
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"sub/{SHARD2}": SHARD2})
    (ckpt / "folder.safetensors").mkdir()
    os.mkfifo(ckpt / "pipe.safetensors")
    (ckpt / "evil.safetensors").symlink_to(outside / SHARD1)
    (ckpt / "evildir").symlink_to(outside)
    (ckpt / "inner.safetensors").symlink_to(SHARD1)
    base = (ckpt / INDEX_NAME).read_bytes()
    assert len(Checkpoint(ckpt).names()) == 2 * len(TENSORS)
    real_root = os.path.realpath(ckpt)
    pool: list[object] = [
        f"../outside/{SHARD1}", f"../ckpt/{SHARD1}", str(outside / SHARD1), f"/{SHARD1}", f"./{SHARD1}",
        f"sub/../{SHARD1}", f"sub//{SHARD2}", f"sub/{SHARD2}", f"sub\\{SHARD2}", f"{SHARD1}\x00", "", ".", "..",
        "sub", "a/b/c.safetensors", "folder.safetensors", "pipe.safetensors", "evil.safetensors",
        f"evildir/{SHARD1}", "inner.safetensors", "config.json", INDEX_NAME, "x" * 300, "\ud800", "名前.safetensors",
        "a\nb", SHARD1, SHARD2, f"{SHARD1}/", f"~/{SHARD1}", "C:\\x", 7, None, [SHARD1], {"a": SHARD1},
    ]
    rng = random.Random(1203)
    index = ckpt / INDEX_NAME
    accepted = refused = 0
    for i in range(4_000):
        blob = mutate_index(rng, base, pool)
        overwrite(index, blob)
        try:
            c = Checkpoint(ckpt)
        except CheckpointError as e:
            message = str(e)
            assert "\n" not in message and "\r" not in message, (i, message)
            refused += 1
            continue
        except BaseException as e:  # noqa: BLE001
            pytest.fail(f"mutation {i}: {type(e).__name__}: {e!r} on {blob[:300]!r}")
        accepted += 1
        for f in c.files.values():  # whatever is accepted reads only files inside the folder
            assert os.path.realpath(f.path).startswith(real_root + os.sep), (i, f.path)
        c.close()
    print(f"index fuzz: {refused} refused, {accepted} accepted")
    assert refused > 2_500 and accepted > 0, (refused, accepted)


# ---------------------------------------------------------------------------------------------
# the index: names, links, types


def test_baseline_checkpoint_loads(tmp_path: Path) -> None:
    c = Checkpoint(make_checkpoint(tmp_path / "m"))
    assert c.shard_names == [SHARD1, SHARD2] and len(c.names()) == 2 * len(TENSORS)
    assert c.read_bytes("x.a.weight") == tensors()[0].data


@pytest.mark.parametrize("name", [f"../m/{SHARD2}", f"../other/{SHARD2}", f"sub/../{SHARD2}", f"./{SHARD2}",
                                  f"a/b/{SHARD2}", f"sub\\{SHARD2}", f"{SHARD2}\x00.txt", "", "..", "."])
def test_index_names_outside_or_odd_paths_are_refused(tmp_path: Path, name: str) -> None:
    m = make_checkpoint(tmp_path / "m")
    (tmp_path / "other").mkdir()
    shutil.copyfile(m / SHARD2, tmp_path / "other" / SHARD2)
    remap(m, SHARD2, name)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(m)
    line = one_line(e)
    assert line.startswith(str(m / INDEX_NAME)) and "not a file name inside the checkpoint folder" in line


def test_absolute_shard_path_is_refused(tmp_path: Path) -> None:
    m = make_checkpoint(tmp_path / "m")
    remap(m, SHARD2, str(m / SHARD2))  # even one that points at the folder's own file
    with pytest.raises(CheckpointError, match="absolute path") as e:
        Checkpoint(m)
    assert str(m / INDEX_NAME) in one_line(e)


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    m = make_checkpoint(tmp_path / "m")
    victim = make_checkpoint(tmp_path / "victim")
    (m / SHARD2).unlink()
    (m / SHARD2).symlink_to(victim / SHARD2)
    with pytest.raises(CheckpointError, match="symbolic link .*outside the checkpoint folder") as e:
        Checkpoint(m)
    assert SHARD2 in one_line(e)


def test_symlinked_subfolder_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    m = make_checkpoint(tmp_path / "m")
    victim = make_checkpoint(tmp_path / "victim")
    (m / "sub").symlink_to(victim)
    remap(m, SHARD2, f"sub/{SHARD2}")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder") as e:
        Checkpoint(m)
    one_line(e)


def test_symlink_inside_the_folder_is_fine(tmp_path: Path) -> None:
    m = make_checkpoint(tmp_path / "m", {f"real/{SHARD2}": SHARD2})
    (m / "alias.safetensors").symlink_to(Path("real") / SHARD2)
    remap(m, f"real/{SHARD2}", "alias.safetensors")
    assert Checkpoint(m).shard_names == ["alias.safetensors", SHARD1]


def hf_cache(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint laid out like the Hugging Face cache: snapshot files are relative links to blobs."""
    plain = make_checkpoint(tmp_path / "plain", {f"sub/{SHARD2}": SHARD2})
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / ("c0ffee" * 6 + "abcd")
    for f in [p for p in plain.rglob("*") if p.is_file()]:
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(plain)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo, snapshot


def test_hf_cache_blob_links_are_legal(tmp_path: Path) -> None:
    repo, snapshot = hf_cache(tmp_path)
    assert os.readlink(snapshot / SHARD1).startswith("../../blobs/")
    c = Checkpoint(snapshot)
    assert c.shard_names == [SHARD1, f"sub/{SHARD2}"]
    assert c.read_bytes("y.a.weight") == tensors()[0].data


@pytest.mark.parametrize("where", ["other repo's blobs", "not a hash", "blobs elsewhere"])
def test_links_to_other_blobs_are_refused(tmp_path: Path, where: str) -> None:
    repo, snapshot = hf_cache(tmp_path)
    data = (snapshot / SHARD1).read_bytes()
    name = hashlib.sha256(data).hexdigest()
    if where == "other repo's blobs":
        blob = tmp_path / "hub" / "models--evil--x" / "deeper" / "still" / "blobs" / name
    elif where == "not a hash":
        blob = repo / "blobs" / "passwd"
    else:
        blob = tmp_path / "elsewhere" / "blobs" / name
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    (snapshot / SHARD1).unlink()
    (snapshot / SHARD1).symlink_to(blob)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder") as e:
        Checkpoint(snapshot)
    one_line(e)


def test_non_string_weight_map_value(tmp_path: Path) -> None:
    m = make_checkpoint(tmp_path / "m")
    wm = weight_map(m)
    wm["x.a.weight"] = ["model-00001-of-00002.safetensors"]
    write_index(m, wm)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(m)
    assert one_line(e) == f"{m / INDEX_NAME}: weight_map value for 'x.a.weight' is not a string"


@pytest.mark.parametrize("doc, problem", [
    ([], "not a JSON object"),
    ({"weight_map": [["a", "b"]]}, "weight_map is not an object"),
    ({"metadata": {}}, "no weight_map"),
    ({"weight_map": {}}, "weight_map is empty"),
    ({"metadata": "big", "weight_map": {"x.a.weight": SHARD1}}, "metadata is not an object"),
])
def test_wrong_typed_index(tmp_path: Path, doc: object, problem: str) -> None:
    m = make_checkpoint(tmp_path / "m")
    (m / INDEX_NAME).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=problem) as e:
        Checkpoint(m)
    assert one_line(e).startswith(str(m / INDEX_NAME))


def test_subfolder_shard_is_legal(tmp_path: Path) -> None:
    m = make_checkpoint(tmp_path / "m", {f"weights/{SHARD2}": SHARD2})
    c = Checkpoint(m)
    assert c.shard_names == [SHARD1, f"weights/{SHARD2}"]
    assert c.file_of("y.b.bias").path == m / "weights" / SHARD2


def test_directory_as_shard(tmp_path: Path) -> None:
    m = make_checkpoint(tmp_path / "m")
    (m / SHARD2).unlink()
    (m / SHARD2).mkdir()
    with pytest.raises(CheckpointError, match="is a directory") as e:
        Checkpoint(m)
    assert "missing" not in one_line(e)


def test_missing_shard_still_says_missing(tmp_path: Path) -> None:
    m = make_checkpoint(tmp_path / "m")
    (m / SHARD2).unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{SHARD2}', which is missing") as e:
        Checkpoint(m)
    one_line(e)


def test_fifo_as_shard_does_not_hang(tmp_path: Path) -> None:
    m = make_checkpoint(tmp_path / "m")
    (m / SHARD2).unlink()
    os.mkfifo(m / SHARD2)
    with pytest.raises(CheckpointError, match="not a regular file") as e:
        Checkpoint(m)
    one_line(e)


def test_model_path_is_a_file(tmp_path: Path) -> None:
    m = make_checkpoint(tmp_path / "m")
    with pytest.raises(CheckpointError) as e:
        Checkpoint(m / SHARD1)
    assert one_line(e) == f"{m / SHARD1}: is a file, not a checkpoint folder"


def test_config_link_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    m = make_checkpoint(tmp_path / "m")
    secret = tmp_path / "secret.json"
    secret.write_text('{"model_type": "toy", "token": "hf_secret"}')
    (m / "config.json").unlink()
    (m / "config.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder") as e:
        Checkpoint(m)
    one_line(e)


def test_prune_refuses_an_index_that_names_the_input_through_dotdot(tiny, cli, tmp_path: Path) -> None:
    """The reported attack: `../m/<shard>` made prune write through the input's own shards."""
    from tiny_models import folder_digest

    src = Path(shutil.copytree(tiny("qwen3_moe", "per-expert"), tmp_path / "m"))
    doc = json.loads((src / INDEX_NAME).read_text())
    doc["weight_map"] = {k: f"../m/{v}" for k, v in doc["weight_map"].items()}
    (src / INDEX_NAME).write_text(json.dumps(doc))
    before = folder_digest(src)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep": {"0": [0, 1, 2, 3, 5, 6], "2": [1, 2, 3, 4, 6, 7]}}))
    result = cli("prune", src, "--plan", plan, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and INDEX_NAME in lines[0] and "../m/" in lines[0], result.output
    assert folder_digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "plan.json"]


# ---------------------------------------------------------------------------------------------
# writers


def test_inside_accepts_plain_names_only(tmp_path: Path) -> None:
    assert inside(tmp_path, "model-00001-of-00002.safetensors") == tmp_path / "model-00001-of-00002.safetensors"
    assert is_plain_name("x.safetensors") and not is_plain_name("a/b")
    for bad in ["../x", "a/b", "/etc/passwd", ".", "..", "", "a\\b", "a\x00b", "a\nb", "x" * 256]:
        with pytest.raises(CheckpointError, match="not a plain file name") as e:
            inside(tmp_path, bad)
        one_line(e)


def _write(kind: str, target: Path, src: SafetensorsFile) -> None:
    if kind == "write_safetensors":
        write_safetensors(target, tensors(), None)
    elif kind == "write_safetensors_hashing":
        ts = [OutTensor(t.name, t.dtype, t.shape, [(src, t.begin, t.end)])
              for t in sorted(src.tensors.values(), key=lambda t: t.begin)]
        write_safetensors_hashing(target, ts, None, src)
    else:
        rewrite_shard(target, src, lambda info: None)


WRITERS = ["write_safetensors", "write_safetensors_hashing", "rewrite_shard"]


@pytest.mark.parametrize("kind", WRITERS)
def test_writers_write_inside_the_temporary_folder(tmp_path: Path, kind: str) -> None:
    src = SafetensorsFile(make_checkpoint(tmp_path / "m") / SHARD1)
    with atomic_output_dir(tmp_path / "out") as tmp:
        _write(kind, inside(tmp, "a.safetensors"), src)
    got = SafetensorsFile(tmp_path / "out" / "a.safetensors")
    assert [t.name for t in got.tensors.values()] == [t.name for t in (tensors() if kind == "write_safetensors"
                                                                       else src.tensors.values())]


@pytest.mark.parametrize("kind", WRITERS)
def test_writers_refuse_targets_outside_the_temporary_folder(tmp_path: Path, kind: str) -> None:
    m = make_checkpoint(tmp_path / "m")
    src = SafetensorsFile(m / SHARD1)
    before = (m / SHARD2).read_bytes()
    with pytest.raises(CheckpointError, match="outside the temporary output folder"):
        _write(kind, tmp_path / "loose.safetensors", src)  # no atomic_output_dir at all
    with atomic_output_dir(tmp_path / "out") as tmp:
        for target in [tmp / ".." / "m" / SHARD2, m / SHARD2, tmp / ".." / "escape.safetensors"]:
            with pytest.raises(CheckpointError, match="refusing to write") as e:
                _write(kind, target, src)
            one_line(e)
        (tmp / "sub").mkdir()
        with pytest.raises(CheckpointError, match="outside the temporary output folder"):
            _write(kind, tmp / "sub" / "x.safetensors", src)
    assert (m / SHARD2).read_bytes() == before
    assert not (tmp_path / "loose.safetensors").exists() and not (tmp_path / "escape.safetensors").exists()


@pytest.mark.parametrize("kind", WRITERS)
def test_writers_do_not_follow_a_planted_link_or_reuse_a_file(tmp_path: Path, kind: str) -> None:
    m = make_checkpoint(tmp_path / "m")
    src = SafetensorsFile(m / SHARD1)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "link.safetensors").symlink_to(victim)
        with pytest.raises(CheckpointError, match="already exists") as e:
            _write(kind, tmp / "link.safetensors", src)
        one_line(e)
        _write(kind, tmp / "once.safetensors", src)
        with pytest.raises(CheckpointError, match="already exists"):
            _write(kind, tmp / "once.safetensors", src)
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "out" / "link.safetensors").is_symlink()


# ---------------------------------------------------------------------------------------------
# atomic_output_dir


def test_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for out in [tmp_path / "file" / "out", tmp_path / "file" / "deeper" / "out"]:
        with pytest.raises(CheckpointError) as e:
            with atomic_output_dir(out):
                pytest.fail("block ran")
        line = one_line(e)
        assert line.startswith(str(out)) and f"{tmp_path / 'file'} is a file, not a folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_is_a_file(tmp_path: Path, overwrite: bool) -> None:
    out = tmp_path / "out"
    out.write_text("mine\n")
    with pytest.raises(CheckpointError) as e:
        with atomic_output_dir(out, overwrite=overwrite):
            pytest.fail("block ran")
    line = one_line(e)
    assert line.startswith(f"{out}: is a file, not a folder") and "already exists" not in line
    assert out.read_text() == "mine\n" and side_files(tmp_path, "out") == []


def test_existing_folder_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match="already exists .*--overwrite") as e:
        with atomic_output_dir(out):
            pytest.fail("block ran")
    one_line(e)
    assert side_files(tmp_path, "out") == []


def _fail_on(monkeypatch: pytest.MonkeyPatch, name: str, code: int, when: Callable[..., bool]) -> None:
    real = getattr(os, name)

    def fake(*args, **kwargs):
        if when(*args, **kwargs):
            raise OSError(code, os.strerror(code), *([str(args[0])] if name != "write" else []))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, fake)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EDQUOT])
def test_write_errors_inside_the_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Tests run as root, where chmod does not stop writes: the errors are injected into os.write."""
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        with atomic_output_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            _fail_on(monkeypatch, "write", code, lambda fd, data: len(data) > 100)
            write_safetensors(inside(tmp, "big.safetensors"), [OutTensor("t", "U8", (4096,), data=b"\0" * 4096)])
    line = one_line(e)
    assert line.startswith(f"{out}: writing the output failed: {os.strerror(code)}"), line
    assert not out.exists() and side_files(tmp_path, "out") == []


@pytest.mark.parametrize("step, code", [("mkdir", errno.EROFS), ("mkdir", errno.EACCES), ("open", errno.EROFS),
                                        ("makedirs", errno.EACCES)])
def test_errors_before_the_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, code: int) -> None:
    out = tmp_path / "new" / "out" if step == "makedirs" else tmp_path / "out"
    name = "mkdir" if step == "makedirs" else step
    _fail_on(monkeypatch, name, code, lambda path, *a, **k: str(tmp_path) in str(path))
    with pytest.raises(CheckpointError) as e:
        with atomic_output_dir(out):
            pytest.fail("block ran")
    monkeypatch.undo()
    line = one_line(e)
    assert line.startswith(f"{out}: ") and os.strerror(code) in line, line
    assert not out.exists()
    if out.parent.exists():
        assert side_files(out.parent, "out") == []


def test_rename_error_at_the_end_keeps_the_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old\n")
    with pytest.raises(CheckpointError, match="moving the finished output into place failed") as e:
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new\n")
            _fail_on(monkeypatch, "rename", errno.EACCES, lambda a, b: ".moe-surgery-tmp-" in str(a))
    one_line(e)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and side_files(tmp_path, "out") == []


def test_exception_in_the_block_removes_everything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError):
        with atomic_output_dir(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(f".out.moe-surgery-tmp-{os.getpid()}-")
            assert (tmp_path / ".out.moe-surgery-lock").exists()
            (tmp / "x").write_text("x")
            1 / 0  # noqa: B018
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_folder_mode_follows_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == mode


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_folders_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead = dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [f".out.moe-surgery-tmp-{dead}-0123abcd", f".out.moe-surgery-old-{dead}-89abcdef", f".out.old-{dead}"]
        live = [f".out.moe-surgery-tmp-{sleeper.pid}-0123abcd"]
        others = [f".other.moe-surgery-tmp-{dead}-0123abcd", ".out.tmp-abc123", "out-notes"]
        for name in stale + live + others:
            (tmp_path / name).mkdir()
            (tmp_path / name / "shard.safetensors").write_bytes(b"x" * 10)
        (tmp_path / "out").mkdir()
        with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "x").write_text("x")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(live + others + ["out"]), left
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_runs_replaced_output_is_put_back(tmp_path: Path) -> None:
    """A run killed between moving the old output aside and renaming the new one: the old one returns."""
    old = tmp_path / f".out.moe-surgery-old-{dead_pid()}-0123abcd"
    old.mkdir()
    (old / "weights.safetensors").write_text("old output")
    with pytest.raises(CheckpointError, match="already exists"):
        with atomic_output_dir(tmp_path / "out"):
            pytest.fail("block ran")
    assert (tmp_path / "out" / "weights.safetensors").read_text() == "old output"
    assert side_files(tmp_path, "out") == []


@pytest.mark.parametrize("what", ["folder", "link"])
def test_overwrite_leaves_no_old_folder(tmp_path: Path, what: str) -> None:
    out = tmp_path / "out"
    target = tmp_path / "target"
    target.mkdir()
    (target / "kept.txt").write_text("kept\n")
    if what == "folder":
        out.mkdir()
        (out / "sub").mkdir()
        (out / "sub" / "stale.txt").write_text("stale\n")
    else:
        out.symlink_to(target)
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new\n")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and not out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "target"]
    assert (target / "kept.txt").read_text() == "kept\n"  # a replaced link's target is left alone


def test_output_name_must_be_a_name(tmp_path: Path) -> None:
    for out in [Path("."), tmp_path / "..", Path("/")]:
        with pytest.raises(CheckpointError, match="name of its own") as e:
            with atomic_output_dir(out):
                pytest.fail("block ran")
        one_line(e)


WRITER_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from surgery.io import SafetensorsFile, atomic_output_dir, inside, rewrite_shard
    src, out, overwrite = SafetensorsFile(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"

    def produce(info):
        if info.name != "x.a.weight":
            return None
        def slowly():
            print("writing", flush=True)
            for _ in range(info.nbytes):
                time.sleep(0.05)
                yield b"\\0"
        return slowly()

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        rewrite_shard(inside(tmp, "shard.safetensors"), src, produce)
    print("finished", flush=True)
""")


def start_writer(tmp_path: Path, out: Path, overwrite: bool = False) -> subprocess.Popen:
    """A process in the middle of rewrite_shard into `out` (it waits between bytes); returns once it writes."""
    m = tmp_path / "m" if (tmp_path / "m").exists() else make_checkpoint(tmp_path / "m")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(m / SHARD1), str(out), "1" if overwrite else "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line == "writing\n", (line, p.stderr.read() if p.poll() is not None else "")
    return p


def test_sigterm_in_the_middle_of_a_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = start_writer(tmp_path, out)
    try:
        tmps = [n for n in side_files(tmp_path, "out") if ".moe-surgery-tmp-" in n]
        assert len(tmps) == 1 and (tmp_path / tmps[0] / "shard.safetensors").exists()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=30)
    finally:
        p.kill()
    assert rc in (143, 2), (rc, p.stderr.read() if p.stderr else "")
    assert not out.exists() and side_files(tmp_path, "out") == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_second_writer_to_the_same_output_is_refused(tmp_path: Path, overwrite: bool) -> None:
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "previous.txt").write_text("previous\n")
    p = start_writer(tmp_path, out, overwrite=overwrite)
    try:
        with pytest.raises(CheckpointError) as e:
            with atomic_output_dir(out, overwrite=overwrite):
                pytest.fail("block ran while another run held the lock")
        assert one_line(e) == f"{out}: another moe-surgery run is writing {out}"
        # the first run's folder and lock are untouched by the refused one
        assert any(".moe-surgery-tmp-" in n for n in side_files(tmp_path, "out"))
        assert (tmp_path / ".out.moe-surgery-lock").exists()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
        p.kill()
    assert side_files(tmp_path, "out") == []
    if overwrite:
        assert sorted(x.name for x in out.iterdir()) == ["previous.txt"]
    with atomic_output_dir(out, overwrite=True) as tmp:  # once it is gone, the output is free again
        (tmp / "x").write_text("x")
    assert sorted(x.name for x in out.iterdir()) == ["x"] and side_files(tmp_path, "out") == []


def test_two_outputs_do_not_block_each_other(tmp_path: Path) -> None:
    with atomic_output_dir(tmp_path / "a") as ta, atomic_output_dir(tmp_path / "b") as tb:
        (ta / "x").write_text("a")
        (tb / "x").write_text("b")
    assert (tmp_path / "a" / "x").read_text() == "a" and (tmp_path / "b" / "x").read_text() == "b"


def test_same_output_twice_in_one_process_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "x").write_text("x")
        with pytest.raises(CheckpointError, match="another moe-surgery run is writing"):
            with atomic_output_dir(out, overwrite=True):
                pytest.fail("nested block ran")
    assert (out / "x").read_text() == "x" and side_files(tmp_path, "out") == []


def test_sigterm_handler_is_restored(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with atomic_output_dir(tmp_path / "out"):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    assert output_dir._ACTIVE == {}


def test_contained_tells_side_files_that_leave_the_folder(tmp_path: Path) -> None:
    from surgery.io.paths import contained

    repo, snapshot = hf_cache(tmp_path)
    secret = tmp_path / "id_ed25519"
    secret.write_text("secret\n")
    (snapshot / "tokenizer.json").symlink_to(secret)
    (snapshot / "chat").mkdir()
    (snapshot / "chat" / "template.jinja").symlink_to(Path("..") / "config.json")
    assert contained(snapshot, snapshot / "config.json")  # a cache blob
    assert contained(snapshot, snapshot / "chat" / "template.jinja")  # a link inside
    assert not contained(snapshot, snapshot / "tokenizer.json")


@pytest.mark.parametrize("name", ["config.json", INDEX_NAME])
def test_config_or_index_as_a_directory(tmp_path: Path, name: str) -> None:
    m = make_checkpoint(tmp_path / "m")
    (m / name).unlink()
    (m / name).mkdir()
    with pytest.raises(CheckpointError) as e:
        Checkpoint(m)
    assert one_line(e) == f"{m / name}: a directory, not a file"


def test_a_validated_header_is_reused_only_for_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second open of an unchanged shard skips the JSON parse; a header edited in place (same file size)
    is parsed and refused again."""
    import surgery.io.safetensors_file as sf
    from safetensors.numpy import save_file
    import numpy as np

    path = tmp_path / "a.safetensors"
    save_file({"w": np.arange(6, dtype=np.float32)}, str(path))
    first = sf.SafetensorsFile(path)
    monkeypatch.setattr(sf, "strict_json", lambda text: pytest.fail("parsed again"))
    assert sf.SafetensorsFile(path).tensors == first.tensors
    monkeypatch.undo()
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"F32"', b'"F3X"'))  # same length, different header
    with pytest.raises(sf.CheckpointError, match="unknown dtype"):
        sf.SafetensorsFile(path)
