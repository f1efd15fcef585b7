"""The torch side shared by collect, heal and eval: loading, blocks, devices, calibration text."""

from surgery.model.load import load_model, load_tokenizer

__all__ = ["load_model", "load_tokenizer"]
