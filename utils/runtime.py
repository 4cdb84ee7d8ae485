"""Run-time switches and measurements shared by notebooks, scripts and benchmarks."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

SMOKE_ENV_VAR = "PHI3_LORA_SMOKE"


def smoke_mode(override: bool | None = None) -> bool:
    """True when the notebooks should shrink their work to a smoke test (``$PHI3_LORA_SMOKE=1``, set by the tests)."""
    if override is not None:
        return override
    return os.environ.get(SMOKE_ENV_VAR, "").strip().lower() in ("1", "true", "yes")


def configure_logging(level: int = logging.INFO) -> None:
    """Show this package's and the Trainer's log lines in a notebook, once, with timestamps."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    for name in ("utils", "transformers.trainer", "trl"):
        logging.getLogger(name).setLevel(level)


def peak_memory_bytes() -> int:
    """Peak memory of this process so far: CUDA max allocated on a GPU, peak RSS on the CPU."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


@dataclass
class Stopwatch:
    """Wall time of a block: ``with Stopwatch() as sw: ...; sw.seconds``."""

    seconds: float = 0.0
    _start: float = field(default=0.0, repr=False)

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with a fixed number of intra-op threads (benchmarks and tests record it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
