"""What the CPU and GPU benchmarks share: configurations, measurement, FLOPs, the table."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from utils.phi3 import projection_shapes, qkv_widths
from utils.tokenization import IGNORE_INDEX


@dataclass(frozen=True)
class BenchConfig:
    """One training configuration: how the data is batched, what carries loss, which levers are on."""

    name: str
    what: str  # one line for the table's legend
    text_field: bool = False  # train on the rendered text (loss on every token) instead of messages
    assistant_only_loss: bool = False  # loss only on the assistant's tokens (needs messages)
    packing: bool = False  # trl BFD packing into rows of `pack_length` tokens (implies padding-free)
    padding_free: bool = False  # one row per batch, no padding (without packing)
    group_by_length: bool = False  # batches of similar lengths (padded batches)
    activation_checkpointing: bool = True  # trl's default, and the Cookbook's (its `gradient_checkpointing=True`)
    checkpoint_every_n_layers: int = 1  # with checkpointing: recompute only every n-th decoder layer (transformers 5)
    varlen_sdpa: bool = False  # utils.speed: SDPA per conversation in padding-free rows
    compact_head: bool = False  # utils.speed: the LM head scores only labelled positions (CPU)
    pad_max_length: int = 512  # truncation length of padded batches (the Cookbook QLoRA notebook: 512)
    liger: bool = False  # Liger kernels (GPU only)
    micro_batch: int = 0  # conversations per forward/backward, the rest by gradient accumulation (0: whole step)
    lora_dropout: float = 0.05  # the Cookbook's; 0 lets peft skip the dropout copy of every adapted input

    def sft_kwargs(self) -> dict[str, Any]:
        """The SFTConfig keys this configuration sets (besides the shared ones)."""
        kwargs: dict[str, Any] = dict(
            assistant_only_loss=self.assistant_only_loss,
            packing=self.packing,
            padding_free=self.padding_free,
            activation_checkpointing=self.activation_checkpointing,
            train_sampling_strategy="group_by_length" if self.group_by_length else "random",
        )
        if self.packing:
            kwargs["packing_strategy"] = "bfd"
        if self.text_field:
            kwargs["dataset_text_field"] = "text"
        if self.activation_checkpointing:
            kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
            if self.checkpoint_every_n_layers > 1:
                kwargs["activation_checkpointing_kwargs"]["every_n_layers"] = self.checkpoint_every_n_layers
        if self.liger:
            kwargs["use_liger_kernel"] = True
        return kwargs


@dataclass
class Counts:
    """Token counts of the batches a run pushed through forward and backward."""

    positions: int = 0  # every position, padding included
    real: int = 0  # conversation tokens (not padding)
    labelled: int = 0  # positions whose next-token label carries loss
    attention_pairs: int = 0  # sum over conversations of L*(L+1)/2: causal query-key pairs
    batches: int = 0
    lengths: list[int] = field(default_factory=list)


def sequence_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Lengths of the conversations in a collated batch (padded rows, or one padding-free row)."""
    if "cu_seq_lens_q" in batch:
        cu = batch["cu_seq_lens_q"].tolist()
        return [b - a for a, b in zip(cu, cu[1:]) if b > a]
    if "attention_mask" in batch:
        return [int(x) for x in batch["attention_mask"].sum(-1).tolist()]
    return [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]


class CountingCollator:
    """Wraps a data collator and counts the tokens of every batch it builds."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.counts = Counts()

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(examples)
        lengths = sequence_lengths(batch)
        c = self.counts
        c.batches += 1
        c.positions += batch["input_ids"].numel()
        c.real += sum(lengths)
        c.labelled += int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
        c.attention_pairs += sum(n * (n + 1) // 2 for n in lengths)
        c.lengths.extend(lengths)
        return batch


def model_flops(config: Any, counts: Counts) -> float:
    """Model FLOPs of one LoRA pass over ``counts`` (forward + backward, frozen base weights).

    Frozen projections cost 2 FLOPs per weight and token forward and 2 more backward (the input
    gradient only: no weight gradient). The LM head counts only where a label is scored. Attention
    counts the causal query-key pairs of each conversation: 2 matmuls of ``hidden`` width forward, 2x
    that backward. Recomputation by gradient checkpointing is not useful work and is not counted.
    """
    layers = config.num_hidden_layers
    per_layer = sum(fan_in * fan_out for fan_in, fan_out in projection_shapes(config).values())
    linear = 4 * per_layer * layers * counts.real
    head = 4 * config.vocab_size * config.hidden_size * counts.labelled
    attention = 3 * 4 * qkv_widths(config)[0] * layers * counts.attention_pairs  # q width = heads x head_dim
    return float(linear + head + attention)


def matmul_peak_flops(dtype: torch.dtype, device: str, size: int = 2048, seconds: float = 2.0) -> float:
    """Measured matmul throughput (FLOP/s), best of repeated ``size``-square products."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = math.inf
    for _ in range(3):  # warm-up
        a @ b
    deadline, runs = time.perf_counter() + seconds, 0
    while runs < 5 or time.perf_counter() < deadline:  # at least 5 timed runs: the best one counts
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10 if device == "cuda" else 1):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / (10 if device == "cuda" else 1))
        runs += 1
    return 2 * size**3 / best


# ratio key written by ``ratios`` -> the measured field it divides by the baseline's
RATIO_FIELDS = {"tokens_per_s_x": "tokens_per_s", "peak_memory_x": "peak_memory_mib",
                "training_memory_x": "training_memory_mib", "wall_x": "wall_s"}


def ratios(rows: list[dict[str, Any]], baseline: str) -> None:
    """Add ``*_x`` ratios against the ``baseline`` row to every row, in place."""
    base = next((r for r in rows if r["config"] == baseline and "error" not in r), None)
    for row in rows:
        if base is None or "error" in row:
            continue
        for ratio, measured in RATIO_FIELDS.items():
            # a tiny model can train inside memory the process already had: nothing to divide by
            row[ratio] = row[measured] / base[measured] if base[measured] > 0 else math.nan


def markdown_table(header: str, rows: list[dict[str, Any]], format_row: Callable[[dict[str, Any]], str]) -> str:
    """``header``, its separator, then ``format_row(row)`` per row; a failed run (an ``error`` key) gets its
    configuration and the error's start, the other cells left empty."""
    columns = header.count("|") - 1
    lines = [header, "|" + "|".join("---" for _ in range(columns)) + "|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['config']} | failed: {row['error'][:80]} |" + " |" * (columns - 2))
        else:
            lines.append(format_row(row))
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a fixed-width text table (markdown-compatible)."""
    header = ("| config | wall s | conv tok/s | x base | loss tokens | padding | peak MiB | x base "
              "| +train MiB | x base | train loss | held-out loss | MFU |")

    def line(r: dict[str, Any]) -> str:
        return (f"| {r['config']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | {r.get('tokens_per_s_x', math.nan):.2f} "
                f"| {r['labelled_tokens']} | {r['padding_fraction']:.0%} | {r['peak_memory_mib']:.0f} "
                f"| {r.get('peak_memory_x', math.nan):.2f} | {r['training_memory_mib']:.0f} "
                f"| {r.get('training_memory_x', math.nan):.2f} | {r['final_train_loss']:.3f} | {r['heldout_loss']:.4f} "
                f"| {r['mfu']:.1%} |")

    return markdown_table(header, rows, line)


def config_dict(config: BenchConfig) -> dict[str, Any]:
    """A configuration as plain JSON."""
    return asdict(config)
