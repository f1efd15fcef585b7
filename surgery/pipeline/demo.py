"""A built-in small model for a first run: a random Qwen3-MoE briefly trained on generated text.

Random routers route almost uniformly and make every criterion look alike; a few hundred
optimiser steps on a toy language with topic-specific words give the experts distinct jobs,
so the demo's collect → score → prune → eval shows real differences, offline, in a minute.
"""

from __future__ import annotations

import json
import os
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


DEMO_EXPERTS, DEMO_TOP_K = 16, 2


def build_demo_model(path: Path, data: Path, steps: int = 300, seed: int = 0, progress: bool = False) -> Path:
    """Create, train briefly and save a 4-layer, 16-expert, top-2 Qwen3-MoE in 4 shards."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from surgery.model.data import build_sequences

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=DEMO_EXPERTS, num_experts_per_tok=DEMO_TOP_K,
        norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=0, pad_token_id=0, bos_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(config)
    seqs = build_sequences([str(data)], tokenizer, 256, 64, seed).input_ids
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    bar = tqdm(range(steps), desc="      Training", unit="step", disable=not progress, leave=False)
    for step in bar:
        batch = seqs[(step * 16) % len(seqs):][:16]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=max(size // 4 + 1, 1))
    return path


DEMO_CRITERIA = ("frequency", "soft_frequency", "reap", "man", "recon", "auto", "random")
DEMO_FILES = ("calib.jsonl", "eval.jsonl", "model", "stats.safetensors")
LEGEND = ("ppl: perplexity on held-out text (lower is better); Δppl: change from the unpruned model; "
          "KL: mean KL(unpruned ‖ pruned) per token; top-1: share of tokens whose most likely next token agrees.")


def check_demo(workdir: Path, ratio: float, steps: int, overwrite: bool) -> None:
    """Refuse bad options and an existing WORKDIR (without `overwrite`) before any work; with `overwrite`
    only a folder holding nothing but an earlier demo's files is replaced."""
    from surgery.errors import UserError
    from surgery.plan.select import keep_count

    if steps < 0:
        raise UserError(f"--steps {steps}: must be ≥ 0")
    try:
        keep_count(DEMO_EXPERTS, DEMO_TOP_K, ratio=ratio)  # e.g. a ratio that keeps fewer than top-k experts
    except UserError as e:
        raise UserError(f"--ratio {ratio}: the demo model has {DEMO_EXPERTS} experts per layer: {e}") from None
    if not os.path.lexists(workdir):
        return
    if not workdir.is_dir() or workdir.is_symlink():
        raise UserError(f"{workdir}: exists and is not a folder; choose another --workdir")
    if not overwrite:
        raise UserError(f"{workdir}: already exists (use --overwrite to replace an earlier demo, or another --workdir)")
    strangers = sorted(p.name for p in workdir.iterdir()
                       if p.name not in DEMO_FILES and not p.name.startswith("pruned-"))
    if strangers:
        raise UserError(f"{workdir}: holds files the demo did not make ({', '.join(strangers[:3])}"
                        f"{', ...' if len(strangers) > 3 else ''}); --overwrite only replaces an earlier demo's folder")


def run_demo(workdir: Path, ratio: float, steps: int, echo=print, overwrite: bool = False,
             progress: bool = True) -> None:
    """Build and train the demo model in WORKDIR (refused if it exists, replaced with `overwrite`), collect,
    prune with DEMO_CRITERIA and compare each with the unpruned model; `echo` prints the progress lines and
    the table."""
    import shutil

    check_demo(workdir, ratio, steps, overwrite)

    from transformers.utils import logging as hf_logging

    from surgery.collect.run import collect

    hf_logging.disable_progress_bar()  # a dozen small loads: their bars would bury the table
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    calib, held = workdir / "calib.jsonl", workdir / "eval.jsonl"
    make_corpus(calib, 400, seed=1)
    make_corpus(held, 60, seed=2)
    echo(f"[1/4] Building and training the demo model ({steps} steps) in {workdir / 'model'}")
    model_dir = build_demo_model(workdir / "model", calib, steps=steps, progress=progress)
    echo("[2/4] Collecting statistics")
    stats = workdir / "stats.safetensors"
    summary = collect(model_dir, [str(calib)], stats, samples=96, seq_len=64, batch_size=16, holdout=32,
                      device="cpu", dtype="float32", progress=False)
    for line in summary.lines():
        echo("      " + line)
    _compare(workdir, model_dir, stats, held, ratio, echo)
    echo(f"Pruned checkpoints are in {workdir}/pruned-*; try `moe-surgery verify {workdir}/pruned-reap`.")


def _compare(workdir: Path, model_dir: Path, stats: Path, held: Path, ratio: float, echo) -> None:
    """Prune with every demo criterion and print perplexity, KL and top-1 against the unpruned model."""
    from surgery.eval.perplexity import evaluate
    from surgery.model.load import load_model, load_tokenizer
    from surgery.pipeline.score import ScoreOptions, score_plan
    from surgery.rewrite.experts import rewrite_checkpoint

    reference = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    base = evaluate(reference, tokenizer, [str(held)], seq_len=64, max_tokens=4096, progress=False)
    echo(f"[3/4] Pruning {ratio:.0%} of the experts with {len(DEMO_CRITERIA)} criteria; [4/4] evaluating")
    echo(f"      {'criterion':<15} {'ppl':>8} {'Δppl':>8} {'KL':>8} {'top-1':>6}")
    echo(f"      {'(unpruned)':<15} {base['geomean_ppl']:>8.3f}")
    for name in DEMO_CRITERIA:
        plan = score_plan(model_dir, stats, ScoreOptions(name, ratio=ratio))
        out = workdir / f"pruned-{name}"
        rewrite_checkpoint(model_dir, plan, out, overwrite=True)
        r = evaluate(load_model(out), tokenizer, [str(held)], seq_len=64, max_tokens=4096, reference=reference,
                     progress=False)
        note = f"  (auto chose {plan.extra['auto']['winner']})" if "auto" in plan.extra else ""
        echo(f"      {name:<15} {r['geomean_ppl']:>8.3f} {r['geomean_ppl'] / base['geomean_ppl'] - 1:>+8.1%} "
             f"{r['kl']:>8.4f} {r['top1']:>6.3f}{note}")
    echo(f"      {LEGEND}")
