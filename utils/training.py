"""LoRA and QLoRA fine-tuning with peft + trl: the configuration profiles and one ``train`` function.

Everything a training run needs is two plain dicts:

* ``training_config(...)``: the ``SFTConfig`` arguments (optimiser, batch, schedule, precision,
  logging, evaluation, checkpoints), from one table with a CPU and a GPU column;
* ``peft_config(...)``: the ``LoraConfig`` arguments (rank, alpha, dropout, target modules).

Notebooks 03 and 04 and the script ``python -m utils.train`` (also under ``accelerate launch``)
all call :func:`train`. Checkpoints are marked complete only after every file is on disk, and
:func:`newest_complete_checkpoint` is what resuming uses, so a crash mid-save is never resumed from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from utils.memory import PHI3_LORA_TARGETS
from utils.paths import CHECKPOINTS, artifact
from utils.runtime import peak_memory_bytes

logger = logging.getLogger(__name__)

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
    "activation_checkpointing": (True, BY_MEMORY, "(was gradient_checkpointing) recompute activations in backward "
                                                 "instead of keeping them: less memory, more time"),
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
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _gpu_has_bf16(hardware: Any | None) -> bool:
    """Native bf16 on the GPU in ``hardware``; without one to ask, assume an Ampere-class GPU (A100, L4, H100)."""
    if hardware is not None and getattr(hardware, "cuda", False):
        return bool(hardware.bf16)
    return True


def gpu_batch_plan(hardware: Any | None, method: str, config: dict[str, Any], model_config: Any | None = None):
    """Micro-batch, accumulation and checkpointing for a GPU run, from the card's memory (utils.memory.plan_batch).

    Without a GPU to measure (``hardware`` is None or has no memory figure) the plan is the one for a 16 GB
    card (a Colab T4), the smallest the series supports.
    """
    from utils.memory import GIB, T4_MEMORY_GIB, plan_batch

    memory = getattr(hardware, "gpu_memory_gib", None) if hardware is not None else None
    if model_config is None:
        from utils.models import phi3_mini_config

        model_config = phi3_mini_config()
    return plan_batch(model_config, (memory or T4_MEMORY_GIB) * GIB, effective_batch=EFFECTIVE_BATCH, method=method,
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
    ``outputs/checkpoints/<run_name or method>``. ``overrides`` replace any key (an unknown key is refused).
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
    import dataclasses

    from trl import SFTConfig

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


def profile_table(method: str = "lora", hardware: Any | None = None):
    """A DataFrame with the CPU and GPU values of every training key side by side, and what it does."""
    import pandas as pd

    cpu, gpu = training_config("cpu", method), training_config("gpu", method, hardware=hardware)
    table = dict(TRAINING_PROFILES)
    if method == "qlora":
        table.update(QLORA_CHANGES)
    rows = [{"key": key, "CPU (this demo)": repr(cpu[key]), "GPU (Phi-3-mini)": repr(gpu[key]),
             "what it does": help_text} for key, (_, _, help_text) in table.items()]
    return pd.DataFrame(rows).set_index("key")


def peft_table(config: dict[str, Any] | None = None):
    """A DataFrame of the LoRA settings with what each one does."""
    import pandas as pd

    config = config or peft_config()
    return pd.DataFrame([{"key": key, "value": repr(config[key]), "what it does": PEFT_PROFILE[key][1]}
                         for key in config]).set_index("key")


def config_diff(before: dict[str, Any], after: dict[str, Any], names: tuple[str, str] = ("before", "after"),
                ignore: tuple[str, ...] = ("output_dir",)):
    """A DataFrame of the keys whose values differ between two config dicts (the lesson of a diff)."""
    import pandas as pd

    keys = [key for key in {**before, **after}
            if key not in ignore and before.get(key, "-") != after.get(key, "-")]
    return pd.DataFrame([{"key": key, names[0]: repr(before.get(key, "-")), names[1]: repr(after.get(key, "-"))}
                         for key in keys], columns=["key", *names]).set_index("key")


# --------------------------------------------------------------------------------------------------
# From dicts to library objects
# --------------------------------------------------------------------------------------------------
def build_sft_config(config: dict[str, Any]):
    """``trl.SFTConfig`` from a training_config dict; a misspelt key is reported with its name."""
    from trl import SFTConfig

    try:
        return SFTConfig(**config)
    except TypeError as error:  # unexpected keyword
        raise ValueError(f"training_config has a key SFTConfig does not know: {error}") from None


def build_lora_config(config: dict[str, Any]):
    """``peft.LoraConfig`` from a peft_config dict."""
    from peft import LoraConfig

    try:
        return LoraConfig(**config)
    except TypeError as error:
        raise ValueError(f"peft_config has a key LoraConfig does not know: {error}") from None


def is_quantized(model: Any) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit model."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def check_target_modules(model: Any, targets: list[str]) -> dict[str, int]:
    """How many layers each target name matches; raises if one matches nothing (a typo or another architecture)."""
    import torch

    linear_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")}
    counts = {target: sum(1 for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == target)
              for target in targets}
    missing = [target for target, count in counts.items() if count == 0]
    if missing:
        raise ValueError(
            f"LoRA target module(s) {missing} match nothing in {type(model).__name__}. Its linear layers are "
            f"named {sorted(linear_names)}; Phi-3 uses {list(PHI3_LORA_TARGETS)}. Fix peft_config['target_modules']."
        )
    return counts


@dataclass(frozen=True)
class ParameterCount:
    """Trainable (adapter) and total parameters of a PEFT model."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / self.total

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.3f}%)"


