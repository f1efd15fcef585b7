"""Identity of checkpoints and files: hashes of config.json, router weights, shard headers and file contents.

The router hash reads only router tensors (kilobytes to megabytes), so checking that a stats
file belongs to a checkpoint costs nothing next to the rewrite.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

from surgery.architectures import MoELayout, resolve
from surgery.errors import UserError
from surgery.io import Checkpoint

# Keys that change when a config is merely re-saved, not when the model changes.
VOLATILE_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "use_cache")
HASH_CHUNK = 16 * 1024 * 1024


def config_sha256(config: dict) -> str:
    stable = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def router_sha256(ckpt: Checkpoint, layout: MoELayout) -> str:
    h = hashlib.sha256()
    for layer, entry in layout.layers.items():
        # By layer and router role, not tensor name: per-expert and fused saves of one model agree.
        for name in sorted(entry.router, key=lambda n: n.rsplit(".", 2)[-2:]):
            h.update(f"{layer}:".encode())
            h.update(ckpt.read_bytes(name))
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks; of a folder, of its files' bytes in sorted path order."""
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            with open(p, "rb") as f:
                while chunk := f.read(HASH_CHUNK):
                    h.update(chunk)
    return h.hexdigest()


def header_sha256(ckpt: Checkpoint) -> dict[str, str]:
    """sha256 of each shard's header (every tensor's name, dtype, shape and offsets): cheap structural identity."""
    out = {}
    for shard, f in ckpt.files.items():
        (hlen,) = struct.unpack("<Q", f.read_range(0, 8))
        out[shard] = hashlib.sha256(f.read_range(0, 8 + hlen)).hexdigest()
    return out


def known_sha256(ckpt: Checkpoint) -> dict[str, str]:
    """Content hashes that cost nothing: in the Hugging Face cache each shard links to a blob named by its sha256."""
    known = {}
    for shard in ckpt.shard_names:
        target = (ckpt.dir / shard).resolve().name
        if (ckpt.dir / shard).is_symlink() and re.fullmatch(r"[0-9a-f]{64}", target):
            known[shard] = target
    return known if len(known) == len(ckpt.shard_names) else {}


def router_mismatch(ckpt: Checkpoint, layout: MoELayout, source: Checkpoint, keep: dict[int, list[int]]) -> str | None:
    """The first router tensor of `ckpt` that is not the kept rows of `source`'s, or None when all are.
    Byte equality: it tells the checkpoint an expert removal started from apart from a look-alike."""
    import numpy as np

    for layer, entry in layout.layers.items():
        for name, axis in entry.router.items():
            if name not in source.weight_map:
                return name
            info = source.info(name)
            ids = keep.get(layer, list(range(info.shape[axis])))
            rows = np.frombuffer(source.read_bytes(name), np.uint8).reshape(*info.shape[: axis + 1], -1)
            if np.take(rows, ids, axis=axis).tobytes() != ckpt.read_bytes(name):
                return name
    return None


def check_stats_match(model_dir, stats) -> None:
    """Refuse a statistics file whose router hash differs from the checkpoint's."""
    with Checkpoint(model_dir) as ckpt:
        layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
        ours = router_sha256(ckpt, layout)
    theirs = stats.model.get("router_sha256")
    if theirs != ours:
        raise UserError(
            f"{stats.label}: statistics were collected on a different model (router hash {str(theirs)[:12]}…, "
            f"{model_dir} has {ours[:12]}…)"
        )
