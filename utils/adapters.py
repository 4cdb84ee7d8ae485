"""PEFT LoRA adapters: wrap a model for training, then find, attach, merge and save trained ones.

Training side: :func:`add_lora_adapter` checks that every target name matches a layer
(:func:`check_target_modules`) and wraps the model with a seeded LoRA. Inference side: a saved adapter
is found (:func:`require_adapter`), checked against the loaded base (:func:`check_adapter_base`),
attached frozen, switched on and off (:func:`adapter_in_use`), merged into full-precision weights and
saved with every stop id for any server (:func:`save_merged`). LoRA written by hand with ``loralib``
is :mod:`utils.loralib_tools`.
"""

from __future__ import annotations

import copy
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from utils.atomic import MANIFEST, atomic_folder, manifest_problem, safetensors_problem, target_lock
from utils.generation import stop_token_ids
from utils.models import sharded_by_accelerate
from utils.phi3 import PHI3_LORA_TARGETS
from utils.training_settings import build_lora_config

# bitsandbytes' quantized linear layers, by class name (matching by name needs no bitsandbytes import).
QUANTIZED_LINEAR_CLASSES = ("Linear4bit", "Linear8bitLt")


# --- training: wrap a model with a new adapter ---------------------------------------------------

def check_target_modules(model: Any, targets: list[str]) -> dict[str, int]:
    """How many layers each target name matches; raises if one matches nothing (a typo or another architecture)."""
    linear_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) or type(module).__name__ in QUANTIZED_LINEAR_CLASSES}
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


# --- inference: find, attach, merge, save ---------------------------------------------------------

def require_adapter(folder: Path, written_by: str) -> Path:
    """The adapter folder with complete weights, or a clear error that names the notebook which writes it.

    Complete: every file its manifest lists has the recorded size, and the safetensors header agrees with
    the file's length (a save cut short by a crash is refused instead of loading half the weights).
    """
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"No PEFT adapter in {folder} (adapter_config.json is missing): run {written_by} first; it trains "
            f"the adapter and saves it there (with the same PHI3_LORA_MODEL and PHI3_LORA_OUTPUTS as this notebook)."
        )
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        problem = f"{weights.name} is missing"
    elif (folder / MANIFEST).is_file() and (folder / MANIFEST).stat().st_mtime >= weights.stat().st_mtime:
        problem = manifest_problem(folder)
    else:  # written by PEFT itself (or over a saved one): the safetensors header says how long the file must be
        problem = safetensors_problem(weights)
    if problem:
        raise FileNotFoundError(f"The adapter in {folder} is incomplete ({problem}), so its save was interrupted: "
                                f"run {written_by} again to write it afresh.")
    return folder


def check_adapter_base(folder: Path, model: PreTrainedModel) -> None:
    """Refuse an adapter that was trained on another base model than the one loaded (e.g. tiny vs smol)."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    trained_on = str(config.get("base_model_name_or_path") or "")
    loaded = str(getattr(model, "name_or_path", "") or model.config._name_or_path)
    if trained_on and Path(trained_on.rstrip("/")).name != Path(loaded.rstrip("/")).name:
        raise ValueError(f"The adapter in {folder} was trained on {trained_on!r}, but the loaded model is "
                         f"{loaded!r}. Set PHI3_LORA_MODEL to the model the adapter was trained on, or retrain it.")


def attach_adapter(model: PreTrainedModel, folder: Path, adapter_name: str = "default") -> Any:
    """Wrap a base model with a saved adapter (frozen, for inference); a second call adds another adapter."""
    check_adapter_base(folder, model)
    if isinstance(model, PeftModel):
        model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=False)
        return model
    return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=False)


@contextmanager
def adapter_in_use(peft_model: Any, adapter_name: str | None) -> Iterator[Any]:
    """Run a block with one named adapter active, or with none (``None``: the base model alone)."""
    if adapter_name is None:
        with peft_model.disable_adapter():
            yield peft_model
    else:
        peft_model.set_adapter(adapter_name)
        yield peft_model


def quantized_modules(model: torch.nn.Module) -> list[str]:
    """Names of bitsandbytes 4-bit / 8-bit linear layers in a model (empty for a 16/32-bit model)."""
    return [name for name, module in model.named_modules() if type(module).__name__ in QUANTIZED_LINEAR_CLASSES]


def merge_adapter(peft_model: Any) -> PreTrainedModel:
    """Fold the active adapter into the base weights (W + B·A·alpha/r) and return the plain model.

    The base must hold 16/32-bit weights, also for a QLoRA adapter: merging into 4-bit weights would
    re-quantize W + B·A and round most of the small update away.
    """
    quantized = [n for n in quantized_modules(peft_model.get_base_model()) if "lora" not in n]
    if quantized:
        raise ValueError(
            f"The base model holds quantized layers ({quantized[0]}, ...). Load the base without a "
            "quantization_config (bf16/fp16 on a GPU, fp32 on a CPU), attach the QLoRA adapter to it, then merge."
        )
    return peft_model.merge_and_unload(progressbar=True)  # peft's bar, one step per adapted layer


def serving_chat_template(template: str) -> str:
    """The chat template without the training-only ``{% generation %}`` markers (same text, any Jinja engine)."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """Save a merged model with its tokenizer; its generation config lists every stop id, for any server."""
    folder = Path(folder)
    stops = stop_token_ids(tokenizer, model)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    serving = copy.deepcopy(tokenizer)
    if serving.chat_template:
        serving.chat_template = serving_chat_template(serving.chat_template)
    with target_lock(folder), atomic_folder(folder, {"what": "merged model"}) as staging:
        model.save_pretrained(staging)  # the old folder stays until this one is complete
        serving.save_pretrained(staging)
    return folder
