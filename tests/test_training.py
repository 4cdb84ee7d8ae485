"""utils.training: the profiles, the dicts -> library objects, target checks, checkpoint completeness."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from utils import training
from utils.memory import PHI3_LORA_TARGETS
from utils.paths import REPO_ROOT


def test_cpu_and_gpu_profiles_differ_where_the_hardware_does():
    cpu, gpu = training.training_config("cpu"), training.training_config("gpu")
    assert set(cpu) == set(gpu)
    assert (cpu["use_cpu"], cpu["bf16"], cpu["fp16"], cpu["activation_checkpointing"]) == (True, False, False, True)
    assert cpu["activation_checkpointing_kwargs"]["every_n_layers"] == 3  # a third of the layers recomputed
    assert (gpu["use_cpu"], gpu["bf16"], gpu["fp16"], gpu["activation_checkpointing"]) == (False, True, False, True)
    assert training.training_config("gpu", "qlora")["optim"] == "paged_adamw_8bit"
    assert training.training_config("cpu", "qlora")["optim"] == "adamw_torch"


def test_cpu_profile_trains_one_conversation_per_pass_and_four_per_step():
    cpu = training.training_config("cpu")
    # the benchmark's winner on a CPU: no padding, least activation memory, the same 4-conversation step
    assert (cpu["per_device_train_batch_size"], cpu["gradient_accumulation_steps"]) == (1, 4)
    assert training.peft_config()["lora_dropout"] == 0.0


@pytest.mark.parametrize("memory_gib, method, expected", [
    (80, "lora", False),  # H100/A100-80GB: Phi-3-mini LoRA at 4 x 2048 fits without recomputation
    (40, "lora", True),
    (16, "qlora", True),
    (None, "lora", True),  # no memory figure: the safe choice
])
def test_gpu_checkpointing_follows_the_memory_estimate(memory_gib, method, expected):
    from utils.memory import needs_gradient_checkpointing
    from utils.models import Hardware, phi3_mini_config

    gpu = Hardware(cuda=True, gpu_name="GPU", bf16=True, gpu_memory_gib=memory_gib)
    config = training.training_config("gpu", method, hardware=gpu)
    assert config["activation_checkpointing"] is expected
    if memory_gib:  # the same answer as the estimate 00_setup shows, for the profile's batch and length
        assert expected == needs_gradient_checkpointing(
            phi3_mini_config(), memory_gib * 2**30, method=method, seq_len=2048, batch_size=4, compute_bytes=2,
            optimizer_bytes_per_param=2 if method == "qlora" else 8)
    assert training.training_config("gpu", method, hardware=gpu, activation_checkpointing=True)[
        "activation_checkpointing"] is True  # an explicit override wins


def test_gpu_without_bf16_gets_fp16():
    from utils.models import Hardware

    t4 = Hardware(cuda=True, gpu_name="Tesla T4", bf16=False)
    config = training.training_config("gpu", hardware=t4)
    assert (config["bf16"], config["fp16"]) == (False, True)


def test_every_table_key_is_explained_and_accepted_by_sftconfig():
    keys = training.sft_config_keys()
    for key, (_, _, help_text) in training.TRAINING_PROFILES.items():
        assert key in keys, key
        assert len(help_text) > 10, key
    table = training.profile_table("qlora")
    assert list(table.columns) == ["CPU (this demo)", "GPU (Phi-3-mini)", "what it does"]
    assert table.loc["optim", "GPU (Phi-3-mini)"] == "'paged_adamw_8bit'"


def test_cpu_profile_builds_an_sftconfig_that_runs_without_a_gpu(tmp_path):
    args = training.build_sft_config(training.training_config("cpu", output_dir=str(tmp_path)))
    assert args.use_cpu and not args.bf16 and args.assistant_only_loss and args.max_length == 512


def test_overrides_accept_sftconfig_arguments_and_refuse_typos():
    assert training.training_config("cpu", padding_free=True)["padding_free"] is True
    with pytest.raises(ValueError, match="learning_rte"):
        training.training_config("cpu", learning_rte=1e-3)
    with pytest.raises(ValueError, match="profile"):
        training.training_config("tpu")
    with pytest.raises(ValueError, match="alpah"):
        training.peft_config(alpah=8)


def test_peft_config_targets_phi3_projections_and_builds_a_lora_config():
    config = training.peft_config(r=8)
    assert config["target_modules"] == list(PHI3_LORA_TARGETS) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    lora = training.build_lora_config(config)
    assert lora.r == 8 and lora.lora_alpha == 32 and set(lora.target_modules) == set(PHI3_LORA_TARGETS)


def test_config_diff_lists_only_changed_keys():
    diff = training.config_diff(training.training_config("gpu", "lora"), training.training_config("gpu", "qlora"),
                                ("LoRA", "QLoRA"))
    assert list(diff.index) == ["optim"]


@pytest.fixture(scope="module")
def tiny_model():
    from utils.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny", verbose=False)
    return model


def test_a_target_that_matches_nothing_fails_loudly(tiny_model):
    assert training.check_target_modules(tiny_model, list(PHI3_LORA_TARGETS)) == {name: 2 for name in PHI3_LORA_TARGETS}
    with pytest.raises(ValueError, match=r"\['q_proj'\] match nothing.*qkv_proj"):
        training.check_target_modules(tiny_model, ["q_proj", "o_proj"])


def test_add_lora_adapter_counts_trainable_parameters(tiny_model, capsys):
    import copy

    model = training.add_lora_adapter(copy.deepcopy(tiny_model), training.peft_config(r=4), seed=0)
    trainable, _ = model.get_nb_trainable_parameters()
    # r x (in + out) per projection per layer, tiny: hidden 64, intermediate 256, 2 layers
    expected = 4 * ((64 + 192) + (64 + 64) + (64 + 512) + (256 + 64)) * 2
    assert trainable == expected
    assert f"trainable {expected:,} of" in capsys.readouterr().out


def _write_checkpoint(folder: Path, complete: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        training.mark_checkpoint_complete(folder, int(folder.name.split("-")[1]))
    return folder


def test_newest_complete_checkpoint_skips_a_partly_written_one_with_a_warning(tmp_path, caplog):
    _write_checkpoint(tmp_path / "checkpoint-2", complete=True)
    good = _write_checkpoint(tmp_path / "checkpoint-10", complete=True)
    _write_checkpoint(tmp_path / "checkpoint-12", complete=False)  # the crash came mid-save
    (tmp_path / "checkpoint-14").mkdir()  # the crash came right after mkdir
    with caplog.at_level(logging.WARNING, logger="utils.training"):
        assert training.newest_complete_checkpoint(tmp_path) == good  # 10 beats 2 numerically
    skipped = [record.getMessage() for record in caplog.records if "Skipping" in record.getMessage()]
    assert len(skipped) == 2 and "checkpoint-14" in skipped[0] and "checkpoint-12" in skipped[1]


def test_a_marker_whose_files_changed_is_not_complete(tmp_path):
    checkpoint = _write_checkpoint(tmp_path / "checkpoint-4", complete=True)
    assert training.checkpoint_is_complete(checkpoint)
    assert json.loads((checkpoint / training.COMPLETE_MARKER).read_text())["step"] == 4
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x" * 50)  # truncated by a later crash
    assert not training.checkpoint_is_complete(checkpoint)
    assert training.newest_complete_checkpoint(tmp_path) is None
    assert training.newest_complete_checkpoint(tmp_path / "missing") is None


def test_bad_rows_are_reported_by_index():
    with pytest.raises(ValueError, match="train is empty"):
        training.conversations_dataset([], "train")
    with pytest.raises(ValueError, match=r"index 1, field 'messages\[0\].role': the conversation ends with a user"):
        training.conversations_dataset([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                         "content": "yo"}]},
                                        {"messages": [{"role": "user", "content": "hi"}]}], "train")
    with pytest.raises(ValueError, match=r"index 0, field 'messages': missing field"):
        training.conversations_dataset([{"text": "hi"}], "train")


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero3"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    from utils.paths import REPO_ROOT

    config = load_config_from_file(str(REPO_ROOT / "configs" / f"{name}.yaml"))
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}[name]
    if name == "fsdp":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Phi3DecoderLayer"
    if name == "deepspeed_zero3":
        assert config.deepspeed_config["zero_stage"] == 3


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*lora-*.yaml")),
                         ids=lambda path: path.name)
def test_shipped_training_configs_resolve_to_valid_dicts(path):
    from utils.train import build_parser, resolve_settings

    settings = resolve_settings(build_parser().parse_args(["--config", str(path)]))
    config = training.training_config(settings["profile"], settings["method"], run_name=settings["run_name"],
                                       **settings["training"])
    training.build_sft_config({**config, "use_cpu": True, "bf16": False, "fp16": False})
    training.build_lora_config(training.peft_config(settings["method"], **settings["peft"]))


def test_script_reports_a_bad_config_file_by_name(tmp_path):
    from utils.train import read_config_file

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\ntrainng:\n  max_steps: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key\(s\) \['trainng'\]"):
        read_config_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        read_config_file(tmp_path / "missing.yaml")


def test_config_diff_of_equal_dicts_is_an_empty_table():
    diff = training.config_diff(training.training_config("cpu", "lora"), training.training_config("cpu", "qlora"))
    assert diff.empty and list(diff.columns) == ["before", "after"]


def test_the_script_reads_any_supported_format_with_the_strict_loader(tmp_path):
    from utils.data import DataValidationError
    from utils.train import load_rows

    rows = load_rows(REPO_ROOT / "data/examples/sharegpt.json", "train", limit=2)
    assert len(rows) == 2 and rows[0]["messages"][-1]["role"] == "assistant"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataValidationError, match="broken.jsonl"):
        load_rows(broken, "train", limit=None)


def test_train_leaves_trl_private_names_alone(tiny_model, tmp_path):
    """train() must not patch library internals: trl's device test is the same during and after a run."""
    import copy

    import torch
    import trl.trainer.utils as trl_utils
    from transformers import TrainerCallback

    from utils.models import load_tokenizer

    original, seen = trl_utils._use_triton, []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(trl_utils._use_triton is original and trl_utils._use_triton(torch.device("cpu")))

    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer number {i}."}]} for i in range(4)]
    model = training.add_lora_adapter(copy.deepcopy(tiny_model), training.peft_config(r=2), seed=0)
    config = training.training_config("cpu", output_dir=str(tmp_path / "run"), max_steps=1, eval_strategy="no",
                                      save_strategy="no", logging_steps=1, disable_tqdm=True, max_length=64)
    result = training.train(model, load_tokenizer("tiny"), rows, None, config, adapter_dir=tmp_path / "adapter",
                            callbacks=[Probe()])
    assert seen == [False] and result.metrics["steps"] == 1
    assert trl_utils._use_triton is original


# --- the schedule: steps, evaluations, checkpoints ---------------------------------------------------

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
    steps = training.optimizer_steps(conversations, config, world_size=world)
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
    cadence = training.training_cadence(total, evaluations=evaluations, log_lines=20)
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
    config = training.training_config("gpu", "lora", hardware=a100, num_train_conversations=len(rows))
    steps = training.optimizer_steps(len(rows), config)
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
    config = training.training_config("gpu", "lora", hardware=card)
    assert config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] == training.EFFECTIVE_BATCH
    assert (config["per_device_train_batch_size"], config["activation_checkpointing"]) == (batch, checkpointing)


def test_one_process_on_several_gpus_is_refused_not_wrapped_in_data_parallel():
    from transformers.training_args import ParallelMode

    several = type("Args", (), {"parallel_mode": ParallelMode.NOT_DISTRIBUTED, "n_gpu": 2})()
    with pytest.raises(RuntimeError, match="DataParallel.*CUDA_VISIBLE_DEVICES=0"):
        training.refuse_data_parallel(several)
    for mode in (ParallelMode.NOT_PARALLEL, ParallelMode.DISTRIBUTED):
        training.refuse_data_parallel(type("Args", (), {"parallel_mode": mode, "n_gpu": 1})())
