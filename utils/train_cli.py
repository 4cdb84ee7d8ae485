"""Train a LoRA or QLoRA adapter from the command line; ``accelerate launch`` runs it unchanged on many devices.

    python -m utils.train_cli --config configs/lora-smol-cpu.yaml
    python -m utils.train_cli --model tiny --method qlora --set max_steps=20 --set learning_rate=1e-3
    accelerate launch --config_file configs/ddp.yaml -m utils.train_cli --config configs/lora-phi3-gpu.yaml

The YAML file holds ``model``, ``method``, ``profile``, ``run_name`` and two mappings,
``training`` and ``peft``, that override :func:`utils.training_settings.training_config` and
:func:`utils.training_settings.peft_config`; command-line flags override the file. Every process
trains; only the main process writes checkpoints' shared files and the final adapter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import prepare_model_for_kbit_training

from utils.adapters import add_lora_adapter
from utils.data import load_conversations, load_split
from utils.models import detect_hardware, load_model_and_tokenizer, nf4_config, sharded_by_accelerate
from utils.paths import LORA_ADAPTER, QLORA_ADAPTER, artifact
from utils.runtime import configure_logging
from utils.tokenization import fit_to_length
from utils.training import train
from utils.training_settings import peft_config, training_config

FILE_KEYS = {"model", "method", "profile", "run_name", "adapter_dir", "train_file", "eval_file",
             "train_limit", "eval_limit", "resume", "overwrite", "allow_changed_resume", "threads", "training",
             "peft"}


def yaml_load(text: str) -> Any:
    """YAML where only true/false are booleans (plain YAML 1.1 reads ``eval_strategy: no`` as False)."""
    class Loader(yaml.SafeLoader):
        """SafeLoader with YAML 1.2's booleans and exponent floats."""

    Loader.yaml_implicit_resolvers = {key: [(tag, regexp) for tag, regexp in resolvers
                                            if tag != "tag:yaml.org,2002:bool"]
                                      for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float",  # 1e-3 too, not only 1.0e-3
                                 re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML run configuration; an unknown top-level key is reported with the file name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Training config {path} does not exist (see configs/ for examples).")
    data = yaml_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}.")
    unknown = sorted(set(data) - FILE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; the known keys are {sorted(FILE_KEYS)}.")
    for section in ("training", "peft"):
        if not isinstance(data.get(section) or {}, dict):
            raise ValueError(f"{path}: '{section}' must be a mapping of keys to values.")
    return data


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` from ``--set``, with the value parsed as YAML (numbers, booleans, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    return key.strip(), yaml_load(value)


def load_rows(path: str | Path | None, split: str, limit: int | None) -> list[dict[str, Any]]:
    """Validated conversations from any supported file (messages, ShareGPT, Alpaca, CSV/TSV), or the shipped split."""
    rows = load_split(split) if path is None else load_conversations(path).conversations
    return rows[:limit] if limit else rows


def full_tensor(parameter: Any) -> Any:
    """The whole value of a parameter, also when FSDP2 (a DTensor) or DeepSpeed ZeRO-3 holds only a shard of it here.

    Collective under sharding: every rank must call it, in the same order.
    """
    from torch.distributed.tensor import DTensor  # lazy: torch builds without distributed support lack it

    if isinstance(parameter, DTensor):
        return parameter.full_tensor()
    if hasattr(parameter, "ds_id"):  # a DeepSpeed ZeRO-3 parameter: gather it for the duration of the read
        import deepspeed  # lazy: optional, only installed where ZeRO-3 runs

        with deepspeed.zero.GatheredParameters([parameter]):
            return parameter.data.clone()
    return parameter


def adapter_checksum(model: Any) -> str:
    """A short hash of the trainable (adapter) weights: equal on every rank when DDP/FSDP kept them in sync.

    Sharded parameters (FSDP2 DTensors, ZeRO-3) are gathered first, so every rank hashes whole tensors.
    """
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(full_tensor(parameter).detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="python -m utils.train_cli", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run configuration (see configs/)")
    parser.add_argument("--model", help="tiny, smol, phi3-mini, auto, a hub id or folder (default: $PHI3_LORA_MODEL)")
    parser.add_argument("--method", choices=("lora", "qlora"))
    parser.add_argument("--profile", choices=("cpu", "gpu"), help="default: gpu when CUDA is available")
    parser.add_argument("--run-name", help="checkpoints go to outputs/checkpoints/<run-name>")
    parser.add_argument("--adapter-dir", help="where the final adapter goes (default: outputs/adapters/<method>)")
    parser.add_argument("--train-file", help="JSONL conversations (default: the shipped train split)")
    parser.add_argument("--eval-file", help="JSONL conversations (default: the shipped validation split)")
    parser.add_argument("--train-limit", type=int, help="use only the first N training conversations")
    parser.add_argument("--eval-limit", type=int, help="use only the first N validation conversations")
    parser.add_argument("--resume", action="store_true", default=None,
                        help="continue from the newest complete checkpoint of the run")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="delete the complete checkpoints of an earlier run of this name and start over")
    parser.add_argument("--allow-changed-resume", action="store_true", default=None,
                        help="resume even though the config or the training data changed since the checkpoint")
    parser.add_argument("--threads", type=int, help="torch intra-op threads per process")
    parser.add_argument("--set", dest="training_set", action="append", type=parse_assignment, default=[],
                        metavar="KEY=VALUE", help="override a training_config key (repeatable)")
    parser.add_argument("--peft-set", action="append", type=parse_assignment, default=[],
                        metavar="KEY=VALUE", help="override a peft_config key (repeatable)")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Merge defaults, the YAML file and the command line (the command line wins)."""
    settings: dict[str, Any] = {"method": "lora", "resume": False, "overwrite": False, "allow_changed_resume": False,
                                "training": {}, "peft": {}}
    if args.config:
        file_settings = read_config_file(args.config)
        settings.update({k: v for k, v in file_settings.items() if k not in ("training", "peft")})
        settings["training"].update(file_settings.get("training") or {})
        settings["peft"].update(file_settings.get("peft") or {})
    for key in ("model", "method", "profile", "run_name", "adapter_dir", "train_file", "eval_file",
                "train_limit", "eval_limit", "resume", "overwrite", "allow_changed_resume", "threads"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    settings["training"].update(dict(args.training_set))
    settings["peft"].update(dict(args.peft_set))
    return settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one training from the command line; returns the run's metrics."""
    settings = resolve_settings(build_parser().parse_args(argv))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    method = settings["method"]
    train_rows = load_rows(settings.get("train_file"), "train", settings.get("train_limit"))
    eval_rows = load_rows(settings.get("eval_file"), "validation", settings.get("eval_limit"))
    hardware = detect_hardware()
    config = training_config(settings.get("profile"), method, run_name=settings.get("run_name"), hardware=hardware,
                             num_train_conversations=len(train_rows), world_size=world, **settings["training"])
    lora = peft_config(method, **settings["peft"])
    if rank == 0:
        print("training_config =", json.dumps(config, indent=1, default=str))
        print("peft_config =", json.dumps(lora, indent=1))

    quantization = nf4_config() if method == "qlora" else None
    model, tokenizer = load_model_and_tokenizer(settings.get("model"), quantization_config=quantization,
                                                hardware=hardware, verbose=rank == 0)
    if quantization is not None and not sharded_by_accelerate():
        # Checkpointing is left to the Trainer, which applies training_config's activation_checkpointing_kwargs
        # (every_n_layers included: peft would hand that key to torch.utils.checkpoint, which refuses it).
        # Sharded QLoRA (FSDP, ZeRO-3) skips this step, as trl does: its fp32 upcast of the embeddings, the LM
        # head and the norms would mix dtypes inside the flat shards those engines build.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = add_lora_adapter(model, lora, seed=config["seed"])
    if config.get("max_length"):  # cut long conversations at a turn boundary, not mid-reply
        train_rows, train_report = fit_to_length(train_rows, tokenizer, config["max_length"])
        eval_rows, eval_report = fit_to_length(eval_rows, tokenizer, config["max_length"])
        if rank == 0:
            print(f"Training data: {train_report}\nValidation data: {eval_report}")
    adapter_dir = Path(settings.get("adapter_dir") or artifact(QLORA_ADAPTER if method == "qlora" else LORA_ADAPTER))
    result = train(model, tokenizer, train_rows, eval_rows, config, adapter_dir=adapter_dir,
                   resume=bool(settings.get("resume")), overwrite=bool(settings.get("overwrite")),
                   allow_changed_resume=bool(settings.get("allow_changed_resume")))
    # One line per process: every rank trained the same number of steps and holds the same weights.
    print(f"[rank {rank} of {world}] {result.metrics['steps']} steps, adapter checksum "
          f"{adapter_checksum(result.trainer.model)}", flush=True)
    if rank == 0:
        print(json.dumps(result.metrics, indent=1))
        print(f"Adapter saved to {adapter_dir}")
    return result.metrics


if __name__ == "__main__":
    configure_logging(logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING)
    main()
