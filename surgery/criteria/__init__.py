"""Expert-importance criteria: higher score = more important = keep."""

from surgery.criteria.auto import AutoResult, LossRanking, holdout_error, holdout_grams, rank_by_loss, run_auto
from surgery.criteria.base import Criterion, ExpertWeights, Layer, LayerInput, Ranker, Selector, oriented
from surgery.criteria.family import PRESETS, unified
from surgery.criteria.registry import AUTO, CRITERIA, auto_candidates, default_drop, get_criterion, is_criterion

__all__ = [
    "AUTO", "CRITERIA", "PRESETS", "AutoResult", "LossRanking", "rank_by_loss", "Criterion", "ExpertWeights", "Layer", "LayerInput", "Ranker",
    "Selector", "auto_candidates", "default_drop", "get_criterion", "is_criterion", "oriented", "holdout_error", "holdout_grams", "run_auto", "unified",
]
