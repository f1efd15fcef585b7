"""`ArchSpec`: what moe-surgery knows about one model_type (filled from data/<model_type>.json by loader.py).

Source of the facts: ../shared/reference/architectures.md (transformers 5.23, vLLM 0.33). Code
elsewhere reads these records instead of branching on model_type.

Tensor classification inside an MoE block (the text after a block prefix):
- `experts.{i}.<anything>` is a per-expert tensor (weights and every quantization companion);
- `experts.<name>` without an id, and each name in `fused`, is a fused tensor, expert axis 0;
- each name in `router` is sliced along the given axis;
- everything else (shared experts, their gates, norms) is copied untouched.
Prefixes and router names list both the Hub spelling and the transformers-5 in-memory
spelling, which `save_pretrained(save_original_format=False)` writes (e.g. Mixtral
`block_sparse_moe.gate` vs `mlp.gate`, PhiMoE `gate` vs `router`, Granite `router.layer` vs `router`).
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery.architectures.expert_math import ExpertMath, expert_math

# Layer prefixes: (regex with a `layer` group, key whose config value is added to the index).
# The offset gives MTP layers their own index after the main stack, e.g. qwen3_next `mtp.layers.0`
# becomes layer `num_hidden_layers`.
Prefix = tuple[str, str | None]


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    expert_keys: tuple[str, ...]  # every alias of the routed-expert count; all present ones are updated
    top_k_keys: tuple[str, ...]
    prefixes: tuple[Prefix, ...]
    router: tuple[tuple[str, int], ...]  # tensor suffix -> expert axis
    config_path: tuple[str, ...] = ()  # sub-config holding the keys, e.g. ("text_config",)
    fused: tuple[str, ...] = ()  # fused tensors outside `experts.` (expert axis 0)
    group_keys: tuple[str, str] | None = None  # (n_group, topk_group) for group-limited routers
    group_when: tuple[str, str] | None = None  # group limit only when config[key] == value
    min_group_size: int = 1  # experts each group must keep (v3 family: top-2 inside a group)
    fixed_top_k: int | None = None  # routers hard-wired to a k (PhiMoE sparsemixer: 2)
    mtp_count_key: str | None = None  # config key counting MTP layers that carry experts
    # For the collector (transformers 5 in-memory modules, relative to the MoE block):
    router_module: str = "gate"
    scoring: str = "softmax"  # how router logits become probabilities p over all experts
    expert_math: str = "glu_halves"  # in-memory expert layout: a kind of surgery.architectures.expert_math
    # On-disk fused gate/up: "out_in" = [E, 2I, H] (nn.Linear rows), "in_out" = [E, H, 2I];
    # gate and up are halves of the 2I axis unless `interleaved` (gpt_oss: gate = ::2, up = 1::2).
    fused_orientation: str = "out_in"
    interleaved: bool = False
    # transformers 5 in-memory name fragment -> on-disk fragment (for --stream-layers loading)
    memory_renames: tuple[tuple[str, str], ...] = ()
    # For tests: value that disables an expert's router logit in the *original* model.
    mask_value: float = float("-inf")
    notes: str = ""

    @property
    def math(self) -> ExpertMath:
        """The expert math table row of this architecture's kind."""
        return expert_math(self.expert_math)
