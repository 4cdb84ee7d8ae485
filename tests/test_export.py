"""Export: each format checked by a client nobody here wrote (PEFT's loader, transformers' Llama, gguf's reader,
Go's text/template), plus the refusals. The llama.cpp comparisons are in tests/test_llama_cpp.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from utils import export
from utils.convert import llama_to_phi3, phi3_to_llama
from utils.models import build_smol_phi3, build_tiny_phi3

FP32_TOLERANCE = 1e-5  # the same function computed in another layout: fp32 rounding only


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    """The tiny random Phi-3 (4 heads, no grouped-query attention)."""
    return build_tiny_phi3()


@pytest.fixture(scope="module")
def gqa_pair() -> tuple[LlamaForCausalLM, torch.nn.Module]:
    """A random Llama with grouped-query attention (q 64 rows, k and v 32 each) and its Phi-3 twin."""
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        llama = LlamaForCausalLM(config).eval()
    return llama, llama_to_phi3(llama)


def _ids(vocab: int, length: int = 12) -> torch.Tensor:
    """A fixed batch of token ids."""
    return torch.arange(1, length + 1).remainder(vocab - 1).add(1).unsqueeze(0)


def _random_adapter(model: torch.nn.Module, folder: Path, targets: list[str], seed: int, **settings) -> Path:
    """A PEFT LoRA adapter with random, non-zero A and B (``init_lora_weights=False``), saved to ``folder``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft = get_peft_model(model, LoraConfig(target_modules=targets, init_lora_weights=False, **settings))
    for name, parameter in peft.named_parameters():
        if "lora_B" in name:
            parameter.data.mul_(20.0)  # large enough to move the logits far beyond fp32 rounding
    peft.save_pretrained(folder)
    peft.unload()
    return folder


