"""The training settings: one table with a CPU and a GPU column, and the two plain dicts every run is made of.

* ``training_config(...)``: the ``SFTConfig`` arguments (optimiser, batch, schedule, precision,
  logging, evaluation, checkpoints), from :data:`TRAINING_PROFILES`;
* ``peft_config(...)``: the ``LoraConfig`` arguments (rank, alpha, dropout, target modules), from :data:`PEFT_PROFILE`.

These functions only compute values: they write nothing. Notebooks 03 and 04, the script
``python -m utils.train_cli`` and the benchmarks read them; :func:`utils.training.train` runs them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from peft import LoraConfig
from trl import SFTConfig

from utils.checkpoints import checkpoints_dir
from utils.memory import GIB, T4_MEMORY_GIB, BatchPlan, plan_batch
from utils.phi3 import PHI3_LORA_TARGETS, phi3_mini_config

PROFILES = ("cpu", "gpu")
METHODS = ("lora", "qlora")
BY_GPU = "bf16 if the GPU has it"  # placeholder in the GPU column, resolved by the hardware
BY_MEMORY = "from the GPU's memory"  # placeholder: utils.memory.plan_batch decides from the card's memory
EFFECTIVE_BATCH = 16  # conversations per optimizer step on a GPU (micro-batch x accumulation), whatever the card
# How often a run evaluates (and checkpoints) and logs, as counts per run: a CPU evaluation pass costs real time.
CADENCE = {"cpu": {"evaluations": 4, "log_lines": 10}, "gpu": {"evaluations": 10, "log_lines": 25}}

# --------------------------------------------------------------------------------------------------
# The one source of every default: key -> (CPU value, GPU value, what it does and a sensible range).
# The CPU column sizes the demo on the 135M smol model; the GPU column is a real Phi-3-mini run.
# Change a default here and notebooks, script, tests and benchmarks all follow.
# --------------------------------------------------------------------------------------------------
TRAINING_PROFILES: dict[str, tuple[Any, Any, str]] = {
    # Optimisation
    "learning_rate": (2e-4, 2e-4, "AdamW step size; LoRA likes 1e-4..3e-4, ~10x full fine-tuning's"),
    "lr_scheduler_type": ("cosine", "cosine", "decay shape after warm-up: cosine, linear or constant"),
    "warmup_steps": (0.05, 0.03, "warm-up length; a float < 1 is a fraction of all steps (0.03..0.1)"),
    "weight_decay": (0.0, 0.0, "L2 pull on the adapter weights; 0..0.1, rarely matters for LoRA"),
    "max_grad_norm": (1.0, 1.0, "clip the gradient norm to this (0.3..1.0) against loss spikes"),
    "optim": ("adamw_torch", "adamw_torch_fused", "optimiser; QLoRA on a GPU uses paged_adamw_8bit"),
    # Batch and length
    "per_device_train_batch_size": (1, BY_MEMORY, "conversations per forward pass per device (1..16); CPU: one "
                                                  "conversation, no padding, least activation memory (benchmarks/); "
                                                  "GPU: the largest of 4, 2, 1 that fits the card"),
    "per_device_eval_batch_size": (8, 8, "conversations per evaluation pass (no gradients: can be larger)"),
    "gradient_accumulation_steps": (4, BY_MEMORY, "passes summed per optimiser step; effective batch = batch x this x "
                                                  "GPUs (the loss is normalised over the whole step); GPU: 16 / batch"),
    "num_train_epochs": (1, 2, "passes over the training split (1..3 for instruction tuning)"),
    "max_steps": (-1, -1, "stop after this many optimiser steps; -1 = use num_train_epochs"),
    "max_length": (512, 2048, "tokens per conversation after truncation (Phi-3-mini-4k: up to 4096)"),
    "assistant_only_loss": (True, True, "learn only the assistant's tokens (needs {% generation %} markers)"),
    "packing": (False, False, "concatenate conversations into full rows; exact only with use_cache=False"),
    # Precision and memory
    "use_cpu": (True, False, "run on the CPU even if a GPU is visible"),
    "bf16": (False, BY_GPU, "bfloat16 autocast: GPUs from Ampere on; 10-400x slower on most CPUs"),
    "fp16": (False, BY_GPU, "float16 autocast with loss scaling: older GPUs (T4, V100)"),
    "activation_checkpointing": (True, BY_MEMORY, "recompute activations in backward instead of keeping them: less "
                                                 "memory, more time (transformers 5's name; gradient_checkpointing "
                                                 "is its deprecated alias)"),
    "activation_checkpointing_kwargs": ({"use_reentrant": False, "every_n_layers": 3}, {"use_reentrant": False},
                                        "non-reentrant works with frozen inputs; every_n_layers=3 recomputes only "
                                        "every third layer: ~1/5 more time instead of ~1/2"),
    # Logging, evaluation, checkpoints
    "logging_strategy": ("steps", "steps", "when to log the training loss"),
    "logging_steps": (5, 10, "log every N optimiser steps (set from the run's length by training_cadence)"),
    "logging_first_step": (True, True, "also log step 1, so the curve starts at the beginning"),
    "eval_strategy": ("steps", "steps", "evaluate the validation split every eval_steps ('no' to skip)"),
    "eval_steps": (20, 50, "validation loss every N steps (set from the run's length by training_cadence)"),
    "eval_on_start": (True, True, "validation loss before the first step: the 'before' number"),
    "save_strategy": ("steps", "steps", "when to write a resumable checkpoint"),
    "save_steps": (20, 50, "checkpoint every N steps (= eval_steps; the Trainer also saves the last step)"),
    "save_total_limit": (2, 3, "keep only the newest N checkpoints"),
    "include_num_input_tokens_seen": ("non_padding", "non_padding", "count real tokens, for tokens/s"),
    "report_to": ("none", "none", "experiment trackers (tensorboard, wandb, ...); none offline"),
    "disable_tqdm": (False, False, "progress bars on"),
    # Reproducibility and data loading
    "seed": (42, 42, "seeds model init (LoRA's A matrices), dropout and shuffling"),
    "dataloader_num_workers": (0, 2, "background processes preparing batches"),
    "ddp_find_unused_parameters": (False, False, "LoRA gives every trainable weight a gradient: no search"),
}

# What QLoRA changes on top of the table above (the 03 -> 04 diff).
QLORA_CHANGES: dict[str, tuple[Any, Any, str]] = {
    "optim": ("adamw_torch", "paged_adamw_8bit", "8-bit AdamW whose states page to CPU RAM on memory spikes"),
}

# LoRA itself is the same on both profiles: key -> (value, what it does and a sensible range).
PEFT_PROFILE: dict[str, tuple[Any, str]] = {
    "r": (16, "rank of the update B @ A; 8..64 (more capacity, more memory)"),
    "lora_alpha": (32, "scale: the update is multiplied by alpha / r; commonly 2 x r"),
    "lora_dropout": (0.0, "dropout on the adapter's input; 0 keeps no masked copy of each input (less memory, "
                          "faster); try 0.05..0.1 if validation loss rises while training loss falls"),
    "target_modules": (list(PHI3_LORA_TARGETS), "Phi-3's fused projections: attention and MLP"),
    "bias": ("none", "train no biases (Phi-3 has none)"),
    "task_type": ("CAUSAL_LM", "tells PEFT which wrapper to build"),
}


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    """Raise a ValueError naming the valid choices."""
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; choose one of {', '.join(choices)}.")


def default_profile() -> str:
    """``gpu`` when CUDA is available, else ``cpu``."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def _gpu_has_bf16(hardware: Any | None) -> bool:
    """Native bf16 on the GPU in ``hardware``; without one to ask, assume an Ampere-class GPU (A100, L4, H100)."""
    if hardware is not None and getattr(hardware, "cuda", False):
        return bool(hardware.bf16)
    return True


