"""Where the series keeps things: one source of truth for every path."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT: Path = Path(__file__).resolve().parent.parent
DATA_DIR: Path = REPO_ROOT / "data"
NOTEBOOKS_DIR: Path = REPO_ROOT / "notebooks"

OUTPUTS_ENV_VAR = "PHI3_LORA_OUTPUTS"
CACHE_ENV_VAR = "PHI3_LORA_CACHE"


def outputs_dir() -> Path:
    """The git-ignored folder for every artifact (adapters, plots, metrics); ``$PHI3_LORA_OUTPUTS`` overrides it."""
    path = Path(os.environ.get(OUTPUTS_ENV_VAR) or REPO_ROOT / "outputs")
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """The git-ignored folder for built models and downloaded assets; ``$PHI3_LORA_CACHE`` overrides it."""
    path = Path(os.environ.get(CACHE_ENV_VAR) or REPO_ROOT / ".cache")
    path.mkdir(parents=True, exist_ok=True)
    return path
