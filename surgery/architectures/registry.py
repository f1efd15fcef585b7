"""Per-model_type facts as plain data: where expert counts live in config.json, which on-disk
tensors belong to which MoE layer, and what constraints a pruned config must satisfy.

Source: ../shared/reference/architectures.md (transformers 5.23, vLLM 0.33). Nothing here
imports the rest of the project; code elsewhere reads these records instead of branching
on model_type.

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

# Layer prefixes: (regex with a `layer` group, key whose config value is added to the index).
# The offset gives MTP layers their own index after the main stack, e.g. qwen3_next `mtp.layers.0`
# becomes layer `num_hidden_layers`.
Prefix = tuple[str, str | None]

_MODEL_LAYERS = r"model\.layers\.(?P<layer>\d+)"


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
    expert_math: str = "glu_halves"  # in-memory expert layout, see surgery.model.expert_math
    # On-disk fused gate/up: "out_in" = [E, 2I, H] (nn.Linear rows), "in_out" = [E, H, 2I];
    # gate and up are halves of the 2I axis unless `interleaved` (gpt_oss: gate = ::2, up = 1::2).
    fused_orientation: str = "out_in"
    interleaved: bool = False
    # transformers 5 in-memory name fragment -> on-disk fragment (for --stream-layers loading)
    memory_renames: tuple[tuple[str, str], ...] = ()
    # For tests: value that disables an expert's router logit in the *original* model.
    mask_value: float = float("-inf")
    notes: str = ""


def _qwen_like(model_type: str, expert_keys: tuple[str, ...], **kw) -> ArchSpec:
    return ArchSpec(
        model_type=model_type,
        expert_keys=expert_keys,
        top_k_keys=kw.pop("top_k_keys", ("num_experts_per_tok",)),
        prefixes=kw.pop("prefixes", ((_MODEL_LAYERS + r"\.mlp", None),)),
        router=kw.pop("router", (("gate.weight", 0),)),
        **kw,
    )


_V3_GROUP = dict(
    router=(("gate.weight", 0), ("gate.e_score_correction_bias", 0)),
    group_keys=("n_group", "topk_group"),
    min_group_size=2,
    mtp_count_key="num_nextn_predict_layers",
    scoring="sigmoid",
)

SPECS: dict[str, ArchSpec] = {
    s.model_type: s
    for s in [
        ArchSpec(
            "mixtral", ("num_local_experts", "num_experts"), ("num_experts_per_tok",),
            ((_MODEL_LAYERS + r"\.block_sparse_moe", None), (_MODEL_LAYERS + r"\.mlp", None)), (("gate.weight", 0),),
            memory_renames=((".mlp.", ".block_sparse_moe."),),
        ),
        ArchSpec(
            "phimoe", ("num_local_experts", "num_experts"), ("num_experts_per_tok",),
            ((_MODEL_LAYERS + r"\.block_sparse_moe", None), (_MODEL_LAYERS + r"\.mlp", None)),
            (("gate.weight", 0), ("router.weight", 0)),
            memory_renames=((".mlp.router.", ".block_sparse_moe.gate."), (".mlp.", ".block_sparse_moe.")),
            fixed_top_k=2, router_module="router", scoring="sparsemixer", mask_value=-1e9,
            notes="sparsemixer is hard-wired to top-2; masking with -inf gives NaN, so tests use -1e9",
        ),
        _qwen_like("qwen2_moe", ("num_experts",)),
        _qwen_like("qwen3_moe", ("num_experts", "num_local_experts")),
        _qwen_like(
            "qwen3_next", ("num_experts",),
            prefixes=((_MODEL_LAYERS + r"\.mlp", None), (r"mtp\.layers\.(?P<layer>\d+)\.mlp", "num_hidden_layers")),
        ),
        _qwen_like(
            "qwen3_vl_moe", ("num_experts", "num_local_experts"), config_path=("text_config",),
            fused_orientation="in_out",
            prefixes=((r"model\.language_model\.layers\.(?P<layer>\d+)\.mlp", None),),
        ),
        _qwen_like("olmoe", ("num_experts", "num_local_experts")),
        _qwen_like(
            "deepseek_v2", ("n_routed_experts", "num_experts"),
            group_keys=("n_group", "topk_group"), group_when=("topk_method", "group_limited_greedy"),
        ),
        _qwen_like("deepseek_v3", ("n_routed_experts", "num_local_experts"), **_V3_GROUP),
        _qwen_like("glm4_moe", ("n_routed_experts", "num_local_experts"), **_V3_GROUP),
        _qwen_like(
            "ernie4_5_moe", ("moe_num_experts", "num_experts"),
            top_k_keys=("moe_k", "num_experts_per_tok"),
            router=(("gate.weight", 0), ("moe_statics.e_score_correction_bias", 1),
                    ("gate.moe_statics.e_score_correction_bias", 1)),
            memory_renames=((".gate.moe_statics.", ".moe_statics."),),
        ),
        ArchSpec(
            "gpt_oss", ("num_local_experts", "num_experts"), ("num_experts_per_tok", "experts_per_token"),
            ((_MODEL_LAYERS + r"\.mlp", None),), (("router.weight", 0), ("router.bias", 0)),
            router_module="router", scoring="topk_softmax", expert_math="gpt_oss",
            fused_orientation="in_out", interleaved=True,
            notes="fused experts with biases (bf16) or MXFP4 *_blocks/*_scales, all expert axis 0",
        ),
        ArchSpec(
            "granitemoe", ("num_local_experts",), ("num_experts_per_tok",),
            ((_MODEL_LAYERS + r"\.block_sparse_moe", None),), (("router.layer.weight", 0), ("router.weight", 0)),
            fused=("input_linear.weight", "output_linear.weight"),
            router_module="router", scoring="topk_softmax",
            memory_renames=((".router.weight", ".router.layer.weight"),),
        ),
        ArchSpec(
            "llama4_text", ("num_local_experts",), ("num_experts_per_tok",),
            ((_MODEL_LAYERS + r"\.feed_forward", None),), (("router.weight", 0),),
            router_module="router", scoring="sigmoid", expert_math="llama4", fused_orientation="in_out",
            notes="top-1 with router weight applied to the expert input; shared expert untouched",
        ),
        ArchSpec(
            "llama4", ("num_local_experts",), ("num_experts_per_tok",),
            ((r"language_model\.model\.layers\.(?P<layer>\d+)\.feed_forward", None),
             (r"model\.language_model\.layers\.(?P<layer>\d+)\.feed_forward", None)),
            (("router.weight", 0),), config_path=("text_config",),
            router_module="router", scoring="sigmoid", expert_math="llama4", fused_orientation="in_out",
        ),
    ]
}


def supported() -> list[str]:
    return sorted(SPECS)


def get_spec(model_type: str) -> ArchSpec | None:
    return SPECS.get(model_type)
