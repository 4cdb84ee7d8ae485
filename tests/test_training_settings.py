"""utils.training_settings: the CPU/GPU table, the two dicts, the schedule arithmetic, the GPU batch plan."""

from __future__ import annotations

import copy

import pytest
import torch

from utils import training_settings
from utils.adapters import add_lora_adapter
from utils.models import Hardware
from utils.phi3 import PHI3_LORA_TARGETS
from utils.tokenization import tokenize_conversation
from utils.training import train


def test_the_cpu_profile_builds_an_fp32_cpu_run_and_the_gpu_profile_a_16_bit_one(tmp_path):
    cpu = training_settings.build_sft_config(training_settings.training_config("cpu", output_dir=str(tmp_path)))
    assert cpu.use_cpu and not cpu.bf16 and not cpu.fp16 and cpu.device.type == "cpu"
    ampere = Hardware(cuda=True, gpu_name="A100", bf16=True, gpu_memory_gib=39.5)
    gpu = training_settings.training_config("gpu", hardware=ampere)
    assert set(gpu) == set(training_settings.training_config("cpu"))  # both columns fill every key
    assert (gpu["use_cpu"], gpu["bf16"], gpu["fp16"]) == (False, True, False)


@pytest.mark.parametrize("profile, differ", [("cpu", set()), ("gpu", {"optim"})])
def test_qlora_changes_only_the_optimizer_and_pages_it_only_on_a_gpu(profile, differ):
    lora = training_settings.training_config(profile, "lora", run_name="same")
    qlora = training_settings.training_config(profile, "qlora", run_name="same")
    assert {key for key in lora if lora[key] != qlora[key]} == differ
    assert ("paged" in qlora["optim"] and "8bit" in qlora["optim"]) == (profile == "gpu")  # paging needs CUDA


def test_a_cpu_profile_step_is_four_unpadded_conversations_one_per_forward_pass(tiny_model, tiny_tokenizer, tmp_path):
    """Measured on a real run: the CPU profile's optimizer step is 4 conversations, each alone in its forward pass."""
    rows = [{"messages": [{"role": "user", "content": "Why? " * (1 + 3 * i)},
                          {"role": "assistant", "content": f"Answer number {i}."}]} for i in range(4)]
    config = training_settings.training_config("cpu", output_dir=str(tmp_path / "run"), max_steps=1,
                                               eval_strategy="no", save_strategy="no", disable_tqdm=True)
    model = add_lora_adapter(copy.deepcopy(tiny_model), training_settings.peft_config(r=2), seed=0)
    shapes = []
    model.get_base_model().model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    result = train(model, tiny_tokenizer, rows, None, config, adapter_dir=tmp_path / "adapter")
    lengths = sorted(len(tokenize_conversation(row["messages"], tiny_tokenizer)["input_ids"]) for row in rows)
    assert result.metrics["steps"] == 1
    assert sorted(shapes) == [(1, length) for length in lengths]  # one conversation per pass, no padding


def test_peft_configs_targets_adapt_every_linear_layer_of_phi3s_decoder_and_nothing_else(tiny_model):
    linear = {name for name, module in tiny_model.named_modules() if isinstance(module, torch.nn.Linear)}
    model = add_lora_adapter(copy.deepcopy(tiny_model), training_settings.peft_config(), seed=0)
    adapted = {name for name, module in model.get_base_model().named_modules() if hasattr(module, "lora_A")}
    assert adapted == {name for name in linear if name.startswith("model.layers.")} and "lm_head" in linear - adapted
    dropouts = {type(module.lora_dropout["default"]).__name__ for module in model.modules() if hasattr(module, "lora_A")}
    assert dropouts == {"Identity"}  # lora_dropout 0: peft keeps no masked copy of each adapted input


def test_settings_write_nothing_to_disk(tmp_path, monkeypatch):
    outputs = tmp_path / "outputs"
    monkeypatch.setenv("PHI3_LORA_OUTPUTS", str(outputs))
    config = training_settings.training_config("cpu", run_name="my-run")
    training_settings.training_config("gpu", "qlora")
    assert config["output_dir"] == str(outputs / "checkpoints" / "my-run")
    assert not outputs.exists()  # the Trainer creates the folder when it first saves


@pytest.mark.parametrize("memory_gib, method, expected", [
    (80, "lora", False),  # H100/A100-80GB: Phi-3-mini LoRA at 4 x 2048 fits without recomputation
    (40, "lora", True),
    (16, "qlora", True),
    (None, "lora", True),  # no memory figure: the safe choice
])
def test_gpu_checkpointing_follows_the_memory_estimate(memory_gib, method, expected):
    from utils.memory import needs_activation_checkpointing
    from utils.phi3 import phi3_mini_config

    gpu = Hardware(cuda=True, gpu_name="GPU", bf16=True, gpu_memory_gib=memory_gib)
    config = training_settings.training_config("gpu", method, hardware=gpu)
    assert config["activation_checkpointing"] is expected
    if memory_gib:  # the same answer as the estimate 00_setup shows, for the profile's batch and length
        assert expected == needs_activation_checkpointing(
            phi3_mini_config(), memory_gib * 2**30, method=method, seq_len=2048, batch_size=4, compute_bytes=2,
            optimizer_bytes_per_param=2 if method == "qlora" else 8)
    assert training_settings.training_config("gpu", method, hardware=gpu, activation_checkpointing=True)[
        "activation_checkpointing"] is True  # an explicit override wins


