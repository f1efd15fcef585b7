"""Run a model one decoder layer at a time, materialising each layer's weights from the shards.

The model is built on the meta device. One pass with every decoder layer replaced by an
identity records the exact arguments the model passes to each layer (masks, rotary
embeddings, positions) for each batch; then, layer by layer, weights are read from the
safetensors shards, every batch goes through the layer, and the layer is freed. Hidden
states between layers stay where space allows (`HiddenStore`): on the accelerator, in RAM,
or in a memory-mapped file on disk. Peak accelerator memory is one decoder layer plus one
batch of activations (plus the stored hidden states when they are kept on the accelerator).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from surgery.architectures import MoELayout
from surgery.architectures.expert_math import memory_fused
from surgery.errors import UserError
from surgery.io.expert_weights import read_expert
from surgery.io import Checkpoint


class StreamingError(UserError):
    """The architecture cannot be streamed (a parameter has no on-disk tensor)."""


class HiddenStore:
    """Hidden states of every batch between two layers, on "gpu", "cpu" or "disk" (a memory-mapped file).

    "auto" picks the first place where all of them fit with room to spare: accelerator memory,
    then available RAM, then a temporary file next to the statistics output.
    """

    def __init__(self, where: str, device: torch.device, total_bytes: int, spill_dir: Path):
        self.where = _choose(where, device, total_bytes)
        self.device = device
        self.spill_dir = spill_dir
        self.items: list[torch.Tensor] = []

    def _disk_tensor(self, like: torch.Tensor, index: int) -> torch.Tensor:
        """A tensor backed by a file that is unlinked as soon as it is mapped: the mapping keeps the pages,
        and a run that is killed (even by SIGKILL) leaves nothing behind."""
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".moe-surgery-hidden-{index}-", suffix=".bin", dir=self.spill_dir)
            os.close(fd)
        except OSError as e:
            raise UserError(f"{self.spill_dir}: cannot spill hidden states to disk ({e.strerror})") from None
        try:
            return torch.from_file(name, shared=True, size=like.numel(), dtype=like.dtype).view(like.shape)
        except RuntimeError as e:
            raise UserError(f"{self.spill_dir}: cannot spill hidden states to disk ({str(e).splitlines()[0]})") from None
        finally:
            os.unlink(name)

    def put(self, index: int, value: torch.Tensor) -> None:
        if self.where == "gpu":
            stored = value.to(self.device)
        elif self.where == "cpu":
            stored = value.to("cpu")
        else:
            stored = self.items[index] if index < len(self.items) else self._disk_tensor(value, index)
            stored.copy_(value)
        if index < len(self.items):
            self.items[index] = stored
        else:
            self.items.append(stored)

    def get(self, index: int) -> torch.Tensor:
        return self.items[index].to(self.device)

    def close(self) -> None:
        self.items = []


def _available_ram() -> int:
    """MemAvailable on Linux (it counts reclaimable cache); free pages elsewhere."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _choose(where: str, device: torch.device, total_bytes: int) -> str:
    if where != "auto":
        return where
    if device.type == "cuda" and total_bytes < 0.3 * torch.cuda.mem_get_info(device)[0]:
        return "gpu"
    if total_bytes < 0.5 * _available_ram():
        return "cpu"
    return "disk"


