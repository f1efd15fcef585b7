"""A built-in small model for a first run: a random Qwen3-MoE briefly trained on generated text.

Random routers route almost uniformly and make every criterion look alike; a few hundred
optimiser steps on a toy language with topic-specific words give the experts distinct jobs,
so the demo's collect → score → prune → eval shows real differences, offline, in a minute.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "kernel": "driver module kernel memory page interrupt device buffer lock thread scheduler cpu".split(),
    "python": "def class return import list dict string value function object module method".split(),
    "cooking": "flour sugar butter oven bake salt pepper onion garlic simmer boil pan".split(),
    "travel": "train station ticket hotel airport map city river mountain road bridge museum".split(),
}
GLUE = "the a of to and in is for with on that this it as".split()


def make_corpus(path: Path, docs: int, seed: int) -> None:
    """Write `docs` jsonl documents, each mostly about one topic."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            topic = rng.choice(list(TOPICS))
            words = [rng.choice(TOPICS[topic]) if rng.random() < 0.6 else rng.choice(GLUE) for _ in range(rng.randint(60, 160))]
            f.write(json.dumps({"text": " ".join(words) + "."}) + "\n")


def build_tokenizer(path: Path):
    """A word-level tokenizer over the demo vocabulary, saved so AutoTokenizer loads it offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<eos>", "<unk>", "."] + sorted({w for ws in TOPICS.values() for w in ws} | set(GLUE))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    fast.save_pretrained(path)
    return fast


def build_demo_model(path: Path, data: Path, steps: int = 300, seed: int = 0) -> Path:
    """Create, train briefly and save a 4-layer, 16-expert, top-2 Qwen3-MoE in 4 shards."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from surgery.model.data import build_sequences

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=0, pad_token_id=0, bos_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(config)
    seqs = build_sequences([str(data)], tokenizer, 256, 64, seed).input_ids
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = seqs[(step * 16) % len(seqs):][:16]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=max(size // 4 + 1, 1))
    return path
