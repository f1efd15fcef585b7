"""The scheme of a quantized checkpoint, read from `quantization_config` in config.json (see
surgery.io.quantization for the schemes and their tensors)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from surgery.io.checkpoint import Checkpoint
from surgery.io.paths import show
from surgery.io.safetensors_file import CheckpointError

# The scheme, from config.json

SUPPORTED = "fp8 (block-scaled or per-tensor), compressed-tensors (float-quantized FP8, nvfp4-pack-quantized), mxfp4"


@dataclass(frozen=True)
class Scheme:
    """What `quantization_config` says, reduced to what decoding needs."""

    method: str  # "fp8" | "compressed-tensors" | "mxfp4"
    where: str  # config.json, for messages
    fp8: frozenset[str] = frozenset()  # FP8 weight scale layouts allowed: "block", "channel", "tensor"
    block: tuple[int, int] | None = None  # FP8 block size (weight_block_size / block_structure)
    fp4_group: int | None = None  # NVFP4 group size
    ignore: tuple[str, ...] = field(default=())  # modules_to_not_convert / ignore, as written

    @property
    def scale_suffix(self) -> str:
        """The FP8 weight's scale: `weight_scale_inv` (fp8) or `weight_scale` (compressed-tensors)."""
        return "_scale_inv" if self.method == "fp8" else "_scale"

    @property
    def name(self) -> str:
        """e.g. `fp8 block [128, 128]`, `compressed-tensors FP8 channel`, `compressed-tensors NVFP4 group 16`."""
        if self.method == "mxfp4":
            return "mxfp4"
        if self.method == "fp8":
            return f"fp8 block {list(self.block)}" if self.block else "fp8 per-tensor"
        parts = []
        if self.fp8:
            parts.append("FP8 " + "/".join(sorted(self.fp8)) + (f" {list(self.block)}" if self.block else ""))
        if self.fp4_group:
            parts.append(f"NVFP4 group {self.fp4_group}")
        return "compressed-tensors " + " + ".join(parts)


def _block_size(value: object, key: str, where: str) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(type(v) is int and v > 0 for v in value)):
        raise CheckpointError(f"{where}: quantization_config.{key} must be two positive integers, not {value!r}")
    return value[0], value[1]


def _compressed_tensors(qc: dict, where: str) -> Scheme:
    top_format = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}: compressed-tensors quantization_config has no config_groups")
    fp8: set[str] = set()
    block = None
    fp4_group = None
    for gname, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if weights is None:
            continue  # activation-only group
        if not isinstance(weights, dict):
            raise CheckpointError(f"{where}: compressed-tensors config group {gname!r}: weights is not an object")
        fmt = group.get("format") or top_format
        bits, number, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
        desc = f"{bits}-bit {number} {strategy} (format {fmt!r})"
        if bits == 8 and number == "float" and fmt in ("float-quantized", "naive-quantized") \
                and strategy in ("channel", "tensor", "block"):
            fp8.add(strategy)
            if strategy == "block":
                block = _block_size(weights.get("block_structure"), f"config_groups.{gname}.weights.block_structure",
                                    where)
        elif bits == 4 and number == "float" and fmt == "nvfp4-pack-quantized":
            g = weights.get("group_size", 16)
            if type(g) is not int or g <= 0:
                raise CheckpointError(f"{where}: compressed-tensors config group {gname!r}: group_size {g!r}")
            fp4_group = g
        else:
            raise CheckpointError(f"{where}: compressed-tensors scheme {desc} in config group {gname!r} is not "
                                  f"supported (supported: {SUPPORTED})")
    if not fp8 and fp4_group is None:
        raise CheckpointError(f"{where}: compressed-tensors quantization_config quantizes no weights")
    ignore = qc.get("ignore") or []
    return Scheme("compressed-tensors", where, frozenset(fp8), block, fp4_group,
                  tuple(str(x) for x in ignore) if isinstance(ignore, list) else ())


def scheme_of(config: dict, where: str = "config.json") -> Scheme | None:
    """The checkpoint's quantization scheme (None when config.json has no `quantization_config`)."""
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config is not an object")
    method = qc.get("quant_method")
    ignore = qc.get("modules_to_not_convert") or []
    ignore = tuple(str(x) for x in ignore) if isinstance(ignore, list) else ()
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt not in ("e4m3", "e5m2"):
            raise CheckpointError(f"{where}: fp8 quantization with fmt {fmt!r} is not supported (e4m3, e5m2)")
        if qc.get("weight_block_size") is None:
            return Scheme("fp8", where, frozenset({"tensor"}), None, ignore=ignore)
        return Scheme("fp8", where, frozenset({"block"}), _block_size(qc["weight_block_size"], "weight_block_size",
                                                                         where), ignore=ignore)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    if method == "mxfp4":
        return Scheme("mxfp4", where, ignore=ignore)
    raise CheckpointError(f"{where}: quantization scheme quant_method={method!r} is not supported "
                          f"(supported: {SUPPORTED})")


_SCHEMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def scheme_for(ckpt: Checkpoint) -> Scheme | None:
    """`scheme_of` the checkpoint's config.json, parsed once per open Checkpoint."""
    if ckpt not in _SCHEMES:
        _SCHEMES[ckpt] = (scheme_of(ckpt.config, show(ckpt.config_path)),)
    return _SCHEMES[ckpt][0]
