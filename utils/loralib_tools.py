"""LoRA from first principles with Microsoft's ``loralib``, on Phi-3: layer swap, checkpoints, PEFT bridge.

LoRA keeps a pretrained weight ``W0`` (out x in) frozen and learns a low-rank update::

    W = W0 + (alpha / r) * B @ A        A: r x in (random), B: out x r (zeros, so W == W0 at step 0)

What this module adds to ``loralib``:

* :func:`add_lora` swaps Phi-3's projections for ``loralib`` layers, re-using the pretrained weights
  (no copy). The fused ``qkv_proj`` gets an update on the q and v slices only; when grouped-query
  attention makes the slices unequal (q wider than k and v), ``lora.MergedLinear`` splits in the
  wrong places, so :class:`SlicedMergedLinear` (same parameters, same ``lora_`` names) is used.
* :func:`expected_lora_parameters`: the trainable-parameter count as a formula, per module.
* :func:`save_lora_checkpoint` / :func:`load_lora_checkpoint`: ``lora_state_dict`` as safetensors, and a
  ``strict=False`` load that refuses to lose work silently (:class:`LoraCheckpointError` and subclasses).
* :func:`export_to_peft`: the same weights as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import loralib as lora
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from utils.atomic import atomic_file, atomic_folder, safetensors_problem, target_lock
from utils.phi3 import PHI3_LORA_TARGETS, QKV_NAMES, projection_shapes, qkv_widths, uses_grouped_query_attention

LORA_MARKER = "lora_"  # loralib's rule: a parameter is a LoRA parameter iff its name contains this
SETTINGS_METADATA_KEY = "loralib_settings"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


# --------------------------------------------------------------------------------------------------
# Settings and the parameter-count formula
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSettings:
    """What to adapt and how: rank, alpha, dropout, target projections, q/k/v slices, embedding."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = PHI3_LORA_TARGETS
    qkv_slices: tuple[bool, bool, bool] = (True, False, True)  # q, k, v: q and v as in the LoRA paper
    embedding: bool = False  # also put lora.Embedding on the token embedding

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r}.")
        unknown = set(self.targets) - set(PHI3_LORA_TARGETS)
        if unknown:
            raise ValueError(f"Unknown Phi-3 target modules {sorted(unknown)}; valid: {list(PHI3_LORA_TARGETS)}.")
        if len(self.qkv_slices) != 3 or ("qkv_proj" in self.targets and not any(self.qkv_slices)):
            raise ValueError(f"qkv_slices must be three booleans (q, k, v), at least one True; got {self.qkv_slices}.")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "qkv_slices", tuple(bool(s) for s in self.qkv_slices))

    @property
    def scaling(self) -> float:
        """The factor alpha / r that multiplies B @ A."""
        return self.alpha / self.r

    def to_json(self) -> str:
        """The settings as JSON (stored in the checkpoint's metadata)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LoraSettings":
        """Settings read back from :meth:`to_json`."""
        return cls(**json.loads(text))


def expected_lora_parameters(config: Any, settings: LoraSettings) -> dict[str, int]:
    """Trainable LoRA parameters per module kind over all layers, from the formula r * (in + out).

    A merged layer with ``n`` enabled slices has A: (r * n) x in and B: (rows of the enabled slices) x r.
    ``lora.Embedding`` has A: r x vocabulary and B: hidden x r.
    """
    shapes = projection_shapes(config)
    layers = config.num_hidden_layers
    counts: dict[str, int] = {}
    for target in settings.targets:
        fan_in, fan_out = shapes[target]
        if target == "qkv_proj":
            enabled = [w for w, on in zip(qkv_widths(config), settings.qkv_slices) if on]
            counts[target] = layers * settings.r * (len(enabled) * fan_in + sum(enabled))
        else:
            counts[target] = layers * settings.r * (fan_in + fan_out)
    if settings.embedding:
        counts["embed_tokens"] = settings.r * (config.vocab_size + config.hidden_size)
    return counts


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of a model; shared (tied) tensors are counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class SlicedMergedLinear(lora.MergedLinear):
    """``lora.MergedLinear`` for a fused projection whose slices have unequal widths (GQA's q, k, v).

    loralib assumes ``out_features / len(enable_lora)`` rows per slice. Here each enabled slice ``s`` gets
    its own pair ``A_s`` (r x in) and ``B_s`` (width_s x r), stored stacked exactly as loralib stores them
    (``lora_A``: (r * enabled) x in, ``lora_B``: (rows of enabled slices) x r), so ``lora_state_dict``,
    ``mark_only_lora_as_trainable``, dropout and the merge on ``eval()`` all work unchanged.
    With equal widths it computes exactly what ``lora.MergedLinear`` computes.
    """

    def __init__(
        self,
        in_features: int,
        slice_widths: Iterable[int],
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: Iterable[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        self.slice_widths = [int(w) for w in slice_widths]
        enable_lora = [bool(e) for e in enable_lora]
        if len(enable_lora) != len(self.slice_widths):
            raise ValueError(f"enable_lora has {len(enable_lora)} entries but there are {len(self.slice_widths)} slices.")
        nn.Linear.__init__(self, in_features, sum(self.slice_widths), **kwargs)
        lora.LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                merge_weights=merge_weights)
        self.enable_lora = enable_lora
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0 and any(enable_lora):
            enabled_rows = sum(w for w, on in zip(self.slice_widths, enable_lora) if on)
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * sum(enable_lora), in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((enabled_rows, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
            self.lora_ind = torch.cat([torch.full((w,), on, dtype=torch.bool, device=self.weight.device)
                                       for w, on in zip(self.slice_widths, enable_lora)])
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    def merge_AB(self) -> torch.Tensor:  # noqa: N802 (loralib's name)
        """The update B @ A for the enabled slices, zero rows elsewhere (out x in, or in x out)."""
        widths = [w for w, on in zip(self.slice_widths, self.enable_lora) if on]
        b_blocks = self.lora_B.split(widths, dim=0)
        a_blocks = self.lora_A.split(self.r, dim=0)
        delta = torch.cat([b @ a for b, a in zip(b_blocks, a_blocks)], dim=0)
        padded = self.zero_pad(delta)
        return padded.transpose(0, 1) if self.fan_in_fan_out else padded


def merged_linear_rows(out_features: int, enable_lora: Iterable[bool]) -> torch.Tensor:
    """The rows that ``lora.MergedLinear`` updates: it assumes equal slices of out / len(enable_lora)."""
    enable_lora = list(enable_lora)
    if out_features % len(enable_lora):
        raise ValueError(f"lora.MergedLinear refuses this layer: {out_features} rows do not split into "
                         f"{len(enable_lora)} equal slices (its assertion 'The length of enable_lora must divide "
                         f"out_features').")
    width = out_features // len(enable_lora)
    return torch.cat([torch.full((width,), bool(on)) for on in enable_lora])


def sliced_rows(slice_widths: Iterable[int], enable_lora: Iterable[bool]) -> torch.Tensor:
    """The rows that should be updated: all rows of every enabled slice, whatever the widths."""
    return torch.cat([torch.full((int(w),), bool(on)) for w, on in zip(slice_widths, enable_lora)])


def merged_slice_widths(layer: lora.MergedLinear) -> list[int]:
    """Rows per slice of a merged layer: its own widths (ours), or loralib's equal split."""
    slices = len(layer.enable_lora)
    return list(getattr(layer, "slice_widths", None) or [layer.out_features // slices] * slices)


def _new_lora_parameters(layer: nn.Module, device: torch.device, dtype: torch.dtype, a_init: str) -> None:
    """Give a layer built on the meta device real LoRA tensors, initialised as loralib does."""
    layer.lora_A = nn.Parameter(torch.empty(layer.lora_A.shape, device=device, dtype=dtype))
    layer.lora_B = nn.Parameter(torch.empty(layer.lora_B.shape, device=device, dtype=dtype))
    if a_init == "kaiming":  # Linear / MergedLinear: A random, B zero
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
        nn.init.zeros_(layer.lora_B)
    else:  # Embedding: A zero, B normal
        nn.init.zeros_(layer.lora_A)
        nn.init.normal_(layer.lora_B)
    if isinstance(layer, lora.MergedLinear):  # the row mask was built on the meta device too
        layer.lora_ind = sliced_rows(merged_slice_widths(layer), layer.enable_lora).to(device)


def _adopt_base_weights(layer: nn.Module, base: nn.Module) -> None:
    """Re-use the pretrained weight (and bias) Parameters in the new layer: no copy, ties preserved."""
    layer.weight = base.weight
    layer.weight.requires_grad = False
    if getattr(base, "bias", None) is not None:
        layer.bias = base.bias


def linear_with_lora(base: nn.Linear, settings: LoraSettings, adapter_dtype: torch.dtype | None = None) -> lora.Linear:
    """A ``lora.Linear`` around a pretrained ``nn.Linear`` (same weight Parameter, B = 0)."""
    with torch.device("meta"):
        layer = lora.Linear(base.in_features, base.out_features, r=settings.r, lora_alpha=settings.alpha,
                            lora_dropout=settings.dropout, bias=base.bias is not None)
    _adopt_base_weights(layer, base)
    _new_lora_parameters(layer, base.weight.device, adapter_dtype or base.weight.dtype, "kaiming")
    return layer


def qkv_with_lora(base: nn.Linear, widths: tuple[int, int, int], settings: LoraSettings,
                  adapter_dtype: torch.dtype | None = None) -> lora.MergedLinear:
    """LoRA on the enabled q/k/v slices of a fused ``qkv_proj``: loralib's class if widths are equal, else ours."""
    if sum(widths) != base.out_features:
        raise ValueError(f"qkv widths {widths} add up to {sum(widths)}, but qkv_proj has {base.out_features} rows.")
    kwargs = dict(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                  enable_lora=list(settings.qkv_slices), bias=base.bias is not None)
    with torch.device("meta"):
        if len(set(widths)) == 1:
            layer = lora.MergedLinear(base.in_features, base.out_features, **kwargs)
        else:
            layer = SlicedMergedLinear(base.in_features, widths, **kwargs)
    _adopt_base_weights(layer, base)
    _new_lora_parameters(layer, base.weight.device, adapter_dtype or base.weight.dtype, "kaiming")
    return layer


def embedding_with_lora(base: nn.Embedding, settings: LoraSettings, *, tied: bool,
                        adapter_dtype: torch.dtype | None = None) -> lora.Embedding:
    """A ``lora.Embedding`` around the token embedding; with tied weights it never merges (see below).

    When the embedding shares its weight with the LM head (``tie_word_embeddings``), loralib's merge on
    ``eval()`` would add the update to the head as well, so ``merge_weights=False`` keeps it separate.
    """
    with torch.device("meta"):
        layer = lora.Embedding(base.num_embeddings, base.embedding_dim, r=settings.r, lora_alpha=settings.alpha,
                               padding_idx=base.padding_idx, merge_weights=not tied)
    _adopt_base_weights(layer, base)
    _new_lora_parameters(layer, base.weight.device, adapter_dtype or base.weight.dtype, "normal")
    return layer


def conv2d_with_lora(base: nn.Conv2d, r: int, alpha: float) -> lora.Conv2d:
    """A ``lora.Conv2d`` that holds a copy of a pretrained square-kernel, ungrouped ``nn.Conv2d``.

    Note: loralib keeps the convolution as a child, so its weight key becomes ``<name>.conv.weight``.
    """
    kernel = base.kernel_size[0]
    if base.kernel_size != (kernel, kernel) or base.groups != 1:
        raise ValueError(f"lora.Conv2d needs a square kernel and groups=1; got kernel {base.kernel_size}, "
                         f"groups {base.groups}.")
    layer = lora.Conv2d(base.in_channels, base.out_channels, kernel, r=r, lora_alpha=alpha, stride=base.stride,
                        padding=base.padding, dilation=base.dilation, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
    layer.conv.load_state_dict(base.state_dict())
    return layer


@dataclass
class LoraReport:
    """What :func:`add_lora` did: which modules became which loralib class, and why."""

    wrapped: dict[str, str] = field(default_factory=dict)  # module name -> class name
    qkv_widths: tuple[int, int, int] | None = None
    grouped_query_attention: bool = False
    note: str = ""

    def classes(self) -> Counter:
        """How many modules of each loralib class were created."""
        return Counter(self.wrapped.values())


def add_lora(model: nn.Module, settings: LoraSettings, adapter_dtype: torch.dtype | None = torch.float32) -> LoraReport:
    """Swap the target projections of a Phi-3 model for loralib layers, in place; base weights are re-used.

    ``adapter_dtype``: dtype of A and B (fp32 by default, so a 16-bit base trains its adapters in fp32
    under autocast; ``None`` follows the base weight). Seed the global RNG first: A is random.
    """
    config = model.config
    report = LoraReport()
    if "qkv_proj" in settings.targets:
        report.qkv_widths = qkv_widths(config)
        report.grouped_query_attention = uses_grouped_query_attention(config)
        enabled = "+".join(n for n, on in zip(QKV_NAMES, settings.qkv_slices) if on)
        if report.grouped_query_attention:
            report.note = (f"GQA: q/k/v have {report.qkv_widths} rows, so lora.MergedLinear (equal slices of "
                           f"{sum(report.qkv_widths) // 3}) would split in the wrong places; SlicedMergedLinear "
                           f"adapts exactly the {enabled} rows.")
        else:
            report.note = f"q/k/v have equal widths {report.qkv_widths}: loralib's own MergedLinear adapts {enabled}."
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in settings.targets or not isinstance(module, nn.Linear) or isinstance(module, lora.LoRALayer):
            continue
        if type(module) is not nn.Linear:  # e.g. bitsandbytes' Linear4bit: packed weights loralib cannot use
            raise TypeError(f"{name} is a {type(module).__name__}, not a plain nn.Linear: loralib needs full-precision "
                            f"weights. Load the model without quantization_config, or use PEFT for QLoRA (notebook 04).")
        if leaf == "qkv_proj":
            new = qkv_with_lora(module, report.qkv_widths, settings, adapter_dtype)
        else:
            new = linear_with_lora(module, settings, adapter_dtype)
        model.set_submodule(name, new)
        report.wrapped[name] = type(new).__name__
    if settings.embedding:
        embed_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        tied = bool(getattr(config, "tie_word_embeddings", False))
        new = embedding_with_lora(model.get_input_embeddings(), settings, tied=tied, adapter_dtype=adapter_dtype)
        model.set_submodule(embed_name, new)
        report.wrapped[embed_name] = type(new).__name__
    if not report.wrapped:
        raise ValueError(f"No module named {list(settings.targets)} was found: is this a Phi-3 model "
                         f"(fused qkv_proj / gate_up_proj)? Model type: {getattr(config, 'model_type', '?')}.")
    return report


def lora_layers(model: nn.Module) -> dict[str, lora.LoRALayer]:
    """Every loralib layer with a rank above zero, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, lora.LoRALayer) and m.r > 0}


def dropout_probability(layer: lora.LoRALayer) -> float:
    """loralib's dropout on the LoRA input (an ``nn.Dropout``, or an identity function when 0)."""
    return float(layer.lora_dropout.p) if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


# --------------------------------------------------------------------------------------------------
# Checkpoints: save, and a strict=False load that cannot lose work silently
# --------------------------------------------------------------------------------------------------


class LoraCheckpointError(RuntimeError):
    """A LoRA checkpoint does not fit the model it is being loaded into."""


class MissingLoraKeysError(LoraCheckpointError):
    """The checkpoint lacks LoRA tensors that the model has: they would keep their fresh initial values."""


class UnexpectedKeysError(LoraCheckpointError):
    """The checkpoint holds tensors the model has no place for: strict=False would silently drop them."""


class LoraShapeMismatchError(LoraCheckpointError):
    """A tensor's shape differs between checkpoint and model (another rank, model size or q/k/v split)."""


class LoraAlreadyMergedError(LoraCheckpointError):
    """The model ran ``eval()`` before loading: loralib already merged B @ A, so new weights would be ignored."""


def _preview(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "the state dict") -> None:
    """Raise unless ``load_state_dict(state_dict, strict=False)`` would miss exactly the frozen base weights.

    Rules: no unexpected keys; every ``lora_`` tensor of the model present; no shape differences; no loralib
    layer already merged (``eval()`` called before the load). Base weights may be missing: they come from
    the pretrained checkpoint.
    """
    if not state_dict:
        raise LoraCheckpointError(f"{source} is empty: nothing to load. Was it saved with lora.lora_state_dict(model) "
                                  f"on a model that had loralib layers?")
    model_state = model.state_dict()
    unexpected = set(state_dict) - set(model_state)
    if unexpected:
        hint = ""
        if any(k.startswith("base_model.model.") for k in unexpected):
            hint = " These look like PEFT keys: load that folder with PeftModel.from_pretrained instead."
        raise UnexpectedKeysError(
            f"{source} has {len(unexpected)} key(s) the model does not have, which strict=False would silently "
            f"ignore: {_preview(unexpected)}. Wrap the model with the same LoraSettings (targets, embedding) it was "
            f"trained with before loading.{hint}")
    missing_lora = {k for k in model_state if LORA_MARKER in k} - set(state_dict)
    if missing_lora:
        raise MissingLoraKeysError(
            f"{source} lacks {len(missing_lora)} LoRA tensor(s) that the model has: {_preview(missing_lora)}. They "
            f"would keep their random initial values. Wrap the model with the settings the checkpoint was trained "
            f"with (fewer targets?), or save it again with lora.lora_state_dict(model).")
    mismatched = {k: (tuple(v.shape), tuple(model_state[k].shape)) for k, v in state_dict.items()
                  if tuple(v.shape) != tuple(model_state[k].shape)}
    if mismatched:
        details = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in sorted(mismatched.items())[:3])
        raise LoraShapeMismatchError(
            f"{source} has {len(mismatched)} tensor(s) whose shape differs from the model's: {details}. The rank r, "
            f"the enabled q/k/v slices or the base model differ from the ones used in training.")
    merged = [n for n, m in lora_layers(model).items() if m.merged]
    if merged:
        raise LoraAlreadyMergedError(
            f"{len(merged)} loralib layer(s) are merged ({_preview(merged, 2)}): model.eval() was called before "
            f"loading, so loralib already added B @ A into the base weights and would ignore the loaded A and B "
            f"(and later subtract the wrong update on train()). Load into a model in train mode, then call eval().")


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "the state dict") -> None:
    """Check with :func:`check_lora_state_dict`, then ``load_state_dict(strict=False)``; raises on any surprise."""
    check_lora_state_dict(model, state_dict, source)
    result = model.load_state_dict(dict(state_dict), strict=False)
    if result.unexpected_keys or any(LORA_MARKER in k for k in result.missing_keys):  # the check above guarantees it
        raise LoraCheckpointError(f"Loading {source} left LoRA keys unmatched: {result}")


def save_lora_checkpoint(model: nn.Module, path: str | Path, settings: LoraSettings | None = None) -> Path:
    """Save ``lora.lora_state_dict(model)`` as safetensors (the settings go into the file's metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora.lora_state_dict(model).items()}
    if not tensors:
        raise ValueError("The model has no LoRA parameters to save: call add_lora(model, settings) first.")
    metadata = {"format": "pt"}
    if settings is not None:
        metadata[SETTINGS_METADATA_KEY] = settings.to_json()
    with atomic_file(path) as temporary:  # a kill mid-write leaves the previous file whole
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def read_lora_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a LoRA checkpoint: safetensors, or a ``torch.save`` file with ``weights_only=True`` (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No LoRA checkpoint at {path}: run the training cells (or notebook 02) first.")
    if path.suffix == ".safetensors":
        problem = safetensors_problem(path)
        if problem:
            raise LoraCheckpointError(f"{problem}: its save was interrupted. Run the training cells (or notebook 02) "
                                      f"again to write it afresh.")
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoraCheckpointError(f"{path} does not hold a flat dict of tensors (what lora.lora_state_dict returns).")
    return state


def read_lora_settings(path: str | Path) -> LoraSettings:
    """The :class:`LoraSettings` stored in a safetensors checkpoint's metadata."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if SETTINGS_METADATA_KEY not in metadata:
        raise LoraCheckpointError(f"{path} has no {SETTINGS_METADATA_KEY!r} metadata: pass the LoraSettings it was "
                                  f"trained with yourself.")
    return LoraSettings.from_json(metadata[SETTINGS_METADATA_KEY])


def load_lora_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Read a LoRA checkpoint file and load it with every check of :func:`load_lora_state_dict`."""
    load_lora_state_dict(model, read_lora_checkpoint(path), source=str(path))


# --------------------------------------------------------------------------------------------------
# Bridge to the ecosystem: a loralib model as a PEFT adapter folder
# --------------------------------------------------------------------------------------------------


def peft_tensors(model: nn.Module, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """The loralib weights under the names PEFT saves (``...qkv_proj.lora_A.weight``), as PEFT LoRA tensors.

    ``lora.Linear`` maps one to one. A merged layer (n enabled slices of rank r) becomes one full-width
    LoRA of rank n * r: A is loralib's stacked A; B is block-structured, slice s's rows holding B_s in
    columns s*r:(s+1)*r and zeros elsewhere (all zeros on the k rows), so B @ A equals loralib's update.
    ``lora.Embedding`` maps to ``lora_embedding_A`` / ``lora_embedding_B``.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        key = f"{prefix}{name}"
        if isinstance(layer, lora.Embedding):
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = a, b
            continue
        if isinstance(layer, lora.MergedLinear):
            widths = merged_slice_widths(layer)
            full_b = b.new_zeros((layer.out_features, a.shape[0]))
            rows = torch.cumsum(torch.tensor([0, *widths]), 0).tolist()
            b_blocks = iter(b.split([w for w, on in zip(widths, layer.enable_lora) if on], dim=0))
            column = 0
            for s, on in enumerate(layer.enable_lora):
                if on:
                    full_b[rows[s]:rows[s + 1], column:column + layer.r] = next(b_blocks)
                    column += layer.r
            b = full_b
        elif not isinstance(layer, lora.Linear):
            raise NotImplementedError(f"{name}: {type(layer).__name__} has no PEFT counterpart in this bridge.")
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def peft_config_for(model: nn.Module, base_model_name_or_path: str | None = None) -> LoraConfig:
    """A ``peft.LoraConfig`` whose per-module rank and alpha give each layer loralib's own scale alpha / r."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no loralib layers to export.")
    ranks, alphas, fan_in_fan_out, dropouts = {}, {}, set(), set()
    for name, layer in layers.items():
        slices = sum(layer.enable_lora) if isinstance(layer, lora.MergedLinear) else 1
        ranks[name], alphas[name] = layer.r * slices, layer.lora_alpha * slices  # same alpha / r as loralib
        if not isinstance(layer, lora.Embedding):  # PEFT's embedding LoRA has no dropout, nor has loralib's
            fan_in_fan_out.add(bool(layer.fan_in_fan_out))
            dropouts.add(dropout_probability(layer))
    if len(fan_in_fan_out) > 1 or len(dropouts) > 1:
        raise ValueError(f"PEFT has one fan_in_fan_out and one lora_dropout per adapter; these layers mix "
                         f"fan_in_fan_out {sorted(fan_in_fan_out)} and dropout {sorted(dropouts)}.")
    r, alpha = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0][0]
    leaves = {n.rsplit(".", 1)[-1] for n in layers}
    all_by_leaf = {leaf: {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == leaf} for leaf in leaves}
    every_one = all(all_by_leaf[leaf] <= set(layers) for leaf in leaves)
    targets = sorted(leaves) if every_one else sorted(layers)
    rank_pattern, alpha_pattern = {}, {}
    for leaf in sorted(leaves):  # one pattern per module kind when all its layers agree, else per module
        names = [n for n in layers if n.rsplit(".", 1)[-1] == leaf]
        kinds = {(ranks[n], alphas[n]) for n in names}
        for pattern, n in ([(leaf, names[0])] if len(kinds) == 1 else [(n.replace(".", r"\."), n) for n in names]):
            if (ranks[n], alphas[n]) != (r, alpha):
                rank_pattern[pattern], alpha_pattern[pattern] = ranks[n], alphas[n]
    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        lora_dropout=dropouts.pop() if dropouts else 0.0, fan_in_fan_out=fan_in_fan_out.pop() if fan_in_fan_out else False,
        bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path or getattr(model.config, "_name_or_path", None) or None,
    )


def export_to_peft(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.from_pretrained`` loads."""
    out_dir = Path(out_dir)
    config = peft_config_for(model, base_model_name_or_path)
    with target_lock(out_dir), atomic_folder(out_dir, manifest=False) as staging:  # PEFT's two files, no more
        config.save_pretrained(str(staging))  # config and weights appear together, or not at all
        save_file(peft_tensors(model), str(staging / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir
