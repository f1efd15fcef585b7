"""Nothing of ours is left on disk by a run that is killed: spilled hidden states are never visible as files."""

from __future__ import annotations

from pathlib import Path

import torch

from surgery.model.streaming import HiddenStore


def test_disk_spill_leaves_no_file_even_while_in_use(tmp_path: Path) -> None:
    """The spill file is unlinked once mapped: at no point can a SIGKILL leave it behind, yet the data stays."""
    store = HiddenStore("disk", torch.device("cpu"), total_bytes=1 << 30, spill_dir=tmp_path / "spill")
    values = [torch.randn(2, 5, 8) for _ in range(3)]
    for i, v in enumerate(values):
        store.put(i, v)
    assert store.where == "disk"
    assert list((tmp_path / "spill").iterdir()) == []  # nothing to leave behind, even now
    store.put(1, values[1] * 2)
    assert torch.equal(store.get(0), values[0]) and torch.equal(store.get(1), values[1] * 2)
    store.close()


def test_unwritable_spill_folder_is_one_line(tmp_path: Path) -> None:
    import pytest

    from surgery.errors import UserError

    blocker = tmp_path / "file"
    blocker.write_text("")
    store = HiddenStore("disk", torch.device("cpu"), total_bytes=1 << 30, spill_dir=blocker / "spill")
    with pytest.raises(UserError, match="cannot spill hidden states to disk"):
        store.put(0, torch.zeros(2, 2))
