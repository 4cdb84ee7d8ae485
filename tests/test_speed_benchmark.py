"""The speed benchmark's CPU-testable parts: data conversion, counting, FLOPs, the GPU script's plan."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.chitchat import chat_to_messages, licence_text
from benchmarks.common import Counts, CountingCollator, model_flops, sequence_lengths
from benchmarks.gpu_phi3_mini import QLORA_BUDGET_GIB, checkpointing_needed, gpu_configs
from benchmarks.train_speed import pack_length
from utils.memory import parameter_counts
from utils.phi3 import phi3_mini_config


def test_gpu_plan_checkpoints_qlora_for_16_gib_but_not_lora_on_a_large_gpu():
    tokens = 4 * 2048
    assert checkpointing_needed("qlora", QLORA_BUDGET_GIB, tokens)
    assert not checkpointing_needed("lora", 139.0, tokens)
    rows = gpu_configs(lora_checkpointing=False, qlora_checkpointing=True, liger=False)
    assert list(rows) == ["lora-cookbook", "lora-defaults", "qlora-cookbook", "qlora-defaults"]
    assert rows["lora-cookbook"].packing and rows["lora-cookbook"].text_field
    assert rows["qlora-defaults"].activation_checkpointing and not rows["lora-defaults"].activation_checkpointing


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


def bench_args(*extra: str):
    """The benchmark's command-line options (defaults unless given)."""
    from benchmarks.train_speed import parse_args

    return parse_args(list(extra))


def apply_changes(source: dict, changes: list) -> dict:
    """``source`` with the printed changes applied: renames (``a -> b``), removals and new values."""
    from benchmarks.train_speed import REMOVED

    result = copy.deepcopy(source)
    for change in changes:
        if change.key.startswith(("from_pretrained", "LoraConfig", "dataset", "torch threads", "compile", "compact",
                                  "labelled")):
            continue  # not SFTConfig keys
        old, _, new = change.key.partition(" -> ")
        result.pop(old, None)
        if change.after is not REMOVED:
            result[new or old] = change.after
    return result


def test_cookbook_row_is_sample_finetune_plus_exactly_the_printed_changes():
    from benchmarks.train_speed import (COOKBOOK_MODEL, COOKBOOK_PEFT_CONFIG, COOKBOOK_TRAINER,
                                        COOKBOOK_TRAINING_CONFIG, ROWS, build_row)

    # Microsoft's sample_finetune.py (microsoft/Phi-3-mini-4k-instruct), as published
    assert COOKBOOK_TRAINING_CONFIG == {
        "bf16": True, "do_eval": False, "learning_rate": 5.0e-06, "log_level": "info", "logging_steps": 20,
        "logging_strategy": "steps", "lr_scheduler_type": "cosine", "num_train_epochs": 1, "max_steps": -1,
        "output_dir": "./checkpoint_dir", "overwrite_output_dir": True, "per_device_eval_batch_size": 4,
        "per_device_train_batch_size": 4, "remove_unused_columns": True, "save_steps": 100, "save_total_limit": 1,
        "seed": 0, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "gradient_accumulation_steps": 1, "warmup_ratio": 0.2}
    assert COOKBOOK_PEFT_CONFIG == {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none",
                                    "task_type": "CAUSAL_LM", "target_modules": "all-linear", "modules_to_save": None}
    assert COOKBOOK_TRAINER == {"max_seq_length": 2048, "dataset_text_field": "text", "packing": True}
    assert COOKBOOK_MODEL == {"torch_dtype": "bfloat16", "attn_implementation": "flash_attention_2"}

    built = build_row(ROWS["cookbook"], bench_args(), pack=384, cuda=False, output_dir="/tmp/x")
    literal = {**COOKBOOK_TRAINING_CONFIG, **COOKBOOK_TRAINER}
    assert built["sft"] == apply_changes(literal, built["changes"])  # nothing changed that is not printed
    assert built["peft"] == COOKBOOK_PEFT_CONFIG and built["data"] == "text"
    keys = {c.key for c in built["changes"]}
    assert {"bf16", "overwrite_output_dir", "max_seq_length -> max_length", "warmup_ratio -> warmup_steps",
            "from_pretrained attn_implementation", "learning_rate"} <= keys
    assert built["sft"]["bf16"] is False and built["model"]["attn_implementation"] == "sdpa"
    from trl import SFTConfig  # the result is a valid SFTConfig of the installed trl
    SFTConfig(**{**built["sft"], "use_cpu": True})


