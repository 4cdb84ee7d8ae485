"""Training speed against the Phi-3 Cookbook's configuration: ``python -m benchmarks.train_speed``.

Two rows are built from settings nobody here hand-wrote for the benchmark: ``cookbook`` starts from a literal
copy of the two dicts in Microsoft's ``sample_finetune.py``, ``defaults`` from the series' own
``utils.training_settings.training_config("cpu")`` and ``peft_config()``. Every change made to either (what
the CPU forces, what the library versions renamed, the shared overrides that make the rows comparable) is a
:class:`Change` with its reason, printed before the table. Lever rows change one thing on one of the two.
Rows run interleaved (the order alternates per repeat), each in a fresh process with a fixed thread count;
the table gives the median and the spread (min-max) of the repeats, and the run stops with an error if any
two rows saw different conversations or took different numbers of optimizer steps.
See ``benchmarks/README.md`` for the method and the latest table.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BenchConfig,
    CountingCollator,
    config_dict,
    markdown_table,
    matmul_peak_flops,
    model_flops,
)

# --- the Cookbook, verbatim ------------------------------------------------------------------------
# Literal copies from Microsoft's `sample_finetune.py`, shipped in the microsoft/Phi-3-mini-4k-instruct
# repository (https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/sample_finetune.py).
COOKBOOK_TRAINING_CONFIG: dict[str, Any] = {
    "bf16": True, "do_eval": False, "learning_rate": 5.0e-06, "log_level": "info", "logging_steps": 20,
    "logging_strategy": "steps", "lr_scheduler_type": "cosine", "num_train_epochs": 1, "max_steps": -1,
    "output_dir": "./checkpoint_dir", "overwrite_output_dir": True, "per_device_eval_batch_size": 4,
    "per_device_train_batch_size": 4, "remove_unused_columns": True, "save_steps": 100, "save_total_limit": 1,
    "seed": 0, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "gradient_accumulation_steps": 1, "warmup_ratio": 0.2,
}
COOKBOOK_PEFT_CONFIG: dict[str, Any] = {
    "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM",
    "target_modules": "all-linear", "modules_to_save": None,
}
# ... and its SFTTrainer(...) and from_pretrained(...) arguments
COOKBOOK_TRAINER: dict[str, Any] = {"max_seq_length": 2048, "dataset_text_field": "text", "packing": True}
COOKBOOK_MODEL: dict[str, Any] = {"torch_dtype": "bfloat16", "attn_implementation": "flash_attention_2"}

BASELINE = "cookbook"


@dataclass(frozen=True)
class Change:
    """One setting changed on a row's source: where, from what, to what, and why."""

    key: str
    before: Any
    after: Any
    why: str
    kind: str  # "forced" (CPU / library versions), "shared" (same for every row), "lever" (what the row tests)

    def line(self) -> str:
        """``key: before -> after  (why)``; a removed key shows ``(removed)``."""
        after = "(removed)" if self.after is REMOVED else repr(self.after)
        before = REMOVED if self.before is REMOVED else repr(self.before)
        return f"[{self.kind}] {self.key}: {before} -> {after}  ({self.why})"


REMOVED = "(absent)"  # a Change's before/after for a key that is not set (a string: it survives JSON)


@dataclass(frozen=True)
class Row:
    """A benchmark row: one of the two sources, plus at most one lever."""

    name: str
    source: str  # "cookbook" or "defaults"
    what: str
    sft: dict[str, Any] = field(default_factory=dict)  # SFTConfig keys the lever sets
    peft: dict[str, Any] = field(default_factory=dict)  # LoraConfig keys the lever sets
    data: str | None = None  # "text" (rendered, loss on every token) or "messages"; None: the source's
    compile_layers: bool = False  # torch.compile each decoder layer (nn.Module.compile) after LoRA is attached
    threads: int | None = None  # torch threads for this row (None: --threads)
    compact_head: bool = False  # utils.speed.score_only_labelled_positions (patches a private trl name)
    full_head: bool = False  # trl's own SFTTrainer (LM head on every position) instead of the series' CPU trainer


