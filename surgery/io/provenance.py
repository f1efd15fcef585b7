"""`pruning.json`, the provenance record of every checkpoint moe-surgery writes: the one reader and writer.

A record starts with the tool, its version, the time and the source checkpoint (`header`), then
what was done: `expert_map` (MoE layer → the source's expert ids kept, in their new order),
`plan`, and the `sparsity` and `heal` sections of later steps, which keep the record they found.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

from surgery import __version__
from surgery.errors import CheckpointError, UserError
from surgery.io import Checkpoint
from surgery.io.identity import header_sha256

PRUNING_JSON = "pruning.json"


def now() -> str:
    """The `created` time stamp: UTC, whole seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def header(source: dict) -> dict:
    """The first keys of a new record: tool, version, time and `source` (at least its "path")."""
    return {"tool": "moe-surgery", "tool_version": __version__, "created": now(), "source": source}


def source(ckpt: Checkpoint, shards_sha256: dict[str, str] | None = None) -> dict:
    """The `source` of a record: the checkpoint's path, its shards' content hashes when known, their header hashes."""
    return {"path": str(ckpt.dir.resolve()), "shards_sha256": shards_sha256 or None,
            "shards_header_sha256": header_sha256(ckpt)}


def read(model_dir: str | Path, needed_for: str | None = None) -> dict:
    """The checkpoint's record. A missing file gives {} unless `needed_for` says why it must exist
    (then a one-line CheckpointError naming the file, as for a file that is not a JSON object)."""
    path = Path(model_dir) / PRUNING_JSON
    if not path.is_file():
        if needed_for is None:
            return {}
        raise CheckpointError(f"{path}: missing; {needed_for}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return doc


def write(folder: str | Path, doc: Mapping) -> None:
    """Write the record into `folder` (a new output folder), indented, with a final newline."""
    (Path(folder) / PRUNING_JSON).write_text(json.dumps(doc, indent=2) + "\n")


def keep_map(raw: object, where: str, key: str, error: type[UserError] = CheckpointError) -> dict[int, list[int]]:
    """`{"<layer>": [expert ids]}` as {layer: ids}: the one place layer keys become integers.

    `key` names the object in the error ("keep" for plans, "expert_map" for pruning.json).
    """
    if not isinstance(raw, dict):
        raise error(f"{where}: {key} must be an object mapping layer index to expert ids")
    out: dict[int, list[int]] = {}
    for layer, ids in raw.items():
        try:
            layer_i = int(layer)
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError
        except ValueError:
            raise error(f"{where}: {key}[{layer!r}] must be a list of integer expert ids under an "
                                  "integer layer") from None
        out[layer_i] = ids
    return out


def expert_map(doc: dict, model_dir: str | Path) -> dict[int, list[int]]:
    """The record's expert_map ({} when experts were not removed), validated."""
    raw = doc.get("expert_map")
    return keep_map(raw, str(Path(model_dir) / PRUNING_JSON), "expert_map") if raw else {}
