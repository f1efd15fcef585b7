"""Per-architecture knowledge (one JSON data file per model_type, the expert math kinds) and the layout
read from a checkpoint's tensor names."""

from surgery.architectures.expert_math import EXPERT_MATH, ExpertMath
from surgery.architectures.layout import ArchitectureError, LayerExperts, MoELayout, check_shapes, first_key, resolve, spec_for, sub_config
from surgery.architectures.registry import SPECS, ArchSpec, get_spec, supported

__all__ = [
    "EXPERT_MATH", "SPECS", "ArchSpec", "ArchitectureError", "ExpertMath", "LayerExperts", "MoELayout",
    "check_shapes", "first_key", "get_spec", "resolve", "spec_for", "sub_config", "supported",
]
