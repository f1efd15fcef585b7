"""Build `ArchSpec` records from the per-model_type JSON files in `surgery/architectures/data/`.

One file per model_type, named `<model_type>.json`, shipped as package data. A file holds one
object whose keys are ArchSpec fields (see spec.py for what each means), written as JSON:

    {
      "model_type": "qwen3_moe",           required, equal to the file name
      "extends": "qwen2_moe",              optional: start from that file's fields (after its own extends)
      "expert_keys": ["num_experts", ...], every alias of the routed-expert count, first present wins
      "top_k_keys": ["num_experts_per_tok"],
      "prefixes": [{"pattern": "<regex with a (?P<layer>...) group>", "layer_offset_key": "num_hidden_layers"}],
      "router": [{"tensor": "gate.weight", "expert_axis": 0}],
      "config_path": ["text_config"],
      "fused": ["input_linear.weight"],
      "group_keys": {"n_group": "n_group", "topk_group": "topk_group"},
      "group_when": {"key": "topk_method", "equals": "group_limited_greedy"},
      "min_group_size": 2, "fixed_top_k": 2, "mtp_count_key": "num_nextn_predict_layers",
      "router_module": "gate", "scoring": "softmax", "expert_math": "glu_halves",
      "fused_orientation": "out_in", "interleaved": false,
      "memory_renames": [{"memory": ".mlp.", "disk": ".block_sparse_moe."}],
      "mask_value": -1e9 (or "-inf"), "notes": "..."
    }

`expert_keys`, `top_k_keys`, `prefixes` and `router` are required (directly or through `extends`);
the rest default to ArchSpec's defaults. `extends` copies every field of the other file except
`model_type` and `notes`; the file's own keys replace whole values (lists are not merged).
Every problem raises ArchDataError naming the file and the key.
"""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from surgery.architectures.expert_math import EXPERT_MATH
from surgery.architectures.spec import ArchSpec

SCORINGS = ("softmax", "sigmoid", "sparsemixer", "topk_softmax")
ORIENTATIONS = ("out_in", "in_out")
REQUIRED = ("expert_keys", "top_k_keys", "prefixes", "router")
NOT_INHERITED = ("model_type", "notes")


class ArchDataError(ValueError):
    """An architecture data file is malformed (a packaging error, not bad user input)."""


def data_dir() -> Path:
    return Path(str(resources.files("surgery.architectures") / "data"))


