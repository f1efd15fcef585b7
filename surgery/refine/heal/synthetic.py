"""Teacher samples for the layer-local stage when the calibration text is short.

The local fit only needs inputs on which to compare the student's blocks with the teacher's, and
it is data-bound: with 61K tokens of text each kept expert sees a few thousand tokens and the fit
stops improving after a few dozen steps. The teacher's own continuations of short prefixes of the
real text are in the teacher's distribution and cost no extra calibration text; held-out tokens
stay real text.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

SAMPLES_PER_SEQUENCE = 3  # teacher samples per real sequence at most, when the local stage is short of text

PREFIX = 32  # real tokens that start each sample
CHUNK = 128  # samples generated at once


def prompts(real: torch.Tensor, count: int, prefix: int = PREFIX) -> torch.Tensor:
    """`count` prefixes [count, prefix]: sequence i % n of `real` at an offset that moves on each pass."""
    n, seq_len = real.shape
    span = max(1, seq_len - prefix)
    rows = []
    for i in range(count):
        start = ((i // n) * 997) % span  # a prime step: successive passes start elsewhere in the sequence
        rows.append(real[i % n, start:start + prefix])
    return torch.stack(rows)


@torch.no_grad()
def teacher_samples(model, real: torch.Tensor, count: int, seed: int, device: torch.device,
                    progress: bool = True) -> torch.Tensor:
    """`count` sequences as long as those of `real`, each a real prefix continued by sampling the teacher
    (temperature 1, no top-k/top-p, end-of-text suppressed so every sequence is full length)."""
    seq_len = real.shape[1]
    prefix = min(PREFIX, seq_len - 1)
    starts = prompts(real, count, prefix)
    torch.manual_seed(seed)
    out = []
    bar = tqdm(total=count * (seq_len - prefix), desc="Teacher samples", unit="tok", unit_scale=True,
               disable=not progress)
    for i in range(0, count, CHUNK):
        ids = starts[i:i + CHUNK].to(device)
        new = seq_len - prefix
        seqs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              pad_token_id=model.config.get_text_config().pad_token_id or 0)
        out.append(seqs[:, :seq_len].cpu())
        bar.update(ids.shape[0] * new)
    bar.close()
    return torch.cat(out)
