"""Expert-importance criteria: higher score = more important = keep."""

from .auto import AutoResult, holdout_error, holdout_grams, run_auto
from .base import Criterion, ExpertWeights, Layer, LayerInput
from .family import PRESETS, unified
from .registry import AUTO, CRITERIA, auto_candidates

__all__ = [
    "AUTO", "CRITERIA", "PRESETS", "AutoResult", "Criterion", "ExpertWeights", "Layer", "LayerInput",
    "auto_candidates", "holdout_error", "holdout_grams", "run_auto", "unified",
]
