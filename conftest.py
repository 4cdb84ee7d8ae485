"""Test settings: every notebook and test runs the tiny Phi-3 in smoke mode, writing to outputs/smoke/.

These environment variables are set before any notebook kernel starts, so nbval's kernels inherit them.
"""

from __future__ import annotations

import os

from utils.paths import REPO_ROOT

os.environ.setdefault("PHI3_LORA_MODEL", "tiny")
os.environ.setdefault("PHI3_LORA_SMOKE", "1")
os.environ.setdefault("PHI3_LORA_OUTPUTS", str(REPO_ROOT / "outputs" / "smoke"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch the Hub
os.environ.setdefault("MPLBACKEND", "Agg")
