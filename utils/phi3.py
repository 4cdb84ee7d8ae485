"""Phi-3's facts, each in one place: the hub id, the published architecture, special tokens, layer names and shapes.

Everything else in the package reads these (memory planning, loralib layers, the model registry, the
benchmarks); nothing here imports another module of the package. The shapes follow ``Phi3ForCausalLM``
(transformers' ``modeling_phi3.py``): one fused ``qkv_proj`` (q, then k, then v rows), ``o_proj`` from the
attention heads back to the hidden size, one fused ``gate_up_proj`` and ``down_proj``; no biases.
"""

from __future__ import annotations

from typing import Any

from transformers import Phi3Config

PHI3_MINI_ID = "microsoft/Phi-3-mini-4k-instruct"
# microsoft/Phi-3-mini-4k-instruct's published config.json (3.8B parameters), for planning and
# benchmarks on machines without the Hub. Loading the real model reads its own config instead.
PHI3_MINI_CONFIG: dict[str, Any] = dict(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    original_max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-5, sliding_window=2047, tie_word_embeddings=False, hidden_act="silu",
    bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
)
# The chat markers of Phi-3's tokenizer and their ids (checked against llama.cpp's reference ids in the tests).
PHI3_SPECIAL_TOKENS = {"<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006,
                       "<|end|>": 32007, "<|user|>": 32010}
# What ends a reply: the end of a turn and the end of the text (a model's generation_config lists both).
PHI3_STOP_TOKEN_IDS = [PHI3_SPECIAL_TOKENS["<|endoftext|>"], PHI3_SPECIAL_TOKENS["<|end|>"]]
# The linear layers of one decoder layer, by the names LoRA targets: attention (fused q/k/v, output) and MLP.
PHI3_LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
QKV_NAMES = ("q", "k", "v")  # the slices of qkv_proj, in the order of its rows


def phi3_mini_config() -> Phi3Config:
    """The published Phi-3-mini-4k-instruct architecture (no weights)."""
    return Phi3Config(**PHI3_MINI_CONFIG)


def head_dim(config: Any) -> int:
    """Width of one attention head: ``config.head_dim`` when set, else hidden size / heads (as Phi3Attention)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def qkv_widths(config: Any) -> tuple[int, int, int]:
    """Rows of q, k and v inside the fused ``qkv_proj`` (k and v are narrower under grouped-query attention)."""
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    return config.num_attention_heads * head_dim(config), kv_heads * head_dim(config), kv_heads * head_dim(config)


def uses_grouped_query_attention(config: Any) -> bool:
    """True when q, k and v have unequal widths (fewer key/value heads than query heads)."""
    return len(set(qkv_widths(config))) > 1


def projection_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection in one decoder layer, as ``Phi3ForCausalLM`` builds them.

    ``o_proj`` maps the concatenated attention heads (heads x head_dim) back to the hidden size; that equals
    hidden x hidden only when head_dim is hidden / heads.
    """
    hidden, inter = config.hidden_size, config.intermediate_size
    q_width = qkv_widths(config)[0]
    return {
        "qkv_proj": (hidden, sum(qkv_widths(config))),
        "o_proj": (q_width, hidden),
        "gate_up_proj": (hidden, 2 * inter),
        "down_proj": (inter, hidden),
    }
