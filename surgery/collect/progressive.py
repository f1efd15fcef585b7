"""Progressive collection: layers named in a plan behave as if pruned while statistics are collected.

Removing experts is the same as masking their router logits (`ArchSpec.mask_value`, -inf or a
large negative number for routers that cannot take -inf): softmax then renormalises over the
kept experts, and sigmoid scores of masked experts are 0. Selection-only correction biases
(`e_score_correction_bias`) are set to -inf for dropped experts, so they are never picked.

Each router of a planned layer is wrapped: during its forward, the one `F.linear` producing
its [*, E] logits gets the mask added. Its bias (a frozen parameter added when the router has
none) also carries the mask, so the collector's router probabilities, computed from
`router.weight` and `router.bias`, are the pruned model's. Edits are re-applied after
`--stream-layers` reloads a layer's weights, and undone by `restore()`.

Statistics keep the model's shape: dropped experts of a planned layer get zeros, and the
kept experts' statistics equal those of the rewritten checkpoint (ids mapped).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from surgery.architectures import ArchSpec
from surgery.architectures.expert_math import CORRECTION_BIAS
from surgery.collect.hooks import SelfCheckError
from surgery.model.blocks import find_blocks


class RouterMask:
    """Masks the dropped experts of every layer in `keep` ({layer: kept original ids})."""

    def __init__(self, model: torch.nn.Module, spec: ArchSpec, keep: dict[int, list[int]]):
        self.spec = spec
        blocks = {b.layer: b for b in find_blocks(model, spec)}
        missing = sorted(set(keep) - set(blocks))
        if missing:
            raise SelfCheckError(f"progressive plan names layers {missing} without a MoE block in the model")
        self._routers: list[tuple[torch.nn.Module, Callable, bool | None]] = []
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer, ids in keep.items():
            self._wrap(blocks[layer].router, ids)

    def _wrap(self, router: torch.nn.Module, kept: list[int]) -> None:
        original = router.forward
        # None: the router has a bias of its own; else whether `bias` is registered as None.
        bias_registered = None if getattr(router, "bias", None) is not None else "bias" in router._parameters
        self._routers.append((router, original, bias_registered))
        edited: set[int] = set()

        def forward(*args, **kwargs):
            mask = self._mask(router, kept)
            self._edit(router, mask, kept, edited)
            return _masked_call(original, mask, router.bias, args, kwargs)

        router.forward = forward

    def _mask(self, router: torch.nn.Module, kept: list[int]) -> torch.Tensor:
        num_experts = router.weight.shape[0]
        mask = torch.full((num_experts,), self.spec.mask_value, device=router.weight.device)
        mask[kept] = 0.0
        return mask

    def _edit(self, router: torch.nn.Module, mask: torch.Tensor, kept: list[int], edited: set[int]) -> None:
        """Mask the bias and correction biases once per tensor (a streamed layer brings new tensors)."""
        bias = getattr(router, "bias", None)
        if bias is None:
            router.bias = torch.nn.Parameter(mask.to(router.weight.dtype), requires_grad=False)
            edited.add(id(router.bias))
        elif id(bias) not in edited:
            self._set(bias, bias + mask.to(bias.dtype))
            edited.add(id(bias))
        for name, t in [*router.named_parameters(), *router.named_buffers()]:
            if name.endswith(CORRECTION_BIAS) and id(t) not in edited:
                dropped = torch.ones(t.shape[-1], dtype=torch.bool, device=t.device)
                dropped[kept] = False
                self._set(t, t.masked_fill(dropped, float("-inf")))
                edited.add(id(t))

    def _set(self, t: torch.Tensor, value: torch.Tensor) -> None:
        self._saved.append((t, t.detach().clone()))
        with torch.no_grad():
            t.copy_(value)

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in reversed(self._saved):
                if not t.is_meta:
                    t.copy_(saved)
        for router, original, bias_registered in self._routers:
            router.forward = original
            if bias_registered is not None:
                if getattr(router, "bias", None) is not None:  # the mask bias, once the router has run
                    del router.bias
                if bias_registered and "bias" not in router._parameters:
                    router.register_parameter("bias", None)
        self._routers.clear()
        self._saved.clear()


def _masked_call(forward: Callable, mask: torch.Tensor, masked_bias: torch.Tensor, args: tuple, kwargs: dict):
    """Run a router's forward with its logits projection masked (exactly one call); a projection
    using the router's own, already masked, bias is counted but not masked twice."""
    original_linear = F.linear
    calls = []

    def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = original_linear(input, weight, bias)
        if out.shape[-1] == mask.shape[0]:
            calls.append(1)
            if bias is not masked_bias:
                out = out + mask.to(out.device, out.dtype)
        return out

    F.linear = linear
    try:
        result = forward(*args, **kwargs)
    finally:
        F.linear = original_linear
    if len(calls) != 1:
        raise SelfCheckError(f"progressive masking found {len(calls)} router logit projections instead of one")
    return result
