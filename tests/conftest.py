"""Fixtures the unit tests share: the tiny Phi-3 and its tokenizer, and one torch thread for a test.

(The repository's root conftest.py sets the environment: tiny model, smoke mode, outputs/smoke/.)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from utils.assets import phi3_vocab_dir
from utils.models import Hardware, load_model_and_tokenizer, load_tokenizer
from utils.runtime import torch_threads

CPU = Hardware(cuda=False)  # fp32 on the CPU even on a GPU machine: the tests' tolerances are fp32 ones


def _load_tiny(for_training: bool = False) -> tuple[Any, Any]:
    """A fresh tiny Phi-3 (random weights, fp32 on the CPU) and its tokenizer."""
    return load_model_and_tokenizer("tiny", for_training=for_training, verbose=False, hardware=CPU)


@pytest.fixture(scope="session")
def load_tiny() -> Callable[..., tuple[Any, Any]]:
    """``load_tiny(for_training=False)``: a fresh tiny Phi-3 and its tokenizer on each call (tests may change it)."""
    return _load_tiny


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    """One tiny Phi-3 for a test module, loaded for training; tests that change it work on a copy."""
    return _load_tiny(for_training=True)[0]


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Any:
    """The tiny model's tokenizer: the real Phi-3-mini tokenizer with its training chat template."""
    return load_tokenizer("tiny")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the test, restored afterwards: small matmuls on a shared 2-core machine."""
    with torch_threads(1):
        yield


@pytest.fixture
def cold_cache(tmp_path, monkeypatch) -> Path:
    """An empty model cache (``$PHI3_LORA_CACHE``) holding only the Phi-3 vocabulary, so that nothing is fetched."""
    cache = tmp_path / "cache"
    shutil.copytree(phi3_vocab_dir(), cache / "phi3-vocab")  # fetched into the real cache once if missing
    monkeypatch.setenv("PHI3_LORA_CACHE", str(cache))
    return cache
