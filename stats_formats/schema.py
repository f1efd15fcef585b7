"""Schema v1 of the per-expert statistics file: every tensor, its shape and its formula.

Notation for one MoE layer (E routed experts, hidden size H, expert intermediate size I),
summed over the calibration tokens t that reach the layer:
  r_i(t)  1 if expert i is among token t's selected experts, else 0
  g_i(t)  the combine weight the model actually applies to expert i (after any renormalisation)
  p_i(t)  the router probability of expert i over all E experts (softmax or sigmoid of the logits)
  x(t)    the MoE block's input to the experts (size H)
  h_i(t)  expert i's intermediate activation, the input of its down projection (size I)
  f_i(t)  expert i's output before gating (size H)

Every tensor is float64 and a sum over tokens, except `out_norm_max` (a maximum) and `token_bits`
(a uint8 bit set), so files from disjoint data merge exactly by adding (taking the maximum for
`out_norm_max`, the bitwise or for `token_bits`).
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
    shape: str  # symbolic, over E, H, I and B = ceil(vocab_size / 8)
    formula: str
    merge: str = "sum"  # "sum", "max" or "or" (bitwise, for bit sets)
    dtype: str = "F64"  # safetensors dtype: F64, or U8 for bit sets


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

# Gradient statistics, written only by `collect --gradients` (a file holds all of them or none).
# G_{s,i} = dL_s/dW_i: the gradient of sequence s's next-token loss L_s (the sum of its tokens'
# cross-entropies) with respect to expert i's matrices W_i = [W_gate, W_up, W_down] (biases excluded).
# Hidden dimension j of G_{s,i} is column j of the gate and up gradients and row j of the down
# gradient: 3*I entries. Sums run over calibration sequences, so they merge exactly; the sequence is
# the unit because a nonlinear function of a gradient summed over shards cannot be merged.
GRADIENT_FIELDS: tuple[Field, ...] = (
    Field("grad_hidden_count", "1", "n_g = sum_s 3*I (entries of G_{s,i} per hidden dimension, over sequences)"),
    Field("grad_gram", "E,E", "K^g_ij = sum_s <G_{s,i}, G_{s,j}> (flattened; diagonal = sum_s ||G_{s,i}||^2)"),
    Field("grad_hidden_sum", "E,H", "sum_s of the sum of G_{s,i}'s entries in hidden dimension j"),
    Field("grad_hidden_sq_sum", "E,H", "sum_s of the sum of G_{s,i}'s squared entries in hidden dimension j"),
    Field("grad_outliers", "E", "sum_s of the number of entries of G_{s,i} outside mean +- 3 std of G_{s,i}'s entries"),
)

# MC-Suite statistics: token_bits is written by every `collect` since it was added (older files lack
# it), out_hist only by `collect --histogram`.
# out_hist grid: s(f) = sign(f) * clip(HIST_STEPS * (log2|f| + HIST_LOG2_RANGE), 0, HIST_HALF), so
# eighth octaves from 2^-16 to 2^16; bin j + HIST_HALF holds grid point j = -HIST_HALF..HIST_HALF.
HIST_STEPS = 8
HIST_LOG2_RANGE = 16
HIST_HALF = 2 * HIST_STEPS * HIST_LOG2_RANGE
MCSUITE_FIELDS: tuple[Field, ...] = (
    Field("out_hist", f"E,{2 * HIST_HALF + 1}",
          "O_i[j] = sum_t r_i sum_c w_j(f_ic): each value's unit weight split linearly between the grid points "
          f"floor(s) and floor(s)+1 around s(f) = sign(f) clip({HIST_STEPS} log2|f| + {HIST_HALF // 2}, 0, "
          f"{HIST_HALF}); bin = point + {HIST_HALF}"),
    Field("token_bits", "E,B",
          "bit v % 8 (least significant first) of byte v // 8 of row i is 1 iff a token with id v was routed to i "
          "at least once (the input token at the routed position)", merge="or", dtype="U8"),
)

# Merging statistics, written only by `collect --merge-stats` (all or none): what `prune --merge hc-smoe`
# (every expert's mean output over every token, routed or not: HC-SMoE clusters on it) and
# `prune --merge mc-smoe` (router-logit similarity) read. l_i(t) is the router's logit for expert i.
MERGE_FIELDS: tuple[Field, ...] = (
    Field("dense_out_sum", "E,H", "sum over all tokens (routed or not) of f_i(x) (every expert run on every token)"),
    Field("logit_gram", "E,E", "L_ij = sum over all tokens of l_i l_j (router logits)"),
)

# Optional field groups by the `collect` option that writes them ("" for a plain collect): all of a
# group's tensors or none.
OPTIONAL_GROUPS: dict[str, tuple[Field, ...]] = {"--gradients": GRADIENT_FIELDS, "--histogram": MCSUITE_FIELDS[:1],
                                                  "": MCSUITE_FIELDS[1:], "--merge-stats": MERGE_FIELDS}

FIELD_BY_NAME = {f.name: f for f in (*FIELDS, *GRADIENT_FIELDS, *MCSUITE_FIELDS, *MERGE_FIELDS)}
HOLDOUT_FIELDS: tuple[str, ...] = ("tokens", "count", "moment_g", "gram")


def field_shape(field: str, num_experts: int, hidden_size: int, intermediate_size: int,
                vocab_size: int = 0) -> tuple[int, ...]:
    """The field's shape for a model; `vocab_size` only matters for `token_bits` (model.vocab_size)."""
    dims = {"E": num_experts, "H": hidden_size, "I": intermediate_size, "B": -(-vocab_size // 8)}
    return tuple(int(s) if s.isdigit() else dims[s] for s in FIELD_BY_NAME[field].shape.split(","))


def tensor_name(layer: int, field: str, holdout: bool = False) -> str:
    return f"{'holdout.' if holdout else ''}layers.{layer}.{field}"


# Sums (or the maximum) of non-negative terms: a negative value can only come from corruption.
NONNEGATIVE_FIELDS: frozenset[str] = frozenset({
    "tokens", "count", "moment_g", "moment_p", "prob_sum", "out_sq_sum", "out_norm_max",
    "inter_norm_sum", "in_sq_sum", "in_gsq_sum", "inter_sq_sum", "inter_gsq_sum", "coselect",
    "grad_hidden_count", "grad_hidden_sq_sum", "grad_outliers",
    "out_hist", "token_bits",
})


def field_table_markdown(fields: tuple[Field, ...] = FIELDS) -> str:
    """A field table of docs/stats-format.md, generated from the schema so the two cannot disagree."""
    rows = ["| field | shape | merge | non-negative | formula |", "|---|---|---|---|---|"]
    for f in fields:
        shape = ", ".join(f.shape.split(","))
        formula = f.formula.replace("|", "\\|")
        nonneg = "yes" if f.name in NONNEGATIVE_FIELDS else "no"
        rows.append(f"| `{f.name}` | [{shape}] | {f.merge} | {nonneg} | `{formula}` |")
    return "\n".join(rows)
