"""The dicts that notebooks 03 and 04 write out literally equal the profile table that the script uses.

``utils.training_settings.training_config`` / ``peft_config`` (the table) drive ``python -m utils.train_cli``
and the benchmarks; the notebooks spell the same run out key by key so a reader can copy it. These tests execute the
notebooks' tagged cells (``training-config``, ``run-length``, ``cadence``, ``peft-config``, ``data``) with each
profile and with fake GPUs (a 16 GB T4 without bf16, a 40 GB A100 with bf16), and compare key by key, so the two
cannot drift apart. The cells run as they are: nothing is copied out of the notebooks by hand.
"""

from __future__ import annotations

import json
from typing import Any

import nbformat
import pytest

from utils.data import DataValidationError, load_split
from utils.models import Hardware
from utils.paths import NOTEBOOKS_DIR
from utils.training_settings import (
    optimizer_steps,
    peft_config as table_peft_config,
    training_config as table_training_config,
)

LORA = NOTEBOOKS_DIR / "03_lora_finetuning.ipynb"
QLORA = NOTEBOOKS_DIR / "04_qlora_finetuning.ipynb"
T4 = Hardware(cuda=True, gpu_name="Tesla T4", bf16=False, flash_attn=False, gpu_memory_gib=15.0, gpu_count=1)
A100 = Hardware(cuda=True, gpu_name="NVIDIA A100-SXM4-40GB", bf16=True, flash_attn=True, gpu_memory_gib=39.4,
                gpu_count=1)
NO_GPU = Hardware(cuda=False)
CADENCE_KEYS = {"logging_steps", "eval_steps", "save_steps"}  # set by the notebooks' cadence cell, after the dict
DEVICE_KEYS = {"use_cpu", "bf16", "fp16"}  # what the GPU column may change when there is no GPU to run on
CASES = [("cpu", NO_GPU), ("cpu", T4), ("gpu", T4), ("gpu", A100)]
CASE_IDS = ["cpu-profile-no-gpu", "cpu-profile-on-T4", "gpu-profile-T4", "gpu-profile-A100"]


def tagged_sources(path, tag: str) -> list[str]:
    """The sources of the cells of ``path`` tagged ``tag`` (there must be at least one)."""
    sources = [cell.source for cell in nbformat.read(path, as_version=4).cells
               if cell.cell_type == "code" and tag in cell.metadata.get("tags", [])]
    assert sources, f"{path.name} has no code cell tagged {tag!r}"
    return sources


def run_cells(path, tags: list[str], namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute the parameters cell and then the cells with ``tags``, in order, in ``namespace``."""
    for tag in ["parameters", *tags]:
        for index, source in enumerate(tagged_sources(path, tag)):
            exec(compile(source, f"{path.name}[{tag} {index}]", "exec"), namespace)
        if tag == "parameters":
            namespace.update(namespace.pop("_overrides", {}))
    return namespace


def notebook_config(path, profile: str, hardware: Hardware, tags=("training-config",), **parameters):
    """The notebook's namespace after its training-config cells, for ``profile`` on ``hardware``."""
    return run_cells(path, list(tags), {"hardware": hardware, "_overrides": {"PROFILE": profile, **parameters}})


def without(config: dict[str, Any], keys) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in keys}


@pytest.mark.parametrize(("profile", "hardware"), CASES, ids=CASE_IDS)
def test_03_training_config_equals_the_table(profile, hardware):
    namespace = notebook_config(LORA, profile, hardware)
    table = table_training_config(profile, "lora", hardware=hardware)
    notebook = namespace["training_config"]
    assert without(notebook, {"output_dir"}) == without(table, CADENCE_KEYS | {"output_dir"})
    assert notebook["output_dir"] == table["output_dir"]


@pytest.mark.parametrize(("profile", "hardware"), CASES, ids=CASE_IDS)
def test_04_training_config_is_03s_plus_the_qlora_diff_and_equals_the_table(profile, hardware):
    namespace = notebook_config(QLORA, profile, hardware)
    lora = table_training_config(profile, "lora", hardware=hardware)
    qlora = table_training_config(profile, "qlora", hardware=hardware)
    assert without(namespace["lora_training_config"], {"output_dir"}) == without(lora, CADENCE_KEYS | {"output_dir"})
    assert without(namespace["training_config"], {"output_dir"}) == without(qlora, CADENCE_KEYS | {"output_dir"})
    assert namespace["training_config"]["output_dir"] == table_training_config(profile, "qlora",
                                                                                run_name="qlora")["output_dir"]
    if profile == "gpu":
        assert namespace["training_config"]["optim"] == "paged_adamw_8bit"


@pytest.mark.parametrize(("profile", "hardware"), CASES, ids=CASE_IDS)
def test_04_shows_exactly_the_keys_where_qlora_differs_from_lora(profile, hardware):
    namespace = notebook_config(QLORA, profile, hardware)
    lora = table_training_config(profile, "lora", hardware=hardware)
    qlora = table_training_config(profile, "qlora", hardware=hardware, run_name="qlora")
    assert set(namespace["changed"]) == {key for key in qlora if qlora[key] != lora[key]}


@pytest.mark.parametrize("path", [LORA, QLORA], ids=["03", "04"])
def test_the_gpu_column_without_a_gpu_changes_only_the_device_keys(path):
    namespace = notebook_config(path, "gpu", NO_GPU)
    method = "qlora" if path == QLORA else "lora"
    table = table_training_config("gpu", method, hardware=NO_GPU)
    notebook = namespace["training_config"]
    changed = {key for key in table if key not in CADENCE_KEYS and notebook.get(key) != table[key]}
    assert changed <= DEVICE_KEYS | {"output_dir"} and changed & DEVICE_KEYS
    assert notebook["use_cpu"] is True and notebook["bf16"] is False and notebook["fp16"] is False
    # the rest of the GPU column is what a T4 would run (no GPU to measure: the plan assumes the smallest card)
    t4 = table_training_config("gpu", method, hardware=T4)
    assert without(notebook, DEVICE_KEYS | {"output_dir"}) == without(t4, DEVICE_KEYS | CADENCE_KEYS | {"output_dir"})


