"""Convert a Llama-architecture checkpoint into Phi-3's exact layout (``Phi3ForCausalLM``).

Llama and Phi-3 compute the same function; they differ only in how weights are stored:
Phi-3 fuses the query/key/value projections into one ``qkv_proj`` and the gate/up
projections into one ``gate_up_proj``. Concatenating the weights (in that order) gives an
exactly equivalent model.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM


def phi3_config_from_llama(config: LlamaConfig) -> Phi3Config:
    """A ``Phi3Config`` describing the same network as a ``LlamaConfig``."""
    head_dim = config.hidden_size // config.num_attention_heads
    if getattr(config, "head_dim", head_dim) != head_dim:
        raise ValueError(
            f"head_dim={config.head_dim} differs from hidden_size/num_attention_heads={head_dim}; "
            "Phi-3 derives head_dim from those two, so this model cannot be expressed in Phi-3's layout."
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("Phi-3's projections have no bias; this Llama model uses biases.")
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"Only plain RoPE converts exactly; this model uses {rope.get('rope_type')!r}.")
    return Phi3Config(
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


def phi3_state_dict_from_llama(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and fuse a Llama state dict: q/k/v -> ``qkv_proj``, gate/up -> ``gate_up_proj``."""
    fused: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")):
            continue  # consumed together with q_proj / gate_proj below
        if name.endswith("self_attn.q_proj.weight"):
            prefix = name.removesuffix("q_proj.weight")
            fused[prefix + "qkv_proj.weight"] = torch.cat(
                [tensor, state[prefix + "k_proj.weight"], state[prefix + "v_proj.weight"]], dim=0
            )
        elif name.endswith("mlp.gate_proj.weight"):
            prefix = name.removesuffix("gate_proj.weight")
            fused[prefix + "gate_up_proj.weight"] = torch.cat([tensor, state[prefix + "up_proj.weight"]], dim=0)
        else:
            fused[name] = tensor
    return fused


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
