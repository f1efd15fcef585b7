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
from surgery.errors import UserError
from surgery.io import Checkpoint
from surgery.model.heap import release_free_memory
from surgery.model.novices import attach_checkpoint_novices
from surgery.model.reader import WeightReader
from surgery.model.weights import StreamingError, disk_name, plain_config, plan_module

__all__ = ["HiddenStore", "StreamingError", "stream_forward"]


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


def available_ram() -> int:
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
    if total_bytes < 0.5 * available_ram():
        return "cpu"
    return "disk"


def decoder_layers(base: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise StreamingError(f"{type(base).__name__} has no `layers` list to stream")
    return layers


def _disk_name(ckpt: Checkpoint, name: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    return disk_name(ckpt, name, renames)


_READERS: dict[str, WeightReader] = {}


def reader_for(device) -> WeightReader:
    """One WeightReader per device for the synchronous loads (its pinned ring is reused)."""
    key = str(torch.device(device))
    if key not in _READERS:
        _READERS[key] = WeightReader(device)
    return _READERS[key]


def load_params(module: torch.nn.Module, prefix: str, ckpt: Checkpoint, layout: MoELayout, layer: int | None,
                 device, dtype) -> None:
    """Fill every parameter and persistent buffer of `module` from disk, straight onto `device`
    (fused experts assembled from per-expert tensors in place; surgery.model.weights).
    The module must have been built in `dtype`."""
    module.to_empty(device=device)
    reader_for(device).load(plan_module(module, prefix, ckpt, layout, layer))


def _rebuild_meta_buffers(model: torch.nn.Module, config) -> None:
    """Rotary embeddings compute their buffers at construction: rebuild those modules on the CPU."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers()):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device("cpu"):
                setattr(parent, attr, type(module)(config=config))


def load_frame(model: torch.nn.Module, config, ckpt: Checkpoint, layout: MoELayout, device, dtype):
    """Load everything of a meta model's decoder but its layers (embeddings, final norm, rotary buffers).

    Returns (decoder, its layers, the decoder's module name, the text config).
    """
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = decoder_layers(base)
    base_prefix = next(n for n, m in model.named_modules() if m is base)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    _rebuild_meta_buffers(model, text_config)
    for name, child in base.named_children():
        if child is not layers and any(True for _ in child.parameters()):
            load_params(child, f"{base_prefix}.{name}", ckpt, layout, None, device, dtype)
    for name, buf in base.named_buffers():
        if buf.is_meta and not name.startswith("layers."):  # decoder layers are loaded one at a time later
            raise StreamingError(f"buffer {name} of {type(base).__name__} cannot be rebuilt for --stream-layers")
    return base, layers, base_prefix, text_config


def record_calls(base: torch.nn.Module, layers: torch.nn.ModuleList, batches: list[torch.Tensor],
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
                   before_batch: Callable[[int], None] | None = None, prefetch: bool = True,
                   on_loaded: Callable[[], None] | None = None) -> str:
    """Push every batch through the model layer by layer (outputs are discarded: hooks collect).

    `after_layer(i)` runs once every batch has been through layer i, before the next layer loads
    (the healer fits the student's layer i there, from what hooks cached). `before_batch(b)` runs
    before batch b goes through a layer (the collector hands the batch's token ids to its hooks).
    `prefetch`: layer i+1's weights are read on a background thread (on CUDA: through pinned buffers,
    copied on a side stream) while layer i computes, so at most two layers are on the device at once;
    False reads each layer when it is needed (same numbers, for tests and comparisons).
    `on_loaded()` runs once the frame (embeddings, norms) is loaded, before any text goes through.

    Returns where the hidden states were kept ("gpu", "cpu" or "disk").
    """
    from transformers import AutoModelForCausalLM

    config = plain_config(config)  # quantized checkpoints: a plain module tree, weights read dequantized
    ckpt = Checkpoint(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    attach_checkpoint_novices(model, ckpt, layout)  # MoNE novices (their weights load as zeros)
    if on_model:
        on_model(model)
    base, layers, base_prefix, text_config = load_frame(model, config, ckpt, layout, device, dtype)
    if on_loaded:
        on_loaded()
    hidden = text_config.hidden_size
    elem = torch.empty((), dtype=dtype).element_size()
    store = HiddenStore(hidden_states, torch.device(device), sum(b.numel() for b in batches) * hidden * elem,
                        spill_dir or Path(tempfile.gettempdir()))
    calls = record_calls(base, layers, batches, store, device)
    prefetcher = LayerPrefetcher(layers, base_prefix, ckpt, layout, device) if prefetch else None

    bar = tqdm(total=len(layers) * len(batches), desc="Layers × batches", disable=not progress)
    try:
        for i, layer in enumerate(layers):
            if prefetcher is not None:
                prefetcher.ready(i)  # and layer i + 1 starts loading
            else:
                load_params(layer, f"{base_prefix}.layers.{i}", ckpt, layout, i, device, dtype)
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
            release_free_memory()  # the layer's replaced hidden states and temporaries, before the next layer's
    finally:
        if prefetcher is not None:
            prefetcher.close()
        bar.close()
        ckpt.close()
    where = store.where
    store.close()
    return where


class LayerPrefetcher:
    """Loads modules one ahead on a background thread (surgery.model.reader.WeightReader.submit).

    `jobs` are (module on the meta device, its name prefix, checkpoint, layout, decoder layer index),
    in the order they will be used. `ready(k)` returns once job k's weights are usable on the compute
    stream and starts reading job k + 1 into freshly allocated device memory: job k + 1 is allocated
    while job k is still there, so the device holds at most two of them (free each with `.to("meta")`
    after use).
    """

    def __init__(self, layers: torch.nn.ModuleList | None, base_prefix: str, ckpt: Checkpoint | None,
                 layout: MoELayout | None, device, jobs: list[tuple] | None = None):
        self.device = torch.device(device)
        self.jobs = jobs if jobs is not None else [
            (layer, f"{base_prefix}.layers.{i}", ckpt, layout, i) for i, layer in enumerate(layers)]
        self.reader = WeightReader(self.device)
        self.pending: dict[int, object] = {}

    def _start(self, k: int) -> None:
        if k < len(self.jobs) and k not in self.pending:
            module, prefix, ckpt, layout, layer = self.jobs[k]
            module.to_empty(device=self.device)
            self.pending[k] = self.reader.submit(plan_module(module, prefix, ckpt, layout, layer))

    def ready(self, k: int) -> None:
        self._start(k)
        self.pending.pop(k).wait()
        self._start(k + 1)

    def close(self) -> None:
        for pending in self.pending.values():
            # the run already failed or finished: only the reader thread must end, its error is not news
            pending.future.exception()
        self.pending = {}
        self.reader.close()