ROWS: dict[str, Row] = {r.name: r for r in (
    Row("cookbook", "cookbook", "Cookbook sample_finetune.py, as far as the CPU allows (baseline)"),
    Row("defaults", "defaults", "the series' CPU defaults: training_config('cpu') + peft_config()"),
    Row("cookbook-assistant-only", "cookbook", "cookbook + loss on assistant tokens only (messages, not text)",
        sft={"assistant_only_loss": True}, data="messages"),
    Row("cookbook-micro-batch", "cookbook", "cookbook without packing: 1 conversation per pass, 4 accumulated",
        sft={"packing": False, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}),
    Row("cookbook-no-ckpt", "cookbook", "cookbook with activation checkpointing off",
        sft={"activation_checkpointing": False}),
    Row("cookbook-no-dropout", "cookbook", "cookbook with LoRA dropout 0", peft={"lora_dropout": 0.0}),
    Row("defaults-no-ckpt", "defaults", "defaults with activation checkpointing off",
        sft={"activation_checkpointing": False}),
    Row("defaults-ckpt-all", "defaults", "defaults checkpointing every layer (not every 3rd)",
        sft={"activation_checkpointing_kwargs": {"use_reentrant": False}}),
    Row("defaults-compile", "defaults", "defaults + torch_compile=True (the Trainer compiles the model)",
        sft={"torch_compile": True}),
    Row("defaults-compile-layers", "defaults", "defaults + torch.compile of each decoder layer (nn.Module.compile)",
        compile_layers=True),
    Row("defaults-full-head", "defaults", "defaults with trl's own SFTTrainer, which runs the LM head on every "
        "position on a CPU (the defaults: utils.training.sft_trainer_class, labelled positions only)", full_head=True),
    Row("defaults-1-thread", "defaults", "defaults with 1 torch thread instead of 2", threads=1),
    Row("defaults-compact-head", "defaults", "defaults with trl's SFTTrainer and its fused head forced to score labelled "
        "positions only (utils.speed; patches a private trl name: a cross-check, not usable as a default)",
        compact_head=True),
)}
DEFAULT_ROWS = ["cookbook", "defaults"]
CONFIGS = ROWS  # the names --configs accepts


def cookbook_source(args: argparse.Namespace, pack: int, cuda: bool) -> tuple[dict, dict, dict, list[Change]]:
    """The Cookbook's dicts with what this machine and the installed libraries force on them, each a Change."""
    sft = copy.deepcopy(COOKBOOK_TRAINING_CONFIG) | dict(COOKBOOK_TRAINER)
    peft = copy.deepcopy(COOKBOOK_PEFT_CONFIG)
    model = dict(COOKBOOK_MODEL)
    changes: list[Change] = []

    def move(key: str, new_key: str | None, value: Any, why: str, kind: str = "forced") -> None:
        before = sft.pop(key)
        if new_key is None:
            changes.append(Change(key, before, REMOVED, why, kind))
            return
        sft[new_key] = value
        changes.append(Change(f"{key} -> {new_key}" if new_key != key else key, before, value, why, kind))

    if not cuda:
        move("bf16", "bf16", False, "CPU: fp32 (bf16 autocast is 10-400x slower on most CPUs)")
        model["torch_dtype"] = "float32"
        changes.append(Change("from_pretrained torch_dtype -> dtype", "bfloat16", "float32",
                              "CPU: fp32; transformers 5 renamed torch_dtype to dtype", "forced"))
        model["attn_implementation"] = "sdpa"
        changes.append(Change("from_pretrained attn_implementation", "flash_attention_2", "sdpa",
                              "flash-attention 2 is CUDA-only", "forced"))
    move("overwrite_output_dir", None, None, "removed from TrainingArguments in transformers 5 (a fresh folder "
         "per run instead)")
    move("warmup_ratio", "warmup_steps", 0.2, "transformers 5 removed warmup_ratio; a float < 1 in warmup_steps "
         "is the same fraction of the run")
    move("gradient_checkpointing", "activation_checkpointing", True, "transformers 5's name (the old one is a "
         "deprecated alias)")
    move("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs", {"use_reentrant": False},
         "transformers 5's name")
    move("max_seq_length", "max_length", pack, f"trl renamed it; packed rows of {pack} tokens (the smallest "
         f"multiple of 64 whose BFD packing of the {args.steps * args.batch_size} conversations gives one row per "
         f"optimizer step) instead of 2048, so the Cookbook trains the same conversations in the same "
         f"{args.steps} steps as every row", "shared")
    move("per_device_train_batch_size", "per_device_train_batch_size", 1, "one packed row per step holds the "
         f"step's ~{args.batch_size} conversations (4 rows of 2048 tokens would hold the whole data set)", "shared")
    return sft, peft, model, changes


def defaults_source(args: argparse.Namespace) -> tuple[dict, dict, dict, list[Change]]:
    """``training_config("cpu")`` and ``peft_config()`` exactly as notebooks 03/04 get them (no changes yet)."""
    from utils.training_settings import peft_config, training_config

    sft = training_config("cpu", "lora")
    model = {"dtype": "float32", "attn_implementation": "sdpa"}  # what utils.models loads on a CPU
    return sft, peft_config("lora"), model, []


