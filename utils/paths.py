"""Where the series keeps things: one source of truth for every path."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT: Path = Path(__file__).resolve().parent.parent
DATA_DIR: Path = REPO_ROOT / "data"
NOTEBOOKS_DIR: Path = REPO_ROOT / "notebooks"

OUTPUTS_ENV_VAR = "PHI3_LORA_OUTPUTS"
CACHE_ENV_VAR = "PHI3_LORA_CACHE"


def outputs_dir(create: bool = True) -> Path:
    """The git-ignored folder for every artifact (adapters, plots, metrics); ``$PHI3_LORA_OUTPUTS`` overrides it.

    ``create=False`` only names the folder (for settings, which must not write).
    """
    path = Path(os.environ.get(OUTPUTS_ENV_VAR) or REPO_ROOT / "outputs")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """The git-ignored folder for built models and downloaded assets; ``$PHI3_LORA_CACHE`` overrides it."""
    path = Path(os.environ.get(CACHE_ENV_VAR) or REPO_ROOT / ".cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


# Artifacts that one notebook writes and a later one reads, relative to outputs_dir().
LORALIB_CHECKPOINT = "adapters/loralib/lora.safetensors"  # 02: loralib's lora_state_dict
LORALIB_AS_PEFT = "adapters/loralib-as-peft"  # 02: the same weights as a PEFT adapter folder
LORA_ADAPTER = "adapters/lora"  # 03: PEFT LoRA adapter (final)
QLORA_ADAPTER = "adapters/qlora"  # 04: PEFT QLoRA adapter (final)
CHECKPOINTS = "checkpoints"  # 03/04: Trainer checkpoints, one sub-folder per run
EVALUATION_RESULTS = "metrics/evaluation.json"  # 05: losses, perplexities, task metrics
MERGED_MODEL = "merged/lora"  # 06: base + LoRA merged into full-precision weights
EXECUTED_NOTEBOOKS = "notebooks"  # make demo: the executed notebooks


def artifact(relative: str, create: bool = True) -> Path:
    """Absolute path of an artifact under :func:`outputs_dir`; its parent folder is created unless ``create=False``."""
    path = outputs_dir(create) / relative
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    return path
