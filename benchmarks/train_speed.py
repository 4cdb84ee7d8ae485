"""Training speed against the Phi-3 Cookbook's configuration: ``python -m benchmarks.train_speed``.

Every configuration trains the same model (LoRA r=16, alpha=32, all linear layers; dropout as each row says)
on the same multi-turn chitchat conversations for one epoch in the same number of optimizer steps,
each in its own process, with a fixed seed and a fixed thread count. The table reports wall time,
conversation tokens/s (real tokens through forward and backward: the headline), loss-bearing
tokens, padding, peak memory, final train loss, held-out assistant loss and MFU, with ratios to the
Cookbook baseline; the JSON goes to ``outputs/bench/train_speed.json``.
See ``benchmarks/README.md`` for the configurations and the latest table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BenchConfig,
    CountingCollator,
    config_dict,
    format_table,
    matmul_peak_flops,
    model_flops,
    ratios,
)

BASELINE = "cookbook"
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")  # + each row's lora_dropout
CONFIGS: dict[str, BenchConfig] = {c.name: c for c in (
    BenchConfig("cookbook", "Cookbook sample_finetune.py: text, loss on every token, BFD packing, grad. checkpointing",
                text_field=True, packing=True),
    BenchConfig("cookbook-qlora-nb", "Cookbook QLoRA notebook's batching: text, every token, padded batches (max 512)",
                text_field=True),
    BenchConfig("assistant-only", "baseline + loss on assistant tokens only", assistant_only_loss=True, packing=True),
    BenchConfig("length-grouped", "padded batches (as cookbook-qlora-nb) grouped by length",
                text_field=True, group_by_length=True),
    BenchConfig("padding-free", "baseline without packing: each batch one padding-free row (SDPA block mask)",
                text_field=True, padding_free=True),
    BenchConfig("varlen-sdpa", "padding-free + utils.speed per-conversation SDPA",
                text_field=True, padding_free=True, varlen_sdpa=True),
    BenchConfig("no-checkpointing", "baseline with gradient checkpointing off",
                text_field=True, packing=True, gradient_checkpointing=False),
    BenchConfig("compact-head", "assistant-only + utils.speed LM head on labelled positions only (patches a private "
                "trl name: measured here, not used by the series)",
                assistant_only_loss=True, packing=True, compact_head=True),
    BenchConfig("micro-batch", "baseline data as padded micro-batches of one conversation + gradient accumulation",
                text_field=True, micro_batch=1),
    BenchConfig("no-dropout", "baseline with LoRA dropout 0 (peft then keeps no dropped copy of each input)",
                text_field=True, packing=True, lora_dropout=0.0),
    BenchConfig("defaults-no-ckpt", "the defaults without checkpointing: the fastest row",
                assistant_only_loss=True, gradient_checkpointing=False, micro_batch=1, lora_dropout=0.0),
    BenchConfig("defaults", "the series' defaults: assistant-only loss, one conversation per micro-batch "
                "(gradient accumulation), checkpointing every 3rd layer, LoRA dropout 0",
                assistant_only_loss=True, checkpoint_every_n_layers=3, micro_batch=1, lora_dropout=0.0),
)}


def parse_args(argv: list[str] | None = None, configs: dict[str, BenchConfig] = CONFIGS,
               parser: argparse.ArgumentParser | None = None,
               defaults: dict[str, Any] | None = None) -> argparse.Namespace:
    """Command-line options (defaults sized for ~12-15 minutes on 2 CPU cores with the smol model)."""
    parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=list(configs), help=f"subset of: {' '.join(configs)}")
    parser.add_argument("--model", default="smol", help="model name for utils.models (default: smol)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="conversations per step (default 4)")
    parser.add_argument("--heldout", type=int, default=8, help="held-out conversations for the loss (default 8)")
    parser.add_argument("--max-tokens", type=int, default=320, help="conversation length cap, in tokens (default 320)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run, fixed (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data subset, LoRA init and order (default 0)")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate, constant, for every row (default 2e-4)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; the fastest is kept")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default outputs/bench/train_speed.json)")
    parser.add_argument("--quantize", choices=("none", "nf4"), default="none", help="load the base in NF4 (QLoRA)")
    parser.add_argument("--pack-length", type=int, default=0,
                        help="packed row length (default 0: the smallest giving one row per step)")
    parser.add_argument("--conversations", type=Path, default=None,
                        help="JSON {'train': [...], 'heldout': [...]} of message lists instead of chitchat")
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


def heldout_loss(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]]) -> float:
    """Mean loss per assistant token over the held-out conversations (plain forward, no gradient)."""
    import torch

    from utils.data import tokenize_conversation

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for messages in conversations:
            row = tokenize_conversation(messages, tokenizer)
            ids = torch.tensor([row["input_ids"]], device=model.device)
            labels = torch.tensor([row["labels"]], device=model.device)
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels, use_cache=False).loss) * n
            count += n
    return total / count


def run_worker(config: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration in this process and measure it."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from benchmarks.chitchat import benchmark_split, render_ids
    from utils.models import load_model_and_tokenizer
    from utils.speed import score_only_labelled_positions, use_varlen_sdpa
    from utils.runtime import peak_memory_bytes

    set_seed(args.seed)
    quantization = None
    if args.quantize == "nf4":
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available()
                                          else torch.float32)
    model, tokenizer = load_model_and_tokenizer(args.model, verbose=False, quantization_config=quantization)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    cuda = torch.cuda.is_available()
    n_train = args.steps * args.batch_size
    if args.conversations:
        stored = json.loads(args.conversations.read_text(encoding="utf-8"))
        train, heldout = stored["train"][:n_train], stored["heldout"][: args.heldout]
    else:
        train, heldout = benchmark_split(tokenizer, n_train, args.heldout, args.max_tokens, seed=args.seed)
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

        lengths = [len(render_ids(m, tokenizer)) for m in train]
        packed = pack_dataset(Dataset.from_dict({"input_ids": [[0] * n for n in lengths]}), args.pack_length, "bfd")
        rows, batch_size = args.pack_length, -(-len(packed) // args.steps)
    elif config.packing:
        rows, batch_size = pack_length([len(render_ids(m, tokenizer)) for m in train], args.steps, args.max_tokens), 1
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
                         peft_config=LoraConfig(**LORA, lora_dropout=config.lora_dropout))
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
        heldout_before = heldout_loss(trainer.model, tokenizer, heldout)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    c = counter.counts
    return dict(
        config=config.name, what=config.what, settings=config_dict(config), steps=trainer.state.global_step,
        batch_size=batch_size, gradient_accumulation_steps=accumulation, max_length=rows,
        memory_before_training_mib=memory_before, training_memory_mib=peak - memory_before, wall_s=wall, real_tokens=c.real, positions=c.positions,
        labelled_tokens=c.labelled, padding_fraction=1 - c.real / c.positions, tokens_per_s=c.real / wall,
        peak_memory_mib=peak, peak_memory_kind="CUDA max allocated" if cuda else "process peak RSS",
        final_train_loss=losses[-1], train_losses=losses,
        heldout_loss=heldout_loss(trainer.model, tokenizer, heldout), heldout_loss_before=heldout_before, flops=model_flops(model.config, c),
        conversations=len(train), conversation_lengths=c.lengths, quantize=args.quantize,
        attn_implementation=trainer.model.config._attn_implementation,
    )


def run_config_in_subprocess(name: str, args: argparse.Namespace, module: str = "benchmarks.train_speed",
                             extra: list[str] | None = None) -> dict[str, Any]:
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
        threads = str(args.threads)
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


def main(argv: list[str] | None = None) -> None:
    """Run every configuration, print the table, write the JSON."""
    args = parse_args(argv)
    if args.worker:
        row = run_worker(CONFIGS[args.worker], args)
        args.result.write_text(json.dumps(row))
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
          f"{', ' + info['gpu'] if cuda else ''}; load average before: {info['load_average_before'][0]:.2f}")
    print(f"Measured matmul peak ({str(dtype).removeprefix('torch.')}, {args.threads} threads): "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"Model {args.model}; {args.steps} steps x {args.batch_size} chitchat conversations (<= {args.max_tokens} "
          f"tokens), {args.heldout} held-out; seed {args.seed}; torch threads {args.threads}\n")
    model_source(resolve_model_name(args.model))  # builds an embedded model (once) outside the measured rows
    rows = []
    for name in args.configs:
        runs = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            row = run_config_in_subprocess(name, args)
            runs.append(row)
            status = row.get("error") or f"{row['tokens_per_s']:.0f} tok/s, {row['wall_s']:.0f} s training"
            print(f"  {name:<18} run {repeat + 1}/{args.repeats}: {status} ({time.perf_counter() - start:.0f} s "
                  f"with start-up)", flush=True)
        good = [r for r in runs if "error" not in r]
        best = max(good, key=lambda r: r["tokens_per_s"]) if good else runs[0]
        if good:
            best["repeat_walls_s"] = [r["wall_s"] for r in good]
        rows.append(best)
        partial = artifact("bench/train_speed.partial.json")  # rows so far, in case the run is stopped
        partial.write_text(json.dumps(dict(machine=info, matmul_peak_flops=peak, rows=rows), default=str))
    peak_after = matmul_peak_flops(dtype, "cuda" if cuda else "cpu")  # contention can hide the peak: keep the best
    print(f"\nMatmul peak measured again after the runs: {peak_after / 1e9:.1f} GFLOP/s; MFU uses the higher one.")
    peak = max(peak, peak_after)
    for row in rows:
        if "error" not in row:
            row["mfu"] = row["flops"] / row["wall_s"] / peak
    ratios(rows, BASELINE)
    print()
    print(format_table(rows))
    before = sorted({round(r["heldout_loss_before"], 4) for r in rows if "error" not in r})
    print(f"\nHeld-out loss before training: {', '.join(f'{b:.4f}' for b in before)} (the start of every row).")
    print(f"x base: ratio to `{BASELINE}`. Peak memory: "
          f"{'CUDA max allocated' if cuda else 'process peak RSS'}; +train MiB: what training adds above the "
          "loaded model, which every row pays alike. conv tok/s: conversation (non-padding) tokens "
          "through forward and backward per second of training. Held-out loss: per assistant token on held-out "
          "conversations.")
    for row in rows:
        print(f"  {row['config']:<18} {CONFIGS[row['config']].what}")
    output = args.output or artifact("bench/train_speed.json")
    payload = dict(machine=info, matmul_peak_flops=peak, matmul_dtype=str(dtype), threads=args.threads,
                   settings={k: v for k, v in vars(args).items() if k not in ("worker", "result", "output")},
                   lora=LORA, baseline=BASELINE, rows=rows, table=format_table(rows))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nJSON: {output}")


if __name__ == "__main__":
    main()