def shared_overrides(args: argparse.Namespace, output_dir: str) -> list[tuple[str, Any, str]]:
    """The settings every row gets (key, value, why): same data, steps, seed, learning rate, no side work."""
    return [
        ("output_dir", output_dir, "a fresh temporary folder per run"),
        ("max_steps", args.steps, f"{args.steps} optimizer steps = one epoch of the {args.steps * args.batch_size} "
                                  "conversations"),
        ("num_train_epochs", 1, "one epoch"),
        ("seed", args.seed, "the same LoRA initialisation and order in every row"),
        ("data_seed", args.seed, "the same order in every row"),
        ("learning_rate", args.lr, "one learning rate for every row: the Cookbook's 5e-6 barely moves LoRA "
                                   "weights in a few steps, which would make its held-out loss uninformative"),
        ("eval_strategy", "no", "no evaluation inside the timed run (the held-out losses are measured after it)"),
        ("eval_on_start", False, "no evaluation inside the timed run"),
        ("save_strategy", "no", "no checkpoints inside the timed run"),
        ("logging_strategy", "steps", "the loss of every step (logging is a dict append on the CPU)"),
        ("logging_steps", 1, "the loss of every step"),
        ("disable_tqdm", True, "no progress bar in the worker"),
        ("report_to", "none", "no experiment tracker"),
        ("dataloader_num_workers", 0, "batches are tokenized up front; no worker processes"),
    ]


