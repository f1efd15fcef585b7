"""`prune --criterion auto --calib-text TEXT`: rank candidate plans (criterion x drop/merge) by the real loss.

Every candidate is applied to the model in memory, exactly as the rewrite would: removed experts are
masked at the router (surgery.collect.progressive.RouterMask: the same as removing them), merged experts'
values are written over their representatives. The model's next-token loss on held-out sequences of the
text (sampled with a seed other than `collect`'s) is the candidate's score; the lowest wins
(surgery.criteria.auto.rank_by_loss) and every candidate's loss is recorded in the plan under `auto`.
The model is held in memory once (float32 on the CPU); each candidate costs one forward over the text.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stats_formats import StatsFile
from surgery.architectures.expert_math import DOWN, GATE_UP
from surgery.criteria import rank_by_loss
from surgery.criteria.auto import CANDIDATES, LOSS_FORMULA
from surgery.plan import Plan
from surgery.pipeline.score import ScoreOptions, score_plan
from surgery.rewrite.merge import merge_layer
from surgery.rewrite.merge_groups import NEEDS, groups_for

AUTO_TOKENS = 8192  # held-out tokens each candidate is measured on
HELD_OUT_SEED = 1_000_003  # added to --seed: the held-out sequences differ from collect's calibration sample
DROP = "drop"


def candidates(model_dir: Path, stats_path: Path, scoring: ScoreOptions, stats: StatsFile,
               methods: tuple[str, ...]) -> dict[str, tuple[Plan, str | None]]:
    """{"<criterion>/<method>": (plan, merge method or None)}; hc-smoe and mc-smoe choose their own groups
    (only the counts come from the plan), so they are one candidate each."""
    plans = {c: score_plan(model_dir, stats_path, replace(scoring, criterion=c, drop=None)) for c in CANDIDATES}
    out: dict[str, tuple[Plan, str | None]] = {}
    for method in methods:
        if method in NEEDS:
            if NEEDS[method][0] in stats.optional_fields:
                out[method] = (plans[CANDIDATES[0]], method)
            continue
        for c, plan in plans.items():
            out[f"{c}/{method}"] = (plan, None if method == DROP else method)
    return out


def held_out_ids(model_dir: Path, text: tuple[str, ...], seq_len: int, seed: int) -> torch.Tensor:
    from surgery.model.data import build_sequences, cap_seq_len
    from surgery.model.load import load_tokenizer
    from surgery.io import Checkpoint

    with Checkpoint(model_dir) as ckpt:
        seq_len = cap_seq_len(ckpt.config, seq_len)
    calib = build_sequences(list(text), load_tokenizer(model_dir), max(1, AUTO_TOKENS // seq_len), seq_len,
                            seed + HELD_OUT_SEED)
    return calib.input_ids


def model_loss(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats per predicted token) over `ids`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in ids.split(batch_size):
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                    reduction="sum")
            total, count = total + float(nll), count + batch[:, 1:].numel()
    return total / max(count, 1)


def candidate_loss(model: torch.nn.Module, spec, plan: Plan, method: str | None, stats: StatsFile,
                   ids: torch.Tensor) -> float:
    """The held-out loss of the model with `plan`'s experts removed (`method` None) or merged, then restored."""
    from surgery.collect.progressive import RouterMask
    from surgery.model.blocks import find_blocks

    blocks = {b.layer: b for b in find_blocks(model, spec)}
    keep = {layer: list(ids_) for layer, ids_ in plan.keep.items()}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    if method is not None:
        groups = groups_for(method, keep, stats.get, lambda name: name in stats.optional_fields, str(stats.path))
        keep = {layer: [g[0] for g in gs] for layer, gs in groups.items()}
        for layer, gs in groups.items():
            experts = blocks[layer].experts
            gate_up, down = merge_layer(method, gs, _reader(experts), lambda name, lay=layer: stats.get(lay, name))
            reps = torch.tensor(keep[layer])
            for param, value in ((getattr(experts, GATE_UP.memory), gate_up), (getattr(experts, DOWN.memory), down)):
                saved.append((param, param.detach().clone()))
                with torch.no_grad():
                    param[reps] = torch.from_numpy(value).to(param.dtype)
    mask = RouterMask(model, spec, keep)
    try:
        return model_loss(model, ids)
    finally:
        mask.restore()
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)


def _reader(experts: torch.nn.Module):
    """Original expert e's {"gate", "up", "down"} from transformers' in-memory fused parameters."""
    def read(e: int) -> dict[str, np.ndarray]:
        gate, up = getattr(experts, GATE_UP.memory)[e].detach().float().chunk(2, dim=0)
        down = getattr(experts, DOWN.memory)[e].detach().float()
        return {"gate": gate.numpy(), "up": up.numpy(), "down": down.numpy()}
    return read


def auto_by_loss(model_dir: Path, stats_path: Path, scoring: ScoreOptions, text: tuple[str, ...],
                 methods: tuple[str, ...] = (DROP, "lsq", "hc-smoe", "mc-smoe"), *, seq_len: int = 512,
                 progress: bool = True) -> tuple[Plan, str | None]:
    """The winning candidate's plan (criterion "auto", every candidate's loss under extra["auto"]) and its merge
    method (None: drop)."""
    from surgery.architectures import get_spec
    from surgery.model.load import load_model

    t0 = time.perf_counter()
    stats = StatsFile(stats_path)
    cands = candidates(model_dir, stats_path, scoring, stats, methods)
    model = load_model(model_dir, "cpu", torch.float32)
    spec = get_spec(model.config.model_type)
    ids = held_out_ids(model_dir, text, seq_len, scoring.seed)
    bar = tqdm(total=len(cands), desc="auto: held-out loss per candidate", disable=not progress)

    def measure(name: str) -> float:
        plan, method = cands[name]
        loss = candidate_loss(model, spec, plan, method, stats, ids)
        bar.update(1)
        return loss

    with bar:
        ranking = rank_by_loss(list(cands), measure)
    plan, method = cands[ranking.winner]
    record = {"by": "held-out loss", "formula": LOSS_FORMULA, "winner": ranking.winner,
              "losses": {k: round(v, 6) for k, v in ranking.losses.items()}, "unpruned_loss": model_loss(model, ids),
              "held_out_tokens": int(ids.numel()), "seconds": round(time.perf_counter() - t0, 2)}
    return replace(plan, criterion="auto", extra={**plan.extra, "auto": record}, document=None,
                   label="auto plan"), method
