"""Identity of a model for statistics files: hashes of config.json and of the router weights.

The router hash reads only router tensors (kilobytes to megabytes), so checking that a stats
file belongs to a checkpoint costs nothing next to the rewrite.
"""

from __future__ import annotations

import hashlib
import json

from surgery.architectures import MoELayout, resolve
from surgery.errors import UserError
from surgery.io import Checkpoint

# Keys that change when a config is merely re-saved, not when the model changes.
VOLATILE_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "use_cache")


def config_sha256(config: dict) -> str:
    stable = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def router_sha256(ckpt: Checkpoint, layout: MoELayout) -> str:
    h = hashlib.sha256()
    for layer, entry in layout.layers.items():
        # By layer and router role, not tensor name: per-expert and fused saves of one model agree.
        for name in sorted(entry.router, key=lambda n: n.rsplit(".", 2)[-2:]):
            h.update(f"{layer}:".encode())
            h.update(ckpt.read_bytes(name))
    return h.hexdigest()


def check_stats_match(model_dir, stats) -> None:
    """Refuse a statistics file whose router hash differs from the checkpoint's."""
    ckpt = Checkpoint(model_dir)
    layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
    ours = router_sha256(ckpt, layout)
    ckpt.close()
    theirs = stats.model.get("router_sha256")
    if theirs != ours:
        raise UserError(
            f"{stats.label}: statistics were collected on a different model (router hash {str(theirs)[:12]}…, "
            f"{model_dir} has {ours[:12]}…)"
        )
