"""The GPU half of the speed benchmark: full-size Phi-3-mini (random weights), LoRA bf16 and QLoRA at 2048.

The device machine has no Hub access, so the model is built from Phi-3-mini-4k-instruct's published
architecture (``utils.phi3.PHI3_MINI_CONFIG``) with random weights (the model registry's
``phi3-mini-random``, ``utils.models.build_phi3_mini_random``); speed and memory do not depend on the weights' values. Two steps:

1. here (CPU, has the chitchat package and the built tokenizer)::

       .venv/bin/python -m benchmarks.gpu_phi3_mini --export

   writes ``outputs/bench/gpu_conversations.json`` (the conversations, cut to 2048 Phi-3 tokens).
2. on the GPU machine (the device tool), carrying that file and the tokenizer::

       python -m benchmarks.gpu_phi3_mini
       # carry: outputs/bench/gpu_conversations.json, .cache/phi3-tokenizer-v1

It builds the random model once (into the cache, in the GPU's compute dtype), then runs, one process
each: the Cookbook baseline and the series' defaults, for LoRA (bf16) and QLoRA (NF4), and prints
the same table as the CPU benchmark with the measured bf16 matmul peak and each run's MFU. QLoRA's
CUDA max allocated is checked against 16 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from benchmarks.chitchat import benchmark_split
from benchmarks.common import BenchConfig, format_table, matmul_peak_flops, ratios
from benchmarks.train_speed import machine, parse_args, run_config_in_subprocess, run_worker
from utils.memory import needs_activation_checkpointing
from utils.models import build_phi3_mini_random, build_phi3_tokenizer, training_chat_template
from utils.paths import artifact, cache_dir
from utils.phi3 import phi3_mini_config

SEQUENCE_LENGTH = 2048  # the Cookbook's max_seq_length, and the packed row length of the baselines
QLORA_BUDGET_GIB = 16.0  # QLoRA Phi-3-mini must fit a 16 GB GPU (T4, V100-16GB, many laptops)
CONVERSATIONS = "bench/gpu_conversations.json"  # under utils.paths.outputs_dir()
TOKENIZER_DIR = "phi3-tokenizer-v1"  # under utils.paths.cache_dir(), built by utils.models
COOKBOOK = dict(text_field=True, packing=True, activation_checkpointing=True)
DEFAULTS = dict(assistant_only_loss=True, padding_free=True, varlen_sdpa=True, lora_dropout=0.0)  # trl: compact head on GPUs


def gpu_configs(lora_checkpointing: bool, qlora_checkpointing: bool, liger: bool) -> dict[str, BenchConfig]:
    """The GPU rows; activation checkpointing of the defaults comes from the memory estimate."""
    rows = [
        BenchConfig("lora-cookbook", "LoRA bf16, Cookbook sample_finetune.py: text, every token, packed 4 x 2048, "
                    "checkpointing", **COOKBOOK),
        BenchConfig("lora-defaults", "LoRA bf16, the series' defaults", activation_checkpointing=lora_checkpointing,
                    **DEFAULTS),
        BenchConfig("qlora-cookbook", "QLoRA NF4, Cookbook settings", **COOKBOOK),
        BenchConfig("qlora-defaults", f"QLoRA NF4, the series' defaults ({QLORA_BUDGET_GIB:.0f} GiB budget)",
                    activation_checkpointing=qlora_checkpointing, **DEFAULTS),
    ]
    if liger:
        rows.append(BenchConfig("lora-defaults-liger", "lora-defaults + Liger kernels",
                                activation_checkpointing=lora_checkpointing, liger=True, **DEFAULTS))
    return {row.name: row for row in rows}


def checkpointing_needed(method: str, budget_gib: float, tokens_per_step: int) -> bool:
    """Activation checkpointing only when the 00_setup memory estimate does not fit the budget."""
    return needs_activation_checkpointing(phi3_mini_config(), budget_gib * 2**30, method=method,
                                        seq_len=tokens_per_step, batch_size=1, compute_bytes=2)


def export_conversations(path: Path, n_train: int, n_heldout: int, max_tokens: int, seed: int) -> dict[str, Any]:
    """Draw the chitchat conversations (cut to ``max_tokens`` Phi-3 tokens) and save them as JSON."""
    tokenizer = AutoTokenizer.from_pretrained(build_phi3_tokenizer())
    tokenizer.chat_template = training_chat_template(tokenizer)
    train, heldout = benchmark_split(tokenizer, n_train, n_heldout, max_tokens, seed=seed)
    payload = dict(source="chitchat-dataset 0.9.0 (MIT)", seed=seed, max_tokens=max_tokens, train=train,
                   heldout=heldout)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")
    return payload


def options(argv: list[str] | None, configs: dict[str, BenchConfig]) -> argparse.Namespace:
    """The CPU benchmark's options with GPU-sized defaults, plus --export."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", action="store_true", help="(CPU) write the conversations file and stop")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a built random Phi-3-mini folder")
    gpu_sizes = dict(steps=10, batch_size=12, heldout=16, max_tokens=SEQUENCE_LENGTH, threads=8,
                     pack_length=SEQUENCE_LENGTH, lr=2e-4)
    return parse_args(argv, configs=configs, parser=parser, defaults=gpu_sizes)