# ---------------------------------------------------------------------------------------------
# Field converters: JSON value -> ArchSpec value, raising ValueError with what was expected.


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected a non-empty string")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("expected a non-negative integer")
    return v


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _strs(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise ValueError("expected a list of strings")
    return tuple(_str(x) for x in v)


def _nonempty_strs(v: Any) -> tuple[str, ...]:
    out = _strs(v)
    if not out:
        raise ValueError("expected at least one string")
    return out


def _record(v: Any, keys: dict[str, Callable[[Any], Any]], optional: tuple[str, ...] = ()) -> tuple:
    """An object with exactly `keys` (those in `optional` may be missing: None) -> tuple in key order."""
    if not isinstance(v, dict):
        raise ValueError(f"expected an object with keys {', '.join(keys)}")
    unknown = sorted(set(v) - set(keys))
    missing = [k for k in keys if k not in v and k not in optional]
    if unknown or missing:
        raise ValueError(f"expected keys {', '.join(keys)}" + (f"; unknown {unknown}" if unknown else "")
                         + (f"; missing {missing}" if missing else ""))
    return tuple(conv(v[k]) if k in v else None for k, conv in keys.items())


def _records(keys: dict[str, Callable[[Any], Any]], optional: tuple[str, ...] = (), nonempty: bool = False):
    def conv(v: Any) -> tuple:
        if not isinstance(v, list) or (nonempty and not v):
            raise ValueError("expected a " + ("non-empty " if nonempty else "") + "list of objects")
        return tuple(_record(x, keys, optional) for x in v)
    return conv


def _pattern(v: Any) -> str:
    p = _str(v)
    try:
        compiled = re.compile(p)
    except re.error as e:
        raise ValueError(f"bad regex {p!r}: {e}") from None
    if "layer" not in compiled.groupindex:
        raise ValueError(f"regex {p!r} needs a (?P<layer>...) group")
    return p


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return v
    return conv


def _mask_value(v: Any) -> float:
    if v == "-inf":
        return -math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError('expected a number or "-inf"')
    return float(v)


def _group_keys(v: Any) -> tuple[str, str] | None:
    return None if v is None else _record(v, {"n_group": _str, "topk_group": _str})


def _group_when(v: Any) -> tuple[str, str] | None:
    return None if v is None else _record(v, {"key": _str, "equals": _str})


FIELDS: dict[str, Callable[[Any], Any]] = {
    "expert_keys": _nonempty_strs,
    "top_k_keys": _nonempty_strs,
    "prefixes": _records({"pattern": _pattern, "layer_offset_key": _opt_str}, optional=("layer_offset_key",),
                         nonempty=True),
    "router": _records({"tensor": _str, "expert_axis": _int}, nonempty=True),
    "config_path": _strs,
    "fused": _strs,
    "group_keys": _group_keys,
    "group_when": _group_when,
    "min_group_size": _int,
    "fixed_top_k": _opt_int,
    "mtp_count_key": _opt_str,
    "router_module": _str,
    "scoring": _one_of(SCORINGS),
    "expert_math": _one_of(tuple(EXPERT_MATH)),
    "fused_orientation": _one_of(ORIENTATIONS),
    "interleaved": _bool,
    "memory_renames": _records({"memory": _str, "disk": _str}),
    "mask_value": _mask_value,
    "notes": lambda v: "" if v == "" else _str(v),
}


# ---------------------------------------------------------------------------------------------
# Files


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ArchDataError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ArchDataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ArchDataError(f"{path}: expected one JSON object")
    if doc.get("model_type") != path.stem:
        raise ArchDataError(f"{path}: model_type {doc.get('model_type')!r} must equal the file name {path.stem!r}")
    unknown = sorted(set(doc) - set(FIELDS) - {"model_type", "extends"})
    if unknown:
        raise ArchDataError(f"{path}: unknown keys {unknown}; known: model_type, extends, {', '.join(FIELDS)}")
    return doc


def _flatten(model_type: str, docs: dict[str, dict], paths: dict[str, Path], seen: tuple[str, ...] = ()) -> dict:
    """The file's fields with `extends` applied (raw JSON values)."""
    doc = docs[model_type]
    if model_type in seen:
        raise ArchDataError(f"{paths[model_type]}: extends cycle {' -> '.join((*seen, model_type))}")
    base: dict = {}
    if "extends" in doc:
        parent = doc["extends"]
        if not isinstance(parent, str) or parent not in docs:
            raise ArchDataError(f"{paths[model_type]}: extends {parent!r}, which has no data file")
        base = {k: v for k, v in _flatten(parent, docs, paths, (*seen, model_type)).items() if k not in NOT_INHERITED}
    return {**base, **{k: v for k, v in doc.items() if k != "extends"}}


def _build(model_type: str, raw: dict, path: Path) -> ArchSpec:
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ArchDataError(f"{path}: missing {', '.join(missing)} (directly or through extends)")
    kwargs = {}
    for key, value in raw.items():
        if key == "model_type":
            continue
        try:
            kwargs[key] = FIELDS[key](value)
        except ValueError as e:
            raise ArchDataError(f"{path}: {key}: {e} (got {value!r})") from None
    return ArchSpec(model_type=model_type, **kwargs)


def load_specs(directory: Path | None = None) -> dict[str, ArchSpec]:
    """{model_type: ArchSpec} for every `<model_type>.json` in `directory` (default: the package data)."""
    directory = data_dir() if directory is None else Path(directory)
    paths = {p.stem: p for p in sorted(directory.glob("*.json"))}
    if not paths:
        raise ArchDataError(f"{directory}: no architecture data files (*.json)")
    docs = {mt: _read(p) for mt, p in paths.items()}
    return {mt: _build(mt, _flatten(mt, docs, paths), paths[mt]) for mt in docs}
