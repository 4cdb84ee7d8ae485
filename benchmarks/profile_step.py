"""Where one training step of a benchmark row spends its time: ``python -m benchmarks.profile_step``.

Trains the row (default: ``defaults``, built exactly as ``benchmarks.train_speed`` builds it) for two
optimizer steps on the benchmark's conversations and profiles the second one with ``torch.profiler``.
Forward hooks wrap every module call in a ``record_function`` label (frozen linear, LoRA, RMSNorm,
attention, activation, ...), so each operator's own time is charged to what called it:

* forward ops by the module they ran in;
* ops that ran inside the backward pass *and* inside a module label are checkpointing's recomputation;
* the other backward ops by what they are (matmuls with a rank-sized side are LoRA's, the rest frozen;
  SDPA's backward is attention; trl's chunked log-prob, cross-entropy and matmuls with a vocabulary-sized
  side are the LM head, whichever trainer the row uses);
* the optimizer (AdamW and gradient clipping), the data loader, and the remainder: Python and
  Trainer overhead between operators (wall time minus the operators' time).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from typing import Any

import torch

CATEGORIES = (
    "frozen matmuls (forward + input gradients)",
    "LoRA matmuls",
    "elementwise: RMSNorm",
    "elementwise: RoPE and attention reshapes",
    "elementwise: SiLU and gate x up",
    "elementwise: LoRA scaling and adds, residual adds",
    "elementwise: other backward ops",
    "attention (SDPA forward + backward)",
    "LM head + cross-entropy",
    "recompute (activation checkpointing)",
    "optimizer + gradient clipping",
    "data loading and collation",
    "embedding",
    "other operators",
)


def module_label(name: str, module: torch.nn.Module) -> str | None:
    """The profiler label of a module call, or None for modules whose ops count to their parent."""
    kind = type(module).__name__
    leaf = name.rsplit(".", 1)[-1]
    if ".lora_A." in f".{name}." or ".lora_B." in f".{name}.":
        return "mod:lora" if isinstance(module, torch.nn.Linear) else None
    if leaf == "base_layer":
        return "mod:frozen"
    if kind.endswith("RMSNorm"):
        return "mod:rmsnorm"
    if kind.endswith("Attention"):
        return "mod:attention"
    if kind.endswith("MLP"):
        return "mod:mlp"
    if leaf in ("act_fn", "activation_fn"):
        return "mod:act"
    if kind == "Linear" and leaf in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):  # peft's lora.Linear
        return "mod:lora-wrapper"
    if leaf == "lm_head":
        return "mod:lm_head"
    if kind == "Embedding" or leaf == "embed_tokens":
        return "mod:embedding"
    if kind.endswith("DecoderLayer"):
        return "mod:layer"
    if kind.endswith("RotaryEmbedding"):
        return "mod:rope"
    return None


def label_modules(model: torch.nn.Module) -> None:
    """Wrap every labelled module call in a ``record_function`` range (forward pre- and post-hooks)."""
    for name, module in model.named_modules():
        label = module_label(name, module)
        if label is None:
            continue
        stack: list[Any] = []

        def enter(_module: Any, _inputs: Any, label: str = label, stack: list[Any] = stack) -> None:
            ctx = torch.autograd.profiler.record_function(label)
            ctx.__enter__()
            stack.append(ctx)

        def leave(_module: Any, _inputs: Any, _output: Any, stack: list[Any] = stack) -> None:
            if stack:
                stack.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def categorize(name: str, ancestors: list[str], shapes: list[list[int]], rank: int, vocab: int = 0) -> str:
    """The category of one operator's own time, from its name, its enclosing ranges and its input shapes."""
    labels = [a for a in ancestors if a.startswith("mod:")]
    in_backward = any(a.startswith("autograd::engine::evaluate_function") for a in ancestors)
    joined = " ".join(ancestors + [name])
    if "Optimizer." in joined or "_foreach" in name or "clip_grad" in joined:
        return "optimizer + gradient clipping"
    if "DataLoader" in joined:
        return "data loading and collation"
    is_mm = name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
    head_matmul = is_mm and vocab > 0 and any(vocab in shape for shape in shapes)  # the LM head's backward
    if "ChunkedLogProb" in joined or "mod:lm_head" in labels or head_matmul or \
            any(op in name for op in ("cross_entropy", "log_softmax", "nll_loss")):
        return "LM head + cross-entropy"
    if labels and in_backward:
        return "recompute (activation checkpointing)"
    if "scaled_dot_product" in name:
        return "attention (SDPA forward + backward)"
    if labels:
        inner = labels[-1]
        if inner == "mod:lora":
            return "LoRA matmuls" if is_mm else "elementwise: LoRA scaling and adds, residual adds"
        if inner == "mod:frozen":
            return "frozen matmuls (forward + input gradients)" if is_mm else "other operators"
        if inner == "mod:rmsnorm":
            return "elementwise: RMSNorm"
        if inner in ("mod:attention", "mod:rope"):
            return "elementwise: RoPE and attention reshapes"
        if inner in ("mod:mlp", "mod:act"):
            return "elementwise: SiLU and gate x up"
        if inner in ("mod:lora-wrapper", "mod:layer"):
            return "elementwise: LoRA scaling and adds, residual adds"
        if inner == "mod:embedding":
            return "embedding"
        return "other operators"
    if is_mm:
        return "LoRA matmuls" if any(rank in shape for shape in shapes) else "frozen matmuls (forward + input gradients)"
    if "embedding" in name:
        return "embedding"
    if in_backward:
        return "elementwise: other backward ops"
    return "other operators"


