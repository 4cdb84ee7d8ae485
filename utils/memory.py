"""Back-of-the-envelope training memory for LoRA and QLoRA, so you can plan before you load.

The estimate counts the big terms: frozen base weights, LoRA weights with their gradients and
AdamW states, saved activations, and the logits (the loss is computed in fp32 over the whole
vocabulary). It is a planning tool, accurate to tens of percent, not a measurement; the training
notebooks print the measured peak next to it.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
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
) -> MemoryEstimate:
    """Estimate one training step's memory for ``method`` in ``("lora", "qlora")``.

    ``compute_bytes``: 2 for bf16/fp16 on a GPU, 4 for fp32 on a CPU. QLoRA stores the projections
    in NF4 with double quantisation (~0.516 bytes per weight) and keeps the rest in ``compute_bytes``.
    ``optimizer_bytes_per_param``: 8 for AdamW's two fp32 moments, 2 for an 8-bit AdamW.
    """
    if method not in ("lora", "qlora"):
        raise ValueError(f"method must be 'lora' or 'qlora', not {method!r}")
    counts = parameter_counts(config)
    linear_bytes = 0.516 if method == "qlora" else compute_bytes
    base = counts["linear"] * linear_bytes + counts["other"] * compute_bytes
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


def needs_gradient_checkpointing(config, budget_bytes: float, **kwargs) -> bool:
    """True when the estimate without checkpointing does not fit in ``budget_bytes`` (with 10% headroom)."""
    estimate = estimate_training_memory(config, gradient_checkpointing=False, **kwargs)
    return estimate.total * 1.1 > budget_bytes
