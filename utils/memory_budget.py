"""Peak GPU memory each notebook would reach with the real Phi-3-mini, from a trace of a tiny-model run.

The tests run every notebook on the 4M-parameter tiny model and record, at every model load, cell,
inference call, ``generate`` call and first optimizer step, which models were alive at once
(``tests/support/memory_trace.py``). This module prices each of those moments as if the notebook had
run the real Phi-3-mini on a GPU, at the GPU profile's sizes, and keeps the largest:

* every live full-precision model: Phi-3-mini's weights in the GPU compute dtype (2 bytes each);
* every live 4-bit model: the QLoRA weights of :func:`utils.memory.estimate_training_memory` (NF4 projections;
  embeddings, LM head and norms in fp32 once ``prepare_model_for_kbit_training`` has run, else 2 bytes);
* LoRA adapters (fp32), scaled from the tiny model's to Phi-3-mini's shapes module by module;
* optimizer states still alive (a finished Trainer keeps its AdamW moments);
* while training: activations and logits from :func:`utils.memory.estimate_training_memory` at the GPU
  profile's batch, length and checkpointing for that card (:func:`utils.training_settings.training_config`), plus
  the adapter's gradients and optimizer states; a hand-written loop (notebook 02) is priced at
  ``CUSTOM_LOOP_BATCH`` x ``CUSTOM_LOOP_SEQ_LEN`` tokens with activation checkpointing;
* while generating: the KV cache of the recorded batch, prompt and new tokens, plus one step's logits;
* inference forward passes: the recorded batch's logits (compute dtype + an fp32 copy) and one layer's
  activations;
* always: ``CUDA_OVERHEAD_GIB`` for the CUDA context, cuBLAS workspaces and allocator slack.

Inference sizes are those of the traced run (smoke sizes in the tests); training sizes are the GPU
profile's. Usage: ``python -m utils.memory_budget [TRACE_FOLDER]`` prints the table for 16, 24 and 40 GB cards.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from utils.memory import (
    GIB,
    T4_MEMORY_GIB,
    activation_bytes_per_layer,
    estimate_training_memory,
    kv_cache_bytes_per_token,
    parameter_counts,
)
from utils.models import Hardware
from utils.paths import REPO_ROOT
from utils.phi3 import phi3_mini_config, projection_shapes
from utils.training_settings import training_config

TRACE_ENV_VAR = "PHI3_LORA_MEMORY_TRACE"
COMPUTE_BYTES = 2  # bf16 or fp16 on a GPU: the dtype plan_loading picks for every full-precision load
ADAPTER_BYTES = 4  # PEFT keeps LoRA weights (and so their gradients) in fp32
CUDA_OVERHEAD_GIB = 0.5  # CUDA context (~0.3-0.4 GiB with PyTorch's kernels loaded), cuBLAS workspace, allocator slack
INT8_BYTES_PER_WEIGHT = 1.0  # bitsandbytes LLM.int8 projections (scales are negligible)
# Notebook 02 trains with its own loop; on a GPU its comparison table says batch 4-16, length 1024-2048,
# checkpointing on. Priced at batch 4 x 2048 tokens with checkpointing (its optimizer: AdamW, 8 bytes/parameter).
CUSTOM_LOOP_BATCH = 4
CUSTOM_LOOP_SEQ_LEN = 2048
CUSTOM_LOOP_CHECKPOINTING = True


@dataclass(frozen=True)
class Card:
    """A GPU: its name, the memory PyTorch reports for it (GiB), native bf16, and where the figure comes from."""

    label: str
    memory_gib: float
    bf16: bool
    source: str


# Memory as PyTorch reports it (torch.cuda.get_device_properties(0).total_memory, the "total capacity" of its
# out-of-memory message), which is what utils.models.detect_hardware() sees; nvidia-smi shows a little more.
T4 = Card("16 GB T4", T4_MEMORY_GIB, False, "Colab T4: 'GPU 0 has a total capacity of 14.74 GiB' (nvidia-smi: 15,360 MiB)")
L4 = Card("24 GB L4/A10G", 22.03, True, "L4: 'total capacity of 22.03 GiB' (nvidia-smi: L4 23,034 MiB, "
                                        "A10G 23,028 MiB)")
A100_40GB = Card("40 GB A100", 39.50, True, "A100-40GB: 'total capacity of 39.50 GiB' (nvidia-smi: 40,960 MiB)")
CARDS = (T4, L4, A100_40GB)  # the cards every notebook is priced on (the README's table)
A100_80GB = Card("80 GB A100", 79.15, True, "A100-80GB: 'total capacity of 79.15 GiB' (nvidia-smi: 81,920 MiB)")


@lru_cache(maxsize=1)
def target_config() -> Any:
    """The configuration every traced model is priced as: Phi-3-mini-4k-instruct's published config."""
    return phi3_mini_config()


