"""Checkpoint I/O at the byte level: validated safetensors headers, positioned reads, sequential writes."""

from surgery.io.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from surgery.io.paths import inside, is_plain_name
from surgery.io.safetensors_file import DTYPE_BITS, CheckpointError, SafetensorsFile, TensorInfo, decode, nbytes
from surgery.io.output_dir import atomic_output_dir
from surgery.io.writer import OutTensor, rewrite_shard, write_safetensors, write_safetensors_hashing

__all__ = [
    "Checkpoint", "CheckpointError", "SafetensorsFile", "TensorInfo", "OutTensor", "DTYPE_BITS",
    "INDEX_NAME", "SINGLE_NAME", "atomic_output_dir", "decode", "rewrite_shard", "nbytes", "write_safetensors", "write_safetensors_hashing",
    "inside", "is_plain_name",
]
