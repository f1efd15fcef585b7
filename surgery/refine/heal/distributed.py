"""Sharded distillation under torchrun: `torchrun --nproc-per-node N -m surgery.cli heal ...`.

Each rank loads the student and the teacher, then both are sharded with PyTorch's FSDP2
(`torch.distributed.fsdp.fully_shard`, one group per decoder layer, then the root): parameters,
gradients and AdamW states are split across the ranks. Every global batch of --batch-size
sequences is split across the ranks (rank r takes sequences r, r + N, ...), so the averaged
gradient is the one-process gradient of the same batch, and N ranks train the same weights as one
(within float rounding) when N divides --batch-size. Every rank measures the whole held-out set (a
sixteenth of the text), so every rank keeps the same best state. The layer-local stage, which holds one layer of each model at a
time, runs on rank 0 and its result is broadcast. Rank 0 alone opens and writes the output; the
others wait for it; a failing rank stops the run (torchrun ends the others) and the output folder is
never left half-written. NCCL on GPUs, gloo on CPUs (tests).

Each rank reads the whole models before sharding them, so loading needs one copy of each model per
rank; what the sharding divides by N is the training state (weights, gradients, optimizer).
--lora, --recipe moe-pruner and sparsified students run on one process only (their expert-wise
terms and adapters read whole expert weights outside the sharded forward).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from surgery.refine.heal.pairing import HealError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def sharded(self) -> bool:
        return self.size > 1


def start(device: torch.device) -> World:
    """This process's rank and the world size; joins the process group when launched by torchrun."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def rank_device(device: torch.device, world: World) -> torch.device:
    """Each rank's own GPU (LOCAL_RANK) when sharded on CUDA."""
    if world.sharded and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def check_sharded(world: World, options, sparsified: bool) -> None:
    """Refuse what runs on one process only, before any work."""
    if not world.sharded:
        return
    if options.lora or options.recipe != "default" or sparsified:
        raise HealError("torchrun: sharded heal runs the default recipe with full-parameter training on "
                        "expert-pruned students; --lora, --recipe moe-pruner and sparsified students run on one process")
    if options.batch_size % world.size:
        raise HealError(f"torchrun: --batch-size {options.batch_size} must be a multiple of the {world.size} ranks "
                        "(each global batch is split evenly across them)")


def shard(model: torch.nn.Module, device: torch.device, world: World) -> torch.nn.Module:
    """FSDP2 over the ranks: each decoder layer its own group, then the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from surgery.model.streaming import decoder_layers

    mesh = init_device_mesh(device.type, (world.size,))
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    for layer in decoder_layers(base):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def split(batches: list[torch.Tensor], world: World) -> list[torch.Tensor]:
    """This rank's share of every global batch (sequences rank, rank + size, ...)."""
    return [b[world.rank::world.size] for b in batches] if world.sharded else batches


def total(count: int, world: World) -> int:
    """A count summed over the ranks."""
    if not world.sharded:
        return count
    import torch.distributed as dist

    t = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t[0])


def full(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (gathered from the ranks when sharded; every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def broadcast(values: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """Rank 0's tensors on every rank."""
    if not world.sharded:
        return values
    import torch.distributed as dist

    box = [values if world.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.sharded:
        import torch.distributed as dist

        dist.barrier()
