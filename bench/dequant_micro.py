"""Decode time of one DeepSeek-V3 expert matrix (2048 x 7168 FP8 e4m3 codes, 128x128 F32 block scales):
the host numpy decoder (surgery.io.quant_formats) against the torch decoder the reader runs on the device
(surgery.model.dequant), checked bit-identical first. One JSON line.

  PYTHONPATH=$PWD python bench/dequant_micro.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from surgery.io.quant_formats import decode_fp8, fp8_block
from surgery.model.dequant import _floats, _fp8_block

ROWS, COLS, BLOCK = 2048, 7168, (128, 128)


def _timed(fn, device: torch.device, repeats: int = 5) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    device = torch.device(parser.parse_args().device)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 0x7E, (ROWS, COLS), dtype=np.uint8)  # finite e4m3 codes
    scale = rng.random((ROWS // BLOCK[0], COLS // BLOCK[1]), dtype=np.float32)
    raw_codes = torch.from_numpy(codes.reshape(-1)).to(device)
    raw_scale = torch.from_numpy(scale.reshape(-1).view(np.uint8)).to(device)

    def host() -> np.ndarray:
        return fp8_block(decode_fp8(codes, "F8_E4M3").reshape(ROWS, COLS), scale, BLOCK)

    def dev() -> torch.Tensor:
        return _fp8_block(_floats(raw_codes, "F8_E4M3", (ROWS, COLS)), _floats(raw_scale, "F32", scale.shape), BLOCK)

    assert np.array_equal(host().view(np.int32), dev().cpu().numpy().view(np.int32))
    print(json.dumps({"matrix": [ROWS, COLS], "device": str(device), "torch_threads": torch.get_num_threads(),
                      "host_numpy_s": round(_timed(host, torch.device("cpu")), 4),
                      "torch_s": round(_timed(dev, device), 5), "bit_identical": True}))


if __name__ == "__main__":
    main()
