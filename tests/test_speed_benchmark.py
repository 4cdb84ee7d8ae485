"""The speed benchmark's CPU-testable parts: data conversion, counting, FLOPs, the GPU script's model and plan."""

from __future__ import annotations

import pytest
import torch

from benchmarks.chitchat import chat_to_messages, licence_text
from benchmarks.common import Counts, CountingCollator, model_flops, sequence_lengths
from benchmarks.gpu_phi3_mini import QLORA_BUDGET_GIB, build_random_phi3, checkpointing_needed, gpu_configs
from benchmarks.train_speed import CONFIGS, pack_length
from utils.memory import parameter_counts
from utils.models import phi3_mini_config


def test_phi3_mini_config_is_the_published_architecture():
    c = phi3_mini_config()
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (3072, 8192, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (32, 32, 32064)
    assert c.max_position_embeddings == 4096 and c.sliding_window == 2047
    assert c.rope_parameters["rope_theta"] == 10000.0 and c.tie_word_embeddings is False
    assert 3.80e9 < sum(parameter_counts(c).values()) < 3.83e9  # 3,821,079,552 on the model card


def test_build_random_phi3_saves_a_loadable_model_with_the_phi3_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config

    from utils.models import TINY_PHI3_CONFIG, build_phi3_tokenizer

    folder = build_random_phi3(tmp_path / "m", build_phi3_tokenizer(), config=Phi3Config(**TINY_PHI3_CONFIG))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16 and model.config.hidden_size == 64
    assert AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<|end|>") == 32007


def test_gpu_plan_checkpoints_qlora_for_16_gib_but_not_lora_on_a_large_gpu():
    tokens = 4 * 2048
    assert checkpointing_needed("qlora", QLORA_BUDGET_GIB, tokens)
    assert not checkpointing_needed("lora", 139.0, tokens)
    rows = gpu_configs(lora_checkpointing=False, qlora_checkpointing=True, liger=False)
    assert list(rows) == ["lora-cookbook", "lora-defaults", "qlora-cookbook", "qlora-defaults"]
    assert rows["lora-cookbook"].packing and rows["lora-cookbook"].text_field
    assert rows["qlora-defaults"].gradient_checkpointing and not rows["lora-defaults"].gradient_checkpointing


def test_chitchat_conversion_roles_and_merged_turns():
    chat = {"messages": [[{"text": "hi", "sender": "a"}, {"text": "how are you?", "sender": "a"}],
                         [{"text": "fine", "sender": "b"}], [{"text": "good", "sender": "a"}]]}
    assert chat_to_messages(chat) == [{"role": "user", "content": "hi\nhow are you?"},
                                      {"role": "assistant", "content": "fine"}, {"role": "user", "content": "good"}]
    with pytest.raises(ValueError, match="conversation x, turn 0"):
        chat_to_messages({"messages": [[{"text": "no sender"}]]}, "x")


def test_chitchat_licence_ships_in_the_wheel():
    text = licence_text()
    assert text.startswith("MIT License") and "Permission is hereby granted" in text


def test_counting_collator_padded_and_padding_free():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}]
    padded = CountingCollator(DataCollatorForLanguageModeling(pad_token_id=0))
    padded(examples)
    assert (padded.counts.positions, padded.counts.real, padded.counts.labelled) == (8, 6, 4)
    free = CountingCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))
    batch = free(examples)
    assert sequence_lengths(batch) == [4, 2]
    assert (free.counts.positions, free.counts.real, free.counts.attention_pairs) == (6, 6, 10 + 3)


def test_model_flops_counts_linear_head_and_attention():
    c = phi3_mini_config()
    one = model_flops(c, Counts(real=1, labelled=0, attention_pairs=0))
    linear = parameter_counts(c)["linear"]
    assert one == 4 * linear
    head = model_flops(c, Counts(real=1, labelled=1)) - one
    assert head == 4 * c.vocab_size * c.hidden_size


