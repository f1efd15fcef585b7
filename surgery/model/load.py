"""Loading a model and its tokenizer for the commands that run one (collect, heal, eval)."""

from __future__ import annotations

import os
import time

import torch

from surgery.errors import UserError


def load_model(path: str | os.PathLike, device: str = "cpu", dtype: str | torch.dtype | None = None):
    """A causal LM from a local folder, in eval mode on `device` (dtype from config unless given).

    The model is built on the meta device, materialised on `device`, and every weight is read from
    the shards straight into its place there (surgery.model.weights): no full copy of the model is
    ever held in host memory on the way to a GPU. A model that cannot fit in the device's free
    memory is refused up front (`collect --stream-layers` runs it one layer at a time).
    Quantized checkpoints (FP8, NVFP4, MXFP4: surgery.io.quantization) load the same way, each weight
    dequantized as it is read (one tensor or one expert at a time) into a plain model in `dtype`; the
    model's config then has no `quantization_config`. MoNE novice checkpoints (config lists
    `approximate_experts`) go through transformers' own loader. The seconds spent are in
    `model.moe_surgery_load_seconds`.
    """
    from surgery.model.novices import is_novice_checkpoint, load_novice_model

    start = time.perf_counter()
    check_loadable(path)
    if is_novice_checkpoint(path):
        model = load_novice_model(path, device, dtype)
    else:
        model = _load_direct(path, device, dtype)
    model.moe_surgery_load_seconds = time.perf_counter() - start
    return model


def _load_direct(path, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgery.architectures import resolve
    from surgery.io import Checkpoint
    from surgery.model.weights import plain_config

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{path}: transformers cannot load this checkpoint ({_first_line(e)})") from None
    config = plain_config(config)  # quantized: a plain module tree, weights read dequantized
    ckpt = Checkpoint(path)
    try:
        dt = _resolve_dtype(dtype, config, ckpt)
        check_fits(ckpt, torch.device(device), dt)
        layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dt)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise UserError(f"{path}: transformers cannot build this model ({_first_line(e)})") from None
        model.config._name_or_path = str(path)
        _keep_in_float32(model, dt)
        fill_model(model, config, ckpt, layout, torch.device(device))
    finally:
        ckpt.close()
    return model.eval()


class DoesNotFitError(UserError):
    """The whole model does not fit on the device."""


def model_bytes(path: str | os.PathLike, dtype: torch.dtype | None = None) -> int:
    """Bytes of the model's weights in `dtype` (None: as stored), from the shard headers alone."""
    from surgery.io import Checkpoint
    from surgery.model.weights import estimate_bytes

    with Checkpoint(path) as ckpt:
        return estimate_bytes(ckpt, dtype)


def free_bytes(device: torch.device) -> int | None:
    """Memory free for the model on `device`: free accelerator memory, or MemAvailable for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        from surgery.model.streaming import available_ram

        return available_ram()
    return None


FIT_SHARE = 0.9  # of the free memory the weights may take; activations need the rest


def fits(needed: int, device: torch.device) -> bool:
    free = free_bytes(device)
    return free is None or needed <= FIT_SHARE * free


def check_fits(ckpt, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before reading any weight, a model that cannot fit in `device`'s free memory."""
    from surgery.model.weights import estimate_bytes

    needed = estimate_bytes(ckpt, dtype)
    if not fits(needed, device):
        raise DoesNotFitError(
            f"{ckpt.dir}: the model needs {needed / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}, "
            f"{device} has {free_bytes(device) / 2**30:.1f} GiB free: too large to load whole; "
            "`collect --stream-layers` runs it one decoder layer at a time")


def _resolve_dtype(dtype, config, ckpt) -> torch.dtype:
    """The dtype given, else the config's, else the first floating tensor's on disk (from_pretrained's "auto")."""
    from surgery.model.weights import TORCH_DTYPES

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        return getattr(torch, dtype)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (config, text):
        value = getattr(cfg, "dtype", None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            return getattr(torch, value)
    for name in ckpt.names():
        stored = TORCH_DTYPES.get(ckpt.info(name).dtype)
        if stored is not None and stored.is_floating_point:
            return stored
    return torch.float32


def _keep_in_float32(model, dtype: torch.dtype) -> None:
    """transformers' `_keep_in_fp32_modules(_strict)`: the same parameters stay float32 as from_pretrained keeps."""
    keep = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if not keep:
        return
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            if p.is_floating_point() and any(k in full for k in keep):
                p.data = p.data.to(torch.float32)


def fill_model(model, config, ckpt, layout, device: torch.device) -> None:
    """Materialise a meta model on `device` and read every weight into place, shard by shard in file
    order; rotary buffers are recomputed, tied weights tied again."""
    from surgery.model.streaming import reader_for
    from surgery.model.weights import plan_module

    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rotary = [n for n, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]
    rebuilt = {id(b) for n in rotary for b in model.get_submodule(n).buffers()}
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    leftover = [n for n, b in model.named_buffers() if id(b) not in persistent and id(b) not in rebuilt]
    if leftover:
        raise UserError(f"{ckpt.dir}: buffer {leftover[0]} is computed at construction and cannot be rebuilt")
    model.to_empty(device=device)
    for name in rotary:  # computed on the CPU at construction, as from_pretrained does, then moved
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("cpu"):
            fresh = type(parent.get_submodule(attr))(config=text_config)
        setattr(parent, attr, fresh.to(device))
    model.tie_weights()
    pieces = plan_module(model, "", ckpt, layout, None)
    pieces.sort(key=lambda p: (str(p.file.path), p.info.begin))
    reader_for(device).load(pieces)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def check_loadable(path: str | os.PathLike) -> None:
    """Our own checks before transformers reads the files: every header, the index, the expert shapes
    against config.json and every quantized weight's companions, so a damaged checkpoint gets one line
    naming the file, not a traceback (nor an error halfway through loading)."""
    from surgery.architectures import check_shapes, resolve
    from surgery.io import Checkpoint
    from surgery.io.quantization import check_quantized

    ckpt = Checkpoint(path)
    try:
        layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
        problems = check_shapes(layout, {n: ckpt.info(n).shape for n in ckpt.names()})
        check_quantized(ckpt)
    finally:
        ckpt.close()
    if problems:
        raise UserError(f"{ckpt.config_path}: the tensors disagree with it: {problems[0]}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer stored next to the model.

    Without tokenizer files transformers silently builds an empty tokenizer from the model
    type, which would turn any text into nothing; refuse that instead.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if len(tokenizer) < 2:
        raise UserError(f"{path}: no usable tokenizer (tokenizer.json / tokenizer_config.json missing?); "
                        "copy the original model's tokenizer files into this folder")
    return tokenizer