def add_lora_adapter(model: Any, config: dict[str, Any], *, seed: int = 42) -> Any:
    """Wrap ``model`` in a PEFT LoRA model (seeded init); prints and checks the trainable parameter count.

    For a 4-bit/8-bit model call ``peft.prepare_model_for_kbit_training`` first (notebook 04 shows why).
    """
    from peft import get_peft_model
    from transformers import set_seed

    from utils.models import sharded_by_accelerate

    counts = check_target_modules(model, config["target_modules"])
    set_seed(seed)  # LoRA's A matrices are drawn at random: same seed, same start
    # peft keeps adapters in fp32 by default; FSDP and ZeRO-3 flatten parameters into shards of one dtype, so
    # there the adapters stay in the base model's dtype (as trl does for ZeRO-3).
    peft_model = get_peft_model(model, build_lora_config(config), autocast_adapter_dtype=not sharded_by_accelerate())
    trainable, total = peft_model.get_nb_trainable_parameters()
    count = ParameterCount(trainable, total)
    if trainable == 0:
        raise RuntimeError("The LoRA model has no trainable parameters: check peft_config['target_modules'].")
    print(f"LoRA on {', '.join(f'{name} x{n}' for name, n in counts.items())}: {count}")
    return peft_model


# --------------------------------------------------------------------------------------------------
# Checkpoints that are safe to resume from
# --------------------------------------------------------------------------------------------------
COMPLETE_MARKER = "checkpoint-complete.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(run_name: str) -> Path:
    """Where the Trainer writes the checkpoints of run ``run_name``: ``outputs/checkpoints/<run_name>``."""
    if not run_name or "/" in run_name or run_name.startswith("."):
        raise ValueError(f"run_name must be a plain folder name, not {run_name!r}")
    return artifact(f"{CHECKPOINTS}/{run_name}/.keep").parent


def mark_checkpoint_complete(checkpoint: Path, step: int) -> None:
    """Write the completeness marker last, atomically (temp file + rename), listing every file and its size."""
    files = {str(path.relative_to(checkpoint)): path.stat().st_size
             for path in sorted(checkpoint.rglob("*")) if path.is_file() and path.name != COMPLETE_MARKER}
    temporary = checkpoint / f".{COMPLETE_MARKER}.tmp"
    temporary.write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")
    os.replace(temporary, checkpoint / COMPLETE_MARKER)


def checkpoint_is_complete(checkpoint: Path) -> bool:
    """True when the marker exists and every file it lists is present with the recorded size."""
    marker = checkpoint / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError):
        return False
    return bool(files) and all((checkpoint / name).is_file() and (checkpoint / name).stat().st_size == size
                               for name, size in files.items())


def newest_complete_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-step complete ``checkpoint-N`` in ``run_dir``; incomplete ones are skipped with a warning."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = sorted(((int(match.group(1)), path) for path in run_dir.iterdir()
                    if path.is_dir() and (match := _CHECKPOINT_NAME.match(path.name))), reverse=True)
    for _, path in found:
        if checkpoint_is_complete(path):
            return path
        logger.warning("Skipping %s: it has no complete marker (%s), so its save was interrupted.",
                       path, COMPLETE_MARKER)
    return None