def full_weight_bytes(config: Any = None) -> float:
    """Phi-3-mini's weights in the GPU compute dtype."""
    counts = parameter_counts(config or target_config())
    return (counts["linear"] + counts["other"]) * COMPUTE_BYTES


def quantized_weight_bytes(kind: str, prepared_for_kbit: bool, config: Any = None) -> float:
    """Phi-3-mini's weights in 4-bit NF4 (QLoRA) or 8-bit; ``prepared_for_kbit``: the rest upcast to fp32."""
    config = config or target_config()
    if kind == "4bit":
        return estimate_training_memory(config, method="qlora", compute_bytes=COMPUTE_BYTES,
                                        prepared_for_kbit=prepared_for_kbit).base_weights
    counts = parameter_counts(config)
    return counts["linear"] * INT8_BYTES_PER_WEIGHT + counts["other"] * (4 if prepared_for_kbit else COMPUTE_BYTES)


def scaled_adapter_parameters(by_target: dict[str, int], traced_config: dict[str, Any], config: Any = None) -> float:
    """LoRA parameters on Phi-3-mini for the traced model's LoRA parameters per module.

    A LoRA pair on a layer with ``in`` inputs and ``out`` outputs has r x (in + out) parameters, so each
    module's count scales by (in + out) on Phi-3-mini over (in + out) on the traced model, times the ratio of
    layer counts. Modules that are not one of Phi-3's projections scale with the hidden size.
    """
    config = config or target_config()
    if not by_target:
        return 0.0
    traced = SimpleNamespace(**traced_config)
    traced_shapes, shapes = projection_shapes(traced), projection_shapes(config)
    layers = config.num_hidden_layers / traced.num_hidden_layers
    total = 0.0
    for target, count in by_target.items():
        if target in shapes:
            total += count * sum(shapes[target]) / sum(traced_shapes[target]) * layers
        else:
            total += count * config.hidden_size / traced.hidden_size
    return total


def _hardware(card: Card) -> Any:
    """A ``utils.models.Hardware`` describing ``card`` (what detect_hardware() would say on it)."""
    return Hardware(cuda=True, gpu_name=card.label, bf16=card.bf16, gpu_memory_gib=card.memory_gib, gpu_count=1)


@lru_cache(maxsize=None)
def trainer_sizes(method: str, card: Card) -> dict[str, Any]:
    """Batch, length, checkpointing and optimizer bytes of the GPU profile on ``card`` (utils.training_settings)."""
    config = training_config("gpu", method, hardware=_hardware(card))
    return {"batch_size": int(config["per_device_train_batch_size"]), "seq_len": int(config["max_length"]),
            "activation_checkpointing": bool(config["activation_checkpointing"]),
            "optimizer_bytes_per_param": 2 if "8bit" in str(config["optim"]) else 8, "optim": config["optim"]}


def _method(record: dict[str, Any]) -> str:
    """``qlora`` for a quantized model, else ``lora``."""
    return "qlora" if record.get("quantization") else "lora"


def _optimizer_bytes_per_param(loop: str, optimizer_class: str, method: str, card: Card) -> int:
    """Optimizer state bytes per trained parameter on ``card``: the GPU profile's optimizer for a Trainer run."""
    if loop == "trainer":
        return trainer_sizes(method, card)["optimizer_bytes_per_param"]
    return 2 if "8bit" in optimizer_class.lower() else 8