def main(argv: list[str] | None = None) -> None:
    """Build the random Phi-3-mini, run every GPU configuration, print the table, write the JSON."""
    liger = __import__("importlib").util.find_spec("liger_kernel") is not None
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0
    tokens = 4 * SEQUENCE_LENGTH  # the Cookbook's batch: 4 rows of 2048
    configs = gpu_configs(checkpointing_needed("lora", memory, tokens) if memory else True,
                          checkpointing_needed("qlora", QLORA_BUDGET_GIB, tokens), liger)
    args = options(argv, configs)
    conversations = args.conversations or artifact(CONVERSATIONS)
    if args.export:
        payload = export_conversations(conversations, args.steps * args.batch_size, args.heldout, args.max_tokens,
                                       args.seed)
        print(f"{len(payload['train'])} + {len(payload['heldout'])} conversations -> {conversations}")
        return
    if args.worker:
        args.result.write_text(json.dumps(run_worker(configs[args.worker], args)))
        return
    if not torch.cuda.is_available():
        sys.exit("No CUDA GPU: run this on the device machine (see benchmarks/README.md).")
    if not conversations.exists():
        sys.exit(f"{conversations} is missing: run `.venv/bin/python -m benchmarks.gpu_phi3_mini --export` on the "
                 "CPU machine and carry the file (see benchmarks/README.md).")
    tokenizer_dir = cache_dir() / TOKENIZER_DIR
    if not (tokenizer_dir / "tokenizer.json").exists():
        sys.exit(f"{tokenizer_dir} is missing: carry .cache/{TOKENIZER_DIR} (built by utils.models).")
    info = machine()
    peak = matmul_peak_flops(torch.bfloat16, "cuda", size=8192)
    start = time.perf_counter()
    folder = args.model_dir or build_phi3_mini_random()
    print(f"GPU: {info.get('gpu')}, {memory:.0f} GiB; bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; random "
          f"Phi-3-mini built in {time.perf_counter() - start:.0f} s; liger_kernel: {liger}")
    for config in configs.values():
        print(f"  {config.name:<20} activation checkpointing: {config.activation_checkpointing}")
    rows = []
    for name in args.configs:
        args.model, args.conversations = str(folder), conversations
        args.quantize = "nf4" if name.startswith("qlora") else "none"
        began = time.perf_counter()
        row = run_config_in_subprocess(name, args, module="benchmarks.gpu_phi3_mini")
        if "error" not in row:
            row["mfu"] = row["flops"] / row["wall_s"] / peak
        rows.append(row)
        status = row.get("error") or f"{row['tokens_per_s']:.0f} tok/s"
        print(f"  {name:<20} {status} ({time.perf_counter() - began:.0f} s)", flush=True)
    for prefix in ("lora", "qlora"):
        group = [r for r in rows if r["config"].startswith(prefix + "-")]
        ratios(group, f"{prefix}-cookbook")
    print()
    print(format_table(rows))
    for row in rows:
        if row["config"].startswith("qlora") and "error" not in row:
            fits = row["peak_memory_mib"] / 1024 <= QLORA_BUDGET_GIB
            print(f"{row['config']}: {row['peak_memory_mib'] / 1024:.1f} GiB CUDA max allocated -> "
                  f"{'fits' if fits else 'does NOT fit'} in {QLORA_BUDGET_GIB:.0f} GiB")
    output = args.output or artifact("bench/gpu_phi3_mini.json")
    output.write_text(json.dumps(dict(machine=info, matmul_peak_flops=peak, matmul_dtype="bfloat16",
                                      settings={k: str(v) for k, v in vars(args).items()}, rows=rows,
                                      table=format_table(rows)), indent=1, default=str))
    print(f"\nJSON: {output}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