def test_gpu_without_bf16_gets_fp16():
    t4 = Hardware(cuda=True, gpu_name="Tesla T4", bf16=False)
    config = training_settings.training_config("gpu", hardware=t4)
    assert (config["bf16"], config["fp16"]) == (False, True)


def test_every_table_key_is_explained_and_accepted_by_sftconfig():
    keys = training_settings.sft_config_keys()
    for key, (_, _, help_text) in training_settings.TRAINING_PROFILES.items():
        assert key in keys, key
        assert len(help_text) > 10, key


def test_overrides_accept_sftconfig_arguments_and_refuse_typos():
    assert training_settings.training_config("cpu", padding_free=True)["padding_free"] is True
    with pytest.raises(ValueError, match="learning_rte"):
        training_settings.training_config("cpu", learning_rte=1e-3)
    with pytest.raises(ValueError, match="profile"):
        training_settings.training_config("tpu")
    with pytest.raises(ValueError, match="alpah"):
        training_settings.peft_config(alpah=8)


def test_peft_config_builds_a_lora_config_and_refuses_what_loraconfig_does_not_know():
    lora = training_settings.build_lora_config(training_settings.peft_config(r=8, lora_alpha=16))
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (8, 16, set(PHI3_LORA_TARGETS))
    with pytest.raises(ValueError, match="LoraConfig does not know"):
        training_settings.build_lora_config({**training_settings.peft_config(), "rank": 8})


@pytest.mark.parametrize("conversations, batch, accumulation, epochs, world", [
    (303, 4, 4, 2, 1),  # the GPU profile on the shipped split
    (303, 1, 4, 1, 1),
    (10, 4, 4, 3, 1),  # fewer batches than one accumulation
    (301, 2, 8, 1, 2),  # two ranks
    (7, 1, 4, 1.5, 1),  # a fractional epoch count
])
def test_optimizer_steps_equal_the_trainers_own_count(conversations, batch, accumulation, epochs, world, tmp_path):
    """Our step arithmetic against transformers' Trainer, which computes max_steps itself."""
    import math

    from transformers import Trainer, TrainingArguments

    config = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
              "num_train_epochs": epochs, "max_steps": -1}
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **config)
    # With two ranks each rank's dataloader holds ceil(n / (batch x world)) batches (checked by arithmetic only:
    # one process cannot run two ranks here); with one, a real Trainer counts its own max_steps.
    batches = math.ceil(conversations / (batch * world))
    steps = training_settings.optimizer_steps(conversations, config, world_size=world)
    if world == 1:
        import torch
        from datasets import Dataset

        class Counter(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))

            def forward(self, x, labels=None):
                return {"loss": (self.w * x.float()).sum()}

        seen = {}

        from transformers import TrainerCallback

        class Spy(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                seen["max_steps"] = state.max_steps
                control.should_training_stop = True

        data = Dataset.from_dict({"x": [1] * conversations, "labels": [0] * conversations})
        Trainer(model=Counter(), args=args, train_dataset=data, callbacks=[Spy()]).train()
        assert steps == seen["max_steps"]
    else:
        assert steps == math.ceil(math.ceil(batches / accumulation) * epochs)


@pytest.mark.parametrize("total, evaluations", [(38, 10), (30, 4), (3, 8), (1000, 10)])
def test_training_cadence_spreads_evaluations_over_the_run(total, evaluations):
    cadence = training_settings.training_cadence(total, evaluations=evaluations, log_lines=20)
    eval_points = [step for step in range(1, total + 1) if step % cadence["eval_steps"] == 0]
    wanted = min(evaluations, total)
    assert wanted - 1 <= len(eval_points) <= wanted and cadence["save_steps"] == cadence["eval_steps"]
    assert 1 <= total // cadence["logging_steps"] <= 20


def test_gpu_profile_on_the_shipped_split_evaluates_along_the_way():
    """The old fixed intervals (eval 50, save 100) gave a 38-step GPU run no evaluation between start and end."""
    from utils.data import load_split
    from utils.models import Hardware

    a100 = Hardware(cuda=True, gpu_name="A100", bf16=True, gpu_memory_gib=39.4)
    rows = load_split("train")
    config = training_settings.training_config("gpu", "lora", hardware=a100, num_train_conversations=len(rows))
    steps = training_settings.optimizer_steps(len(rows), config)
    assert steps == 38  # 303 conversations, 2 epochs of 16 per step
    along_the_way = [s for s in range(1, steps) if s % config["eval_steps"] == 0]
    assert len(along_the_way) >= 8 and config["save_steps"] == config["eval_steps"] <= steps


@pytest.mark.parametrize("memory_gib, batch, checkpointing", [
    (15.0, 4, True),  # T4: Phi-3-mini LoRA in fp16 fits with recomputation
    (79.2, 4, False),  # 80 GB: no recomputation needed
])
def test_gpu_batch_follows_the_cards_memory_at_16_per_step(memory_gib, batch, checkpointing):
    from utils.models import Hardware

    card = Hardware(cuda=True, gpu_name="GPU", bf16=False, gpu_memory_gib=memory_gib)
    config = training_settings.training_config("gpu", "lora", hardware=card)
    assert config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] == training_settings.EFFECTIVE_BATCH
    assert (config["per_device_train_batch_size"], config["activation_checkpointing"]) == (batch, checkpointing)