def breakdown(events: Any, wall_s: float, rank: int, vocab: int = 0) -> dict[str, float]:
    """Seconds per category from the profiler's events (each operator's self time counted once)."""
    seconds: dict[str, float] = collections.defaultdict(float)
    counted = 0.0
    for event in events:
        if event.name.startswith("mod:") or event.name.startswith("ProfilerStep"):
            continue  # the labels' own time is Python between operators: part of the remainder
        ancestors = []
        parent = event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        self_s = event.self_cpu_time_total / 1e6
        if not event.name.startswith("aten::") and not event.name.startswith("Optimizer.") and \
                "DataLoader" not in event.name and "ChunkedLogProb" not in event.name:
            continue  # autograd nodes and other wrappers: their self time is bookkeeping, in the remainder
        seconds[categorize(event.name, ancestors[::-1], list(event.input_shapes or []), rank, vocab)] += self_s
        counted += self_s
    seconds["Python, autograd and Trainer overhead (wall - operators)"] = max(0.0, wall_s - counted)
    return dict(seconds)


def main(argv: list[str] | None = None) -> None:
    """Profile the second optimizer step of one row and print the breakdown."""
    from benchmarks.train_speed import ROWS, parse_args

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--row", default="defaults", help="the benchmark row to profile (default: defaults)")
    extra.add_argument("--table", type=int, default=0, help="also print the profiler's top-N operator table")
    known, rest = extra.parse_known_args(argv)
    args = parse_args(rest + ["--steps", "2"] if "--steps" not in rest else rest)
    row = ROWS[known.row]
    torch.set_num_threads(row.threads or args.threads)

    from datasets import Dataset
    from transformers import TrainerCallback, set_seed

    from benchmarks.chitchat import benchmark_split
    from benchmarks.train_speed import build_row, pack_length, row_trainer_class
    from utils.models import load_model_and_tokenizer
    from utils.tokenization import conversation_length
    from utils.training_settings import build_lora_config, build_sft_config

    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, verbose=False)
    train, _ = benchmark_split(tokenizer, args.steps * args.batch_size, 0, args.max_tokens, seed=args.seed)
    pack = pack_length([conversation_length(m, tokenizer) + 1 for m in train], args.steps, args.max_tokens)
    built = build_row(row, args, pack, output_dir="/tmp/bench-profile")
    if built["data"] == "text":
        dataset = Dataset.from_list([{"text": tokenizer.apply_chat_template(m, tokenize=False)} for m in train])
    else:
        dataset = Dataset.from_list([{"messages": m} for m in train])

    class ProfileLastStep(TrainerCallback):
        """Start the profiler at the last step's beginning, stop it at its end."""

        def __init__(self) -> None:
            self.profiler: Any = None
            self.wall_s = 0.0

        def on_step_begin(self, _args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == args.steps - 1:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       record_shapes=True)
                self.profiler.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, _args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.profiler is not None and state.global_step == args.steps:
                self.profiler.__exit__(None, None, None)
                self.wall_s = time.perf_counter() - self.start

    callback = ProfileLastStep()
    sft_args = build_sft_config(built["sft"])
    trainer = row_trainer_class(row, sft_args)(model=model, args=sft_args, train_dataset=dataset,
                                               processing_class=tokenizer, peft_config=build_lora_config(built["peft"]),
                                               callbacks=[callback])
    label_modules(trainer.model)
    trainer.train()
    events = callback.profiler.events()
    seconds = breakdown(events, callback.wall_s, int(built["peft"]["r"]), model.config.vocab_size)
    tokens = sum(conversation_length(m, tokenizer) for m in train[-args.batch_size:])
    print(f"Row {row.name} ({args.model}, {row.threads or args.threads} torch threads): profiled step "
          f"{args.steps} of {args.steps}, {callback.wall_s:.2f} s wall (profiler on), ~{tokens} conversation tokens")
    print("| where the time goes | s | share |\n|---|---|---|")
    for name, value in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"| {name} | {value:.2f} | {value / callback.wall_s:.0%} |")
    if known.table:
        print(callback.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=known.table))
    if args.output:
        args.output.write_text(json.dumps(dict(row=row.name, wall_s=callback.wall_s, seconds=seconds), indent=1))


if __name__ == "__main__":
    main()
