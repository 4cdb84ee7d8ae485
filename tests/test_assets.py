"""The pinned sdist is fetched without running it (no pip, no build backend) and only with the recorded sha256.

No network: PyPI's JSON API and the file download are served by a stand-in opener.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from pathlib import Path

import pytest

from utils import assets
from utils.atomic import sha256_file

INDEX = "https://pypi.org/pypi/demo-project/json"


class FakePyPI:
    """Serves the project JSON and one file; records every address opened."""

    def __init__(self, payload: bytes, listed_sha256: str, filename: str = "demo-1.0.tar.gz", version: str = "1.0",
                 index: str = INDEX):
        self.payload, self.listed, self.filename, self.version, self.index = payload, listed_sha256, filename, version, index
        self.opened: list[str] = []

    def __call__(self, address: str, timeout: float = 0) -> io.BytesIO:
        self.opened.append(address)
        if address == self.index:
            entry = {"filename": self.filename, "url": f"../../packages/aa/{self.filename}",
                     "digests": {"sha256": self.listed}}
            return io.BytesIO(json.dumps({"releases": {self.version: [entry]}}).encode())
        return io.BytesIO(self.payload)


def _fetch(opener: FakePyPI, target: Path, sha256: str) -> Path:
    return assets.fetch_pinned_file("demo-project", "1.0", "demo-1.0.tar.gz", sha256, target, opener=opener)


def test_fetch_keeps_a_file_with_the_recorded_sha256(tmp_path) -> None:
    payload = b"the real sdist"
    good = hashlib.sha256(payload).hexdigest()
    opener = FakePyPI(payload, good)
    target = tmp_path / "cache" / "demo-1.0.tar.gz"
    assert _fetch(opener, target, good).read_bytes() == payload
    assert opener.opened == [INDEX, "https://pypi.org/packages/aa/demo-1.0.tar.gz"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["demo-1.0.tar.gz"]  # no temporary left
    _fetch(opener, target, good)  # cached: verified, not fetched again
    assert len(opener.opened) == 2


def test_fetch_refuses_a_download_with_another_sha256_and_keeps_nothing(tmp_path) -> None:
    recorded = hashlib.sha256(b"the real sdist").hexdigest()
    opener = FakePyPI(b"something else", recorded)  # PyPI's listing agrees, the bytes do not
    target = tmp_path / "cache" / "demo-1.0.tar.gz"
    with pytest.raises(assets.AssetError, match="does not match the recorded"):
        _fetch(opener, target, recorded)
    assert list(target.parent.iterdir()) == []


def test_fetch_refuses_when_pypi_lists_another_sha256_before_downloading(tmp_path) -> None:
    opener = FakePyPI(b"x", "0" * 64)
    with pytest.raises(assets.AssetError, match="refusing it"):
        _fetch(opener, tmp_path / "demo-1.0.tar.gz", hashlib.sha256(b"x").hexdigest())
    assert opener.opened == [INDEX]


def test_a_cached_file_with_another_sha256_is_refused(tmp_path) -> None:
    target = tmp_path / "demo-1.0.tar.gz"
    target.write_bytes(b"tampered")
    with pytest.raises(assets.AssetError, match="does not match"):
        _fetch(FakePyPI(b"", ""), target, hashlib.sha256(b"original").hexdigest())


def test_the_phi3_vocabulary_comes_from_the_sdist_without_running_pip(tmp_path, monkeypatch) -> None:
    """The real pinned sdist, served offline: nothing is executed (pip download would run its build backend)."""
    cached = assets.cache_dir() / "sdist" / assets.LLAMA_CPP_SDIST_FILE
    if not cached.is_file():
        pytest.skip(f"{cached} is not fetched yet (any tokenizer build fetches it)")

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setenv("PHI3_LORA_CACHE", str(tmp_path))
    payload = cached.read_bytes()
    opener = FakePyPI(payload, assets.LLAMA_CPP_SDIST_SHA256, assets.LLAMA_CPP_SDIST_FILE, assets.LLAMA_CPP_VERSION,
                      assets.PYPI_JSON.format(project=assets.LLAMA_CPP_PROJECT))
    monkeypatch.setattr(assets, "fetch_pinned_file", _with_default_opener(assets.fetch_pinned_file, opener))
    folder = assets.phi3_vocab_dir()
    assert folder == tmp_path / "phi3-vocab"
    for name, expected in assets.PHI3_VOCAB_SHA256.items():
        assert sha256_file(folder / name) == expected
    assert (tmp_path / "sdist" / assets.LLAMA_CPP_SDIST_FILE).is_file()  # kept for llama.cpp's converters
    assert len(opener.opened) == 2  # PyPI's JSON API, then the file


def _with_default_opener(function, opener):
    """``function`` with its ``opener`` argument bound (the default was bound at definition time)."""
    def bound(*args, **kwargs):
        kwargs.setdefault("opener", opener)
        return function(*args, **kwargs)
    return bound
