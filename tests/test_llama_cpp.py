"""llama.cpp itself loads what the series exports and computes what transformers + PEFT compute.

Needs the ``llama_cpp`` binding built from the pinned, sha256-checked sdist (``make llama-cpp``, about 18 minutes
on 2 cores, once); ``make export-check`` builds it and runs ``pytest -m llama_cpp``, which ``.ci/run`` calls.
The tiny model's adapter is trained here for a few steps with PEFT, so A and B are both non-zero.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils import export
from utils.adapters import save_merged
from utils.models import build_smol_phi3, build_tiny_phi3

pytestmark = pytest.mark.llama_cpp

PROMPT = [{"role": "system", "content": "Answer briefly."},
          {"role": "user", "content": "How do I keep cut apples from turning brown?"}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Train a tiny adapter, record transformers' logits, and write every GGUF with llama.cpp's converters."""
    pytest.importorskip("llama_cpp", reason="build the binding first: make llama-cpp")
    folder = tmp_path_factory.mktemp("llama-cpp")
    base_dir = build_tiny_phi3()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = tokenizer.apply_chat_template(PROMPT, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    training = tokenizer.apply_chat_template(PROMPT + [{"role": "assistant", "content": "In short: lemon juice."}],
                                             tokenize=True, return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.inference_mode():
        base_logits = model(input_ids=torch.tensor([ids])).logits[0]
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    optimizer = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.tensor([training])
    for _ in range(8):  # a few steps: B moves away from its zero initialisation
        peft(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft.eval()
    peft.save_pretrained(folder / "adapter")
    with torch.inference_mode():
        adapter_logits = peft(input_ids=torch.tensor([ids])).logits[0]
    save_merged(peft.merge_and_unload(), tokenizer, folder / "merged")
    outputs = {"base-f16": ("model", base_dir, "f16"), "base-q8_0": ("model", base_dir, "q8_0"),
               "adapter-f16": ("adapter", folder / "adapter", "f16"),
               "adapter-q8_0": ("adapter", folder / "adapter", "q8_0"),
               "merged-f16": ("model", folder / "merged", "f16")}
    jobs = {}
    for name, (kind, source, outtype) in outputs.items():
        temporary = folder / f".{name}.tmp"
        jobs[folder / f"{name}.gguf"] = (export.model_gguf_job(source, temporary, outtype) if kind == "model" else
                                         export.adapter_gguf_job(source, base_dir, temporary, outtype))
    export.write_ggufs(jobs)
    return {"folder": folder, "ids": ids, "base": base_logits, "adapter": adapter_logits, "tokenizer": tokenizer,
            "model": model}


def _gguf(exported: dict, name: str) -> Path:
    return exported["folder"] / f"{name}.gguf"


@pytest.mark.parametrize("base, adapter, tolerance", [
    ("base-f16", "adapter-f16", "f16"),
    ("base-q8_0", "adapter-f16", "q8_0"),
    ("base-q8_0", "adapter-q8_0", "q8_0"),
])
def test_llama_cpp_base_plus_gguf_adapter_matches_peft(exported, base, adapter, tolerance) -> None:
    got = export.llama_cpp_logits(_gguf(exported, base), exported["ids"], _gguf(exported, adapter))
    absolute, relative = export.relative_difference(got, exported["adapter"])
    _, effect = export.relative_difference(exported["adapter"], exported["base"])
    print(f"{base} + {adapter}: max |diff| {absolute:.2e}, relative {relative:.2e} "
          f"(tolerance {export.GGUF_TOLERANCE[tolerance]:.1e}); the adapter moves the logits by {effect:.2e}")
    assert effect > 10 * export.GGUF_TOLERANCE["f16"]  # the f16 comparison would fail an ignored adapter
    assert relative < export.GGUF_TOLERANCE[tolerance]


def test_llama_cpp_base_alone_matches_transformers(exported) -> None:
    got = export.llama_cpp_logits(_gguf(exported, "base-f16"), exported["ids"])
    assert export.relative_difference(got, exported["base"])[1] < export.GGUF_TOLERANCE["f16"]


def test_llama_cpp_merged_gguf_matches_peft(exported) -> None:
    got = export.llama_cpp_logits(_gguf(exported, "merged-f16"), exported["ids"])
    absolute, relative = export.relative_difference(got, exported["adapter"])
    print(f"merged-f16: max |diff| {absolute:.2e}, relative {relative:.2e}")
    assert relative < export.GGUF_TOLERANCE["f16"]


def test_llama_cpp_greedy_tokens_match_peft(exported) -> None:
    """Where transformers' top token leads by a clear margin, llama.cpp picks the same one."""
    got = export.llama_cpp_logits(_gguf(exported, "base-f16"), exported["ids"], _gguf(exported, "adapter-f16"))
    reference = exported["adapter"]
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > export.GGUF_TOLERANCE["f16"] * reference.abs().max() * 2
    assert clear.sum() >= len(exported["ids"]) // 2
    assert torch.equal(got.argmax(-1)[clear], reference.argmax(-1)[clear])


def test_modelfile_passes_an_ollama_modelfile_linter(exported) -> None:
    """owist-modelfile-lint (MIT, PyPI; installed by make llama-cpp) parses the Modelfile and opens its GGUFs."""
    linter = pytest.importorskip("owist_modelfile_lint", reason="make llama-cpp installs owist-modelfile-lint")
    text = export.ollama_modelfile(exported["tokenizer"], "./base-f16.gguf", "./adapter-f16.gguf",
                                   system="Answer briefly.", model=exported["model"])
    path = exported["folder"] / "Modelfile"
    path.write_text(text, encoding="utf-8")
    result = linter.lint(path, estimate_resources=False)
    assert result.ok and not result.errors, [str(issue) for issue in result.issues]
    assert [i.keyword for i in linter.parser.parse(text).instructions] == [c for c, _ in export.parse_modelfile(text)]


@pytest.mark.slow
def test_llama_cpp_loads_the_smol_model_with_its_own_bpe_vocabulary(tmp_path) -> None:
    """SmolLM2's byte-level BPE vocabulary in Phi-3's layout: llama.cpp loads it and computes transformers' logits."""
    pytest.importorskip("llama_cpp", reason="build the binding first: make llama-cpp")
    smol = build_smol_phi3()
    gguf = export.model_to_gguf(smol, tmp_path / "smol-f16.gguf", "f16")
    tokenizer = AutoTokenizer.from_pretrained(smol)
    ids = tokenizer.apply_chat_template(PROMPT, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = model(input_ids=torch.tensor([ids])).logits[0]
    relative = export.relative_difference(export.llama_cpp_logits(gguf, ids, threads=2), reference)[1]
    print(f"smol f16: relative {relative:.2e}")
    assert relative < export.GGUF_TOLERANCE["f16"]
    assert torch.equal(export.llama_cpp_logits(gguf, ids).argmax(-1)[-1:], reference.argmax(-1)[-1:])
