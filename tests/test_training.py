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
