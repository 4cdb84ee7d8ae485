"""Back-of-the-envelope memory for LoRA and QLoRA training and for batched generation, to plan before you load.

The training estimate counts the big terms: frozen base weights, LoRA weights with their gradients and
AdamW states, saved activations, and the logits (the loss is computed in fp32 over the whole
vocabulary). It is a planning tool, accurate to tens of percent, not a measurement; the training
notebooks print the measured peak next to it. For generation: the KV cache per token and how many prompts
fit in one batched ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from utils.phi3 import PHI3_LORA_TARGETS, projection_shapes, qkv_widths

GIB = 2**30
# What PyTorch reports for a "16 GB" Tesla T4 (Colab's free GPU): the "total capacity" of its out-of-memory
# message and torch.cuda.get_device_properties(0).total_memory; nvidia-smi shows 15,360 MiB. The smallest card
# the series supports: plans without a GPU to ask are made for it.
T4_MEMORY_GIB = 14.74
NF4_BYTES_PER_WEIGHT = 0.516  # 4 bits + one fp8 scale per 64 weights + one fp32 scale per 256 blocks (double quant)
HEADROOM = 1.1  # plans keep 10% free for the allocator's fragmentation and the CUDA context


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes per component of one training step."""

    method: str
    base_weights: float
    adapter_weights: float
    adapter_gradients: float
    optimizer_states: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        """Sum of all components, in bytes."""
        return (self.base_weights + self.adapter_weights + self.adapter_gradients + self.optimizer_states
                + self.activations + self.logits)

    def as_gib(self) -> dict[str, float]:
        """Every component and the total in GiB, for a table."""
        parts = {name: getattr(self, name) for name in
                 ("base_weights", "adapter_weights", "adapter_gradients", "optimizer_states", "activations", "logits")}
        return {**{name: value / GIB for name, value in parts.items()}, "total": self.total / GIB}


def parameter_counts(config) -> dict[str, int]:
    """Parameters of a Phi-3 model by kind: ``linear`` (quantisable projections) and ``other``."""
    linear = sum(i * o for i, o in projection_shapes(config).values()) * config.num_hidden_layers
    embeddings = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else embeddings
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    return {"linear": linear, "other": embeddings + head + norms}


def lora_parameter_count(config, r: int, targets: tuple[str, ...] = PHI3_LORA_TARGETS) -> int:
    """LoRA parameters: r x (in + out) for every targeted projection in every layer."""
    shapes = projection_shapes(config)
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"Unknown Phi-3 target modules {sorted(unknown)}; valid: {sorted(shapes)}")
    return sum(r * (shapes[t][0] + shapes[t][1]) for t in targets) * config.num_hidden_layers


def activation_bytes_per_layer(config, tokens: int, compute_bytes: int = 2) -> float:
    """Tensors one decoder layer saves for backward (or holds at once in a forward pass) for ``tokens`` tokens.

    Per token: ~10 hidden-sized (norms, q/k/v, attention output, residuals) and ~4 intermediate-sized (gate/up
    output, activation, product) tensors in the compute dtype.
    """
    return tokens * (10 * config.hidden_size + 4 * config.intermediate_size) * compute_bytes


def estimate_training_memory(
    config,
    *,
    method: str = "lora",
    r: int = 16,
    targets: tuple[str, ...] = PHI3_LORA_TARGETS,
    seq_len: int = 1024,
    batch_size: int = 1,
    compute_bytes: int = 2,
    activation_checkpointing: bool = False,
    optimizer_bytes_per_param: int = 8,
    prepared_for_kbit: bool = True,
) -> MemoryEstimate:
    """Estimate one training step's memory for ``method`` in ``("lora", "qlora")``.

    ``compute_bytes``: 2 for bf16/fp16 on a GPU, 4 for fp32 on a CPU. QLoRA stores the projections
    in NF4 with double quantisation (~0.516 bytes per weight). ``prepared_for_kbit``: peft's
    ``prepare_model_for_kbit_training`` casts every weight that is not 4-bit (embeddings, Phi-3's untied
    LM head, norms) to fp32, ~0.37 GiB more on Phi-3-mini; sharded QLoRA (FSDP, ZeRO-3) skips that cast.
    ``optimizer_bytes_per_param``: 8 for AdamW's two fp32 moments, 2 for an 8-bit AdamW.
    """
    if method not in ("lora", "qlora"):
        raise ValueError(f"method must be 'lora' or 'qlora', not {method!r}")
    counts = parameter_counts(config)
    linear_bytes = NF4_BYTES_PER_WEIGHT if method == "qlora" else compute_bytes
    other_bytes = 4 if method == "qlora" and prepared_for_kbit else compute_bytes
    base = counts["linear"] * linear_bytes + counts["other"] * other_bytes
    adapter = lora_parameter_count(config, r, targets)
    tokens = seq_len * batch_size
    per_layer = activation_bytes_per_layer(config, tokens, compute_bytes)
    if activation_checkpointing:  # keep only each layer's input; recompute one layer at a time
        activations = tokens * config.hidden_size * compute_bytes * config.num_hidden_layers + per_layer
    else:
        activations = per_layer * config.num_hidden_layers
    logits = tokens * config.vocab_size * (compute_bytes + 4 + 4)  # logits, fp32 upcast, fp32 gradient
    return MemoryEstimate(
        method=method,
        base_weights=base,
        adapter_weights=adapter * 4,  # PEFT keeps adapter weights in fp32
        adapter_gradients=adapter * 4,
        optimizer_states=adapter * optimizer_bytes_per_param,
        activations=activations,
        logits=logits,
    )


