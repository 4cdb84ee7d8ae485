"""The model registry, the real Phi-3 tokenizer, the Llama -> Phi-3 conversion and the GPU decisions."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Phi3ForCausalLM

from utils import models
from utils.assets import AssetError, phi3_vocab_oracle, verify_sha256
from utils.atomic import atomic_folder
from utils.convert import llama_to_phi3, phi3_config_from_llama
from utils.models import Hardware, build_phi3_tokenizer, load_model_and_tokenizer, plan_loading, resolve_model_name
from utils.phi3 import PHI3_SPECIAL_TOKENS, phi3_mini_config


@pytest.fixture(scope="module")
def phi3_tokenizer():
    return AutoTokenizer.from_pretrained(build_phi3_tokenizer())


# --- the real Phi-3 tokenizer ---------------------------------------------------------------

def test_tokenizer_matches_llama_cpp_reference_ids(phi3_tokenizer):
    oracle = phi3_vocab_oracle()
    assert len(oracle) >= 40
    mismatches = [(text, ids, phi3_tokenizer.encode(text, add_special_tokens=False))
                  for text, ids in oracle if phi3_tokenizer.encode(text, add_special_tokens=False) != ids]
    assert not mismatches, mismatches[:3]


def test_special_token_ids(phi3_tokenizer):
    assert len(phi3_tokenizer) == 32064
    for token, token_id in PHI3_SPECIAL_TOKENS.items():
        assert phi3_tokenizer.convert_tokens_to_ids(token) == token_id
    assert phi3_tokenizer.eos_token_id == 32000
    assert phi3_tokenizer.pad_token_id == 32000
    assert phi3_tokenizer.bos_token_id == 1


def test_load_tokenizer_builds_no_model_and_equals_the_tokenizer_saved_beside_it(tmp_path, monkeypatch):
    built = models.build_tiny_phi3()  # in the real cache: the tokenizer the tiny model was saved with
    beside_the_model = models._use_training_template(AutoTokenizer.from_pretrained(built))
    empty_cache = tmp_path / "cache"
    shutil.copytree(build_phi3_tokenizer(), empty_cache / build_phi3_tokenizer().name)  # the tokenizer alone
    monkeypatch.setenv("PHI3_LORA_CACHE", str(empty_cache))
    for name in ("tiny", "phi3-mini-random"):
        tokenizer = models.load_tokenizer(name)
        assert sorted(path.name for path in empty_cache.iterdir()) == [build_phi3_tokenizer().name]  # no model built
        assert tokenizer.get_vocab() == beside_the_model.get_vocab()
        assert tokenizer.chat_template == beside_the_model.chat_template
        assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side, tokenizer.model_max_length) == (
            beside_the_model.eos_token, beside_the_model.pad_token, beside_the_model.padding_side,
            beside_the_model.model_max_length)


def test_chat_template_renders_phi3_format_with_system_turn():
    tokenizer = models.load_tokenizer("tiny")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|endoftext|>"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nHi<|end|>\n<|assistant|>\n")


def test_training_template_renders_like_the_models_own_template():
    from trl.chat_template_utils import phi3_chat_template

    tokenizer = models.load_tokenizer("tiny")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ours = tokenizer.apply_chat_template(messages, tokenize=False)
    theirs = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=phi3_chat_template)
    assert ours == theirs
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    kept = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert PHI3_SPECIAL_TOKENS["<|end|>"] in kept  # the model learns to stop
    assert PHI3_SPECIAL_TOKENS["<|user|>"] not in kept


# --- registry -----------------------------------------------------------------------------

def test_resolve_auto_follows_cuda():
    assert resolve_model_name("auto", cuda_available=True).name == "phi3-mini"
    assert resolve_model_name("auto", cuda_available=True).source == "microsoft/Phi-3-mini-4k-instruct"
    assert resolve_model_name("auto", cuda_available=False).name == "smol"
    assert "no CUDA GPU" in resolve_model_name("auto", cuda_available=False).reason


def test_resolve_reads_the_environment(monkeypatch):
    monkeypatch.setenv(models.MODEL_ENV_VAR, "smol")
    assert resolve_model_name().name == "smol"
    assert resolve_model_name("tiny").name == "tiny"  # an explicit name wins


def test_resolve_accepts_hub_ids_and_folders(tmp_path):
    assert resolve_model_name("someone/phi-3-finetune").source == "someone/phi-3-finetune"
    assert resolve_model_name(str(tmp_path)).source == str(tmp_path)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError) as error:
        resolve_model_name("phi3-large")
    message = str(error.value)
    for name in ("auto", "tiny", "smol", "phi3-mini"):
        assert name in message
    assert "phi3-large" in message


def test_tiny_model_is_a_small_deterministic_phi3():
    first, second = models.tiny_phi3_model(), models.tiny_phi3_model()
    assert isinstance(first, Phi3ForCausalLM)
    count = sum(p.numel() for p in first.parameters())
    assert 1e6 < count < 1e7
    assert first.model.layers[0].self_attn.qkv_proj.out_features == 3 * first.config.hidden_size
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_tiny_model_builds_without_touching_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.tiny_phi3_model()
    assert torch.equal(torch.rand(3), expected)


def test_load_tiny_for_training_and_for_generation():
    model, tokenizer = load_model_and_tokenizer("tiny", verbose=False)
    assert isinstance(model, Phi3ForCausalLM) and model.config.use_cache is False
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    model, _ = load_model_and_tokenizer("tiny", for_training=False, verbose=False)
    assert model.config.use_cache is True
    assert "{% generation %}" in tokenizer.chat_template


# --- GPU decision logic (cannot run here, so the decisions are tested directly) -------------

@pytest.mark.parametrize(
    ("hardware", "dtype", "attention"),
    [
        (Hardware(cuda=True, gpu_name="A100", bf16=True, flash_attn=True), torch.bfloat16, "flash_attention_2"),
        (Hardware(cuda=True, gpu_name="A100", bf16=True, flash_attn=False), torch.bfloat16, "sdpa"),
        (Hardware(cuda=True, gpu_name="T4", bf16=False, flash_attn=False), torch.float16, "sdpa"),
        (Hardware(cuda=False), torch.float32, "sdpa"),
    ],
)
def test_plan_loading(hardware, dtype, attention):
    plan = plan_loading(hardware)
    assert (plan.dtype, plan.attn_implementation) == (dtype, attention)
    assert plan.device == ("cuda" if hardware.cuda else "cpu")


def test_phi3_mini_on_a_gpu_is_loaded_with_the_planned_settings(monkeypatch):
    """The real Phi-3-mini path, end to end, with the Hub calls replaced by recorders."""
    calls = {}
    tiny_tokenizer = models.load_tokenizer("tiny")

    def fake_model_loader(source, **kwargs):
        calls["model"] = (source, kwargs)
        return models.tiny_phi3_model()

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fake_model_loader)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda source, **kw: tiny_tokenizer)
    monkeypatch.setenv("LOCAL_RANK", "1")
    gpu = Hardware(cuda=True, gpu_name="H100", bf16=True, flash_attn=True, gpu_memory_gib=80)
    model, tokenizer = load_model_and_tokenizer("phi3-mini", hardware=gpu, verbose=False)
    source, kwargs = calls["model"]
    assert source == "microsoft/Phi-3-mini-4k-instruct"
    assert kwargs["dtype"] == torch.bfloat16
    assert kwargs["attn_implementation"] == "flash_attention_2"
    assert kwargs["device_map"] == {"": 1}  # each `accelerate launch` rank on its own GPU
    assert "trust_remote_code" not in kwargs
    assert model.config.use_cache is False

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP shards the weights itself
    load_model_and_tokenizer("phi3-mini", hardware=gpu, verbose=False)
    assert "device_map" not in calls["model"][1]


# --- the Llama -> Phi-3 conversion ---------------------------------------------------------

def _small_llama(tie: bool) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tie,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_conversion_is_exact_on_a_random_gqa_llama(tie):
    llama = _small_llama(tie)
    phi3 = llama_to_phi3(llama)
    assert isinstance(phi3, Phi3ForCausalLM)
    assert phi3.config.num_key_value_heads == 2
    assert phi3.model.layers[0].self_attn.qkv_proj.weight.shape == (48 + 2 * 2 * 8, 48)
    assert phi3.model.layers[0].mlp.gate_up_proj.weight.shape == (2 * 96, 48)
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(phi3(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
    if tie:
        assert phi3.lm_head.weight.data_ptr() == phi3.model.embed_tokens.weight.data_ptr()


def test_conversion_refuses_what_phi3_cannot_express():
    config = _small_llama(True).config
    config.attention_bias = True
    with pytest.raises(ValueError, match="bias"):
        phi3_config_from_llama(config)


@pytest.mark.slow
def test_smol_phi3_matches_the_original_smollm2():
    """SmolLM2-135M-Instruct as Llama and as converted Phi-3 give the same logits on a chat prompt."""
    llama, llama_tokenizer = models.load_smollm2_llama()
    phi3, tokenizer = load_model_and_tokenizer("smol", for_training=False, verbose=False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert inputs["input_ids"].tolist() == llama_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(phi3(**inputs).logits, llama.eval()(**inputs).logits, atol=1e-4, rtol=0)
    assert isinstance(phi3, Phi3ForCausalLM) and phi3.config.num_key_value_heads == 3
    answer = phi3.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, inputs["input_ids"].shape[1]:])


@pytest.mark.slow
def test_smol_training_template_renders_like_smollm2s_own():
    tokenizer = models.load_tokenizer("smol")
    original = (models._TEMPLATES / "smollm2.jinja").read_text(encoding="utf-8")
    for messages in ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                     [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d"}]):
        for prompt in (False, True):
            assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == \
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt,
                                              chat_template=original)


# --- assets -------------------------------------------------------------------------------

def test_checksum_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"not the real thing")
    with pytest.raises(AssetError, match="does not match"):
        verify_sha256(path, "0" * 64)


def test_failed_build_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_folder(target, manifest=False) as staging:
            (staging / "half-written").write_text("x")
            raise RuntimeError("crash mid-build")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


# --- the GPU decisions, on this CPU machine -------------------------------------------------

def _fake_gpu(monkeypatch, major: int, name: str, memory_gib: float, count: int = 1) -> None:
    """Make torch report a CUDA GPU of compute capability ``major`` (nothing runs on it)."""
    props = type("Props", (), {"name": name, "major": major, "minor": 5, "total_memory": int(memory_gib * 2**30)})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: props)
    # On a real T4 a bf16 tensor *can* be created (emulation): that is what fooled the old check.
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)


def test_a_t4_gets_fp16_not_emulated_bf16(monkeypatch):
    _fake_gpu(monkeypatch, major=7, name="Tesla T4", memory_gib=15.0)
    hardware = models.detect_hardware()
    assert hardware.bf16 is False and hardware.gpu_memory_gib == pytest.approx(15.0)
    plan = plan_loading(hardware)
    assert plan.dtype == torch.float16 and "fp16" in plan.reason and plan.device_map == {"": 0}


def test_an_ampere_gpu_gets_bf16_and_counts_its_gpus(monkeypatch):
    _fake_gpu(monkeypatch, major=8, name="NVIDIA A100", memory_gib=39.4, count=2)
    hardware = models.detect_hardware()
    assert hardware.bf16 is True and hardware.gpu_count == 2
    assert plan_loading(hardware).dtype == torch.bfloat16


def test_each_rank_loads_onto_its_own_gpu_and_sharding_engines_place_weights_themselves(monkeypatch):
    gpu = Hardware(cuda=True, gpu_name="GPU", bf16=True, gpu_memory_gib=80)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert plan_loading(gpu).device_map == {"": 1}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert plan_loading(gpu).device_map is None
    assert plan_loading(Hardware(cuda=False)).device_map is None


def test_sharded_qlora_stores_4bit_weights_in_the_compute_dtype(monkeypatch):
    assert models.nf4_config(torch.bfloat16).bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    config = models.nf4_config(torch.bfloat16)
    assert config.bnb_4bit_quant_storage == torch.bfloat16 and config.bnb_4bit_use_double_quant


def test_the_full_size_stand_in_has_phi3_minis_published_size():
    choice = resolve_model_name("phi3-mini-random")
    assert choice.is_builtin and "random" in models.MODEL_CHOICES[choice.name]
    with torch.device("meta"):
        model = Phi3ForCausalLM(phi3_mini_config())
    assert sum(p.numel() for p in model.parameters()) == 3_821_079_552  # microsoft/Phi-3-mini-4k-instruct
    assert model.model.layers[0].self_attn.qkv_proj.out_features == 3 * 3072


@pytest.mark.parametrize("dtype, same, expected", [
    (torch.float32, True, 1e-5), (torch.float32, False, 1e-4), (torch.float16, True, 1e-2), (torch.bfloat16, True, 3e-2),
])
def test_logit_tolerance_follows_the_dtype(dtype, same, expected):
    from utils.runtime import logit_tolerance

    assert logit_tolerance(dtype, same_kernels=same) == expected


def test_logit_tolerance_holds_for_a_real_bf16_recomputation():
    """Two summation orders of the same product in bf16 stay within the bf16 tolerance, not within fp32's."""
    from utils.runtime import logit_tolerance

    torch.manual_seed(0)
    w, b, a = torch.randn(64, 64), torch.randn(64, 4) * 0.05, torch.randn(4, 64) * 0.05
    x = torch.randn(8, 64)
    for dtype in (torch.bfloat16, torch.float32):
        merged = x.to(dtype) @ (w + b @ a).to(dtype).T
        separate = x.to(dtype) @ w.to(dtype).T + (x.to(dtype) @ a.to(dtype).T) @ b.to(dtype).T
        error = (merged - separate).abs().max().float() / merged.abs().max().float()
        assert error <= logit_tolerance(dtype, same_kernels=False)
    assert error > 0  # fp32 rounds too, just less


def _4bit_input_gradient_after_an_evaluation_pass(cpu_kernel_allowed: bool):
    """The gradient reaching the input of one 4-bit layer, after a forward without gradients (an evaluation)."""
    model, _ = load_model_and_tokenizer("tiny", quantization_config=models.nf4_config(torch.float32), verbose=False)
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "Linear4bit" and layer.support_avx512bf16_for_cpu is False  # the loader's switch
    layer.support_avx512bf16_for_cpu = cpu_kernel_allowed
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, layer.in_features))  # after this the CPU kernel would take over
    layer.train()
    x = torch.randn(2, layer.in_features, requires_grad=True)
    try:
        layer(x).sum().backward()
    except RuntimeError:
        return None
    return x.grad


def test_4bit_layers_keep_their_gradient_after_an_evaluation_pass():
    """bitsandbytes' CPU inference kernel (on AVX-512 bf16 CPUs) has no backward: the loader switches it off."""
    gradient = _4bit_input_gradient_after_an_evaluation_pass(cpu_kernel_allowed=False)
    assert gradient is not None and gradient.abs().sum() > 0
