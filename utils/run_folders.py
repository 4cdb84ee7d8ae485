"""Run folders that never cost the user work: only folders the series made are cleared, and only when asked.

A training run's checkpoints go to a run folder (``outputs/checkpoints/<run>`` or any ``output_dir``).
:func:`prepare_run_dir` decides, before the first step, what happens to what is already there:

* a folder the series did not create (no ``.phi3-lora-run`` marker) that holds anything but finished Trainer
  checkpoints is never deleted: the run stops and says why (``output_dir=.`` cannot wipe a repository);
* complete checkpoints of an earlier run are kept unless the caller says ``overwrite=True`` (``--overwrite``)
  or ``resume=True`` (``--resume``); the error names both;
* a resume compares the fingerprint of this run (config and training data, :func:`run_fingerprint`) with the
  one in the checkpoint's completeness marker and refuses a mismatch, naming what changed
  (``allow_changed_resume=True`` / ``--allow-changed-resume`` continues anyway).

Clearing a run folder removes only its ``checkpoint-N`` folders; any other file in it stays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from utils.atomic import atomic_write_json

logger = logging.getLogger(__name__)

SERIES_MARKER = ".phi3-lora-run"  # written into every run folder the series creates
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Keys that change how a run reports or where it writes, not which batches it trains on or what it learns.
NOT_FINGERPRINTED = ("output_dir", "logging_steps", "logging_strategy", "logging_first_step", "disable_tqdm",
                     "report_to", "dataloader_num_workers", "save_total_limit", "save_steps", "save_strategy",
                     "eval_steps", "eval_strategy", "eval_on_start", "per_device_eval_batch_size", "run_name",
                     "logging_dir", "overwrite_output_dir", "resume_from_checkpoint")


class RunFolderError(RuntimeError):
    """The run folder holds something that a fresh run or a resume would destroy or mis-use."""


def _sha256_json(value: Any) -> str:
    """sha256 of a value as canonical JSON (sorted keys; anything else as its string)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()


def run_fingerprint(config: dict[str, Any], train_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a resume must agree on: the training settings (minus reporting keys) and the training data, hashed."""
    settings = {key: value for key, value in sorted(config.items()) if key not in NOT_FINGERPRINTED}
    settings = json.loads(json.dumps(settings, default=str))
    return {"config_sha256": _sha256_json(settings), "config": settings,
            "data_sha256": _sha256_json(train_rows), "data_rows": len(train_rows)}


def fingerprint_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per difference between a checkpoint's fingerprint and this run's (empty: they agree)."""
    lines = []
    if recorded.get("config_sha256") != current.get("config_sha256"):
        before, now = recorded.get("config") or {}, current.get("config") or {}
        keys = sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))
        lines += [f"config {key}: {before.get(key, '(not set)')!r} then, {now.get(key, '(not set)')!r} now"
                  for key in keys] or ["config: a different hash"]
    if recorded.get("data_sha256") != current.get("data_sha256"):
        lines.append(f"training data: {recorded.get('data_rows')} conversations then, {current.get('data_rows')} "
                     f"now, different content (sha256 {str(recorded.get('data_sha256'))[:12]} then, "
                     f"{str(current.get('data_sha256'))[:12]} now)")
    return lines


def is_series_folder(folder: str | Path) -> bool:
    """True when the series created this run folder (it holds the ``.phi3-lora-run`` marker)."""
    return (Path(folder) / SERIES_MARKER).is_file()


def mark_series_folder(folder: str | Path) -> Path:
    """Create ``folder`` if needed and mark it as a run folder of this series (what may later be cleared)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / SERIES_MARKER, {"what": "a training run folder created by the phi3-lora-course "
                                                       "series; only its checkpoint-N folders are ever removed"})
    return folder


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a run folder, by step."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in run_dir.iterdir()
             if path.is_dir() and (m := _CHECKPOINT.match(path.name))]
    return [path for _, path in sorted(found)]


def _trainer_output(path: Path) -> bool:
    """A ``checkpoint-N`` folder with the Trainer's state, or the model card (README.md) the Trainer writes."""
    if path.is_dir():
        return bool(_CHECKPOINT.match(path.name)) and (path / "trainer_state.json").is_file()
    if path.name == "README.md" and path.stat().st_size < 100_000:
        return "generated_from_trainer" in path.read_text(encoding="utf-8", errors="replace")
    return False