@dataclass
class MomentCost:
    """The priced bytes of one traced moment, by component."""

    snapshot: int
    event: str
    cell: int
    source: str
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Sum of all components, in bytes."""
        return sum(self.parts.values())


def price_snapshot(snapshot: dict[str, Any], card: Card, index: int = 0) -> MomentCost:
    """Bytes one traced moment would need with Phi-3-mini on ``card``."""
    config = target_config()
    cost = MomentCost(index, snapshot["event"], snapshot.get("cell", 0), snapshot.get("source", ""))
    parts = cost.parts
    models = {record["serial"]: record for record in snapshot.get("models", [])}
    trained = set(snapshot.get("models_trained", [])) if snapshot["event"] == "train" else set()
    weights = adapters = gradients = 0.0
    for record in models.values():
        unique = 1.0 - record["base_shared_bytes"] / record["base_bytes"] if record["base_bytes"] else 0.0
        if record.get("quantization"):
            prepared = bool(record.get("kbit_prepared") or record.get("trained") or record["serial"] in trained)
            weights += unique * quantized_weight_bytes(record["quantization"], prepared, config)
        else:
            weights += unique * full_weight_bytes(config)
        adapters += scaled_adapter_parameters(record.get("adapter_by_target", {}), record["config"], config) \
            * ADAPTER_BYTES
        if record["serial"] not in trained:  # gradients left behind outside a training step
            grads = {k: v for k, v in record.get("grad_by_target", {}).items() if k != "base"}
            gradients += scaled_adapter_parameters(grads, record["config"], config) * ADAPTER_BYTES
    parts["model weights"] = weights
    parts["LoRA adapters"] = adapters
    if gradients:
        parts["gradients left"] = gradients
    optimizer_states = 0.0
    for optimizer in snapshot.get("optimizers", []):
        owners = [models[s] for s in optimizer.get("models", []) if s in models]
        if not owners:  # (at a first step the new optimizer has no state yet: any listed here is an older one)
            continue
        per_param = _optimizer_bytes_per_param(optimizer.get("loop", "custom"), optimizer.get("class", ""),
                                               _method(owners[0]), card)
        numel = {k: v for k, v in optimizer.get("numel_by_target", {}).items() if k not in ("base", "unowned")}
        optimizer_states += scaled_adapter_parameters(numel, owners[0]["config"], config) * per_param
    if optimizer_states:
        parts["optimizer states alive"] = optimizer_states
    event = snapshot["event"]
    if event == "train":
        for serial in trained:
            record = models.get(serial)
            if record is None:
                continue
            method = _method(record)
            if snapshot.get("loop") == "trainer":
                sizes = trainer_sizes(method, card)
            else:
                sizes = {"batch_size": CUSTOM_LOOP_BATCH, "seq_len": CUSTOM_LOOP_SEQ_LEN,
                         "activation_checkpointing": CUSTOM_LOOP_CHECKPOINTING}
            per_param = _optimizer_bytes_per_param(snapshot.get("loop", "custom"), snapshot.get("optimizer", ""),
                                                   method, card)
            estimate = estimate_training_memory(config, method=method, seq_len=sizes["seq_len"],
                                                batch_size=sizes["batch_size"], compute_bytes=COMPUTE_BYTES,
                                                activation_checkpointing=sizes["activation_checkpointing"])
            trainable = {k: v for k, v in record.get("trainable_by_target", {}).items() if k != "base"}
            adapter = scaled_adapter_parameters(trainable, record["config"], config)
            parts["activations (training)"] = parts.get("activations (training)", 0.0) + estimate.activations
            parts["logits (training)"] = parts.get("logits (training)", 0.0) + estimate.logits
            parts["adapter gradients"] = parts.get("adapter gradients", 0.0) + adapter * ADAPTER_BYTES
            parts["optimizer states"] = parts.get("optimizer states", 0.0) + adapter * per_param
    elif event == "forward":
        tokens = int(snapshot["tokens"])
        if snapshot.get("grad"):  # a forward pass that keeps its graph (not a training step)
            estimate = estimate_training_memory(config, seq_len=int(snapshot["length"]),
                                                batch_size=int(snapshot["batch"]), compute_bytes=COMPUTE_BYTES)
            parts["activations (forward)"] = estimate.activations
            parts["logits (forward)"] = estimate.logits
        else:
            parts["activations (forward)"] = activation_bytes_per_layer(config, tokens, COMPUTE_BYTES)
            parts["logits (forward)"] = tokens * config.vocab_size * (COMPUTE_BYTES + 4)
    elif event == "generate":
        sequences = int(snapshot["batch"]) * max(int(snapshot.get("num_beams", 1)),
                                                 int(snapshot.get("num_return_sequences", 1)))
        length = int(snapshot["prompt"]) + int(snapshot["max_new_tokens"])
        parts["KV cache"] = sequences * length * kv_cache_bytes_per_token(config, COMPUTE_BYTES)
        parts["activations (prefill)"] = activation_bytes_per_layer(config, sequences * int(snapshot["prompt"]),
                                                                    COMPUTE_BYTES)
        parts["logits (one step)"] = sequences * config.vocab_size * (COMPUTE_BYTES + 4)
    parts["CUDA context and allocator"] = CUDA_OVERHEAD_GIB * GIB
    return cost


@dataclass
class NotebookPeak:
    """The largest priced moment of one notebook on one card."""

    notebook: str
    card: Card
    peak: MomentCost

    @property
    def gib(self) -> float:
        """The peak in GiB."""
        return self.peak.total / GIB

    @property
    def fits(self) -> bool:
        """True when the peak fits the card's memory."""
        return self.gib <= self.card.memory_gib

    def describe(self) -> str:
        """One line: the peak, where it happens and its largest parts."""
        parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in
                          sorted(self.peak.parts.items(), key=lambda item: -item[1]) if value >= 0.01 * GIB)
        return (f"{self.notebook}: {self.gib:.2f} GiB of {self.card.memory_gib:.2f} on a {self.card.label} at "
                f"code cell {self.peak.cell} ({self.peak.event}, cell starts {self.peak.source!r}); GiB: {parts}")


