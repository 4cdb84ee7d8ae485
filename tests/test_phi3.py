"""utils.phi3: Phi-3's facts against the real ``Phi3ForCausalLM`` (built on the meta device: shapes, no weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from utils.memory import parameter_counts
from utils.phi3 import (
    PHI3_LORA_TARGETS,
    PHI3_MINI_CONFIG,
    head_dim,
    phi3_mini_config,
    projection_shapes,
    qkv_widths,
    uses_grouped_query_attention,
)

# Small configurations that pull the shapes apart: grouped-query attention (fewer key/value heads) and a head
# width that is not hidden / heads, where o_proj's input (heads x head_dim) differs from the hidden size.
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    "multi-head": dict(num_key_value_heads=4),
    "grouped-query": dict(num_key_value_heads=2),
    "wide heads": dict(num_key_value_heads=2, head_dim=32),
}


def meta_model(config: Phi3Config) -> Phi3ForCausalLM:
    """The real module tree for ``config``, without allocating weights."""
    with torch.device("meta"):
        return Phi3ForCausalLM(config)


def built_shapes(model: Phi3ForCausalLM) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every linear layer of the first decoder layer, by its name."""
    layer = model.model.layers[0]
    return {name.rsplit(".", 1)[-1]: (module.in_features, module.out_features)
            for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}


@pytest.mark.parametrize("extra", list(CASES.values()), ids=list(CASES))
def test_projection_shapes_are_the_shapes_phi3forcausallm_builds(extra):
    config = Phi3Config(**SMALL, **extra)
    assert built_shapes(meta_model(config)) == projection_shapes(config)
    assert set(projection_shapes(config)) == set(PHI3_LORA_TARGETS)


def test_o_proj_reads_heads_times_head_dim_not_the_hidden_size():
    config = Phi3Config(**SMALL, **CASES["wide heads"])
    attention = meta_model(config).model.layers[0].self_attn
    assert attention.o_proj.in_features == 4 * 32 != config.hidden_size
    assert projection_shapes(config)["o_proj"] == (128, 64)
    assert head_dim(config) == attention.head_dim == 32


@pytest.mark.parametrize("extra", list(CASES.values()), ids=list(CASES))
def test_qkv_widths_split_the_fused_projection_where_the_attention_does(extra):
    config = Phi3Config(**SMALL, **extra)
    attention = meta_model(config).model.layers[0].self_attn
    q, k, v = qkv_widths(config)
    assert q == config.num_attention_heads * attention.head_dim  # where the model's forward cuts the query slice
    assert k == v == attention.num_key_value_heads * attention.head_dim
    assert q + k + v == attention.qkv_proj.out_features
    assert uses_grouped_query_attention(config) == (config.num_key_value_heads < config.num_attention_heads)


def test_phi3_mini_config_is_the_published_architecture():
    c = phi3_mini_config()
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (3072, 8192, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (32, 32, 32064)
    assert c.max_position_embeddings == 4096 and c.sliding_window == 2047
    assert c.rope_parameters["rope_theta"] == 10000.0 and c.tie_word_embeddings is False
    assert PHI3_MINI_CONFIG["eos_token_id"] == 32000


def test_parameter_count_of_phi3_mini_is_the_model_cards_from_the_real_module_tree():
    model = meta_model(phi3_mini_config())
    assert sum(p.numel() for p in model.parameters()) == 3_821_079_552  # microsoft/Phi-3-mini-4k-instruct
    assert sum(parameter_counts(phi3_mini_config()).values()) == 3_821_079_552
    assert built_shapes(model) == projection_shapes(model.config)
