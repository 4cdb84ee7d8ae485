"""utils.train_cli: the YAML run files and accelerate configs that ship, bad files named, any data format read."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils.paths import REPO_ROOT
from utils.training_settings import build_lora_config, build_sft_config, peft_config, training_config


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero3"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    from utils.paths import REPO_ROOT

    config = load_config_from_file(str(REPO_ROOT / "configs" / f"{name}.yaml"))
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}[name]
    if name == "fsdp":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Phi3DecoderLayer"
    if name == "deepspeed_zero3":
        assert config.deepspeed_config["zero_stage"] == 3


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*lora-*.yaml")),
                         ids=lambda path: path.name)
def test_shipped_training_configs_resolve_to_valid_dicts(path):
    from utils.train_cli import build_parser, resolve_settings

    settings = resolve_settings(build_parser().parse_args(["--config", str(path)]))
    config = training_config(settings["profile"], settings["method"], run_name=settings["run_name"],
                                       **settings["training"])
    build_sft_config({**config, "use_cpu": True, "bf16": False, "fp16": False})
    build_lora_config(peft_config(settings["method"], **settings["peft"]))


def test_script_reports_a_bad_config_file_by_name(tmp_path):
    from utils.train_cli import read_config_file

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\ntrainng:\n  max_steps: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key\(s\) \['trainng'\]"):
        read_config_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        read_config_file(tmp_path / "missing.yaml")


def test_the_script_reads_any_supported_format_with_the_strict_loader(tmp_path):
    from utils.data import DataValidationError
    from utils.train_cli import load_rows

    rows = load_rows(REPO_ROOT / "data/examples/sharegpt.json", "train", limit=2)
    assert len(rows) == 2 and rows[0]["messages"][-1]["role"] == "assistant"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataValidationError, match="broken.jsonl"):
        load_rows(broken, "train", limit=None)
