"""No command destroys work (issue 15): run folders, overwrite and resume, atomic writes, loaders, the model cache.

The old behaviour each test guards against: ``train()`` ran ``shutil.rmtree`` on any ``output_dir``; a second
run silently wiped the first run's checkpoints; a resume after the data or settings changed went ahead;
adapters, merged models, metrics and the loralib -> PEFT export were written in place (a failure midway left
a new config beside old or truncated weights, and ``require_adapter`` looked at the config only); the cache
counted a folder as built when one file existed.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from utils import atomic, run_folders
from utils.atomic import MANIFEST, manifest_problem, safetensors_problem
from utils.run_folders import SERIES_MARKER, RunFolderError

ROWS = [{"messages": [{"role": "user", "content": f"How do I fix dish {i}?"},
                      {"role": "assistant", "content": f"In short: season dish {i}.\nTip: taste first."}]}
        for i in range(6)]


@pytest.fixture(scope="module")
def tiny():
    from utils.models import load_model_and_tokenizer

    return load_model_and_tokenizer("tiny", verbose=False)


def tiny_peft(tiny):
    from utils.adapters import add_lora_adapter
    from utils.training_settings import peft_config

    return add_lora_adapter(copy.deepcopy(tiny[0]), peft_config(r=2), seed=0)


def run_config(output_dir: Path, **changes):
    from utils.training_settings import training_config

    values = dict(output_dir=str(output_dir), max_steps=2, eval_strategy="no", save_strategy="steps", save_steps=1,
                  logging_steps=1, disable_tqdm=True, max_length=64, save_total_limit=5,
                  per_device_train_batch_size=2, gradient_accumulation_steps=1, activation_checkpointing=False)
    values.update(changes)
    return training_config("cpu", **values)


def run(tiny, output_dir: Path, adapter: Path, rows=ROWS, **kwargs):
    from utils.training import train

    config = run_config(output_dir, **kwargs.pop("config", {}))
    return train(tiny_peft(tiny), tiny[1], rows, None, config, adapter_dir=adapter, **kwargs)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- never delete what the user has ---------------------------------------------------------------

def test_train_never_deletes_a_foreign_non_empty_output_dir(tiny, tmp_path):
    foreign = tmp_path / "my-project"
    (foreign / ".git").mkdir(parents=True)
    (foreign / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (foreign / "notes.txt").write_text("three weeks of work")
    before = snapshot(foreign)
    for resume in (False, True):
        with pytest.raises(RunFolderError, match=r"not created by this series.*nothing in it was touched"):
            run(tiny, foreign, tmp_path / "adapter", resume=resume)
    assert snapshot(foreign) == before and not (foreign / SERIES_MARKER).exists()


def test_the_script_refuses_output_dir_dot(tiny, tmp_path, monkeypatch):
    from utils.train_cli import main

    project = tmp_path / "repo"
    (project / "utils").mkdir(parents=True)
    (project / "utils" / "code.py").write_text("x = 1\n")
    monkeypatch.chdir(project)
    with pytest.raises(RunFolderError, match="not created by this series"):
        main(["--model", "tiny", "--train-limit", "4", "--eval-limit", "2", "--set", "output_dir=.",
              "--set", "max_steps=1", "--adapter-dir", str(tmp_path / "adapter")])
    assert (project / "utils" / "code.py").read_text() == "x = 1\n"


def test_an_empty_existing_folder_is_adopted_and_marked(tmp_path):
    (tmp_path / "empty").mkdir()
    assert run_folders.prepare_run_dir(tmp_path / "empty", resume=False, newest_complete=lambda _: None,
                                       read_fingerprint=lambda _: None) is None
    assert run_folders.is_series_folder(tmp_path / "empty")


def test_clearing_a_series_folder_removes_only_its_checkpoints(tmp_path):
    folder = run_folders.mark_series_folder(tmp_path / "run")
    (folder / "checkpoint-3").mkdir()
    (folder / "checkpoint-3" / "trainer_state.json").write_text("{}")  # incomplete: no marker
    (folder / "my-notes.md").write_text("keep me")
    assert run_folders.prepare_run_dir(folder, resume=False, newest_complete=lambda _: None,
                                       read_fingerprint=lambda _: None) is None
    assert not (folder / "checkpoint-3").exists() and (folder / "my-notes.md").read_text() == "keep me"


def test_a_second_run_refuses_to_wipe_complete_checkpoints_unless_told(tiny, tmp_path):
    from utils.checkpoints import checkpoint_is_complete

    run_dir, adapter = tmp_path / "run", tmp_path / "adapter"
    first = run(tiny, run_dir, adapter)
    assert first.metrics["steps"] == 2 and (run_dir / SERIES_MARKER).is_file()
    kept = snapshot(run_dir / "checkpoint-2")
    with pytest.raises(RunFolderError) as caught:
        run(tiny, run_dir, adapter)
    message = str(caught.value)
    assert "checkpoint-1, checkpoint-2" in message and "--resume" in message and "--overwrite" in message
    assert snapshot(run_dir / "checkpoint-2") == kept
    again = run(tiny, run_dir, adapter, overwrite=True)
    assert again.metrics["steps"] == 2 and again.resumed_from is None
    assert checkpoint_is_complete(run_dir / "checkpoint-2")


def test_the_completeness_marker_records_config_and_data_hashes_and_a_changed_resume_is_refused(tiny, tmp_path):
    from utils.checkpoints import COMPLETE_MARKER

    run_dir, adapter = tmp_path / "run", tmp_path / "adapter"
    run(tiny, run_dir, adapter)
    marker = json.loads((run_dir / "checkpoint-2" / COMPLETE_MARKER).read_text())
    assert set(marker["fingerprint"]) >= {"config_sha256", "data_sha256", "data_rows"}
    assert marker["fingerprint"]["data_rows"] == len(ROWS)

    same = run(tiny, run_dir, adapter, resume=True)
    assert same.resumed_from == run_dir / "checkpoint-2"
    other_data = copy.deepcopy(ROWS)
    other_data[3]["messages"][1]["content"] = "In short: something else.\nTip: new."
    with pytest.raises(RunFolderError, match=r"training data: 6 conversations then, 6 now, different content"):
        run(tiny, run_dir, adapter, rows=other_data, resume=True)
    with pytest.raises(RunFolderError, match=r"config learning_rate: 0.0002 then, 0.001 now"):
        run(tiny, run_dir, adapter, resume=True, config={"learning_rate": 1e-3})
    forced = run(tiny, run_dir, adapter, rows=other_data, resume=True, allow_changed_resume=True)
    assert forced.resumed_from is not None and forced.resumed_from.parent == run_dir


def test_the_script_has_overwrite_and_allow_changed_resume_flags():
    from utils.train_cli import build_parser, resolve_settings

    settings = resolve_settings(build_parser().parse_args(["--overwrite", "--allow-changed-resume"]))
    assert settings["overwrite"] is True and settings["allow_changed_resume"] is True
    assert resolve_settings(build_parser().parse_args([]))["overwrite"] is False


# --- atomic writes --------------------------------------------------------------------------------

def test_a_failed_adapter_save_leaves_the_previous_adapter_whole(tiny, tmp_path, monkeypatch):
    import peft

    from utils.adapters import require_adapter

    adapter = tmp_path / "adapter"
    run(tiny, tmp_path / "run1", adapter)
    before = snapshot(adapter)

    original = peft.PeftModel.save_pretrained

    def torn_save(self, save_directory, *args, **kwargs):
        if Path(save_directory).name.startswith("checkpoint-"):  # the run's checkpoints save normally
            return original(self, save_directory, *args, **kwargs)
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "adapter_config.json").write_text("{}")
        (Path(save_directory) / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        raise OSError("disk full")

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", torn_save)
    with pytest.raises(OSError, match="disk full"):
        run(tiny, tmp_path / "run2", adapter)
    assert snapshot(adapter) == before
    assert require_adapter(adapter, "this test") == adapter
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert MANIFEST in before and "training_metrics.json" in before  # written with the adapter, listed in its manifest


def test_require_adapter_refuses_truncated_or_missing_weights(tiny, tmp_path):
    from utils.adapters import require_adapter

    adapter = tmp_path / "adapter"
    run(tiny, tmp_path / "run", adapter)
    weights = adapter / "adapter_model.safetensors"
    assert safetensors_problem(weights) is None and require_adapter(adapter, "03") == adapter
    weights.write_bytes(weights.read_bytes()[:-100])  # a save cut short
    with pytest.raises(FileNotFoundError, match=r"adapter_model.safetensors.*(truncated|bytes).*run 03"):
        require_adapter(adapter, "03")
    (adapter / MANIFEST).unlink()  # an adapter from before manifests: the safetensors header is the check
    with pytest.raises(FileNotFoundError, match="truncated"):
        require_adapter(adapter, "03")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        require_adapter(adapter, "03")


def test_a_legacy_adapter_without_manifest_but_complete_weights_is_accepted(tiny, tmp_path):
    from utils.adapters import require_adapter

    model = tiny_peft(tiny)
    model.save_pretrained(tmp_path / "legacy")  # PEFT's own writer, no manifest
    assert require_adapter(tmp_path / "legacy", "03") == tmp_path / "legacy"


def test_save_merged_replaces_a_merged_model_only_when_complete(tiny, tmp_path, monkeypatch):
    from utils.adapters import save_merged

    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    folder = save_merged(model, tokenizer, tmp_path / "merged")
    before = snapshot(folder)
    assert manifest_problem(folder, hashes=True) is None

    def torn(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"torn")
        raise OSError("killed")

    monkeypatch.setattr(type(model), "save_pretrained", torn)
    with pytest.raises(OSError, match="killed"):
        save_merged(model, tokenizer, folder)
    assert snapshot(folder) == before


def test_export_to_peft_and_lora_checkpoint_are_atomic(tmp_path, monkeypatch):
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from utils import loralib_tools as lt

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2))
    lt.add_lora(model, lt.LoraSettings(r=2))
    export = lt.export_to_peft(model, tmp_path / "as-peft")
    checkpoint = lt.save_lora_checkpoint(model, tmp_path / "lora.safetensors")
    exported, saved = snapshot(export), checkpoint.read_bytes()
    assert sorted(exported) == ["adapter_config.json", "adapter_model.safetensors"]

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(lt, "peft_tensors", fail)  # the weights fail after the config was written
    with pytest.raises(RuntimeError, match="interrupted"):
        lt.export_to_peft(model, export, base_model_name_or_path="another/base")
    assert snapshot(export) == exported

    def torn_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)
        raise OSError("no space left")

    monkeypatch.setattr(lt, "save_file", torn_file)  # the writer dies after 10 bytes
    with pytest.raises(OSError, match="no space"):
        lt.save_lora_checkpoint(model, checkpoint)
    assert checkpoint.read_bytes() == saved
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]

    checkpoint.write_bytes(saved[:-64])  # cut short by an older writer or a full disk: refused by name
    with pytest.raises(lt.LoraCheckpointError, match=r"lora.safetensors is truncated.*interrupted"):
        lt.read_lora_checkpoint(checkpoint)


def test_metrics_json_is_written_atomically(tmp_path, monkeypatch):
    from utils.evaluation import write_results

    path = write_results(tmp_path / "metrics" / "evaluation.json", {"loss": 1.5})
    before = path.read_bytes()

    def torn_text(self, text, *args, **kwargs):  # the process dies halfway through writing the final file
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError("killed mid-write")

    monkeypatch.setattr(Path, "write_text", torn_text)
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("killed mid-write")))
    with pytest.raises(OSError, match="killed mid-write"):
        write_results(path, {"loss": 2.0})
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["evaluation.json"]


# --- the model and tokenizer cache ----------------------------------------------------------------

def test_the_cache_writes_a_manifest_and_rebuilds_what_does_not_match_it(cold_cache, caplog):
    from utils import models

    folder = models.build_tiny_phi3()
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["inputs"]) >= {"config", "transformers", "chat_template_sha256"}
    assert manifest_problem(folder, hashes=True) is None
    weights = folder / "model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # truncated by a crash or a full disk
    with caplog.at_level(logging.WARNING):
        assert models.build_tiny_phi3() == folder
    assert "Rebuilding" in caplog.text and "model.safetensors" in caplog.text
    assert weights.read_bytes() == good  # the same seed builds the same weights

    caplog.clear()
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["inputs"]["transformers"] = "4.0.0"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        models.build_tiny_phi3()
    assert "transformers" in caplog.text and manifest_problem(folder) is None


def test_a_cache_folder_with_one_file_and_no_manifest_is_not_taken_as_built(cold_cache, caplog):
    from utils import models

    folder = cold_cache / "tiny-phi3-v1"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"left by an interrupted build")
    with caplog.at_level(logging.WARNING):
        models.build_tiny_phi3()
    assert f"no {MANIFEST}" in caplog.text
    assert manifest_problem(folder, hashes=True) is None and safetensors_problem(folder / "model.safetensors") is None
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() > 4_000_000