class CheckpointCompleteness(TrainerCallback):
    """Marks ``checkpoint-N`` complete (``checkpoint-complete.json``, written last) once every rank has written it.

    Resuming with :func:`newest_complete_checkpoint` then never starts from a save that a crash cut short.
    It only writes that marker: the run itself is the same with or without it.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and state.is_world_process_zero:  # about to (re)write checkpoint-N
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE_MARKER).unlink(missing_ok=True)

    def on_save(self, args, state, control, **kwargs):
        args.distributed_state.wait_for_everyone()  # every rank has written its part (RNG states)
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            mark_checkpoint_complete(checkpoint, state.global_step)
            logger.info("Checkpoint %s complete", checkpoint)


def refuse_data_parallel(args: Any) -> None:
    """Stop a single process that sees several GPUs: the Trainer would silently wrap the model in DataParallel.

    ``torch.nn.DataParallel`` copies the whole model to every GPU on every step and is slower than one
    GPU for a model this size. Use one GPU (``CUDA_VISIBLE_DEVICES=0``) or ``accelerate launch`` (DDP/FSDP).
    """
    from transformers.training_args import ParallelMode

    if args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        raise RuntimeError(
            f"This process sees {args.n_gpu} GPUs but was not started by `accelerate launch`, so the Trainer would "
            "wrap the model in torch.nn.DataParallel (a full copy per GPU on every step, slower than one GPU). "
            "Either train on one GPU: restart with CUDA_VISIBLE_DEVICES=0 (for a notebook: set it before starting "
            "Jupyter), or on all of them with `accelerate launch --config_file configs/ddp.yaml -m utils.train ...` "
            "(docs/multi-gpu.md)."
        )


def _throughput_callback(clock: dict[str, float]):
    """A TrainerCallback that records the token count and time when training (re)starts and ends."""
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.update(start=time.perf_counter(), tokens_at_start=state.num_input_tokens_seen)

        def on_train_end(self, args, state, control, **kwargs):
            clock.update(end=time.perf_counter(), tokens_at_end=state.num_input_tokens_seen)

    return Throughput()


# --------------------------------------------------------------------------------------------------
# Data and the training run
# --------------------------------------------------------------------------------------------------
def conversations_dataset(rows: list[dict[str, Any]], name: str = "rows"):
    """A ``datasets.Dataset`` of ``messages``, after the same strict checks as every loader (utils.data)."""
    from utils.data import load_conversations, to_sft_dataset

    if not rows:
        raise ValueError(f"{name} is empty: there is nothing to train or evaluate on.")
    return to_sft_dataset(load_conversations(rows, format="messages").conversations)


@dataclass
class TrainingResult:
    """What a run produced and measured."""

    adapter_dir: Path
    run_dir: Path
    log_history: list[dict[str, Any]]
    metrics: dict[str, Any]
    resumed_from: Path | None = None
    trainer: Any = field(default=None, repr=False)

    def losses(self):
        """(train, validation) DataFrames of loss by step, from the Trainer's log history."""
        import pandas as pd

        train = pd.DataFrame([(row["step"], row["loss"]) for row in self.log_history if "loss" in row],
                             columns=["step", "loss"])
        valid = pd.DataFrame([(row["step"], row["eval_loss"]) for row in self.log_history if "eval_loss" in row],
                             columns=["step", "eval_loss"])
        return train, valid