@pytest.mark.parametrize("path", [LORA, QLORA], ids=["03", "04"])
@pytest.mark.parametrize(("profile", "hardware"), [("cpu", NO_GPU), ("gpu", T4)], ids=["cpu", "gpu-T4"])
def test_run_length_and_cadence_equal_the_tables_schedule(path, profile, hardware):
    """After the CPU demo's shortening and the cadence cell, the whole dict is the table's for that run."""
    conversations = 303
    namespace = notebook_config(path, profile, hardware, tags=("training-config", "run-length", "cadence"),
                                train_rows=[{}] * conversations, GPU_MAX_STEPS=None)
    overrides = {}
    if profile == "cpu":
        overrides = {"max_steps": namespace["MAX_STEPS"], "max_length": namespace["MAX_LENGTH"],
                     "learning_rate": namespace["LEARNING_RATE"]}
    method = "qlora" if path == QLORA else "lora"
    table = table_training_config(profile, method, hardware=hardware, num_train_conversations=conversations,
                                  **overrides)
    assert without(namespace["training_config"], {"output_dir"}) == without(table, {"output_dir"})
    if profile == "gpu":  # 2 epochs x ceil(ceil(303 / 4) / 4) = 38 optimizer steps, evaluated every 4
        assert namespace["steps"] == 38 == optimizer_steps(conversations, table)
        assert (table["eval_steps"], table["save_steps"]) == (4, 4)


def test_gpu_max_steps_caps_only_the_gpu_profile():
    gpu = notebook_config(LORA, "gpu", T4, tags=("training-config", "run-length"), GPU_MAX_STEPS=5)
    cpu = notebook_config(LORA, "cpu", NO_GPU, tags=("training-config", "run-length"), GPU_MAX_STEPS=5)
    assert gpu["training_config"]["max_steps"] == 5 and gpu["training_config"]["max_length"] == 2048
    assert cpu["training_config"]["max_steps"] == cpu["MAX_STEPS"]


@pytest.mark.parametrize("path", [LORA, QLORA], ids=["03", "04"])
def test_peft_config_equals_the_table(path):
    namespace = run_cells(path, ["peft-config"], {})
    assert namespace["peft_config"] == table_peft_config("qlora" if path == QLORA else "lora")


@pytest.mark.parametrize("tag", ["run-length", "data", "cadence", "peft-config"])
def test_04_repeats_03s_cells_unchanged(tag):
    assert tagged_sources(QLORA, tag) == tagged_sources(LORA, tag)


def test_04_repeats_03s_training_config_dict_unchanged():
    lora_dict = tagged_sources(LORA, "training-config")[1]
    qlora_copy = tagged_sources(QLORA, "training-config")[1]
    assert qlora_copy == lora_dict.replace("training_config = {", "lora_training_config = {  # 03's, unchanged")


def sharegpt(conversation: dict[str, Any]) -> dict[str, Any]:
    """A shipped conversation rewritten in the ShareGPT format (from/value, human/gpt/system)."""
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in conversation["messages"]]}


def test_the_data_cell_trains_on_a_users_file_and_holds_out_every_tenth(tmp_path, tiny_tokenizer):
    shipped = load_split("train")[:20]
    path = tmp_path / "my_chats.jsonl"
    path.write_text("".join(json.dumps(sharegpt(c)) + "\n" for c in shipped), encoding="utf-8")
    namespace = run_cells(LORA, ["data"], {
        "_overrides": {"TRAIN_FILE": str(path), "EVAL_FILE": None, "DATA_FORMAT": "sharegpt",
                       "EVAL_CONVERSATIONS": None},
        "tokenizer": tiny_tokenizer, "training_config": {"max_length": 4096}})
    assert [row["messages"] for row in namespace["train_rows"]] == \
        [c["messages"] for i, c in enumerate(shipped) if i % 10 != 9]
    assert [row["messages"] for row in namespace["eval_rows"]] == [shipped[9]["messages"], shipped[19]["messages"]]
    assert namespace["train_dataset"].column_names == ["messages"]


def test_the_data_cell_reports_the_line_of_a_bad_record(tmp_path, tiny_tokenizer):
    path = tmp_path / "my_chats.jsonl"
    good = json.dumps(sharegpt(load_split("train")[0]))
    bad = good.replace('"from"', '"form"', 1)
    path.write_text(f"{good}\n{bad}\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match="line 2"):
        run_cells(LORA, ["data"], {
            "_overrides": {"TRAIN_FILE": str(path), "EVAL_FILE": None, "DATA_FORMAT": "sharegpt"},
            "tokenizer": tiny_tokenizer, "training_config": {"max_length": 4096}})


def test_the_data_cell_defaults_to_the_shipped_splits(tiny_tokenizer):
    namespace = run_cells(LORA, ["data"], {
        "_overrides": {"TRAIN_FILE": None, "EVAL_FILE": None, "DATA_FORMAT": None, "EVAL_CONVERSATIONS": None},
        "tokenizer": tiny_tokenizer, "training_config": {"max_length": 4096}})
    assert len(namespace["train_rows"]) == len(load_split("train"))
    assert len(namespace["eval_rows"]) == len(load_split("validation"))