def test_pack_length_gives_one_row_per_step():
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    lengths = [300, 120, 90, 380, 200, 60, 310, 250]
    length = pack_length(lengths, steps=3, cap=384)
    rows = pack_dataset(Dataset.from_dict({"input_ids": [[0] * n for n in lengths]}), length, strategy="bfd")
    assert len(rows) <= 3 and length % 64 == 0 and length >= 384


def test_benchmark_configurations_change_one_thing_from_their_reference():
    base = CONFIGS["cookbook"]
    assert base.text_field and base.packing and base.gradient_checkpointing
    assert not CONFIGS["no-checkpointing"].gradient_checkpointing
    defaults = CONFIGS["defaults"]
    assert defaults.sft_kwargs()["assistant_only_loss"] and not defaults.compact_head and defaults.micro_batch == 1
    assert defaults.gradient_checkpointing and defaults.checkpoint_every_n_layers == 3
    assert not CONFIGS["defaults-no-ckpt"].gradient_checkpointing and CONFIGS["varlen-sdpa"].varlen_sdpa
    assert defaults.sft_kwargs()["gradient_checkpointing_kwargs"] == {"use_reentrant": False, "every_n_layers": 3}
    assert base.lora_dropout == 0.05 and CONFIGS["no-dropout"].lora_dropout == 0.0


def test_the_benchmarked_defaults_are_what_notebooks_03_and_04_train_with():
    from utils.training import peft_config, training_config

    cpu, defaults = training_config("cpu"), CONFIGS["defaults"]
    assert cpu["per_device_train_batch_size"] == defaults.micro_batch
    assert cpu["activation_checkpointing"] == defaults.gradient_checkpointing
    assert cpu["activation_checkpointing_kwargs"] == defaults.sft_kwargs()["gradient_checkpointing_kwargs"]
    assert cpu["assistant_only_loss"] == defaults.assistant_only_loss and not cpu["packing"]
    assert peft_config()["lora_dropout"] == defaults.lora_dropout
    # the benchmark's 4-conversation step is the profile's micro-batch x accumulation
    assert cpu["per_device_train_batch_size"] * cpu["gradient_accumulation_steps"] == 4


def test_benchmark_end_to_end_on_the_tiny_model(tmp_path, capsys):
    """Two rows through the real command: the table, the ratios, and a "before" loss measured without the adapter
    that matches the untrained model's held-out loss computed independently here."""
    import json

    from benchmarks.chitchat import benchmark_split
    from benchmarks.train_speed import heldout_loss, main
    from utils.models import load_model_and_tokenizer

    output = tmp_path / "bench.json"
    main(["--model", "tiny", "--configs", "cookbook", "defaults", "--steps", "1", "--batch-size", "2",
          "--heldout", "2", "--max-tokens", "128", "--threads", "1", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "| cookbook |" in printed and "| defaults |" in printed
    result = json.loads(output.read_text())
    rows = {row["config"]: row for row in result["rows"]}
    assert set(rows) == {"cookbook", "defaults"}
    errors = {name: row["error"] for name, row in rows.items() if "error" in row}
    assert not errors, errors  # the worker's traceback, when a row failed
    assert rows["cookbook"]["tokens_per_s_x"] == 1.0 and rows["cookbook"]["peak_memory_x"] == 1.0
    assert rows["defaults"]["gradient_accumulation_steps"] == 2 and rows["defaults"]["steps"] == 1
    assert rows["defaults"]["labelled_tokens"] < rows["cookbook"]["labelled_tokens"]  # assistant tokens only
    # the same conversations; trl appends an EOS token to each rendered text of the baseline
    assert rows["cookbook"]["real_tokens"] - rows["defaults"]["real_tokens"] == rows["cookbook"]["conversations"]

    model, tokenizer = load_model_and_tokenizer("tiny", verbose=False)
    _, heldout = benchmark_split(tokenizer, 2, 2, 128, seed=0)
    untrained = heldout_loss(model, tokenizer, heldout)
    for row in rows.values():
        assert row["heldout_loss_before"] == pytest.approx(untrained, rel=1e-5)
        assert row["heldout_loss"] != pytest.approx(untrained, rel=1e-7)  # one step of training moved it