def _only_checkpoints(run_dir: Path) -> bool:
    """True when the folder holds Trainer checkpoints and nothing else (a run folder from before markers)."""
    entries = list(run_dir.iterdir())
    return any(path.is_dir() for path in entries) and all(_trainer_output(path) for path in entries)


def prepare_run_dir(
    run_dir: str | Path,
    *,
    resume: bool,
    overwrite: bool = False,
    fingerprint: dict[str, Any] | None = None,
    allow_changed_resume: bool = False,
    newest_complete: Callable[[Path], Path | None],
    read_fingerprint: Callable[[Path], dict[str, Any] | None],
    modify: bool = True,
) -> Path | None:
    """Make ``run_dir`` ready for a run and return the checkpoint to resume from (None: start at step 0).

    Raises :class:`RunFolderError` instead of deleting a folder the series did not create, instead of
    wiping complete checkpoints without ``overwrite``, and instead of resuming with other settings or data.
    ``modify=False`` only decides (every rank of a distributed run does that; the main process then acts).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"output_dir {run_dir} is a file, not a folder: choose another output_dir.")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        if modify:
            mark_series_folder(run_dir)
        if resume and modify:
            logger.warning("No checkpoint in %s: starting from the beginning.", run_dir)
        return None
    ours = is_series_folder(run_dir)
    if not ours and not _only_checkpoints(run_dir):
        names = sorted(path.name for path in run_dir.iterdir())
        raise RunFolderError(
            f"output_dir {run_dir} already exists, holds {len(names)} entries ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}) and was not created by this series (no {SERIES_MARKER} marker), "
            "so nothing in it was touched. Choose a new or empty output_dir (or run_name)."
        )
    checkpoint = newest_complete(run_dir)
    if resume and checkpoint is not None:
        recorded = read_fingerprint(checkpoint)
        if fingerprint is not None and recorded:
            changes = fingerprint_differences(recorded, fingerprint)
            if changes and not allow_changed_resume:
                raise RunFolderError(
                    f"Refusing to resume from {checkpoint}: it was trained with other settings or data, so the "
                    "resumed run would skip the wrong batches:\n  " + "\n  ".join(changes) +
                    "\nRestore the old settings and data, start over with overwrite=True (--overwrite), or "
                    "continue anyway with allow_changed_resume=True (--allow-changed-resume).")
            for line in changes if modify else []:
                logger.warning("Resuming although %s (allow_changed_resume=True)", line)
        elif fingerprint is not None and modify:
            logger.warning("%s records no config or data fingerprint (written by an older version): the resume "
                           "cannot check that the settings and the data are the same.", checkpoint)
        if not ours and modify:
            mark_series_folder(run_dir)
        return checkpoint
    if resume and modify:
        logger.warning("No complete checkpoint in %s: starting from the beginning.", run_dir)
    checkpoints = checkpoint_folders(run_dir)
    if checkpoint is not None and not overwrite:
        raise RunFolderError(
            f"{run_dir} holds complete checkpoints of an earlier run ({', '.join(p.name for p in checkpoints)}). "
            "Nothing was deleted. Pass resume=True (--resume) to continue that run, or overwrite=True "
            "(--overwrite; in notebooks OVERWRITE = True) to delete its checkpoints and start over, or choose "
            "another run_name / output_dir.")
    if not modify:
        return None
    for path in checkpoints:  # incomplete ones (a crash mid-save), or complete ones the caller chose to overwrite
        shutil.rmtree(path)
    if checkpoints:
        logger.warning("Removed %d checkpoint(s) of an earlier run from %s (%s).", len(checkpoints), run_dir,
                       "overwrite=True" if checkpoint is not None else "none was complete")
    mark_series_folder(run_dir)
    return None