def gpu_batch_plan(hardware: Any | None, method: str, config: dict[str, Any],
                   model_config: Any | None = None) -> BatchPlan:
    """Micro-batch, accumulation and checkpointing for a GPU run, from the card's memory (utils.memory.plan_batch).

    Without a GPU to measure (``hardware`` is None or has no memory figure) the plan is the one for a 16 GB
    card (a Colab T4), the smallest the series supports.
    """
    memory = getattr(hardware, "gpu_memory_gib", None) if hardware is not None else None
    return plan_batch(model_config or phi3_mini_config(), (memory or T4_MEMORY_GIB) * GIB, effective_batch=EFFECTIVE_BATCH, method=method,
                      seq_len=int(config["max_length"]), compute_bytes=2,
                      optimizer_bytes_per_param=2 if "8bit" in str(config["optim"]) else 8)


def optimizer_steps(num_conversations: int, config: dict[str, Any], world_size: int = 1) -> int:
    """The optimizer steps the Trainer will run: ``max_steps`` if set, else epochs x ceil(batches / accumulation)."""
    if int(config.get("max_steps", -1) or -1) > 0:
        return int(config["max_steps"])
    if num_conversations <= 0:
        raise ValueError("There are no training conversations: nothing to schedule.")
    per_pass = int(config["per_device_train_batch_size"]) * max(1, world_size)
    batches = math.ceil(num_conversations / per_pass)
    per_epoch = max(1, math.ceil(batches / int(config["gradient_accumulation_steps"])))
    return int(math.ceil(per_epoch * float(config["num_train_epochs"])))


