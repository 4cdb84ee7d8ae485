"""The training run: one ``train`` function for notebooks 03 and 04, the script and ``accelerate launch``.

:func:`train` fine-tunes a PEFT model (:func:`utils.adapters.add_lora_adapter`) with trl's ``SFTTrainer``
on the settings of :func:`utils.training_settings.training_config`, marks every checkpoint complete
(:mod:`utils.checkpoints`), resumes only from a complete one, saves the final adapter and measures
time, tokens/s, peak memory and the losses before and after (:func:`metrics_table` puts runs side by side).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed
from transformers import TrainerCallback
from transformers.training_args import ParallelMode
from trl import SFTTrainer

from utils.atomic import atomic_write_json, clean_leftovers, commit_folder, fault_point, target_lock, write_manifest
from utils.checkpoints import CheckpointCompleteness, prepare_checkpoints
from utils.data import conversations_dataset
from utils.run_folders import run_fingerprint
from utils.runtime import peak_memory_bytes
from utils.speed import labelled_head_trainer
from utils.training_settings import build_sft_config

logger = logging.getLogger(__name__)


def refuse_data_parallel(args: Any) -> None:
    """Stop a single process that sees several GPUs: the Trainer would silently wrap the model in DataParallel.

    ``torch.nn.DataParallel`` copies the whole model to every GPU on every step and is slower than one
    GPU for a model this size. Use one GPU (``CUDA_VISIBLE_DEVICES=0``) or ``accelerate launch`` (DDP/FSDP).
    """
    if args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        raise RuntimeError(
            f"This process sees {args.n_gpu} GPUs but was not started by `accelerate launch`, so the Trainer would "
            "wrap the model in torch.nn.DataParallel (a full copy per GPU on every step, slower than one GPU). "
            "Either train on one GPU: restart with CUDA_VISIBLE_DEVICES=0 (for a notebook: set it before starting "
            "Jupyter), or on all of them with "
            "`accelerate launch --config_file configs/ddp.yaml -m utils.train_cli ...` (docs/multi-gpu.md)."
        )


def _throughput_callback(clock: dict[str, float]) -> TrainerCallback:
    """A TrainerCallback that records the token count and time when training (re)starts and ends."""
    class Throughput(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.update(start=time.perf_counter(), tokens_at_start=state.num_input_tokens_seen)

        def on_train_end(self, args, state, control, **kwargs):
            clock.update(end=time.perf_counter(), tokens_at_end=state.num_input_tokens_seen)

    return Throughput()


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
    overwrite: bool = False,
    allow_changed_resume: bool = False,
    callbacks: list[Any] | None = None,
) -> TrainingResult:
    """Fine-tune a PEFT ``model`` with ``SFTTrainer`` and save the final adapter to ``adapter_dir`` (rank 0 only).

    ``config`` is a :func:`utils.training_settings.training_config` dict; checkpoints go to its ``output_dir``. With
    ``resume=True`` training continues from the newest *complete* checkpoint there (or starts over
    when there is none), after checking that the config and the training data are the ones it was trained
    with (``allow_changed_resume=True`` skips that check). Without ``resume``, complete checkpoints of an
    earlier run are removed only with ``overwrite=True``; a folder the series did not create is never touched
    (:func:`utils.checkpoints.prepare_checkpoints`). The adapter and its ``training_metrics.json`` replace
    ``adapter_dir`` in one step, with a manifest, once they are completely written.
    """
    if not hasattr(model, "peft_config"):
        raise TypeError("train() expects a PEFT model: call add_lora_adapter(model, peft_config) first.")
    args = build_sft_config(config)
    refuse_data_parallel(args)
    run_dir = Path(args.output_dir)
    fingerprint = run_fingerprint(config, train_rows)
    choices = dict(resume=resume, overwrite=overwrite, fingerprint=fingerprint,
                   allow_changed_resume=allow_changed_resume)
    distributed = args.distributed_state.num_processes > 1
    # Every rank decides (and refuses) alike before the main process changes anything.
    checkpoint = prepare_checkpoints(run_dir, **choices, modify=not distributed)
    args.distributed_state.wait_for_everyone()
    if distributed and args.distributed_state.is_main_process:
        prepare_checkpoints(run_dir, **choices)
    args.distributed_state.wait_for_everyone()
    if eval_rows is None or args.eval_strategy == "no":
        args.eval_strategy, args.eval_on_start, eval_dataset = "no", False, None
    else:
        eval_dataset = conversations_dataset(eval_rows, "eval_rows")
    clock: dict[str, float] = {}
    trainer_class = sft_trainer_class(args)
    trainer = trainer_class(
        model=model, args=args, train_dataset=conversations_dataset(train_rows, "train_rows"),
        eval_dataset=eval_dataset, processing_class=tokenizer,
        callbacks=[CheckpointCompleteness(fingerprint), _throughput_callback(clock), *(callbacks or [])],
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
    history = list(trainer.state.log_history)
    metrics = _run_metrics(history, clock, trainer.state.global_step)
    metrics["resumed_from_step"] = int(checkpoint.name.split("-")[-1]) if checkpoint else None
    metrics["base_model"] = getattr(trainer.model.get_base_model().config, "_name_or_path", None)
    save_adapter(trainer, adapter_dir, metrics)
    return TrainingResult(adapter_dir, run_dir, history, metrics, checkpoint, trainer)


def sft_trainer_class(args: Any) -> type:
    """``SFTTrainer``, or on a CPU its subclass that runs the LM head only on labelled positions.

    With the loss on the assistant's tokens most positions carry no label. trl's fused LM head skips them on
    GPUs (Triton) but scores every position on a CPU; :func:`utils.speed.labelled_head_trainer` passes the
    labelled positions as the model's ``logits_to_keep`` instead: same loss and gradients, 1.2x faster steps
    on the smol demo model (``benchmarks/README.md``). Packed or padding-free rows keep trl's own loss.
    """
    if args.device.type == "cpu" and not args.packing and not getattr(args, "padding_free", False):
        return labelled_head_trainer(SFTTrainer)
    return SFTTrainer


def _main_process_id(args: Any) -> int:
    """The process id of rank 0 (every rank's own id in a single process): names the shared staging folder."""
    pid = [os.getpid()]
    if args.distributed_state.num_processes > 1:
        torch.distributed.broadcast_object_list(pid, src=0)
    return int(pid[0])


def save_adapter(trainer: Any, adapter_dir: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Save the adapter (and ``training_metrics.json``) into a staging folder, then swap it into ``adapter_dir``.

    The old adapter stays whole until the new one is completely written (a manifest lists every file).
    ``trainer.save_model`` runs on every rank (it gathers FSDP/ZeRO-3 shards) and writes on the main process.
    """
    adapter_dir = Path(adapter_dir)
    main = trainer.is_world_process_zero()
    staging = adapter_dir.with_name(f".{adapter_dir.name}.partial-{_main_process_id(trainer.args)}")
    if main:
        adapter_dir.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(adapter_dir)
        shutil.rmtree(staging, ignore_errors=True)
    try:
        trainer.save_model(str(staging))
        if main:
            if metrics is not None:
                atomic_write_json(staging / "training_metrics.json", metrics)
            fault_point("folder-staged")  # the fault-injection tests kill the run here
            write_manifest(staging, {"global_step": trainer.state.global_step})
            with target_lock(adapter_dir):
                commit_folder(staging, adapter_dir)
    finally:
        if main and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return adapter_dir


def _reset_peak_memory() -> None:
    """Start the CUDA peak-memory counter afresh (the CPU's peak RSS cannot be reset)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _run_metrics(history: list[dict[str, Any]], clock: dict[str, float], steps: int) -> dict[str, Any]:
    """Time, tokens/s, peak memory and the losses before and after, from one run."""
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
    labels = {"steps": "optimizer steps", "seconds": "train time (s)", "tokens": "tokens trained",
              "tokens_per_second": "tokens/s", "peak_memory_gib": "peak memory (GiB)",
              "peak_memory_kind": "memory measured as", "eval_loss_before": "validation loss before",
              "eval_loss_after": "validation loss after", "train_loss_first": "first logged train loss",
              "train_loss_last": "last logged train loss"}
    metrics = {name: result.metrics if isinstance(result, TrainingResult) else result for name, result in results.items()}
    return pd.DataFrame({name: {label: values.get(key) for key, label in labels.items()}
                         for name, values in metrics.items()})
