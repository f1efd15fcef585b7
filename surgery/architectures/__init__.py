"""Per-architecture knowledge (plain data) and the layout read from a checkpoint's tensor names."""

from surgery.architectures.layout import ArchitectureError, LayerExperts, MoELayout, check_shapes, first_key, resolve, spec_for, sub_config
from surgery.architectures.registry import SPECS, ArchSpec, get_spec, supported

__all__ = [
    "SPECS", "ArchSpec", "ArchitectureError", "LayerExperts", "MoELayout", "check_shapes", "first_key",
    "get_spec", "resolve", "spec_for", "sub_config", "supported",
]
