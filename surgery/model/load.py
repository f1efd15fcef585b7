"""Loading a model and its tokenizer for the commands that run one (collect, heal, eval)."""

from __future__ import annotations

import os

import torch

from surgery.errors import UserError


def load_model(path: str | os.PathLike, device: str = "cpu", dtype: str | torch.dtype | None = None):
    """A causal LM from a local folder, in eval mode on `device` (dtype from config unless given).

    MoNE novice checkpoints (config lists `approximate_experts`) go through `surgery.model.novices`.
    """
    # transformers is an optional extra and slow to import: only commands that run a model pay.
    from transformers import AutoModelForCausalLM

    from surgery.model.novices import is_novice_checkpoint, load_novice_model

    if is_novice_checkpoint(path):
        return load_novice_model(path, device, dtype)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    return model.eval().to(device)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer stored next to the model.

    Without tokenizer files transformers silently builds an empty tokenizer from the model
    type, which would turn any text into nothing; refuse that instead.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if len(tokenizer) < 2:
        raise UserError(f"{path}: no usable tokenizer (tokenizer.json / tokenizer_config.json missing?); "
                        "copy the original model's tokenizer files into this folder")
    return tokenizer