def test_defaults_row_is_training_config_cpu_plus_only_the_shared_overrides():
    from benchmarks.train_speed import ROWS, build_row
    from utils.training_settings import peft_config, training_config

    built = build_row(ROWS["defaults"], bench_args(), pack=384, output_dir="/tmp/x")
    assert built["sft"] == apply_changes(training_config("cpu"), built["changes"])
    assert built["peft"] == peft_config()
    allowed = {"output_dir", "max_steps", "num_train_epochs", "seed", "data_seed", "learning_rate", "eval_strategy",
               "eval_on_start", "save_strategy", "logging_strategy", "logging_steps", "disable_tqdm", "report_to",
               "dataloader_num_workers"}
    assert {c.key for c in built["changes"]} <= allowed and all(c.kind == "shared" for c in built["changes"])
    for key in ("assistant_only_loss", "per_device_train_batch_size", "gradient_accumulation_steps",
                "activation_checkpointing", "activation_checkpointing_kwargs", "packing", "lr_scheduler_type"):
        assert built["sft"][key] == training_config("cpu")[key]


def test_lever_rows_differ_from_their_source_only_in_their_lever():
    from benchmarks.train_speed import ROWS, build_row

    args = bench_args()
    for row in ROWS.values():
        built = build_row(row, args, pack=384, output_dir="/tmp/x")
        source = build_row(ROWS[row.source], args, pack=384, output_dir="/tmp/x")
        changed = {k for k in set(built["sft"]) | set(source["sft"]) if built["sft"].get(k) != source["sft"].get(k)}
        assert changed <= set(row.sft) | {"dataset_text_field"}, (row.name, changed)
        assert {k for k in built["peft"] if built["peft"][k] != source["peft"][k]} <= set(row.peft)
        levers = [c for c in built["changes"] if c.kind == "lever"]
        assert bool(levers) == (row.name not in ("cookbook", "defaults")), row.name


def test_same_work_check_fires_on_different_conversations_or_steps():
    from benchmarks.train_speed import check_same_work

    run = dict(config="a", conversations_sha256="x", conversations_seen=16, steps=4)
    check_same_work([run, {**run, "config": "b"}])
    with pytest.raises(RuntimeError, match="conversations_sha256"):
        check_same_work([run, {**run, "config": "b", "conversations_sha256": "y"}])
    with pytest.raises(RuntimeError, match="steps"):
        check_same_work([run, {**run, "config": "b", "steps": 3}])
    with pytest.raises(RuntimeError, match="conversations_seen"):
        check_same_work([run, {**run, "config": "b", "conversations_seen": 12}])


def test_rows_run_interleaved_and_a_mismatch_stops_the_command(monkeypatch, tmp_path):
    import benchmarks.train_speed as bench

    calls = []

    def fake_run(name, args, threads=None):
        calls.append(name)
        steps = 3 if (name == "defaults" and len(calls) > 2) else 4  # the 2nd repeat of defaults takes fewer steps
        return dict(config=name, conversations_sha256="x", conversations_seen=16, steps=steps, tokens_per_s=1.0,
                    wall_s=1.0)

    monkeypatch.setattr(bench, "run_config_in_subprocess", fake_run)
    monkeypatch.setattr(bench, "matmul_peak_flops", lambda *a, **k: 1.0)
    with pytest.raises(RuntimeError, match="steps differs"):
        bench.main(["--model", "tiny", "--repeats", "2", "--output", str(tmp_path / "b.json")])
    assert calls == ["cookbook", "defaults", "defaults"]  # repeat 2 starts with the other row; stops at the mismatch


def test_summary_reports_median_and_spread():
    from benchmarks.train_speed import summarize

    def run(name, wall, loss):
        return dict(config=name, what="", wall_s=wall, tokens_per_s=1000 / wall, loss_tokens_per_s=500 / wall,
                    peak_memory_mib=100.0, training_memory_mib=10.0, heldout_assistant_loss=loss,
                    heldout_all_loss=loss + 1, final_train_loss=1.0, flops=1e9, step_s=[2.0, 1.0, 1.0],
                    real_tokens=1000, labelled_tokens=500, steps=3, conversations_seen=12, padding_fraction=0.0,
                    heldout_assistant_loss_before=5.0, heldout_all_loss_before=6.0, changes=[], sft_config={},
                    peft_config={})

    cookbook, defaults = summarize([run("cookbook", 10, 3.0), run("cookbook", 20, 3.0), run("cookbook", 40, 3.0),
                                    run("defaults", 5, 2.9)], peak_flops=1e9)
    assert cookbook["tokens_per_s"] == {"median": 50.0, "min": 25.0, "max": 100.0}
    assert defaults["tokens_per_s_x"] == 200.0 / 50.0 and defaults["repeats"] == 1
    assert cookbook["first_step_s"] == 2.0 and cookbook["later_step_s"] == 1.0


