"""Real training runs on the tiny model: kill-and-resume equals an uninterrupted run; accelerate with 2 ranks.

Each subprocess pays ~13 s of imports, so there are only two: the run that is killed and the
2-process accelerate launch. The resumed and the uninterrupted runs happen in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.paths import REPO_ROOT
from utils.runtime import torch_threads

TOPICS = ["boil an egg", "rest a steak", "proof bread dough", "keep basil fresh", "crisp chicken skin",
          "thicken a sauce", "stop pasta sticking", "ripen an avocado"]


def write_conversations(path: Path, count: int) -> Path:
    """A small JSONL file of Kitchen-Coach-style conversations (independent of the shipped data)."""
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(count):
            topic = TOPICS[index % len(TOPICS)]
            messages = [{"role": "user", "content": f"How do I {topic}? (question {index})"},
                        {"role": "assistant", "content": f"In short: {topic} gently.\nTake your time.\nTip: taste it."}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("conversations")
    return {"train": write_conversations(folder / "train.jsonl", 48), "eval": write_conversations(folder / "val.jsonl", 4)}


def run_args(data: dict[str, Path], run_name: str, adapter_dir: Path, max_steps: int) -> list[str]:
    """Command-line arguments of utils.train_cli for a short deterministic tiny run."""
    return ["--model", "tiny", "--run-name", run_name, "--adapter-dir", str(adapter_dir),
            "--train-file", str(data["train"]), "--eval-file", str(data["eval"]), "--threads", "1",
            "--set", f"max_steps={max_steps}", "--set", "save_steps=2", "--set", "logging_steps=1",
            "--set", "per_device_train_batch_size=2", "--set", "max_length=64", "--set", "learning_rate=1e-3",
            "--set", "eval_strategy=no", "--set", "save_total_limit=10"]


def subprocess_env(outputs: Path) -> dict[str, str]:
    return {**os.environ, "PHI3_LORA_OUTPUTS": str(outputs), "PHI3_LORA_MODEL": "tiny", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_sigkill_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(data, tmp_path, monkeypatch):
    from utils import train_cli as script
    from utils.checkpoints import COMPLETE_MARKER, checkpoints_dir

    outputs = tmp_path / "outputs"
    monkeypatch.setenv("PHI3_LORA_OUTPUTS", str(outputs))
    steps = 16
    killed_args = run_args(data, "killed", tmp_path / "killed-adapter", steps)
    log = open(tmp_path / "killed.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "utils.train_cli", *killed_args], cwd=REPO_ROOT,
                               env=subprocess_env(outputs), stdout=log, stderr=subprocess.STDOUT)
    run_dir = outputs / "checkpoints" / "killed"
    deadline = time.monotonic() + 120
    while not list(run_dir.glob(f"checkpoint-*/{COMPLETE_MARKER}")):
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (tmp_path / "killed-adapter").exists(), "the run finished before it could be killed"
    assert run_dir == checkpoints_dir("killed")

    with torch_threads(1):
        resumed = script.main([*killed_args, "--resume"])
        straight = script.main(run_args(data, "straight", tmp_path / "straight-adapter", steps))
    assert resumed["resumed_from_step"] is not None and 2 <= resumed["resumed_from_step"] < steps
    assert straight["resumed_from_step"] is None and resumed["steps"] == straight["steps"] == steps

    import torch

    first = adapter_tensors(tmp_path / "killed-adapter")
    second = adapter_tensors(tmp_path / "straight-adapter")
    assert first.keys() == second.keys() and len(first) == 4 * 2 * 2  # 4 targets x 2 layers x (A, B)
    initial_b = [name for name, tensor in second.items() if "lora_B" in name and torch.count_nonzero(tensor) == 0]
    assert not initial_b, "lora_B still zero: the run did not train"
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-6, msg=name)


def test_accelerate_launch_two_cpu_processes_train_together_and_save_one_adapter(data, tmp_path):
    outputs = tmp_path / "outputs"
    adapter = tmp_path / "ddp-adapter"
    # `--multi_gpu` selects accelerate's torchrun launcher; without CUDA the ranks use gloo on the CPU.
    # (`--cpu --num_processes 2` alone starts a single process in accelerate 1.15.)
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29517", "-m", "utils.train_cli", *run_args(data, "ddp", adapter, 4)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(outputs), capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    ranks = sorted(line for line in output.splitlines() if line.startswith("[rank "))
    assert [line.split(" steps")[0] for line in ranks] == ["[rank 0 of 2] 4", "[rank 1 of 2] 4"], output[-3000:]
    checksums = {line.rsplit(" ", 1)[-1] for line in ranks}
    assert len(checksums) == 1, f"the ranks' adapters differ: {ranks}"
    metrics = json.loads((adapter / "training_metrics.json").read_text())
    assert metrics["steps"] == 4
    saved = [path for path in (outputs, adapter) for path in path.rglob("adapter_model.safetensors")
             if "checkpoint-" not in str(path)]
    assert saved == [adapter / "adapter_model.safetensors"]
    state = json.loads((outputs / "checkpoints" / "ddp" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 2 and state["global_step"] == 4
    # Rank 1 wrote its own RNG state into the checkpoint: it was a training process, not a bystander.
    assert (outputs / "checkpoints" / "ddp" / "checkpoint-4" / "rng_state_1.pth").is_file()
