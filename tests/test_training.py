"""utils.training: the run itself (library internals left alone) and the refusal of DataParallel."""

from __future__ import annotations

import pytest

from utils import training
from utils.adapters import add_lora_adapter
from utils.training_settings import peft_config, training_config


def test_train_leaves_trl_private_names_alone(tiny_model, tiny_tokenizer, tmp_path):
    """train() must not patch library internals: trl's device test is the same during and after a run."""
    import copy

    import torch
    import trl.trainer.utils as trl_utils
    from transformers import TrainerCallback

    original, seen = trl_utils._use_triton, []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(trl_utils._use_triton is original and trl_utils._use_triton(torch.device("cpu")))

    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer number {i}."}]} for i in range(4)]
    model = add_lora_adapter(copy.deepcopy(tiny_model), peft_config(r=2), seed=0)
    config = training_config("cpu", output_dir=str(tmp_path / "run"), max_steps=1, eval_strategy="no",
                                      save_strategy="no", logging_steps=1, disable_tqdm=True, max_length=64)
    result = training.train(model, tiny_tokenizer, rows, None, config, adapter_dir=tmp_path / "adapter",
                            callbacks=[Probe()])
    assert seen == [False] and result.metrics["steps"] == 1
    assert trl_utils._use_triton is original


def test_one_process_on_several_gpus_is_refused_not_wrapped_in_data_parallel():
    from transformers.training_args import ParallelMode

    several = type("Args", (), {"parallel_mode": ParallelMode.NOT_DISTRIBUTED, "n_gpu": 2})()
    with pytest.raises(RuntimeError, match="DataParallel.*CUDA_VISIBLE_DEVICES=0"):
        training.refuse_data_parallel(several)
    for mode in (ParallelMode.NOT_PARALLEL, ParallelMode.DISTRIBUTED):
        training.refuse_data_parallel(type("Args", (), {"parallel_mode": mode, "n_gpu": 1})())


def test_train_on_a_cpu_runs_the_lm_head_only_on_labelled_positions(tiny_model, tiny_tokenizer, tmp_path):
    """train()'s CPU trainer hands the LM head the labelled positions of each conversation, not every position."""
    import copy

    rows = [{"messages": [{"role": "user", "content": "A fairly long question about boiling an egg, please?"},
                          {"role": "assistant", "content": "Ten minutes."}]}]
    model = add_lora_adapter(copy.deepcopy(tiny_model), peft_config(r=2), seed=0)
    head_positions: list[int] = []
    hook = model.get_base_model().lm_head.register_forward_hook(
        lambda module, inputs, output: head_positions.append(inputs[0].shape[1]))
    config = training_config("cpu", output_dir=str(tmp_path / "run"), max_steps=1, gradient_accumulation_steps=1,
                             eval_strategy="no", save_strategy="no", logging_steps=1, disable_tqdm=True, max_length=64)
    result = training.train(model, tiny_tokenizer, rows, None, config, adapter_dir=tmp_path / "adapter")
    hook.remove()
    batch = result.trainer.data_collator([result.trainer.train_dataset[0]])
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert head_positions and set(head_positions) == {labelled} and labelled < batch["input_ids"].shape[1] - 1


def test_packed_or_padding_free_rows_keep_trls_own_loss(tmp_path):
    from trl import SFTConfig, SFTTrainer

    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert training.sft_trainer_class(SFTConfig(packing=True, **common)) is SFTTrainer
    assert training.sft_trainer_class(SFTConfig(padding_free=True, **common)) is SFTTrainer
    plain = training.sft_trainer_class(SFTConfig(**common))
    assert issubclass(plain, SFTTrainer) and plain.compute_loss is not SFTTrainer.compute_loss
