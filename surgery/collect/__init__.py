"""The collector: one calibration pass through the model writes the statistics file."""

from .hooks import SelfCheckError
from .run import CollectSummary, collect
from .streaming import StreamingError

__all__ = ["CollectSummary", "SelfCheckError", "StreamingError", "collect"]