def _decoder_layers(base: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise StreamingError(f"{type(base).__name__} has no `layers` list to stream")
    return layers


def _disk_name(ckpt: Checkpoint, name: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    if name in ckpt.weight_map:
        return name
    for mem, disk in renames:
        cand = name.replace(mem, disk)
        if cand in ckpt.weight_map:
            return cand
    return None


def _load_params(module: torch.nn.Module, prefix: str, ckpt: Checkpoint, layout: MoELayout, layer: int | None,
                 device, dtype) -> None:
    """Fill every parameter and persistent buffer of `module` from disk (fused experts via read_expert)."""
    spec = layout.spec
    module.to_empty(device=device)
    state = module.state_dict()
    for key, target in state.items():
        full = f"{prefix}.{key}" if prefix else key
        fused = memory_fused(key) if layer is not None and spec.math.glu_halves else None
        if fused is not None:  # [E, 2I, H] = gate rows then up rows, or [E, H, I] = down
            values = []
            for e in range(target.shape[0]):
                m = read_expert(ckpt, layout, layer, e)
                values.append(torch.cat([torch.from_numpy(m[role]) for role in fused.roles]))
            target.copy_(torch.stack(values).to(dtype))
            continue
        disk = _disk_name(ckpt, full, spec.memory_renames)
        if disk is None:
            raise StreamingError(f"{ckpt.dir}: no on-disk tensor for parameter {full!r}; --stream-layers cannot load it")
        value = torch.from_numpy(ckpt.array(disk).copy())
        if tuple(value.shape) != tuple(target.shape):
            raise StreamingError(f"{ckpt.dir}: {disk} has shape {list(value.shape)}, the model expects {list(target.shape)}")
        target.copy_(value.to(target.dtype))


def _rebuild_meta_buffers(model: torch.nn.Module, config) -> None:
    """Rotary embeddings compute their buffers at construction: rebuild those modules on the CPU."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers()):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device("cpu"):
                setattr(parent, attr, type(module)(config=config))


def _load_frame(model: torch.nn.Module, config, ckpt: Checkpoint, layout: MoELayout, device, dtype):
    """Load everything of a meta model's decoder but its layers (embeddings, final norm, rotary buffers).

    Returns (decoder, its layers, the decoder's module name, the text config).
    """
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = _decoder_layers(base)
    base_prefix = next(n for n, m in model.named_modules() if m is base)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    _rebuild_meta_buffers(model, text_config)
    for name, child in base.named_children():
        if child is not layers and any(True for _ in child.parameters()):
            _load_params(child, f"{base_prefix}.{name}", ckpt, layout, None, device, dtype)
    for name, buf in base.named_buffers():
        if buf.is_meta and not name.startswith("layers."):  # decoder layers are loaded one at a time later
            raise StreamingError(f"buffer {name} of {type(base).__name__} cannot be rebuilt for --stream-layers")
    return base, layers, base_prefix, text_config


def _record_calls(base: torch.nn.Module, layers: torch.nn.ModuleList, batches: list[torch.Tensor],
                  store: HiddenStore, device) -> list[list[dict]]:
    """One cheap pass with identity layers: each layer's call arguments per batch, and layer 0's inputs into `store`."""
    calls: list[list[dict]] = [[] for _ in layers]
    originals = [layer.forward for layer in layers]

    def recorder(i):
        def forward(hidden_states, *args, **kwargs):
            if i == 0:
                store.put(len(store.items), hidden_states)
            calls[i].append({"args": args, "kwargs": kwargs})
            return hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        with torch.no_grad():
            for ids in batches:
                base(input_ids=ids.to(device), use_cache=False)
    finally:
        for layer, fwd in zip(layers, originals):
            layer.forward = fwd
    return calls


def stream_forward(model_dir: str, config, layout: MoELayout, batches: list[torch.Tensor], device, dtype,
                   on_model: Callable[[torch.nn.Module], None] | None = None, progress: bool = True,
                   hidden_states: str = "auto", spill_dir: Path | None = None,
                   after_layer: Callable[[int], None] | None = None,
                   before_batch: Callable[[int], None] | None = None) -> str:
    """Push every batch through the model layer by layer (outputs are discarded: hooks collect).

    `after_layer(i)` runs once every batch has been through layer i, before the next layer loads
    (the healer fits the student's layer i there, from what hooks cached). `before_batch(b)` runs
    before batch b goes through a layer (the collector hands the batch's token ids to its hooks).

    Returns where the hidden states were kept ("gpu", "cpu" or "disk").
    """
    from transformers import AutoModelForCausalLM

    ckpt = Checkpoint(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    if on_model:
        on_model(model)
    base, layers, base_prefix, text_config = _load_frame(model, config, ckpt, layout, device, dtype)
    hidden = text_config.hidden_size
    elem = torch.empty((), dtype=dtype).element_size()
    store = HiddenStore(hidden_states, torch.device(device), sum(b.numel() for b in batches) * hidden * elem,
                        spill_dir or Path(tempfile.gettempdir()))
    calls = _record_calls(base, layers, batches, store, device)

    bar = tqdm(total=len(layers) * len(batches), desc="Layers × batches", disable=not progress)
    for i, layer in enumerate(layers):
        _load_params(layer, f"{base_prefix}.layers.{i}", ckpt, layout, i, device, dtype)
        with torch.no_grad():
            for b, call in enumerate(calls[i]):
                if before_batch:
                    before_batch(b)
                out = layer(store.get(b), *call["args"], **call["kwargs"])
                store.put(b, out[0] if isinstance(out, tuple) else out)
                bar.update(1)
        layer.to("meta")
        calls[i] = []
        if after_layer:
            after_layer(i)
    bar.close()
    ckpt.close()
    where = store.where
    store.close()
    return where
