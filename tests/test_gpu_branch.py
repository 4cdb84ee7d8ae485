"""The GPU branch of notebooks 03 and 04 runs in the test suite, on a CPU.

``PROFILE="gpu"`` on a machine without CUDA runs the GPU column of ``training_config`` with only the device keys
changed (``use_cpu``, ``bf16``, ``fp16``): the GPU schedule (epochs x micro-batch x accumulation from the card's
batch plan), the cadence derived from it, the paged 8-bit optimizer of QLoRA and every assertion of the
notebooks run here, so that branch is never dead code. To keep it to under a minute per notebook on the tiny
model, both notebooks train on a user file of the 64 shortest training conversations (which also runs the
own-data path): every tenth is held out, so 58 train, and the GPU profile's 2 epochs of 16 conversations per
step make 8 optimizer steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import pytest
import torch

from utils.checkpoints import COMPLETE_MARKER
from utils.data import load_split
from utils.models import Hardware, detect_hardware
from utils.paths import NOTEBOOKS_DIR
from utils.training_settings import optimizer_steps, training_config

CONVERSATIONS = 64
TRAIN, HELD_OUT = 58, 6  # every tenth conversation (indices 9, 19, ..., 59) is held out for validation
STEPS = 8  # 2 epochs x ceil(ceil(58 / 4) / 4)


@pytest.fixture(scope="module")
def gpu_branch_runs(tmp_path_factory):
    """Execute 03 then 04 with PROFILE="gpu" into a fresh outputs folder; returns (outputs, executed notebooks)."""
    import papermill

    outputs = tmp_path_factory.mktemp("gpu-branch")
    data = outputs / "my_chats.jsonl"
    shortest = sorted(load_split("train"), key=lambda c: sum(len(m["content"]) for m in c["messages"]))
    data.write_text("".join(json.dumps(c) + "\n" for c in shortest[:CONVERSATIONS]), encoding="utf-8")
    patch = pytest.MonkeyPatch()
    patch.setenv("PHI3_LORA_OUTPUTS", str(outputs))  # the kernels inherit it
    executed = {}
    try:
        for name, extra in (("03_lora_finetuning", {"RUN_RANK_EXPERIMENT": False}), ("04_qlora_finetuning", {})):
            executed[name] = Path(outputs / f"{name}.ipynb")
            papermill.execute_notebook(
                str(NOTEBOOKS_DIR / f"{name}.ipynb"), str(executed[name]), cwd=str(NOTEBOOKS_DIR),
                parameters={"PROFILE": "gpu", "TRAIN_FILE": str(data), "EVAL_FILE": None, "DATA_FORMAT": None, **extra},
                kernel_name="python3", progress_bar=False)
    finally:
        patch.undo()
    return outputs, executed


def test_the_schedule_arithmetic_the_runs_are_checked_against():
    """Independent of the notebooks: 58 conversations, 2 epochs, 4 x 4 per step on a T4-sized plan -> 8 steps."""
    assert sum(1 for i in range(CONVERSATIONS) if i % 10 != 9) == TRAIN
    config = training_config("gpu", "lora", hardware=Hardware(cuda=False))
    assert (config["num_train_epochs"], config["per_device_train_batch_size"],
            config["gradient_accumulation_steps"]) == (2, 4, 4)
    assert optimizer_steps(TRAIN, config) == STEPS == 2 * math.ceil(math.ceil(TRAIN / 4) / 4)


@pytest.mark.parametrize(("name", "adapter"), [("03_lora_finetuning", "lora"), ("04_qlora_finetuning", "qlora")])
def test_the_gpu_profile_ran_its_schedule_and_evaluated_along_the_way(gpu_branch_runs, name, adapter):
    outputs, executed = gpu_branch_runs
    notebook = nbformat.read(executed[name], as_version=4)
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors  # every cell ran, the notebook's own assertions included (loss fell, validation improved)
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    hardware = detect_hardware()
    assert f"profile 'gpu', training on the {'GPU' if hardware.cuda else 'CPU'}" in text

    metrics = json.loads((outputs / "adapters" / adapter / "training_metrics.json").read_text())
    assert metrics["profile"] == "gpu" and metrics["steps"] == STEPS
    assert [step for step, _ in metrics["eval_curve"]] == list(range(STEPS + 1))  # start, every step, end
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]

    args = torch.load(outputs / "adapters" / adapter / "training_args.bin", weights_only=False)
    expected_optim = "paged_adamw_8bit" if adapter == "qlora" else "adamw_torch_fused"
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (4, 4, 2)
    assert args.optim == expected_optim and args.max_length == 2048 and args.max_steps == -1
    if not hardware.cuda:  # the only keys that follow the device
        assert (args.use_cpu, args.bf16, args.fp16) == (True, False, False)
    else:
        assert (args.use_cpu, args.bf16, args.fp16) == (False, hardware.bf16, not hardware.bf16)

    checkpoints = sorted((outputs / "checkpoints" / adapter).glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    assert [p.name for p in checkpoints] == [f"checkpoint-{s}" for s in (STEPS - 2, STEPS - 1, STEPS)]
    assert all((p / COMPLETE_MARKER).is_file() for p in checkpoints)


def test_04_drew_03s_validation_curve_beside_its_own(gpu_branch_runs):
    outputs, executed = gpu_branch_runs
    lora = json.loads((outputs / "adapters" / "lora" / "training_metrics.json").read_text())
    qlora = json.loads((outputs / "adapters" / "qlora" / "training_metrics.json").read_text())
    assert [s for s, _ in lora["eval_curve"]] == [s for s, _ in qlora["eval_curve"]]
    notebook = nbformat.read(executed["04_qlora_finetuning"], as_version=4)
    table = [o for c in notebook.cells if c.source.startswith("from utils.training import metrics_table")
             for o in c.outputs if o.output_type == "execute_result"]
    assert table and "LoRA (03)" in table[0]["data"]["text/plain"]
