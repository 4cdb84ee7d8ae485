"""Checkpoints that are safe to resume from: a completeness marker written last, and the newest complete one.

The Trainer writes ``checkpoint-N`` folders; :class:`CheckpointCompleteness` marks each complete
(``checkpoint-complete.json``, listing every file and its size) only after every rank has written it,
and :func:`newest_complete_checkpoint` is what resuming uses, so a crash mid-save is never resumed from.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from utils.atomic import atomic_write_json, fault_point, fsync_path
from utils.paths import CHECKPOINTS, artifact
from utils.run_folders import prepare_run_dir

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint-complete.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(run_name: str) -> Path:
    """Where the Trainer writes the checkpoints of run ``run_name``: ``outputs/checkpoints/<run_name>`` (not created)."""
    if not run_name or "/" in run_name or run_name.startswith("."):
        raise ValueError(f"run_name must be a plain folder name, not {run_name!r}")
    return artifact(f"{CHECKPOINTS}/{run_name}", create=False)


def mark_checkpoint_complete(checkpoint: Path, step: int, fingerprint: dict[str, Any] | None = None) -> None:
    """Write the completeness marker last, atomically, listing every file and its size (and the run's fingerprint).

    ``fingerprint`` (:func:`utils.run_folders.run_fingerprint`): hashes of the config and the training data,
    which a resume compares with its own.
    """
    files = {str(path.relative_to(checkpoint)): path.stat().st_size
             for path in sorted(checkpoint.rglob("*")) if path.is_file() and path.name != COMPLETE_MARKER}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and path.name != COMPLETE_MARKER:
            fsync_path(path)  # the files are on the disk before the marker says so
    marker = {"step": step, "files": files}
    if fingerprint is not None:
        marker["fingerprint"] = fingerprint
    atomic_write_json(checkpoint / COMPLETE_MARKER, marker)


def checkpoint_fingerprint(checkpoint: Path) -> dict[str, Any] | None:
    """The config and data fingerprint recorded in a checkpoint's completeness marker (None: none recorded)."""
    try:
        return json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_checkpoints(run_dir: str | Path, *, resume: bool, overwrite: bool = False,
                        fingerprint: dict[str, Any] | None = None, allow_changed_resume: bool = False,
                        modify: bool = True) -> Path | None:
    """Ready ``run_dir`` for a run; returns the complete checkpoint to resume from (None: start afresh).

    Never deletes a folder the series did not create, nor complete checkpoints without ``overwrite``; refuses
    a resume whose config or data differ from the checkpoint's (:func:`utils.run_folders.prepare_run_dir`).
    """
    return prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, fingerprint=fingerprint,
                           allow_changed_resume=allow_changed_resume, newest_complete=newest_complete_checkpoint,
                           read_fingerprint=checkpoint_fingerprint, modify=modify)


def checkpoint_is_complete(checkpoint: Path) -> bool:
    """True when the marker exists and every file it lists is present with the recorded size."""
    marker = checkpoint / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError):
        return False
    return bool(files) and all((checkpoint / name).is_file() and (checkpoint / name).stat().st_size == size
                               for name, size in files.items())


def newest_complete_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-step complete ``checkpoint-N`` in ``run_dir``; incomplete ones are skipped with a warning."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = sorted(((int(match.group(1)), path) for path in run_dir.iterdir()
                    if path.is_dir() and (match := _CHECKPOINT_NAME.match(path.name))), reverse=True)
    for _, path in found:
        if checkpoint_is_complete(path):
            return path
        logger.warning("Skipping %s: it has no complete marker (%s), so its save was interrupted.",
                       path, COMPLETE_MARKER)
    return None


class CheckpointCompleteness(TrainerCallback):
    """Marks ``checkpoint-N`` complete (``checkpoint-complete.json``, written last) once every rank has written it.

    Resuming with :func:`newest_complete_checkpoint` then never starts from a save that a crash cut short.
    It only writes that marker: the run itself is the same with or without it. ``fingerprint``: the run's
    config and data hashes, recorded in the marker for :func:`prepare_checkpoints`.
    """

    def __init__(self, fingerprint: dict[str, Any] | None = None) -> None:
        self.fingerprint = fingerprint

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and state.is_world_process_zero:  # about to (re)write checkpoint-N
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE_MARKER).unlink(missing_ok=True)

    def on_save(self, args, state, control, **kwargs):
        args.distributed_state.wait_for_everyone()  # every rank has written its part (RNG states)
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            fault_point("checkpoint-written")  # the fault-injection tests kill the run here
            mark_checkpoint_complete(checkpoint, state.global_step, self.fingerprint)
            logger.info("Checkpoint %s complete", checkpoint)