def train(
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]] | None,
    config: dict[str, Any],
    *,
    adapter_dir: str | Path,
    resume: bool = False,
    callbacks: list[Any] | None = None,
) -> TrainingResult:
    """Fine-tune a PEFT ``model`` with ``SFTTrainer`` and save the final adapter to ``adapter_dir`` (rank 0 only).

    ``config`` is a :func:`training_config` dict; checkpoints go to its ``output_dir``. With
    ``resume=True`` training continues from the newest *complete* checkpoint there (or starts over
    when there is none); with ``resume=False`` old checkpoints of the run are removed first.
    """
    from trl import SFTTrainer

    if not hasattr(model, "peft_config"):
        raise TypeError("train() expects a PEFT model: call add_lora_adapter(model, peft_config) first.")
    args = build_sft_config(config)
    refuse_data_parallel(args)
    run_dir = Path(args.output_dir)
    checkpoint = newest_complete_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        logger.info("No complete checkpoint in %s: starting from the beginning.", run_dir)
    if not resume and args.distributed_state.is_main_process and run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run must not mix with (or later resume from) an old one
    args.distributed_state.wait_for_everyone()
    if eval_rows is None or args.eval_strategy == "no":
        args.eval_strategy, args.eval_on_start, eval_dataset = "no", False, None
    else:
        eval_dataset = conversations_dataset(eval_rows, "eval_rows")
    clock: dict[str, float] = {}
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=conversations_dataset(train_rows, "train_rows"),
        eval_dataset=eval_dataset, processing_class=tokenizer,
        callbacks=[CheckpointCompleteness(), _throughput_callback(clock), *(callbacks or [])],
    )
    if args.use_cpu and getattr(model, "is_loaded_in_4bit", False):
        # trl 1.16 casts QLoRA adapters to bf16 (the QLoRA paper's choice for GPUs); on a CPU bf16 is 10-400x
        # slower than fp32, so the adapters go back to fp32, as notebook 04 does.
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    _reset_peak_memory()
    if checkpoint is not None:
        logger.info("Resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    adapter_dir = Path(adapter_dir)
    trainer.save_model(str(adapter_dir))  # writes on the main process only (and gathers FSDP/ZeRO-3 shards)
    history = list(trainer.state.log_history)
    metrics = _run_metrics(history, clock, trainer.state.global_step)
    metrics["resumed_from_step"] = int(checkpoint.name.split("-")[-1]) if checkpoint else None
    metrics["base_model"] = getattr(trainer.model.get_base_model().config, "_name_or_path", None)
    if trainer.is_world_process_zero():
        (adapter_dir / "training_metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return TrainingResult(adapter_dir, run_dir, history, metrics, checkpoint, trainer)


def _reset_peak_memory() -> None:
    """Start the CUDA peak-memory counter afresh (the CPU's peak RSS cannot be reset)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _run_metrics(history: list[dict[str, Any]], clock: dict[str, float], steps: int) -> dict[str, Any]:
    """Time, tokens/s, peak memory and the losses before and after, from one run."""
    import torch

    seconds = clock.get("end", 0.0) - clock.get("start", 0.0)
    tokens = int(clock.get("tokens_at_end", 0) - clock.get("tokens_at_start", 0))
    evals = [row["eval_loss"] for row in history if "eval_loss" in row]
    train_losses = [row["loss"] for row in history if "loss" in row]
    return {
        "steps": steps,
        "seconds": round(seconds, 2),
        "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else math.nan,
        "peak_memory_gib": round(peak_memory_bytes() / 2**30, 3),
        "peak_memory_kind": "CUDA max allocated" if torch.cuda.is_available() else "peak RSS of the process",
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "eval_loss_before": evals[0] if evals else None,
        "eval_loss_after": evals[-1] if evals else None,
    }


def metrics_table(results: dict[str, TrainingResult | dict[str, Any]]):
    """A DataFrame with one column per run (a result, or the metrics dict of a saved run): time, tokens/s, memory, losses."""
    import pandas as pd

    labels = {"steps": "optimizer steps", "seconds": "train time (s)", "tokens": "tokens trained",
              "tokens_per_second": "tokens/s", "peak_memory_gib": "peak memory (GiB)",
              "peak_memory_kind": "memory measured as", "eval_loss_before": "validation loss before",
              "eval_loss_after": "validation loss after", "train_loss_first": "first logged train loss",
              "train_loss_last": "last logged train loss"}
    metrics = {name: result.metrics if isinstance(result, TrainingResult) else result for name, result in results.items()}
    return pd.DataFrame({name: {label: values.get(key) for key, label in labels.items()}
                         for name, values in metrics.items()})


def plot_losses(result: TrainingResult, title: str = "Loss", path: str | Path | None = None):
    """Train and validation loss against the optimiser step (saved to ``path`` if given); returns the figure."""
    import matplotlib.pyplot as plt

    train_losses, valid = result.losses()
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot(train_losses["step"], train_losses["loss"], label="train (logged mean)", alpha=0.8)
    axis.plot(valid["step"], valid["eval_loss"], "o-", label="validation")
    axis.set(xlabel="optimizer step", ylabel="cross-entropy (assistant tokens)", title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