def test_all_token_loss_matches_transformers_own_loss():
    """utils.evaluation's held-out loss, on every token and on assistant tokens, against the model's own loss."""
    import torch

    from utils.evaluation import assistant_token_loss
    from utils.models import load_model_and_tokenizer
    from utils.tokenization import tokenize_conversation

    model, tokenizer = load_model_and_tokenizer("tiny", verbose=False)
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4, of course."},
                {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6."}]
    row = tokenize_conversation(messages, tokenizer)
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        every = float(model(input_ids=ids, labels=ids).loss)
        replies = float(model(input_ids=ids, labels=torch.tensor([row["labels"]])).loss)
    all_tokens = assistant_token_loss(model, tokenizer, [{"messages": messages}], tokens="all")
    assistant = assistant_token_loss(model, tokenizer, [{"messages": messages}])
    assert all_tokens.loss == pytest.approx(every, rel=1e-5) and all_tokens.assistant_tokens == len(row["input_ids"]) - 1
    assert assistant.loss == pytest.approx(replies, rel=1e-5) and all_tokens.loss != pytest.approx(assistant.loss)
    with pytest.raises(ValueError, match="tokens="):
        assistant_token_loss(model, tokenizer, [{"messages": messages}], tokens="prompt")


def test_benchmark_end_to_end_on_the_tiny_model(tmp_path, capsys):
    """Two rows through the real command: the printed changes, the median table, the same-work check, and a
    "before" loss measured without the adapter that matches the untrained model's held-out loss computed here."""
    import json

    from benchmarks.chitchat import benchmark_split
    from benchmarks.train_speed import heldout_losses, main
    from utils.models import load_model_and_tokenizer

    output = tmp_path / "bench.json"
    main(["--model", "tiny", "--steps", "2", "--batch-size", "2", "--heldout", "2", "--max-tokens", "128",
          "--threads", "1", "--repeats", "1", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "| cookbook | 1 |" in printed and "| defaults | 1 |" in printed
    assert "[forced] bf16: True -> False" in printed and "in 2 optimizer steps (checked)" in printed
    result = json.loads(output.read_text())
    errors = {r["config"]: r["error"] for r in result["runs"] if "error" in r}
    assert not errors, errors  # the worker's traceback, when a row failed
    rows = {s["config"]: s for s in result["summaries"]}
    assert set(rows) == {"cookbook", "defaults"}
    assert rows["cookbook"]["tokens_per_s_x"] == 1.0 and rows["cookbook"]["peak_memory_mib_x"] == 1.0
    assert rows["defaults"]["sft_config"]["gradient_accumulation_steps"] == 2 and rows["defaults"]["steps"] == 2
    assert rows["defaults"]["labelled_tokens"] < rows["cookbook"]["labelled_tokens"]  # assistant tokens only
    # the same conversations; trl appends an EOS token to each rendered text of the baseline
    assert rows["cookbook"]["real_tokens"] - rows["defaults"]["real_tokens"] == rows["cookbook"]["conversations_seen"]

    model, tokenizer = load_model_and_tokenizer("tiny", verbose=False)
    _, heldout = benchmark_split(tokenizer, 4, 2, 128, seed=0)
    untrained = heldout_losses(model, tokenizer, heldout)
    for row in rows.values():
        assert row["heldout_assistant_loss_before"] == pytest.approx(untrained["assistant"], rel=1e-5)
        assert row["heldout_all_loss_before"] == pytest.approx(untrained["all"], rel=1e-5)
        # training moved it (step 1 is the warm-up's, at learning rate 0, in both rows' schedules)
        assert row["heldout_assistant_loss"]["median"] != pytest.approx(untrained["assistant"], rel=1e-7)


@pytest.mark.parametrize("row", ["lora-cookbook", "lora-defaults"])
def test_the_gpu_scripts_worker_trains_its_rows_on_the_tiny_model(row, tmp_path):
    """The prepared GPU check's rows (benchmarks/gpu_phi3_mini.py) run through the same worker, here on the CPU."""
    result = tmp_path / "row.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_phi3_mini", "--worker", row, "--result", str(result), "--model", "tiny",
         "--steps", "2", "--batch-size", "2", "--heldout", "2", "--max-tokens", "64", "--threads", "1"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(result.read_text())
    assert measured["config"] == row and measured["steps"] >= 1 and measured["real_tokens"] > 0
    assert math.isfinite(measured["heldout_loss"]) and math.isfinite(measured["final_train_loss"])
