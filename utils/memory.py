"""Back-of-the-envelope training memory for LoRA and QLoRA, so you can plan before you load.

The estimate counts the big terms: frozen base weights, LoRA weights with their gradients and
AdamW states, saved activations, and the logits (the loss is computed in fp32 over the whole
vocabulary). It is a planning tool, accurate to tens of percent, not a measurement; the training
notebooks print the measured peak next to it.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
# What PyTorch reports for a "16 GB" Tesla T4 (Colab's free GPU): the "total capacity" of its out-of-memory
# message and torch.cuda.get_device_properties(0).total_memory; nvidia-smi shows 15,360 MiB. The smallest card
# the series supports: plans without a GPU to ask are made for it.
T4_MEMORY_GIB = 14.74
NF4_BYTES_PER_WEIGHT = 0.516  # 4 bits + one fp8 scale per 64 weights + one fp32 scale per 256 blocks (double quant)
PHI3_LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


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


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Phi-3 projection in one decoder layer."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    return {
        "qkv_proj": (hidden, hidden + 2 * kv_heads * head_dim),
        "o_proj": (hidden, hidden),
        "gate_up_proj": (hidden, 2 * inter),
        "down_proj": (inter, hidden),
    }


def parameter_counts(config) -> dict[str, int]:
    """Parameters of a Phi-3 model by kind: ``linear`` (quantisable projections) and ``other``."""
    linear = sum(i * o for i, o in linear_shapes(config).values()) * config.num_hidden_layers
    embeddings = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else embeddings
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    return {"linear": linear, "other": embeddings + head + norms}


def lora_parameter_count(config, r: int, targets: tuple[str, ...] = PHI3_LORA_TARGETS) -> int:
    """LoRA parameters: r x (in + out) for every targeted projection in every layer."""
    shapes = linear_shapes(config)
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"Unknown Phi-3 target modules {sorted(unknown)}; valid: {sorted(shapes)}")
    return sum(r * (shapes[t][0] + shapes[t][1]) for t in targets) * config.num_hidden_layers


def estimate_training_memory(
    config,
    *,
    method: str = "lora",
    r: int = 16,
    targets: tuple[str, ...] = PHI3_LORA_TARGETS,
    seq_len: int = 1024,
    batch_size: int = 1,
    compute_bytes: int = 2,
    gradient_checkpointing: bool = False,
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
    hidden, inter = config.hidden_size, config.intermediate_size
    # Tensors saved for backward per token and layer: ~10 hidden-sized (norms, q/k/v, attention output,
    # residuals) and ~4 intermediate-sized (gate/up output, activation, product) in the compute dtype.
    per_layer = tokens * (10 * hidden + 4 * inter) * compute_bytes
    if gradient_checkpointing:  # keep only each layer's input; recompute one layer at a time
        activations = tokens * hidden * compute_bytes * config.num_hidden_layers + per_layer
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


HEADROOM = 1.1  # plans keep 10% free for the allocator's fragmentation and the CUDA context


def needs_gradient_checkpointing(config, budget_bytes: float, **kwargs) -> bool:
    """True when the estimate without checkpointing does not fit in ``budget_bytes`` (with 10% headroom)."""
    estimate = estimate_training_memory(config, gradient_checkpointing=False, **kwargs)
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
            estimate = estimate_training_memory(config, batch_size=micro, gradient_checkpointing=checkpointing,
                                                **kwargs)
            if estimate.total * HEADROOM <= budget_bytes:
                return BatchPlan(micro, effective_batch // micro, checkpointing, estimate.total / GIB)
    estimate = estimate_training_memory(config, batch_size=1, gradient_checkpointing=True, **kwargs)
    return BatchPlan(1, effective_batch, True, estimate.total / GIB)
