"""`python tests/hostile_runner.py DELAY_MS ARGS...`: run `moe-surgery ARGS...` with every byte-range copy
of the shard writer slowed by DELAY_MS milliseconds, so that a test can kill it (or race it) in the middle
of writing a tiny checkpoint. Only the speed changes: the real CLI, writer and output folder code run."""

from __future__ import annotations

import sys
import time

import surgery.io.writer as writer


def main() -> None:
    delay = float(sys.argv[1]) / 1000
    copy = writer._copy_range

    def slow_copy(*args, **kwargs):
        time.sleep(delay)
        return copy(*args, **kwargs)

    writer._copy_range = slow_copy
    from surgery.cli import main as cli

    cli(sys.argv[2:], prog_name="moe-surgery")


if __name__ == "__main__":
    main()
