"""Expert tensor names and the expert math kinds, as a small code table (plain data and regexes, no torch).

Two vocabularies meet here:

* **On disk** (safetensors names, any architecture): a per-expert nn.Linear weight has a role by its
  projection name (`gate_proj|w1` = gate, `up_proj|w3` = up, `down_proj|w2` = down; Mixtral and
  PhiMoE spell them w1/w3/w2); fused tensors are `experts.gate_up_proj|input_linear.weight` (gate and
  up) and `experts.down_proj|output_linear.weight` (Granite spells them input/output_linear). How a
  fused tensor's axes are ordered on disk is the architecture's `fused_orientation` / `interleaved`.
* **In memory** (transformers 5 experts modules): every kind keeps fused `gate_up_proj` and
  `down_proj` parameters; the kind (`ArchSpec.expert_math`) says their axes and the formula:

  | kind       | gate_up_proj            | down_proj  | formula                                  |
  |------------|-------------------------|------------|------------------------------------------|
  | glu_halves | [E, 2I, H], gate | up   | [E, H, I]  | act(x Wg^T) * (x Wu^T), then W_down       |
  | gpt_oss    | [E, H, 2I], interleaved | [E, I, H]  | x W + b, clamped SwiGLU, h W + b         |
  | llama4     | [E, H, 2I]              | [E, I, H]  | router weight scales the expert *input*  |

The torch code for each formula lives in `surgery.model.expert_math`, keyed by `ExpertMath.formula`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# On-disk names

# Projection name on disk -> role. Roles are nn.Linear weights: gate/up [I, H], down [H, I].
PROJECTION_ROLE = {
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up",
    "down_proj": "down", "w2": "down",
}
ROLES = ("gate", "up", "down")


def _role_pattern(role: str) -> re.Pattern:
    names = "|".join(n for n, r in PROJECTION_ROLE.items() if r == role)
    return re.compile(rf"(^|\.)({names})\.weight$")


# A per-expert tensor's role, by its name (e.g. `...experts.3.w1.weight` is the gate).
ROLE_PATTERNS: dict[str, re.Pattern] = {role: _role_pattern(role) for role in ROLES}
# Fused expert tensors on disk (expert axis 0): gate and up together, and down.
FUSED_GATE_UP = re.compile(r"(experts\.gate_up_proj|input_linear\.weight)$")
FUSED_DOWN = re.compile(r"(experts\.down_proj|output_linear\.weight)$")
# Shared (always-on) experts' Linear weights: `<moe block>.shared_expert(s).<projection>.weight`;
# group 1 is the projection name (a key of PROJECTION_ROLE).
SHARED_RE = re.compile(r"\.shared_experts?\.(gate_proj|up_proj|down_proj)\.weight$")
# Router tensor (in memory and on disk) that only biases the selection, never the combine weights
# (DeepSeek-V3 / GLM-4.5 `gate.e_score_correction_bias`, ERNIE `moe_statics.e_score_correction_bias`).
CORRECTION_BIAS = "e_score_correction_bias"

# ---------------------------------------------------------------------------------------------
# In-memory (transformers 5) fused expert parameters


@dataclass(frozen=True)
class FusedMatrix:
    """One fused parameter of a transformers 5 experts module and where it lives on disk."""

    memory: str  # attribute of the experts module
    disk: re.Pattern  # its fused on-disk tensor names
    roles: tuple[str, ...]  # nn.Linear roles stacked along its rows in glu_halves order (gate, then up)


GATE_UP = FusedMatrix("gate_up_proj", FUSED_GATE_UP, ("gate", "up"))
DOWN = FusedMatrix("down_proj", FUSED_DOWN, ("down",))
FUSED_MATRICES = {m.memory: m for m in (GATE_UP, DOWN)}
_MEMORY_FUSED = re.compile(r"(?:^|\.)experts\.(gate_up_proj|down_proj)$")


def memory_fused(name: str) -> FusedMatrix | None:
    """The fused matrix an in-memory parameter name (`...experts.gate_up_proj`) is, else None."""
    m = _MEMORY_FUSED.search(name)
    return FUSED_MATRICES[m[1]] if m else None


# ---------------------------------------------------------------------------------------------
# The kinds


@dataclass(frozen=True)
class ExpertMath:
    kind: str
    # Name of the torch formula in surgery.model.expert_math; None = the collector cannot compute it.
    formula: str | None
    # Fused in-memory matrices (attribute, axis of size hidden_size), gate_up first and down last;
    # empty when the collector does not model the kind.
    matrices: tuple[tuple[str, int], ...]
    # In-memory gate_up_proj is [E, 2I, H] with gate rows then up rows and down_proj [E, H, I], i.e. the
    # nn.Linear roles stacked: such parameters can be loaded from (and exported to) any on-disk layout.
    glu_halves: bool
    # The router weight multiplies the expert's input instead of its output (vLLM's expert
    # substitution cannot serve it, so novices are refused).
    router_scales_input: bool = False

    @property
    def down(self) -> tuple[str, int]:
        """(in-memory down matrix, its hidden-size axis); its other non-expert axis is the intermediate size."""
        return self.matrices[-1]


EXPERT_MATH: dict[str, ExpertMath] = {
    m.kind: m
    for m in [
        ExpertMath("glu_halves", formula="glu", matrices=((GATE_UP.memory, 2), (DOWN.memory, 1)), glu_halves=True),
        ExpertMath("gpt_oss", formula="biased_clamped_glu", matrices=((GATE_UP.memory, 1), (DOWN.memory, 2)),
                   glu_halves=False),
        ExpertMath("llama4", formula=None, matrices=(), glu_halves=False, router_scales_input=True),
    ]
}


def expert_math(kind: str) -> ExpertMath:
    """The table row of `kind` (KeyError names the known kinds)."""
    try:
        return EXPERT_MATH[kind]
    except KeyError:
        raise KeyError(f"unknown expert math kind {kind!r}; known: {', '.join(EXPERT_MATH)}") from None


def collectable_kinds() -> tuple[str, ...]:
    """Kinds the collector has a formula for."""
    return tuple(k for k, m in EXPERT_MATH.items() if m.formula)
