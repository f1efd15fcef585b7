"""A character-level tokenizer built in code, so tests need no network and no downloaded files."""

from __future__ import annotations

import os
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<eos>"]
CHARS = " \n\t" + string.ascii_letters + string.digits + string.punctuation


def save_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """Save a tokenizer loadable with AutoTokenizer.from_pretrained(path); return it.

    One token per ASCII character; ids stay below vocab_size (characters that don't fit,
    and any non-ASCII character, become <unk>), so it pairs with a model of that vocabulary.
    """
    symbols = (SPECIALS + list(CHARS))[:vocab_size]
    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast
