"""Run-time switches and measurements shared by notebooks, scripts and benchmarks."""

from __future__ import annotations

import gc
import logging
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

SMOKE_ENV_VAR = "PHI3_LORA_SMOKE"
TEXT_PROGRESS_ENV_VAR = "PHI3_LORA_TEXT_PROGRESS"  # set by `make demo`: papermill keeps text, not widget states


def smoke_mode(override: bool | None = None) -> bool:
    """True when the notebooks should shrink their work to a smoke test (``$PHI3_LORA_SMOKE=1``, set by the tests)."""
    if override is not None:
        return override
    return os.environ.get(SMOKE_ENV_VAR, "").strip().lower() in ("1", "true", "yes")


def progress_bar(iterable, **kwargs):
    """A tqdm bar: a widget in JupyterLab, text in a terminal, and text under ``make demo`` (papermill), whose saved
    notebooks keep a widget only as its first state."""
    if os.environ.get(TEXT_PROGRESS_ENV_VAR):
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)


def configure_logging(level: int = logging.INFO) -> None:
    """Show this package's and the Trainer's log lines in a notebook, once, with timestamps."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    for name in ("utils", "transformers.trainer", "trl"):
        logging.getLogger(name).setLevel(level)


def peak_memory_bytes() -> int:
    """Peak memory of this process so far: CUDA max allocated on a GPU, peak RSS on the CPU."""
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
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Relative tolerance for comparing the logits of two computations that are equal in exact arithmetic
# (merged vs unmerged adapter, reloaded vs trained, PEFT vs loralib), by the dtype they ran in.
# fp32 keeps ~7 significant digits, fp16 ~3, bf16 ~2: the difference of two roundings of logits of size ~20-40
# grows with every layer they pass through. Another attention kernel (flash-attention vs SDPA) or another order of
# the same additions (a merged W + BA vs W x + B A x) rounds differently again.
_RELATIVE_LOGIT_TOLERANCE = {  # dtype name -> (same kernels, different kernels or summation order)
    "float32": (1e-5, 1e-4),
    "float16": (1e-2, 2e-2),
    "bfloat16": (3e-2, 1e-1),  # across summation orders: 4.0e-2 measured on smol with autocast (02), so 2.5x margin
}


def logit_tolerance(dtype, same_kernels: bool = True) -> float:
    """Relative tolerance for logits computed in ``dtype``: compare ``max|a - b| <= tol * max|a|``."""
    name = str(dtype).removeprefix("torch.")
    if name not in _RELATIVE_LOGIT_TOLERANCE:
        raise ValueError(f"No logit tolerance for dtype {dtype}; known: {sorted(_RELATIVE_LOGIT_TOLERANCE)}")
    same, different = _RELATIVE_LOGIT_TOLERANCE[name]
    return same if same_kernels else different


def free_accelerator_memory() -> None:
    """Return freed tensors' memory to the system: garbage-collect, then empty the CUDA cache on a GPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