def read_trace(path: str | Path) -> dict[str, Any]:
    """A trace written by tests/support/memory_trace.py; a clear error if it is not one."""
    path = Path(path)
    try:
        trace = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable memory trace ({error}); rerun the notebook under pytest.") from None
    if "snapshots" not in trace:
        raise ValueError(f"{path} has no 'snapshots': not a memory trace from tests/support/memory_trace.py.")
    return trace


def notebook_peak(trace: dict[str, Any], card: Card) -> NotebookPeak:
    """The most expensive moment of a traced notebook on ``card``."""
    snapshots = trace["snapshots"]
    if not snapshots:
        raise ValueError(f"The trace of {trace.get('notebook')} holds no snapshot: did the notebook run any cell?")
    costs = [price_snapshot(snapshot, card, index) for index, snapshot in enumerate(snapshots)]
    return NotebookPeak(trace.get("notebook") or "?", card, max(costs, key=lambda cost: cost.total))


def trace_files(folder: str | Path) -> list[Path]:
    """The notebook traces in ``folder`` (``NN_name.json``), in series order."""
    return sorted(Path(folder).glob("[0-9][0-9]_*.json"))


def budget_table(traces: list[dict[str, Any]], cards: tuple[Card, ...] = CARDS) -> str:
    """A markdown table: one row per notebook, peak GiB and whether it fits on each card."""
    header = "| notebook | " + " | ".join(f"{card.label} ({card.memory_gib:.2f} GiB)" for card in cards) + " |"
    lines = [header, "|---|" + "---|" * len(cards)]
    for trace in traces:
        cells = []
        for card in cards:
            peak = notebook_peak(trace, card)
            cells.append(f"{peak.gib:.1f} {'fits' if peak.fits else '**does not fit**'}")
        lines.append(f"| {trace.get('notebook')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the budget table for the traces in a folder; exit status 1 if a notebook does not fit a T4."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get(TRACE_ENV_VAR) or str(REPO_ROOT / "outputs" / "smoke" / "memory-trace")
    parser.add_argument("folder", nargs="?", default=default, help=f"trace folder (default: {default})")
    parser.add_argument("--details", action="store_true", help="also print where each peak happens on a T4")
    args = parser.parse_args(argv)
    files = trace_files(args.folder)
    if not files:
        parser.error(f"No notebook traces (NN_name.json) in {args.folder}: run `make test` (or pytest on the "
                     "notebooks) first; it writes them there.")
    traces = [read_trace(path) for path in files]
    print(f"Estimated peak GPU memory (GiB) with Phi-3-mini, CUDA context included; traces from {args.folder}\n")
    print(budget_table(traces))
    peaks = [notebook_peak(trace, T4) for trace in traces]
    if args.details:
        print()
        for peak in peaks:
            print(peak.describe())
    return 0 if all(peak.fits for peak in peaks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
