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

    check_loadable(path)
    if is_novice_checkpoint(path):
        return load_novice_model(path, device, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # the library's own words, on one line
        raise UserError(f"{path}: transformers cannot load this checkpoint ({_first_line(e)})") from None
    return model.eval().to(device)


def check_loadable(path: str | os.PathLike) -> None:
    """Our own checks before transformers reads the files: every header, the index and the expert
    shapes against config.json, so a damaged checkpoint gets one line naming the file, not a traceback."""
    from surgery.architectures import check_shapes, resolve
    from surgery.io import Checkpoint

    ckpt = Checkpoint(path)
    try:
        layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
        problems = check_shapes(layout, {n: ckpt.info(n).shape for n in ckpt.names()})
    finally:
        ckpt.close()
    if problems:
        raise UserError(f"{ckpt.config_path}: the tensors disagree with it: {problems[0]}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


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

