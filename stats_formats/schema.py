"""Schema v1 of the per-expert statistics file: every tensor, its shape and its formula.

Notation for one MoE layer (E routed experts, hidden size H, expert intermediate size I),
summed over the calibration tokens t that reach the layer:
  r_i(t)  1 if expert i is among token t's selected experts, else 0
  g_i(t)  the combine weight the model actually applies to expert i (after any renormalisation)
  p_i(t)  the router probability of expert i over all E experts (softmax or sigmoid of the logits)
  x(t)    the MoE block's input to the experts (size H)
  h_i(t)  expert i's intermediate activation, the input of its down projection (size I)
  f_i(t)  expert i's output before gating (size H)

Every tensor is float64 and a sum over tokens, except `out_norm_max` (a maximum), so files from
disjoint data merge exactly by adding (and taking the maximum for `out_norm_max`).
Tensor names are `layers.{l}.{field}` for main statistics and `holdout.layers.{l}.{field}` for
the optional held-out slice (only the fields in HOLDOUT_FIELDS), where l is the checkpoint's layer
index (MTP layers count after the main stack).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_NAME = "moe-surgery-stats"
SCHEMA_VERSION = "1.0"
METADATA_KEY = "moe_surgery"


@dataclass(frozen=True)
class Field:
    name: str
    shape: str  # symbolic, over E, H, I
    formula: str
    merge: str = "sum"  # "sum" or "max"


FIELDS: tuple[Field, ...] = (
    Field("tokens", "1", "N = number of tokens that reached the layer's router"),
    Field("count", "E", "n_i = sum_t r_i"),
    Field("moment_g", "3,3,E", "M_g[a,b,i] = sum_t r_i g_i^a ||f_i||^b for a,b in {0,1,2}"),
    Field("moment_p", "3,3,E", "M_p[a,b,i] = sum_t r_i p_i^a ||f_i||^b for a,b in {0,1,2}"),
    Field("prob_sum", "E", "sum over all tokens (routed or not) of p_i"),
    Field("out_sum", "E,H", "S_i = sum_t r_i f_i"),
    Field("out_sq_sum", "E,H", "Q_i = sum_t r_i f_i * f_i (element-wise)"),
    Field("out_unit_sum", "E,H", "U_i = sum_t r_i f_i / ||f_i||"),
    Field("out_norm_max", "E", "max_t r_i ||f_i|| (0 for an expert never routed)", merge="max"),
    Field("inter_norm_sum", "E", "sum_t r_i ||h_i||"),
    Field("in_sq_sum", "E,H", "sum_t r_i x * x (per input channel; Wanda on gate/up)"),
    Field("in_gsq_sum", "E,H", "sum_t r_i g_i^2 x * x (router-weighted; MoE-Pruner on gate/up)"),
    Field("inter_sq_sum", "E,I", "sum_t r_i h_i * h_i (Wanda on down)"),
    Field("inter_gsq_sum", "E,I", "sum_t r_i g_i^2 h_i * h_i (MoE-Pruner on down)"),
    Field("coselect", "E,E", "C_ij = sum_t r_i r_j (diagonal = n_i)"),
    Field("gram", "E,E", "K_ij = sum_t r_i r_j g_i g_j <f_i, f_j> (diagonal = M_g[2,2,i])"),
)

FIELD_BY_NAME = {f.name: f for f in FIELDS}
HOLDOUT_FIELDS: tuple[str, ...] = ("tokens", "count", "moment_g", "gram")


def field_shape(field: str, num_experts: int, hidden_size: int, intermediate_size: int) -> tuple[int, ...]:
    dims = {"E": num_experts, "H": hidden_size, "I": intermediate_size}
    return tuple(int(s) if s.isdigit() else dims[s] for s in FIELD_BY_NAME[field].shape.split(","))


def tensor_name(layer: int, field: str, holdout: bool = False) -> str:
    return f"{'holdout.' if holdout else ''}layers.{layer}.{field}"


# Sums (or the maximum) of non-negative terms: a negative value can only come from corruption.
NONNEGATIVE_FIELDS: frozenset[str] = frozenset({
    "tokens", "count", "moment_g", "moment_p", "prob_sum", "out_sq_sum", "out_norm_max",
    "inter_norm_sum", "in_sq_sum", "in_gsq_sum", "inter_sq_sum", "inter_gsq_sum", "coselect",
})


def field_table_markdown() -> str:
    """The field table of docs/stats-format.md, generated from FIELDS so the two cannot disagree."""
    rows = ["| field | shape | merge | non-negative | formula |", "|---|---|---|---|---|"]
    for f in FIELDS:
        shape = ", ".join(f.shape.split(","))
        formula = f.formula.replace("|", "\\|")
        nonneg = "yes" if f.name in NONNEGATIVE_FIELDS else "no"
        rows.append(f"| `{f.name}` | [{shape}] | {f.merge} | {nonneg} | `{formula}` |")
    return "\n".join(rows)
