"""Convert between the Llama layout and Phi-3's exact layout (``Phi3ForCausalLM``), both directions.

Llama and Phi-3 compute the same function; they differ only in how weights are stored:
Phi-3 fuses the query/key/value projections into one ``qkv_proj`` and the gate/up
projections into one ``gate_up_proj``. Concatenating the weights (in that order) gives an
exactly equivalent model; splitting them by rows goes back.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from utils.phi3 import head_dim, qkv_widths

# Phi-3's fused projections and the Llama-layout projections they stand for, in row order.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def phi3_config_from_llama(config: LlamaConfig) -> Phi3Config:
    """A ``Phi3Config`` describing the same network as a ``LlamaConfig``."""
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("Phi-3's projections have no bias; this Llama model uses biases.")
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"Only plain RoPE converts exactly; this model uses {rope.get('rope_type')!r}.")
    phi3_config = Phi3Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,  # grouped-query attention
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        original_max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope.get("rope_theta", 10_000.0)},
        tie_word_embeddings=config.tie_word_embeddings,
        sliding_window=None,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    )
    if config.head_dim != head_dim(phi3_config):
        raise ValueError(
            f"head_dim={config.head_dim} differs from the {head_dim(phi3_config)} that Phi-3 derives from "
            "hidden_size / num_attention_heads, so this model cannot be expressed in Phi-3's layout."
        )
    return phi3_config


def phi3_state_dict_from_llama(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and fuse a Llama state dict: q/k/v -> ``qkv_proj``, gate/up -> ``gate_up_proj`` (rows in that order)."""
    parts_of = {parts[0]: (fused, parts) for fused, parts in FUSED_PROJECTIONS.items()}  # q_proj -> (qkv_proj, ...)
    consumed = {part for parts in FUSED_PROJECTIONS.values() for part in parts[1:]}  # taken with the first part
    fused_state: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if module in consumed and name.endswith(".weight"):
            continue
        if module in parts_of and name.endswith(".weight"):
            fused, parts = parts_of[module]
            prefix = name.removesuffix(f"{module}.weight")
            fused_state[f"{prefix}{fused}.weight"] = torch.cat([state[f"{prefix}{part}.weight"] for part in parts], dim=0)
        else:
            fused_state[name] = tensor
    return fused_state


def llama_to_phi3(model: LlamaForCausalLM) -> Phi3ForCausalLM:
    """Build a ``Phi3ForCausalLM`` that computes exactly what ``model`` computes."""
    config = phi3_config_from_llama(model.config)
    phi3 = Phi3ForCausalLM(config)
    state = phi3_state_dict_from_llama(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    result = phi3.load_state_dict(state, strict=False)
    missing = [name for name in result.missing_keys if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"Conversion mismatch: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if config.tie_word_embeddings:
        phi3.tie_weights()
    phi3.generation_config = model.generation_config
    return phi3.to(next(model.parameters()).dtype).eval()


# --- the reverse direction: Phi-3 -> Llama -------------------------------------------------------------

def fused_widths(config: Any) -> dict[str, tuple[int, ...]]:
    """Row widths of each fused projection's parts: q/k/v (grouped-query aware) and gate/up."""
    return {"qkv_proj": qkv_widths(config), "gate_up_proj": (config.intermediate_size,) * 2}


def llama_config_from_phi3(config: Phi3Config) -> LlamaConfig:
    """A ``LlamaConfig`` describing the same network as a ``Phi3Config`` (plain RoPE, no partial rotary)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"Only plain, full RoPE converts exactly; this Phi-3 uses {rope}.")
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=head_dim(config), hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope.get("rope_theta", 10_000.0)},
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )


def llama_state_dict_from_phi3(state: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Split a Phi-3 state dict's fused weights by rows: ``qkv_proj`` -> q/k/v, ``gate_up_proj`` -> gate/up."""
    widths = fused_widths(config)
    split: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        fused = next((f for f in FUSED_PROJECTIONS if name.endswith(f"{f}.weight")), None)
        if fused is None:
            split[name] = tensor
            continue
        for part, rows in zip(FUSED_PROJECTIONS[fused], tensor.split(list(widths[fused]), dim=0)):
            split[name.replace(f"{fused}.weight", f"{part}.weight")] = rows
    return split


def phi3_to_llama(model: Phi3ForCausalLM) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` that computes what a ``Phi3ForCausalLM`` computes (fused weights split by rows).

    The Llama model is built on the meta device and takes the Phi-3 tensors' rows as they are (no copy).
    Phi-3-mini's ``sliding_window`` (2047) has no Llama equivalent: the two agree on sequences up to it.
    """
    config = llama_config_from_phi3(model.config)
    state = {name: tensor.contiguous() for name, tensor in
             llama_state_dict_from_phi3(model.state_dict(), model.config).items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    result = llama.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in result.missing_keys if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(f"Conversion mismatch: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if config.tie_word_embeddings:
        llama.tie_weights()
    with torch.device(next(model.parameters()).device):  # the RoPE buffers, built on the meta device above
        llama.model.rotary_emb = type(llama.model.rotary_emb)(config)
    llama.generation_config = model.generation_config
    return llama.eval()
