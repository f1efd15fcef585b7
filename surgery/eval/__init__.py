"""Measuring a checkpoint: perplexity per text file and divergence from a reference model."""