@torch.inference_mode()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def _with_adapter(model: torch.nn.Module, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` with the adapter in ``folder`` loaded by PEFT's own loader (then removed again)."""
    peft = PeftModel.from_pretrained(model, str(folder))
    logits = _logits(peft, ids)
    peft.unload()
    return logits


def test_phi3_to_llama_computes_the_same_logits(tiny_dir: Path) -> None:
    phi3 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    llama = phi3_to_llama(phi3)
    ids = _ids(phi3.config.vocab_size)
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert (_logits(llama, ids) - _logits(phi3, ids)).abs().max() < FP32_TOLERANCE


@pytest.mark.parametrize("case", ["tiny", "grouped-query"])
def test_split_adapter_on_llama_gives_the_fused_adapters_logits(case, tiny_dir, gqa_pair, tmp_path) -> None:
    if case == "tiny":
        phi3 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        llama = phi3_to_llama(phi3)
    else:
        llama, phi3 = gqa_pair
    ids = _ids(phi3.config.vocab_size)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    fused = _random_adapter(phi3, tmp_path / "fused", targets, seed=1, r=4, lora_alpha=8,
                            rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 6})
    split = export.split_fused_adapter(fused, tmp_path / "split", phi3.config, "a-llama-base")

    config = json.loads((split / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    assert (config["r"], config["lora_alpha"]) == (4, 8) and config["base_model_name_or_path"] == "a-llama-base"
    expected = _with_adapter(phi3, fused, ids)
    got = _with_adapter(llama, split, ids)
    base = _logits(llama, ids)
    assert (expected - base).abs().max() > 100 * FP32_TOLERANCE  # the adapter matters
    assert (got - expected).abs().max() < FP32_TOLERANCE


def test_split_writes_only_the_targets_the_adapter_has(gqa_pair, tmp_path) -> None:
    llama, phi3 = gqa_pair
    fused = _random_adapter(phi3, tmp_path / "fused", ["qkv_proj"], seed=2, r=4, lora_alpha=4)
    split = export.split_fused_adapter(fused, tmp_path / "split", phi3.config)
    names = export.read_adapter(split)[1]
    assert {name.split(".")[-3] for name in names} == {"q_proj", "k_proj", "v_proj"}
    shapes = {name.split(".")[-3]: tensor.shape for name, tensor in names.items() if "lora_B" in name}
    assert shapes == {"q_proj": (64, 4), "k_proj": (32, 4), "v_proj": (32, 4)}  # grouped-query widths


def test_fuse_back_gives_the_original_adapter(gqa_pair, tmp_path) -> None:
    llama, phi3 = gqa_pair
    fused = _random_adapter(phi3, tmp_path / "fused", ["qkv_proj", "gate_up_proj", "down_proj"], seed=3, r=4,
                            lora_alpha=16)
    split = export.split_fused_adapter(fused, tmp_path / "split", phi3.config)
    report = export.fuse_llama_adapter(split, tmp_path / "back", phi3.config)
    original, again = export.read_adapter(fused), export.read_adapter(report.folder)
    assert report.grown_rank == {} and len(report.shared_rank) == 4  # 2 layers x (qkv, gate_up)
    assert original[1].keys() == again[1].keys()
    assert all(torch.equal(original[1][key], again[1][key]) for key in original[1])
    assert sorted(again[0]["target_modules"]) == sorted(original[0]["target_modules"])
    assert again[0]["rank_pattern"] == {} and again[0]["alpha_pattern"] == {}


def test_fuse_llama_adapter_with_own_a_matrices_is_exact(gqa_pair, tmp_path) -> None:
    """An adapter trained on the Llama layout (q and v only, own A's, another rank for v) on Phi-3's fused base."""
    llama, phi3 = gqa_pair
    ids = _ids(phi3.config.vocab_size)
    source = _random_adapter(llama, tmp_path / "llama", ["q_proj", "v_proj", "up_proj"], seed=4, r=4, lora_alpha=8,
                             rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 8})
    report = export.fuse_llama_adapter(source, tmp_path / "fused", phi3.config)
    config, tensors = export.read_adapter(report.folder)
    assert set(report.grown_rank.values()) == {6}  # q (4) + v (2): the A's were stacked
    b = tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    assert b.shape == (128, 6) and b[64:96].abs().max() == 0  # no adapter on k: its rows are zero
    up = tensors["base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight"]
    assert up[:96].abs().max() == 0  # no adapter on gate
    assert "qkv_proj" in config["target_modules"] and "q_proj" not in config["target_modules"]
    expected = _with_adapter(llama, source, ids)
    got = _with_adapter(phi3, report.folder, ids)
    assert (expected - _logits(phi3, ids)).abs().max() > 100 * FP32_TOLERANCE
    assert (got - expected).abs().max() < FP32_TOLERANCE


def test_one_alpha_adapter_keeps_per_module_scales(gqa_pair, tmp_path) -> None:
    """What llama.cpp gets (one global alpha) computes what PEFT computes with rank/alpha patterns."""
    llama, phi3 = gqa_pair
    ids = _ids(phi3.config.vocab_size)
    source = _random_adapter(phi3, tmp_path / "patterns", ["qkv_proj", "o_proj"], seed=5, r=4, lora_alpha=8,
                             rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 12})
    folded = export.llama_cpp_ready_adapter(source, tmp_path / "one-alpha")
    config = export.read_adapter(folded)[0]
    assert config["rank_pattern"] == {"o_proj": 2} and config["alpha_pattern"] == {}
    assert (_with_adapter(phi3, folded, ids) - _with_adapter(phi3, source, ids)).abs().max() < FP32_TOLERANCE


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_llama_cpp_refuses_lora_on_the_head_or_embeddings(target, gqa_pair, tmp_path) -> None:
    llama, phi3 = gqa_pair
    folder = _random_adapter(phi3, tmp_path / "adapter", ["qkv_proj", target], seed=6, r=2, lora_alpha=2)
    with pytest.raises(export.ExportError, match=rf"{target}.*retrain without.*merge"):
        export.adapter_gguf_job(folder, "unused", tmp_path / "never.gguf")
    assert not (tmp_path / "never.gguf").exists()


# --- GGUF, read back by gguf's own reader ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ggufs(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny adapter, and the base and adapter written as GGUF (f16) by llama.cpp's converters, one process."""
    folder = tmp_path_factory.mktemp("gguf")
    phi3 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    adapter = _random_adapter(phi3, folder / "adapter", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                              seed=7, r=8, lora_alpha=16)
    jobs = {folder / "base-f16.gguf": export.model_gguf_job(tiny_dir, folder / ".base.tmp", "f16"),
            folder / "adapter-f16.gguf": export.adapter_gguf_job(adapter, tiny_dir, folder / ".adapter.tmp", "f16")}
    export.write_ggufs(jobs)
    return {"adapter": folder / "adapter-f16.gguf", "base": folder / "base-f16.gguf", "peft": adapter}


def test_gguf_adapter_metadata_read_by_gguf_reader(tiny_ggufs) -> None:
    summary = export.gguf_summary(tiny_ggufs["adapter"])
    assert (summary["type"], summary["architecture"], summary["lora_alpha"]) == ("adapter", "phi3", 16.0)
    tensors = summary["tensors"]
    assert len(tensors) == 2 * 4 * 2  # 2 layers x 4 modules x (lora_a, lora_b)
    # GGUF lists dimensions fastest first: lora_a is (in, r), lora_b is (r, out); fused names stay fused
    assert tensors["blk.0.attn_qkv.weight.lora_a"][0] == (64, 8)
    assert tensors["blk.0.attn_qkv.weight.lora_b"][0] == (8, 192)
    assert tensors["blk.1.ffn_up.weight.lora_b"][0] == (8, 512)  # Phi-3's gate_up_proj is llama.cpp's ffn_up
    assert tensors["blk.1.ffn_down.weight.lora_a"][0] == (256, 8)


def test_gguf_base_metadata_read_by_gguf_reader(tiny_ggufs, tiny_dir) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(tiny_ggufs["base"]))
    fields = {name: reader.fields[name].contents() for name in
              ("general.architecture", "phi3.block_count", "phi3.embedding_length", "tokenizer.ggml.eos_token_id")}
    assert fields == {"general.architecture": "phi3", "phi3.block_count": 2, "phi3.embedding_length": 64,
                      "tokenizer.ggml.eos_token_id": 32000}
    assert "phi3" in reader.fields["general.name"].contents().lower()  # llama.cpp's cue for Phi-3's special tokens
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tokens) == 32064 and tokens[32007] == "<|end|>" == tokenizer.convert_ids_to_tokens(32007)
    shapes = {tensor.name: tuple(int(n) for n in tensor.shape) for tensor in reader.tensors}
    assert shapes["blk.0.attn_qkv.weight"] == (64, 192) and shapes["output.weight"] == (64, 32064)


# --- Ollama ----------------------------------------------------------------------------------------

GO_RENDER = r'''
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	source, _ := os.ReadFile(os.Args[1])
	var data struct{ Messages []Message }
	raw, _ := os.ReadFile(os.Args[2])
	if err := json.Unmarshal(raw, &data.Messages); err != nil {
		panic(err)
	}
	t := template.Must(template.New("ollama").Parse(string(source)))
	if err := t.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
'''

CONVERSATIONS = [
    [{"role": "user", "content": "How do I keep cut apples from browning?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why did my cake sink?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "In short: hello.\n\nTip: {{ braces }} stay text."},
     {"role": "user", "content": "And avocado?"}],
]


@pytest.mark.ollama_go
@pytest.mark.parametrize("model", ["tiny", "smol"])
def test_ollama_template_renders_like_the_chat_template_in_go(model, tmp_path) -> None:
    """Go's own text/template (what Ollama runs) renders the derived TEMPLATE as the tokenizer's template does."""
    go = shutil.which("go")
    assert go is not None, "Go is not installed: `make export-check` installs Debian's golang-go (the reference here)"
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_phi3() if model == "tiny" else build_smol_phi3())
    (tmp_path / "render.go").write_text(GO_RENDER)
    (tmp_path / "template.txt").write_text(export.ollama_template(tokenizer))
    binary = tmp_path / "render"
    subprocess.run([go, "build", "-o", str(binary), str(tmp_path / "render.go")], check=True, cwd=tmp_path,
                   env={"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
                        "GO111MODULE": "off"})
    for index, messages in enumerate(CONVERSATIONS):
        (tmp_path / f"{index}.json").write_text(json.dumps(messages))
        rendered = subprocess.run([str(binary), str(tmp_path / "template.txt"), str(tmp_path / f"{index}.json")],
                                  check=True, capture_output=True, text=True).stdout
        assert rendered == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_modelfile_parses_with_stops_from_the_tokenizer(tiny_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    text = export.ollama_modelfile(tokenizer, "./base-f16.gguf", "./adapter-f16.gguf", system="Be brief.", model=model)
    commands = export.parse_modelfile(text)
    assert [c for c, _ in commands] == ["FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER", "PARAMETER"]
    stops = sorted(value for command, value in commands if command == "PARAMETER")
    assert stops == sorted(f'stop "{token}"' for token in tokenizer.convert_ids_to_tokens([32000, 32007]))
    assert dict(commands)["TEMPLATE"] == export.ollama_template(tokenizer)


def test_a_template_that_drops_the_system_turn_is_refused(tiny_dir) -> None:
    """The chat template inside llama.cpp's Phi-3 vocab GGUF drops system messages: no Modelfile is made from it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = ("{% for message in messages %}{% if message['role'] != 'system' %}<|{{ message['role'] }}|>\n"
                               "{{ message['content'] }}<|end|>\n{% endif %}{% endfor %}<|assistant|>\n")
    with pytest.raises(export.ExportError, match="drops the system turn"):
        export.ollama_template(tokenizer)


def test_modelfile_parser_rejects_unknown_commands() -> None:
    with pytest.raises(export.ExportError, match="unknown command 'FORM'"):
        export.parse_modelfile("FORM ./base.gguf\n")


# --- the Hub -------------------------------------------------------------------------------------------

def test_hub_folder_has_a_model_card_and_push_without_token_touches_nothing(gqa_pair, tmp_path, monkeypatch):
    import huggingface_hub

    llama, phi3 = gqa_pair
    adapter = _random_adapter(phi3, tmp_path / "adapter", ["qkv_proj"], seed=8, r=4, lora_alpha=8)
    folder = export.hub_folder(adapter, tmp_path / "hub", base_model="microsoft/Phi-3-mini-4k-instruct",
                               base_revision="abc123", training={"steps": 30, "learning_rate": 2e-4},
                               metrics=None, repo_id="me/kitchen-coach-lora")
    card = (folder / "README.md").read_text()
    for needed in ("base_model: \"microsoft/Phi-3-mini-4k-instruct\"", "`abc123`", "CC-BY-4.0", "| r | 4 |",
                   "| steps | 30 |", "PeftModel.from_pretrained", "Intended use and limits", "Not evaluated yet"):
        assert needed in card, needed
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "microsoft/Phi-3-mini-4k-instruct"

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was called without a token")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    files = export.push_adapter(folder, "me/kitchen-coach-lora", token=None)
    assert sorted(name for name, _ in files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], sorted(kwargs["allow_patterns"])))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert export.push_adapter(folder, "me/kitchen-coach-lora", token="hf_x") == files
    assert calls == [("token", "hf_x"), ("create_repo", "me/kitchen-coach-lora"),
                     ("upload_folder", "me/kitchen-coach-lora", [name for name, _ in files])]
