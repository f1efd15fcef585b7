"""Fake but exactly consistent statistics: random per-token routing and activations, reduced by
each formula of stats_formats.schema, so tests can check merges and scores against ground truth."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from stats_formats import HOLDOUT_FIELDS, tensor_name


@dataclass
class Tokens:
    """One layer's per-token quantities, in the notation of stats_formats.schema."""

    r: np.ndarray  # [N, E] 1 where the expert is selected
    g: np.ndarray  # [N, E] combine weight (0 where not selected)
    p: np.ndarray  # [N, E] router probability
    x: np.ndarray  # [N, H] MoE block input
    h: np.ndarray  # [N, E, I] intermediate activation of every expert
    f: np.ndarray  # [N, E, H] output of every expert before gating

    def __getitem__(self, index: Any) -> Tokens:
        """A subset of the tokens, e.g. tokens[:10] or tokens[mask]."""
        return Tokens(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return len(self.r)


def default_model(
    num_experts: int = 4, hidden: int = 6, inter: int = 5, layers: tuple[int, ...] = (0, 1), top_k: int = 2
) -> dict[str, Any]:
    return {
        "model_type": "fake_moe",
        "num_hidden_layers": max(layers) + 1,
        "num_experts": num_experts,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "top_k": top_k,
        "moe_layers": list(layers),
        "config_sha256": "c" * 64,
        "router_sha256": "r" * 64,
    }


def default_calibration(num_tokens: int = 0, holdout_sequences: int = 0, **overrides: Any) -> dict[str, Any]:
    calibration = {
        "sources": ["fake:random"],
        "num_sequences": 1,
        "num_tokens": num_tokens,
        "seq_len": num_tokens,
        "seed": 0,
        "holdout_sequences": holdout_sequences,
    }
    calibration.update(overrides)
    return calibration


def fake_tokens(model: dict[str, Any], n: int, rng: np.random.Generator) -> Tokens:
    """Softmax top-k routing with renormalised weights and an uneven expert load."""
    e, k = model["num_experts"], model["top_k"]
    logits = rng.normal(size=(n, e)) + np.linspace(-1.0, 1.0, e)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    r = np.zeros((n, e))
    np.put_along_axis(r, np.argsort(-p, axis=1)[:, :k], 1.0, axis=1)
    g = r * p
    g /= g.sum(axis=1, keepdims=True)
    return Tokens(
        r=r,
        g=g,
        p=p,
        x=rng.normal(size=(n, model["hidden_size"])),
        h=rng.normal(size=(n, e, model["intermediate_size"])),
        f=rng.normal(size=(n, e, model["hidden_size"])) * rng.uniform(0.5, 2.0, size=(n, e, 1)),
    )


def fake_layers(model: dict[str, Any], n: int, seed: int) -> dict[int, Tokens]:
    rng = np.random.default_rng(seed)
    return {layer: fake_tokens(model, n, rng) for layer in model["moe_layers"]}


def layer_fields(t: Tokens) -> dict[str, np.ndarray]:
    """Every schema field of one layer, straight from its formula."""
    r, g, p, x, h, f = t.r, t.g, t.p, t.x, t.h, t.f
    fn = np.linalg.norm(f, axis=2)
    hn = np.linalg.norm(h, axis=2)
    powers = np.arange(3)
    g_pow = g[:, None, :] ** powers[None, :, None]  # [N, a, E]
    p_pow = p[:, None, :] ** powers[None, :, None]
    n_pow = fn[:, None, :] ** powers[None, :, None]  # [N, b, E]
    w = r * g
    return {
        "tokens": np.array([float(len(t))]),
        "count": r.sum(axis=0),
        "moment_g": np.einsum("te,tae,tbe->abe", r, g_pow, n_pow),
        "moment_p": np.einsum("te,tae,tbe->abe", r, p_pow, n_pow),
        "prob_sum": p.sum(axis=0),
        "out_sum": np.einsum("te,teh->eh", r, f),
        "out_sq_sum": np.einsum("te,teh->eh", r, f * f),
        "out_unit_sum": np.einsum("te,teh->eh", r, f / fn[:, :, None]),
        "out_norm_max": (r * fn).max(axis=0, initial=0.0),
        "inter_norm_sum": (r * hn).sum(axis=0),
        "in_sq_sum": np.einsum("te,th->eh", r, x * x),
        "in_gsq_sum": np.einsum("te,th->eh", r * g * g, x * x),
        "inter_sq_sum": np.einsum("te,tei->ei", r, h * h),
        "inter_gsq_sum": np.einsum("te,tei->ei", r * g * g, h * h),
        "coselect": r.T @ r,
        "gram": np.einsum("ti,tj,tih,tjh->ij", w, w, f, f),
    }


def compute_fields(
    main: dict[int, Tokens], holdout: dict[int, Tokens] | None = None
) -> dict[str, np.ndarray]:
    """All tensors of a statistics file, named as in the file."""
    tensors = {}
    for layer, tokens in main.items():
        tensors.update({tensor_name(layer, k): v for k, v in layer_fields(tokens).items()})
    for layer, tokens in (holdout or {}).items():
        fields = layer_fields(tokens)
        tensors.update({tensor_name(layer, k, True): fields[k] for k in HOLDOUT_FIELDS})
    return tensors


def make_stats(
    model: dict[str, Any], tokens_per_layer: int, seed: int, holdout_tokens: int = 0
) -> dict[str, np.ndarray]:
    """Tensors of a valid file for `model` (with a holdout slice when holdout_tokens > 0)."""
    main = fake_layers(model, tokens_per_layer, seed)
    holdout = fake_layers(model, holdout_tokens, seed + 1_000_003) if holdout_tokens else None
    return compute_fields(main, holdout)