def needs_activation_checkpointing(config, budget_bytes: float, **kwargs) -> bool:
    """True when the estimate without checkpointing does not fit in ``budget_bytes`` (with 10% headroom)."""
    estimate = estimate_training_memory(config, activation_checkpointing=False, **kwargs)
    return estimate.total * HEADROOM > budget_bytes


@dataclass(frozen=True)
class BatchPlan:
    """Micro-batch, accumulation and checkpointing that fit a memory budget at a fixed effective batch."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    activation_checkpointing: bool
    estimate_gib: float


def plan_batch(config, budget_bytes: float, *, effective_batch: int = 16, max_micro_batch: int = 4,
               **kwargs) -> BatchPlan:
    """The fastest setting that fits ``budget_bytes``: the largest micro-batch, checkpointing only if needed.

    Tries micro-batches ``max_micro_batch, ..., 1`` (powers of two dividing ``effective_batch``), each first
    without and then with activation checkpointing; the first that fits (with 10% headroom) wins. When
    nothing fits, the smallest setting is returned (micro-batch 1 with checkpointing), for the caller to report.
    """
    candidates = [b for b in (8, 4, 2, 1) if b <= max_micro_batch and effective_batch % b == 0] or [1]
    for micro in candidates:
        for checkpointing in (False, True):
            estimate = estimate_training_memory(config, batch_size=micro, activation_checkpointing=checkpointing,
                                                **kwargs)
            if estimate.total * HEADROOM <= budget_bytes:
                return BatchPlan(micro, effective_batch // micro, checkpointing, estimate.total / GIB)
    estimate = estimate_training_memory(config, batch_size=1, activation_checkpointing=True, **kwargs)
    return BatchPlan(1, effective_batch, True, estimate.total / GIB)


# --- memory for batched generation ----------------------------------------------------------------

def kv_cache_bytes_per_token(config: Any, dtype_bytes: int = 2) -> int:
    """Bytes of keys and values the KV cache keeps per token: layers x (k width + v width) x dtype bytes."""
    _, k_width, v_width = qkv_widths(config)
    return config.num_hidden_layers * (k_width + v_width) * dtype_bytes


def generation_memory_per_sequence(config: Any, prompt_tokens: int, new_tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes one more sequence adds to a batched ``generate``: its KV cache at full length and its prompt's pass.

    The prompt's pass holds one layer's working tensors at a time (about 4 hidden-sized and 3 MLP-sized per
    token) and, where attention falls back to PyTorch's plain kernel, the fp32 score matrix of every head;
    each decoding step adds one fp32 row of logits (and its softmax).
    """
    cache = (prompt_tokens + new_tokens) * kv_cache_bytes_per_token(config, dtype_bytes)
    working = prompt_tokens * (4 * config.hidden_size + 3 * config.intermediate_size) * dtype_bytes
    scores = config.num_attention_heads * prompt_tokens**2 * 4
    logits = 2 * config.vocab_size * 4
    return cache + working + scores + logits


def generation_batch_size(config: Any, memory_bytes: float, weights_bytes: float, prompt_tokens: int,
                          new_tokens: int, dtype_bytes: int = 2) -> int:
    """The most prompts ``generate`` can answer together in ``memory_bytes`` next to ``weights_bytes`` (10% kept free).

    ``prompt_tokens``: the longest prompt (a batch is padded to it). Raises when not even one sequence fits.
    """
    free = memory_bytes / HEADROOM - weights_bytes
    per_sequence = generation_memory_per_sequence(config, prompt_tokens, new_tokens, dtype_bytes)
    if free < per_sequence:
        raise ValueError(
            f"{memory_bytes / 2**30:.1f} GiB hold the {weights_bytes / 2**30:.1f} GiB of weights but not one "
            f"{prompt_tokens}+{new_tokens}-token sequence ({per_sequence / 2**30:.2f} GiB, 10% headroom kept): "
            "lower max_new_tokens or the prompt length, or load the model in 4 bits."
        )
    return int(free // per_sequence)