def build_row(row: Row, args: argparse.Namespace, pack: int, cuda: bool = False,
              output_dir: str = "bench-run") -> dict[str, Any]:
    """A row's SFTConfig and LoraConfig dicts, its data format, its model and every change made to its source."""
    if row.source == "cookbook":
        sft, peft, model, changes = cookbook_source(args, pack, cuda)
        data = "text"
    elif row.source == "defaults":
        sft, peft, model, changes = defaults_source(args)
        data = "messages"
    else:
        raise ValueError(f"Row {row.name}: source must be 'cookbook' or 'defaults', not {row.source!r}.")
    for key, value, why in shared_overrides(args, output_dir):
        before = sft.get(key, REMOVED)
        sft[key] = value
        if before != value:
            changes.append(Change(key, before, value, why, "shared"))
    per_step = sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"]
    if row.source == "defaults" and per_step != args.batch_size:  # only with a non-default --batch-size
        accumulation = max(1, args.batch_size // sft["per_device_train_batch_size"])
        changes.append(Change("gradient_accumulation_steps", sft["gradient_accumulation_steps"], accumulation,
                              f"--batch-size {args.batch_size} conversations per optimizer step", "shared"))
        sft["gradient_accumulation_steps"] = accumulation
    for key, value in row.sft.items():
        changes.append(Change(key, sft.get(key, REMOVED), value, row.what, "lever"))
        sft[key] = value
    for key, value in row.peft.items():
        changes.append(Change(f"LoraConfig {key}", peft.get(key, REMOVED), value, row.what, "lever"))
        peft[key] = value
    if row.data and row.data != data:
        changes.append(Change("dataset", data, row.data, row.what, "lever"))
        data = row.data
    if data == "messages":
        sft.pop("dataset_text_field", None)
    threads = row.threads or args.threads
    if threads != args.threads:
        changes.append(Change("torch threads", args.threads, threads, row.what, "lever"))
    for flag in ("compile_layers", "compact_head", "full_head"):
        if getattr(row, flag):
            changes.append(Change(flag, False, True, row.what, "lever"))
    return dict(sft=sft, peft=peft, model=model, data=data, threads=threads, changes=changes)


def row_trainer_class(row: Row, sft_args: Any) -> type:
    """The trainer a row trains with: trl's ``SFTTrainer`` for the Cookbook and the head levers, and for the
    defaults the one ``utils.training.train()`` uses (on a CPU: the LM head only on labelled positions)."""
    from trl import SFTTrainer

    from utils.training import sft_trainer_class

    if row.source == "defaults" and not (row.full_head or row.compact_head):
        return sft_trainer_class(sft_args)
    return SFTTrainer


def conversations_hash(conversations: list[list[dict[str, str]]]) -> str:
    """sha256 of the conversation list (order included), to prove every row trained on the same data."""
    return hashlib.sha256(json.dumps(conversations, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_same_work(rows: list[dict[str, Any]]) -> None:
    """Raise if any two runs saw different conversations or took different numbers of optimizer steps."""
    good = [r for r in rows if "error" not in r]
    for key in ("conversations_sha256", "conversations_seen", "steps"):
        values = {r["config"] + f" run {r.get('repeat', 1)}": r[key] for r in good}
        if len(set(values.values())) > 1:
            raise RuntimeError(f"The rows did not do the same work: {key} differs: {values}. Their speeds are not "
                               "comparable; check the packing length and --steps / --batch-size.")


def parse_args(argv: list[str] | None = None, configs: dict[str, BenchConfig] = CONFIGS,
               parser: argparse.ArgumentParser | None = None,
               defaults: dict[str, Any] | None = None) -> argparse.Namespace:
    """Command-line options (defaults: cookbook and defaults, 3 repeats: ~6-8 minutes on 2 idle CPU cores)."""
    parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    chosen = DEFAULT_ROWS if configs is ROWS else list(configs)
    parser.add_argument("--configs", nargs="*", default=chosen,
                        help=f"rows to run (default: {' '.join(chosen)}); any of: {' '.join(configs)}")
    parser.add_argument("--model", default="smol", help="model name for utils.models (default: smol)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="conversations per step (default 4)")
    parser.add_argument("--heldout", type=int, default=8, help="held-out conversations for the loss (default 8)")
    parser.add_argument("--max-tokens", type=int, default=320, help="conversation length cap, in tokens (default 320)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run, fixed (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data subset, LoRA init and order (default 0)")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate, constant, for every row (default 2e-4)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per row, interleaved (the row order alternates); median and min-max (default 3)")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default outputs/bench/train_speed.json)")
    parser.add_argument("--quantize", choices=("none", "nf4"), default="none", help="load the base in NF4 (QLoRA)")
    parser.add_argument("--pack-length", type=int, default=0,
                        help="packed row length (default 0: the smallest giving one row per step)")
    parser.add_argument("--conversations", type=Path, default=None,
                        help="JSON {'train': [...], 'heldout': [...]} of message lists instead of chitchat")
    parser.add_argument("--list", action="store_true",
                        help="print every row's changes to its source (pack length from the default data) and stop")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    unknown = set(args.configs) - set(configs)
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}; choose from {list(configs)}")
    return args


def pack_length(lengths: list[int], steps: int, cap: int) -> int:
    """Smallest row length (a multiple of 64, at least ``cap``) whose BFD packing gives at most ``steps`` rows."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    dataset = Dataset.from_dict({"input_ids": [[0] * n for n in lengths]})
    length = max(cap, -(-sum(lengths) // steps // 64) * 64)
    while len(pack_dataset(dataset, length, strategy="bfd")) > steps:
        length += 64
    return length


def heldout_losses(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]]) -> dict[str, float]:
    """Held-out loss per assistant token and per token (every token after the first): utils.evaluation's."""
    from utils.evaluation import assistant_token_loss

    rows = [{"messages": m} for m in conversations]
    return {tokens: assistant_token_loss(model, tokenizer, rows, max_length=4096, tokens=tokens).loss
            for tokens in ("assistant", "all")}


class StepClock:
    """A TrainerCallback (duck-typed) that records the wall time of every optimizer step."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def __getattr__(self, name: str) -> Any:  # every other Trainer event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.marks = [time.perf_counter()]

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.marks.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Seconds per optimizer step, in order."""
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def bench_conversations(args: argparse.Namespace, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """The training and held-out conversations every row uses: ``--conversations`` JSON, or chitchat by seed."""
    from benchmarks.chitchat import benchmark_split

    n_train = args.steps * args.batch_size
    if args.conversations:
        stored = json.loads(args.conversations.read_text(encoding="utf-8"))
        return stored["train"][:n_train], stored["heldout"][: args.heldout]
    return benchmark_split(tokenizer, n_train, args.heldout, args.max_tokens, seed=args.seed)


def run_row(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    """Train one row in this process and measure it (speed, memory, both held-out losses, the work done)."""
    import torch

    from datasets import Dataset
    from transformers import set_seed

    from utils.models import load_model_and_tokenizer, nf4_config
    from utils.runtime import peak_memory_bytes
    from utils.speed import score_only_labelled_positions
    from utils.tokenization import conversation_length
    from utils.training_settings import build_lora_config, build_sft_config

    threads = row.threads or args.threads
    torch.set_num_threads(threads)
    set_seed(args.seed)
    cuda = torch.cuda.is_available()
    model, tokenizer = load_model_and_tokenizer(args.model, verbose=False,
                                                quantization_config=nf4_config() if args.quantize == "nf4" else None)
    train, heldout = bench_conversations(args, tokenizer)
    lengths = [conversation_length(m, tokenizer) + 1 for m in train]  # + the EOS trl appends to a text row
    pack = args.pack_length or pack_length(lengths, args.steps, args.max_tokens)
    built = build_row(row, args, pack, cuda, output_dir=tempfile.mkdtemp(prefix=f"bench-{row.name}-"))
    sft, peft = built["sft"], built["peft"]
    # Safetensors weights are paged in lazily: read every one now, so that the memory measured before
    # training includes the whole model (the untrained held-out loss is measured after training instead).
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sum()
    if built["data"] == "text":  # sample_finetune.py renders each conversation with the chat template
        dataset = Dataset.from_list([{"text": tokenizer.apply_chat_template(m, tokenize=False)} for m in train])
    else:
        dataset = Dataset.from_list([{"messages": m} for m in train])
    clock = StepClock()
    sft_args = build_sft_config(sft)
    trainer_class = row_trainer_class(row, sft_args)
    trainer = trainer_class(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=build_lora_config(peft), callbacks=[clock])
    if row.compile_layers:  # public nn.Module.compile: each decoder layer (LoRA inside) becomes one compiled graph
        for layer in trainer.model.get_base_model().model.layers:
            layer.compile()
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    memory_before = peak_memory_bytes() / 2**20
    with score_only_labelled_positions() if row.compact_head else nullcontext():
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    peak = peak_memory_bytes() / 2**20
    with trainer.model.disable_adapter():  # LoRA's B starts at zero: without the adapter = before training
        before = heldout_losses(trainer.model, tokenizer, heldout)
    after = heldout_losses(trainer.model, tokenizer, heldout)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    c = counter.counts
    steps = clock.step_seconds()
    return dict(
        config=row.name, what=row.what, source=row.source, threads=threads, data=built["data"],
        sft_config={k: v for k, v in sft.items() if k != "output_dir"}, peft_config=peft, model_kwargs=built["model"],
        changes=[ch.line() for ch in built["changes"]],
        steps=trainer.state.global_step, conversations_sha256=conversations_hash(train), conversations_seen=len(c.lengths),
        max_length=sft.get("max_length"), wall_s=wall, step_s=steps,
        real_tokens=c.real, positions=c.positions, labelled_tokens=c.labelled,
        padding_fraction=1 - c.real / c.positions, tokens_per_s=c.real / wall, loss_tokens_per_s=c.labelled / wall,
        memory_before_training_mib=memory_before, peak_memory_mib=peak, training_memory_mib=peak - memory_before,
        final_train_loss=losses[-1], train_losses=losses,
        heldout_assistant_loss=after["assistant"], heldout_all_loss=after["all"],
        heldout_assistant_loss_before=before["assistant"], heldout_all_loss_before=before["all"],
        flops=model_flops(model.config, c), conversation_lengths=c.lengths,
        attn_implementation=trainer.model.config._attn_implementation,
    )


def run_worker(config: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Train one ``BenchConfig`` in this process and measure it (the GPU script's rows: benchmarks/gpu_phi3_mini.py)."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from utils.tokenization import conversation_length
    from utils.models import load_model_and_tokenizer
    from utils.runtime import peak_memory_bytes
    from utils.speed import score_only_labelled_positions, use_varlen_sdpa

    set_seed(args.seed)
    from utils.models import nf4_config

    quantization = nf4_config() if args.quantize == "nf4" else None  # bf16 compute on a GPU, fp32 on a CPU
    model, tokenizer = load_model_and_tokenizer(args.model, verbose=False, quantization_config=quantization)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.activation_checkpointing)
    cuda = torch.cuda.is_available()
    train, heldout = bench_conversations(args, tokenizer)
    # Safetensors weights are paged in lazily: read every one now, so that the memory measured before
    # training includes the whole model. (Not a held-out pass: its activations would stay in the allocator
    # and count as "before" for every row; the untrained loss is measured after training instead.)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sum()
    if config.text_field:
        dataset = Dataset.from_list([{"text": tokenizer.apply_chat_template(m, tokenize=False)} for m in train])
    else:
        dataset = Dataset.from_list([{"messages": m} for m in train])
    if config.packing and args.pack_length:  # fixed rows (the Cookbook's 2048): as many rows per step as needed
        from trl.data_utils import pack_dataset

        lengths = [conversation_length(m, tokenizer) for m in train]
        packed = pack_dataset(Dataset.from_dict({"input_ids": [[0] * n for n in lengths]}), args.pack_length, "bfd")
        rows, batch_size = args.pack_length, -(-len(packed) // args.steps)
    elif config.packing:
        rows, batch_size = pack_length([conversation_length(m, tokenizer) for m in train], args.steps, args.max_tokens), 1
    else:
        rows, batch_size = (None if config.padding_free else config.pad_max_length), args.batch_size
    accumulation = 1
    if config.micro_batch and not config.packing:  # same conversations per optimizer step, smaller passes
        if batch_size % config.micro_batch:
            raise ValueError(f"{config.name}: --batch-size {batch_size} is not a multiple of micro_batch "
                             f"{config.micro_batch}")
        batch_size, accumulation = config.micro_batch, batch_size // config.micro_batch
    sft = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{config.name}-"),
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, num_train_epochs=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        max_length=rows, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
        use_cpu=not cuda, bf16=cuda, **config.sft_kwargs(),
    )
    trainer = SFTTrainer(model=model, args=sft, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(**{**COOKBOOK_PEFT_CONFIG, "lora_dropout": config.lora_dropout}))
    if config.varlen_sdpa and "flash" not in model.config._attn_implementation:  # flash-attention is varlen already
        use_varlen_sdpa(trainer.model)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # What training adds: above CUDA allocated memory (GPU), or above the process's peak so far (CPU: the
    # libraries and the model), which every row pays alike.
    memory_before = (torch.cuda.memory_allocated() if cuda else peak_memory_bytes()) / 2**20
    with score_only_labelled_positions() if config.compact_head else nullcontext():
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    peak = peak_memory_bytes() / 2**20  # CUDA max allocated on a GPU, peak RSS on the CPU
    with trainer.model.disable_adapter():  # LoRA's B starts at zero: without the adapter = before training
        heldout_before = heldout_losses(trainer.model, tokenizer, heldout)["assistant"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    c = counter.counts
    return dict(
        config=config.name, what=config.what, settings=config_dict(config), steps=trainer.state.global_step,
        batch_size=batch_size, gradient_accumulation_steps=accumulation, max_length=rows,
        memory_before_training_mib=memory_before, training_memory_mib=peak - memory_before, wall_s=wall, real_tokens=c.real, positions=c.positions,
        labelled_tokens=c.labelled, padding_fraction=1 - c.real / c.positions, tokens_per_s=c.real / wall,
        peak_memory_mib=peak, peak_memory_kind="CUDA max allocated" if cuda else "process peak RSS",
        final_train_loss=losses[-1], train_losses=losses,
        heldout_loss=heldout_losses(trainer.model, tokenizer, heldout)["assistant"], heldout_loss_before=heldout_before, flops=model_flops(model.config, c),
        conversations=len(train), conversation_lengths=c.lengths, quantize=args.quantize,
        attn_implementation=trainer.model.config._attn_implementation,
    )


def run_config_in_subprocess(name: str, args: argparse.Namespace, module: str = "benchmarks.train_speed",
                             extra: list[str] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run one configuration in a fresh process with the thread count fixed; returns its result row."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, "-m", module, "--worker", name, "--result", str(result),
                   "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--heldout", str(args.heldout), "--max-tokens", str(args.max_tokens),
                   "--threads", str(args.threads), "--seed", str(args.seed), "--lr", str(args.lr),
                   "--quantize", args.quantize, "--pack-length", str(args.pack_length)]
        if args.conversations:
            command += ["--conversations", str(args.conversations)]
        command += extra or []
        threads = str(threads or args.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not result.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
            print("\n".join(f"    {line}" for line in tail), file=sys.stderr)
            return dict(config=name, error=tail[-1] if tail else f"exit code {done.returncode}")
        return json.loads(result.read_text())


def machine() -> dict[str, Any]:
    """The machine the table was measured on."""
    import psutil
    import torch

    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), logical_cpus=os.cpu_count(),
                memory_gib=round(psutil.virtual_memory().total / 2**30, 1),
                load_average_before=os.getloadavg())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --- the median table ------------------------------------------------------------------------------

def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of the repeats."""
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def summarize(runs: list[dict[str, Any]], peak_flops: float) -> list[dict[str, Any]]:
    """One summary per row over its repeats: medians and spreads, ratios of medians to the baseline."""
    names = list(dict.fromkeys(r["config"] for r in runs))
    summaries = []
    for name in names:
        good = [r for r in runs if r["config"] == name and "error" not in r]
        if not good:
            summaries.append(dict(config=name, error=next(r["error"] for r in runs if r["config"] == name)))
            continue
        summary: dict[str, Any] = dict(config=name, what=good[0]["what"], repeats=len(good))
        for key in ("tokens_per_s", "loss_tokens_per_s", "wall_s", "peak_memory_mib", "training_memory_mib",
                    "heldout_assistant_loss", "heldout_all_loss", "final_train_loss"):
            summary[key] = spread([r[key] for r in good])
        summary["mfu"] = spread([r["flops"] / r["wall_s"] / peak_flops for r in good])
        first = [r["step_s"][0] for r in good if r["step_s"]]
        rest = [statistics.median(r["step_s"][1:]) for r in good if len(r["step_s"]) > 1]
        summary["first_step_s"] = statistics.median(first) if first else float("nan")
        summary["later_step_s"] = statistics.median(rest) if rest else float("nan")
        for key in ("real_tokens", "labelled_tokens", "steps", "conversations_seen", "padding_fraction",
                    "heldout_assistant_loss_before", "heldout_all_loss_before", "changes", "sft_config", "peft_config"):
            summary[key] = good[0][key]
        summaries.append(summary)
    base = next((s for s in summaries if s["config"] == BASELINE and "error" not in s), None)
    for summary in summaries:
        if base is None or "error" in summary:
            continue
        for key in ("tokens_per_s", "loss_tokens_per_s", "peak_memory_mib", "training_memory_mib"):
            # a tiny model can train inside memory the process already had: nothing to divide by
            summary[key + "_x"] = summary[key]["median"] / base[key]["median"] if base[key]["median"] > 0 else math.nan
    return summaries


def format_median_table(summaries: list[dict[str, Any]]) -> str:
    """The summaries as a markdown table: median (min-max) of the repeats, ratios of medians to the baseline."""
    def m(s: dict[str, float], fmt: str = ".0f") -> str:
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    def line(s: dict[str, Any]) -> str:
        return (f"| {s['config']} | {s['repeats']} | {m(s['tokens_per_s'])} | {s.get('tokens_per_s_x', math.nan):.2f} "
                f"| {m(s['loss_tokens_per_s'])} | {s.get('loss_tokens_per_s_x', math.nan):.2f} "
                f"| {m(s['peak_memory_mib'])} | {s.get('peak_memory_mib_x', math.nan):.2f} "
                f"| {s['training_memory_mib']['median']:.0f} | {s['heldout_assistant_loss']['median']:.4f} "
                f"| {s['heldout_all_loss']['median']:.4f} | {s['mfu']['median']:.1%} |")

    header = ("| row | runs | conv tok/s | x base | loss tok/s | x base | peak MiB | x base | +train MiB "
              "| held-out loss (assistant) | held-out loss (all tokens) | MFU |")
    return markdown_table(header, summaries, line)


def target_lines(summaries: list[dict[str, Any]]) -> list[str]:
    """Issue 16's targets for defaults vs cookbook (medians), each met or not."""
    rows = {s["config"]: s for s in summaries if "error" not in s}
    if "defaults" not in rows or BASELINE not in rows:
        return []
    d, c = rows["defaults"], rows[BASELINE]
    checks = [
        ("conversation tokens/s >= 2.5x", d["tokens_per_s_x"], d["tokens_per_s_x"] >= 2.5, "{:.2f}x"),
        ("peak memory <= 0.5x", d["peak_memory_mib_x"], d["peak_memory_mib_x"] <= 0.5, "{:.2f}x"),
        ("held-out loss (assistant) no worse", d["heldout_assistant_loss"]["median"],
         d["heldout_assistant_loss"]["median"] <= c["heldout_assistant_loss"]["median"], "{:.4f} vs "
         + f"{c['heldout_assistant_loss']['median']:.4f}"),
        ("held-out loss (all tokens) no worse", d["heldout_all_loss"]["median"],
         d["heldout_all_loss"]["median"] <= c["heldout_all_loss"]["median"], "{:.4f} vs "
         + f"{c['heldout_all_loss']['median']:.4f}"),
        ("MFU >= 40% of the fp32 matmul peak", d["mfu"]["median"], d["mfu"]["median"] >= 0.40, "{:.1%}"),
    ]
    return [f"  {'met    ' if ok else 'NOT met'} {what}: {fmt.format(value)}" for what, value, ok, fmt in checks]


def list_rows(args: argparse.Namespace) -> None:
    """Print each row's source and every change made to it, without training anything."""
    from benchmarks.chitchat import benchmark_split
    from utils.models import load_tokenizer
    from utils.tokenization import conversation_length

    tokenizer = load_tokenizer(args.model)
    train, _ = benchmark_split(tokenizer, args.steps * args.batch_size, 0, args.max_tokens, seed=args.seed)
    pack = args.pack_length or pack_length([conversation_length(m, tokenizer) + 1 for m in train], args.steps,
                                           args.max_tokens)
    names = args.configs if "--configs" in sys.argv else list(ROWS)
    for name in names:
        built = build_row(ROWS[name], args, pack, output_dir="<temporary folder>")
        lever = name != ROWS[name].source
        print(f"{name}{f' = {ROWS[name].source} +' if lever else ':'} {ROWS[name].what}")
        for change in built["changes"]:
            if change.kind == "lever" or not lever:
                print(f"    {change.line()}")


def main(argv: list[str] | None = None) -> None:
    """Run the rows interleaved, check they did the same work, print the changes and the median table."""
    args = parse_args(argv)
    if args.worker:
        result = run_row(ROWS[args.worker], args)
        args.result.write_text(json.dumps(result, default=str))
        return
    if args.list:
        list_rows(args)
        return
    import torch

    from utils.models import model_source, resolve_model_name
    from utils.paths import artifact

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    info = machine()
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_peak_flops(dtype, "cuda" if cuda else "cpu")
    print(f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, {info['memory_gib']} GiB"
          f"{', ' + info['gpu'] if cuda else ''}; load average (1, 5, 15 min) before: "
          f"{', '.join(f'{x:.2f}' for x in info['load_average_before'])}")
    print(f"Measured matmul peak ({str(dtype).removeprefix('torch.')}, {args.threads} threads): "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"Model {args.model}; {args.steps} steps x {args.batch_size} chitchat conversations (<= {args.max_tokens} "
          f"tokens), {args.heldout} held-out; seed {args.seed}; torch threads {args.threads}; "
          f"{args.repeats} repeats, interleaved\n")
    model_source(resolve_model_name(args.model))  # builds an embedded model (once) outside the measured rows
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for repeat in range(args.repeats):
        order = args.configs if repeat % 2 == 0 else list(reversed(args.configs))  # no row always goes first
        for name in order:
            began = time.perf_counter()
            run = run_config_in_subprocess(name, args, threads=ROWS[name].threads)
            run["repeat"] = repeat + 1
            runs.append(run)
            status = run.get("error") or (f"{run['tokens_per_s']:.0f} conv tok/s, {run['wall_s']:.0f} s training, "
                                          f"steps {run['steps']}")
            print(f"  repeat {repeat + 1}/{args.repeats} {name:<24} {status} "
                  f"({time.perf_counter() - began:.0f} s with start-up)", flush=True)
            partial = artifact("bench/train_speed.partial.json")  # runs so far, in case the command is stopped
            partial.write_text(json.dumps(dict(machine=info, matmul_peak_flops=peak, runs=runs), default=str))
            check_same_work(runs)  # stop at the first run that did different work
    peak_after = matmul_peak_flops(dtype, "cuda" if cuda else "cpu")  # contention can hide the peak: keep the best
    info["load_average_after"] = os.getloadavg()
    print(f"\nMatmul peak measured again after the runs: {peak_after / 1e9:.1f} GFLOP/s; MFU uses the higher one. "
          f"Load average after: {', '.join(f'{x:.2f}' for x in info['load_average_after'])}. "
          f"All runs: {time.perf_counter() - started:.0f} s.")
    peak = max(peak, peak_after)
    summaries = summarize(runs, peak)
    good = [s for s in summaries if "error" not in s]
    if good:
        print(f"Every row trained the same {good[0]['conversations_seen']} conversations (sha256 "
              f"{runs[0]['conversations_sha256'][:12]}) in {good[0]['steps']} optimizer steps (checked).")
    print("\nWhat each row changes on its source (Cookbook sample_finetune.py dicts, or training_config('cpu') + "
          "peft_config()):")
    for s in good:
        print(f"  {s['config']}:")
        for change in s["changes"]:
            print(f"    {change}")
    print()
    print(format_median_table(summaries))
    print(f"\nMedian (min-max) of {args.repeats} interleaved repeats; x base: ratio of medians to `{BASELINE}`. "
          "conv tok/s: conversation (non-padding) tokens through forward and backward per second of "
          "trainer.train(); loss tok/s: tokens that carry loss. Peak MiB: "
          f"{'CUDA max allocated' if cuda else 'process peak RSS'}; +train MiB: above the loaded model. Held-out "
          "losses (utils.evaluation.assistant_token_loss): per assistant token and per token, on "
          f"{args.heldout} held-out conversations, the same for every row.")
    if good:
        print(f"Held-out loss before training (the adapter disabled): assistant {good[0]['heldout_assistant_loss_before']:.4f}, "
              f"all tokens {good[0]['heldout_all_loss_before']:.4f}.")
        for s in good:
            print(f"  {s['config']:<24} first step {s['first_step_s']:.1f} s, later steps {s['later_step_s']:.1f} s "
                  f"(median); {s['what']}")
    targets = target_lines(summaries)
    if targets:
        print("\nIssue 16's targets, defaults vs cookbook (medians):")
        print("\n".join(targets))
    output = args.output or artifact("bench/train_speed.json")
    payload = dict(machine=info, matmul_peak_flops=peak, matmul_dtype=str(dtype), threads=args.threads,
                   settings={k: v for k, v in vars(args).items() if k not in ("worker", "result", "output")},
                   baseline=BASELINE, cookbook=dict(training_config=COOKBOOK_TRAINING_CONFIG,
                                                    peft_config=COOKBOOK_PEFT_CONFIG, trainer=COOKBOOK_TRAINER,
                                                    model=COOKBOOK_MODEL),
                   summaries=summaries, runs=runs, table=format_median_table(summaries))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nJSON: {output}")


if __name__ == "__main__":
    main()
