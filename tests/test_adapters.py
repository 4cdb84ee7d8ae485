"""utils.adapters, training side: target names that match nothing, and the trainable-parameter count."""

from __future__ import annotations

import pytest

from utils import adapters
from utils.phi3 import PHI3_LORA_TARGETS
from utils.training_settings import peft_config


def test_a_target_that_matches_nothing_fails_loudly(tiny_model):
    assert adapters.check_target_modules(tiny_model, list(PHI3_LORA_TARGETS)) == {name: 2 for name in PHI3_LORA_TARGETS}
    with pytest.raises(ValueError, match=r"\['q_proj'\] match nothing.*qkv_proj"):
        adapters.check_target_modules(tiny_model, ["q_proj", "o_proj"])


def test_add_lora_adapter_counts_trainable_parameters(tiny_model, capsys):
    import copy

    model = adapters.add_lora_adapter(copy.deepcopy(tiny_model), peft_config(r=4), seed=0)
    trainable, _ = model.get_nb_trainable_parameters()
    # r x (in + out) per projection per layer, tiny: hidden 64, intermediate 256, 2 layers
    expected = 4 * ((64 + 192) + (64 + 64) + (64 + 512) + (256 + 64)) * 2
    assert trainable == expected
    assert f"trainable {expected:,} of" in capsys.readouterr().out
