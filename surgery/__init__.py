"""moe-surgery: remove experts from Mixture-of-Experts checkpoints without loading the model."""

__version__ = "0.1.0"