def training_cadence(total_steps: int, evaluations: int = 8, log_lines: int = 20) -> dict[str, int]:
    """Logging, evaluation and checkpoint intervals for a run of ``total_steps`` optimizer steps.

    About ``evaluations`` validation passes (each followed by a checkpoint) and ``log_lines`` training-loss
    lines per run, whatever its length; with ``eval_on_start`` and the Trainer's evaluation and save at the
    last step, the curve has a point at the start, along the way and at the end.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    every = max(1, math.ceil(total_steps / max(1, evaluations)))
    return {"logging_steps": max(1, math.ceil(total_steps / max(1, log_lines))), "eval_steps": every,
            "save_steps": every}


def training_config(
    profile: str | None = None,
    method: str = "lora",
    *,
    run_name: str | None = None,
    hardware: Any | None = None,
    model_config: Any | None = None,
    num_train_conversations: int | None = None,
    world_size: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """The SFTConfig arguments for ``profile`` (cpu/gpu, default: this machine) and ``method`` (lora/qlora).

    On the GPU profile, precision follows the GPU in ``hardware`` (bf16 where native, else fp16), and the
    micro-batch, accumulation and activation checkpointing come from its memory
    (:func:`gpu_batch_plan`; without a GPU to ask, a 16 GB card is assumed). With
    ``num_train_conversations``, logging, evaluation and checkpoint intervals follow the number of
    optimizer steps the run will take (:func:`training_cadence`). ``output_dir`` is
    ``outputs/checkpoints/<run_name or method>`` (a path only: nothing is created until the Trainer saves).
    ``overrides`` replace any key (an unknown key is refused).
    """
    profile = profile or default_profile()
    _check_choice(profile, PROFILES, "profile")
    _check_choice(method, METHODS, "method")
    column = PROFILES.index(profile)
    table = dict(TRAINING_PROFILES)
    if method == "qlora":
        table.update(QLORA_CHANGES)
    config = {key: values[column] for key, values in table.items()}
    if profile == "gpu":
        bf16 = _gpu_has_bf16(hardware)
        config["bf16"], config["fp16"] = bf16, not bf16
        plan = gpu_batch_plan(hardware, method, {**config, **overrides}, model_config)
        config["per_device_train_batch_size"] = plan.per_device_train_batch_size
        config["gradient_accumulation_steps"] = plan.gradient_accumulation_steps
        config["activation_checkpointing"] = plan.activation_checkpointing
    if num_train_conversations is not None:
        steps = optimizer_steps(num_train_conversations, {**config, **overrides}, world_size)
        config.update(training_cadence(steps, **CADENCE[profile]))
    unknown = sorted(set(overrides) - set(config) - {"output_dir"})
    if unknown:  # any other SFTConfig argument is welcome; a typo is not
        unknown = sorted(set(unknown) - sft_config_keys())
    if unknown:
        raise ValueError(f"Unknown training_config keys {unknown}: neither in the profile table ({sorted(config)}) "
                         "nor an SFTConfig argument.")
    config["output_dir"] = str(checkpoints_dir(run_name or method))
    config.update(overrides)
    return config


def sft_config_keys() -> set[str]:
    """Every argument ``trl.SFTConfig`` accepts."""
    return {item.name for item in dataclasses.fields(SFTConfig) if item.init}


def peft_config(method: str = "lora", **overrides: Any) -> dict[str, Any]:
    """The LoraConfig arguments (the same for LoRA and QLoRA: only the base model's storage differs)."""
    _check_choice(method, METHODS, "method")
    config = {key: (list(value) if isinstance(value, list) else value) for key, (value, _) in PEFT_PROFILE.items()}
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"Unknown peft_config keys {unknown}; the known keys are {sorted(config)}.")
    config.update(overrides)
    return config


def build_sft_config(config: dict[str, Any]) -> SFTConfig:
    """``trl.SFTConfig`` from a training_config dict; a misspelt key is reported with its name."""
    try:
        return SFTConfig(**config)
    except TypeError as error:  # unexpected keyword
        raise ValueError(f"training_config has a key SFTConfig does not know: {error}") from None


def build_lora_config(config: dict[str, Any]) -> LoraConfig:
    """``peft.LoraConfig`` from a peft_config dict."""
    try:
        return LoraConfig(**config)
    except TypeError as error:
        raise ValueError(f"peft_config has a key LoraConfig does not know: {error}") from None
