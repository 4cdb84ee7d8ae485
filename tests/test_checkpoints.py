"""utils.checkpoints: the completeness marker and resuming only from a complete checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from utils import checkpoints


def _write_checkpoint(folder: Path, complete: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        checkpoints.mark_checkpoint_complete(folder, int(folder.name.split("-")[1]))
    return folder


def test_newest_complete_checkpoint_skips_a_partly_written_one_with_a_warning(tmp_path, caplog):
    _write_checkpoint(tmp_path / "checkpoint-2", complete=True)
    good = _write_checkpoint(tmp_path / "checkpoint-10", complete=True)
    _write_checkpoint(tmp_path / "checkpoint-12", complete=False)  # the crash came mid-save
    (tmp_path / "checkpoint-14").mkdir()  # the crash came right after mkdir
    with caplog.at_level(logging.WARNING, logger="utils.checkpoints"):
        assert checkpoints.newest_complete_checkpoint(tmp_path) == good  # 10 beats 2 numerically
    skipped = [record.getMessage() for record in caplog.records if "Skipping" in record.getMessage()]
    assert len(skipped) == 2 and "checkpoint-14" in skipped[0] and "checkpoint-12" in skipped[1]


def test_a_marker_whose_files_changed_is_not_complete(tmp_path):
    checkpoint = _write_checkpoint(tmp_path / "checkpoint-4", complete=True)
    assert checkpoints.checkpoint_is_complete(checkpoint)
    assert json.loads((checkpoint / checkpoints.COMPLETE_MARKER).read_text())["step"] == 4
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x" * 50)  # truncated by a later crash
    assert not checkpoints.checkpoint_is_complete(checkpoint)
    assert checkpoints.newest_complete_checkpoint(tmp_path) is None
    assert checkpoints.newest_complete_checkpoint(tmp_path / "missing") is None
