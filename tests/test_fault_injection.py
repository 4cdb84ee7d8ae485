"""SIGKILL during an adapter save, a checkpoint write and a cache build; two cache builds at once (issue 15).

A named fault point (``$PHI3_LORA_FAULT_POINT``, utils.atomic.fault_point) makes the subprocess stop at a
known moment and say so in a file; the test then kills it with SIGKILL. After each kill, what is on disk
must be the old complete artifact or the new complete one, never a mix, and the next run says what it found.
Each subprocess pays ~10 s of imports on 2 cores, so there are six.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.atomic import FAULT_POINT_ENV_VAR, FAULT_READY_ENV_VAR, FAULT_SLEEP_ENV_VAR, MANIFEST, manifest_problem
from utils.paths import REPO_ROOT

TOPICS = ["boil an egg", "rest a steak", "proof dough", "keep basil fresh"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def train_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(12):
            topic = TOPICS[index % len(TOPICS)]
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": f"How do I {topic}? ({index})"},
                {"role": "assistant", "content": f"In short: {topic} gently.\nTip: taste it."}]}) + "\n")
    return path


def env_for(tmp_path: Path, point: str | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PHI3_LORA_OUTPUTS": str(tmp_path / "outputs"), "PHI3_LORA_MODEL": "tiny",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop(FAULT_POINT_ENV_VAR, None)
    if point:
        env[FAULT_POINT_ENV_VAR] = point
        env[FAULT_READY_ENV_VAR] = str(tmp_path / f"ready-{point}")
    return env


def kill_at(command: list[str], env: dict[str, str], log: Path, timeout: float = 180) -> int:
    """Start ``command``, wait until it reaches its fault point, SIGKILL it; returns its pid."""
    ready = Path(env[FAULT_READY_ENV_VAR])
    ready.unlink(missing_ok=True)
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert process.poll() is None, f"finished before the fault point:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no fault point within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    return process.pid


def train_args(train_file: Path, run_name: str, adapter: Path, *extra: str) -> list[str]:
    return ["--model", "tiny", "--run-name", run_name, "--adapter-dir", str(adapter), "--train-file", str(train_file),
            "--eval-limit", "2", "--threads", "1", "--set", "eval_strategy=no", "--set", "logging_steps=1",
            "--set", "per_device_train_batch_size=2", "--set", "gradient_accumulation_steps=1",
            "--set", "max_length=64", "--set", "activation_checkpointing=false", *extra]


def test_sigkill_during_an_adapter_save_leaves_the_old_or_the_new_adapter(train_file, tmp_path, monkeypatch, caplog):
    from utils import train_cli as script
    from utils.adapters import require_adapter

    monkeypatch.setenv("PHI3_LORA_OUTPUTS", str(tmp_path / "outputs"))
    adapter = tmp_path / "adapter"
    quick = ["--set", "max_steps=1", "--set", "save_strategy=no"]
    script.main(train_args(train_file, "first", adapter, *quick))
    old = snapshot(adapter)

    # Killed with every new file written but before the swap: the old adapter is untouched.
    command = [sys.executable, "-m", "utils.train_cli", *train_args(train_file, "second", adapter, *quick)]
    pid = kill_at(command, env_for(tmp_path, "folder-staged"), tmp_path / "staged.log")
    assert snapshot(adapter) == old and require_adapter(adapter, "03") == adapter
    assert (tmp_path / f".adapter.partial-{pid}").is_dir()

    # Killed right after the swap: the new adapter is complete; the old copy waits beside it.
    command = [sys.executable, "-m", "utils.train_cli", *train_args(train_file, "third", adapter, *quick)]
    pid = kill_at(command, env_for(tmp_path, "folder-swapped"), tmp_path / "swapped.log")
    assert "removed .adapter.partial-" in (tmp_path / "swapped.log").read_text()  # it said what it found
    assert snapshot(adapter) != old and manifest_problem(adapter, hashes=True) is None
    assert (tmp_path / f".adapter.old-{pid}").is_dir()

    with caplog.at_level(logging.WARNING):
        script.main(train_args(train_file, "fourth", adapter, *quick))
    assert f"removed .adapter.old-{pid}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter")) == [".adapter.lock"]


def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(train_file, tmp_path, monkeypatch,
                                                                              caplog):
    from utils import train_cli as script
    from utils.checkpoints import checkpoint_is_complete

    monkeypatch.setenv("PHI3_LORA_OUTPUTS", str(tmp_path / "outputs"))
    args = train_args(train_file, "killed", tmp_path / "adapter", "--set", "max_steps=3", "--set", "save_steps=1",
                      "--set", "save_total_limit=5")
    kill_at([sys.executable, "-m", "utils.train_cli", *args], env_for(tmp_path, "checkpoint-written@2"),
            tmp_path / "checkpoint.log")
    run_dir = tmp_path / "outputs" / "checkpoints" / "killed"
    assert checkpoint_is_complete(run_dir / "checkpoint-1")
    assert (run_dir / "checkpoint-2").is_dir() and not checkpoint_is_complete(run_dir / "checkpoint-2")
    assert not (tmp_path / "adapter").exists()

    with caplog.at_level(logging.WARNING):
        metrics = script.main([*args, "--resume"])
    assert "Skipping" in caplog.text and "checkpoint-2" in caplog.text
    assert metrics["resumed_from_step"] == 1 and metrics["steps"] == 3
    assert checkpoint_is_complete(run_dir / "checkpoint-3")


@pytest.fixture
def cache_with_tokenizer(cold_cache) -> Path:
    """A cache holding the Phi-3 vocabulary and the built tokenizer, but no model."""
    from utils import models

    models.build_phi3_tokenizer()
    return cold_cache


BUILD = [sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO); "
         "from utils.models import build_tiny_phi3; print('built', build_tiny_phi3(), flush=True)"]


def test_sigkill_during_a_cache_build_keeps_the_old_model_and_the_next_run_says_so(cache_with_tokenizer, tmp_path,
                                                                                  caplog):
    from utils import models

    folder = models.build_tiny_phi3()
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["inputs"]["transformers"] = "0.0-older"  # a stale build: the next load rebuilds it
    (folder / MANIFEST).write_text(json.dumps(manifest))
    old = snapshot(folder)
    env = env_for(tmp_path, "folder-staged", PHI3_LORA_CACHE=str(cache_with_tokenizer))
    pid = kill_at(BUILD, env, tmp_path / "build.log")
    assert "Rebuilding" in (tmp_path / "build.log").read_text()
    assert snapshot(folder) == old  # the old, complete copy: never a mix
    assert (cache_with_tokenizer / f".tiny-phi3-v1.partial-{pid}").is_dir()

    with caplog.at_level(logging.WARNING):
        models.build_tiny_phi3()
    assert f"removed .tiny-phi3-v1.partial-{pid}" in caplog.text and "0.0-older" in caplog.text
    assert manifest_problem(folder, models.tiny_cache_inputs(), hashes=True) is None


def test_two_cache_builds_at_once_build_once_and_both_get_the_model(cache_with_tokenizer, tmp_path):
    env = env_for(tmp_path, None, PHI3_LORA_CACHE=str(cache_with_tokenizer))
    env.update({FAULT_POINT_ENV_VAR: "folder-staged", FAULT_SLEEP_ENV_VAR: "6"})  # a slow writer holds the lock
    processes = [subprocess.Popen(BUILD, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    both = "\n".join(outputs)
    assert both.count("Building the tiny") == 1, both
    assert "Waiting for another process" in both, both
    folder = cache_with_tokenizer / "tiny-phi3-v1"
    assert all(f"built {folder}" in output for output in outputs)
    assert manifest_problem(folder, hashes=True) is None
