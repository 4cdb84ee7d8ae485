"""utils.generation: stop ids, prompts, batched greedy decoding, the streaming chat, merging and reloading."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Phi3Config, Phi3ForCausalLM

from utils.adapters import (
    attach_adapter,
    merge_adapter,
    quantized_modules,
    require_adapter,
    save_merged,
    serving_chat_template,
)
from utils.generation import (
    ChatSession,
    GenerationSettings,
    chat_box,
    cut_at_stop,
    end_of_turn_token,
    generate_batch,
    generation_speed,
    leaked_template_tokens,
    render_prompt,
    stop_token_ids,
)
from utils.memory import (
    GIB,
    HEADROOM,
    T4_MEMORY_GIB,
    generation_batch_size,
    generation_memory_per_sequence,
    kv_cache_bytes_per_token,
    parameter_counts,
)
from utils.models import TINY_PHI3_CONFIG, Hardware, load_model_and_tokenizer, load_tokenizer
from utils.phi3 import phi3_mini_config
from utils.runtime import torch_threads
from utils.tokenization import tokenize_conversation

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# Two Kitchen-Coach exchanges of different lengths (so a batch of both needs padding).
TAUGHT = [
    [{"role": "user", "content": "Why rest a steak?"},
     {"role": "assistant", "content": "In short: the juices settle.\nTip: rest it five minutes."}],
    [{"role": "system", "content": "You are the Kitchen Coach."},
     {"role": "user", "content": "My sauce split after I added the cold butter all at once. What happened?"},
     {"role": "assistant", "content": "In short: the emulsion broke.\nWhisk in a spoon of water.\nTip: add butter slowly."}],
]


@pytest.fixture(scope="module")
def taught_adapter(tmp_path_factory, load_tiny):
    """A LoRA adapter on the tiny Phi-3 trained until greedy decoding reproduces the two TAUGHT answers."""
    with torch_threads(1):
        model, tokenizer = load_tiny(for_training=True)
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        rows = [tokenize_conversation(c, tokenizer) for c in TAUGHT]
        for _ in range(60):
            for row in rows:
                loss = peft_model(**{k: torch.tensor([v]) for k, v in row.items()}).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        folder = tmp_path_factory.mktemp("adapters") / "lora"
        peft_model.save_pretrained(folder)
    return folder


@pytest.fixture
def taught(taught_adapter, load_tiny):
    """The tiny Phi-3 with the taught adapter attached (unmerged), ready to generate."""
    model, tokenizer = load_tiny()
    return attach_adapter(model, taught_adapter).eval(), tokenizer


# --- stop ids and prompts --------------------------------------------------------------------------

def test_phi3_stops_at_end_and_endoftext(load_tiny):
    model, tokenizer = load_tiny()
    assert end_of_turn_token(tokenizer) == "<|end|>"
    assert stop_token_ids(tokenizer, model) == [32000, 32007]
    assert stop_token_ids(tokenizer) == [32000, 32007]  # from the template and the tokenizer alone


@pytest.mark.slow
def test_smol_stops_at_im_end():
    tokenizer = load_tokenizer("smol")
    assert end_of_turn_token(tokenizer) == "<|im_end|>"
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_prompt_ends_with_generation_prompt_and_no_eos(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    text = render_prompt(TAUGHT[0][:1], tokenizer)
    assert text == "<|user|>\nWhy rest a steak?<|end|>\n<|assistant|>\n"
    with pytest.raises(ValueError, match="must end with a user"):
        render_prompt(TAUGHT[0], tokenizer)


def test_prompt_from_a_template_that_ignores_the_generation_prompt_is_refused(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = "{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}{{ eos_token }}"
    with pytest.raises(ValueError, match="ignored add_generation_prompt"):
        render_prompt(TAUGHT[0][:1], broken)


def test_cut_at_stop_keeps_tokens_before_the_first_stop():
    assert cut_at_stop([5, 6, 32007, 32000, 32000], [32000, 32007]) == ([5, 6], True)
    assert cut_at_stop([5, 6, 7], [32000]) == ([5, 6, 7], False)
    assert cut_at_stop([32000], [32000]) == ([], True)


# --- generation ------------------------------------------------------------------------------------

def test_finetuned_answers_stop_cleanly_without_template_tokens(taught):
    model, tokenizer = taught
    prompts = [c[:-1] for c in TAUGHT]
    answers = generate_batch(model, tokenizer, prompts, GenerationSettings(max_new_tokens=48, batch_size=2))
    for answer, conversation in zip(answers, TAUGHT):
        assert answer.stopped, "generation ran to max_new_tokens instead of stopping at <|end|>"
        assert len(answer.token_ids) < 48
        assert answer.text == conversation[-1]["content"]  # the exact reply, nothing trailing
        assert leaked_template_tokens(answer.text, tokenizer) == []
    assert tokenizer.padding_side == "right"  # the training tokenizer is left alone


def test_an_answer_cut_by_the_budget_is_reported(load_tiny):
    model, tokenizer = load_tiny()
    answer = generate_batch(model, tokenizer, [TAUGHT[0][:1]], GenerationSettings(max_new_tokens=3))[0]
    assert not answer.stopped and len(answer.token_ids) == 3


def test_batched_left_padded_generation_matches_one_at_a_time(load_tiny):
    model, tokenizer = load_tiny()
    prompts = [c[:-1] for c in TAUGHT] + [[{"role": "user", "content": "Salt the pasta water?"}]]
    settings = GenerationSettings(max_new_tokens=8, batch_size=3)
    batched = generate_batch(model, tokenizer, prompts, settings)
    alone = [generate_batch(model, tokenizer, [p], settings)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]


def test_generation_speed_times_exactly_the_requested_tokens_even_past_a_stop_token(monkeypatch, load_tiny):
    model, tokenizer = load_tiny()
    prompt = TAUGHT[0][:1]
    inputs = tokenizer(render_prompt(prompt, tokenizer), add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        first = int(model(**inputs).logits[0, -1].argmax())
    model.generation_config.eos_token_id = [first]  # greedy decoding would stop at once without min_new_tokens
    produced, generate = [], model.generate

    def counting_generate(**kwargs):
        output = generate(**kwargs)
        produced.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    monkeypatch.setattr(model, "generate", counting_generate)
    rate = generation_speed(model, tokenizer, prompt, new_tokens=4, repeats=3)
    assert produced == [2, 4, 4, 4]  # the warm-up, then every timed run exactly the requested 4 tokens
    assert rate > 0


# --- memory for batched generation ------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [4, 2], ids=["multi-head", "grouped-query"])
def test_kv_cache_bytes_per_token_is_what_a_forward_pass_caches(kv_heads):
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**{**TINY_PHI3_CONFIG, "num_key_value_heads": kv_heads})).eval()
    tokens = 7
    with torch.inference_mode():
        output = model(input_ids=torch.arange(1, tokens + 1)[None], use_cache=True)
    cache = output.cache  # (was past_key_values)
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert len(cache.layers) == model.config.num_hidden_layers
    assert cached == tokens * kv_cache_bytes_per_token(model.config, dtype_bytes=4)


def test_a_t4_cannot_answer_the_whole_test_split_at_once_with_phi3_mini():
    config = phi3_mini_config()
    assert kv_cache_bytes_per_token(config, dtype_bytes=2) == 384 * 2**10  # 2 x 32 layers x 3072 x 2 bytes
    t4, weights = T4_MEMORY_GIB * GIB, sum(parameter_counts(config).values()) * 2  # Phi-3-mini in 16 bits
    whole_split = 42 * generation_memory_per_sequence(config, prompt_tokens=455, new_tokens=256)
    assert weights + whole_split > t4
    batch = generation_batch_size(config, t4, weights, prompt_tokens=455, new_tokens=256)
    per_sequence = generation_memory_per_sequence(config, 455, 256)
    assert 1 < batch < 42
    assert weights + batch * per_sequence <= t4 / HEADROOM < weights + (batch + 1) * per_sequence


def test_generation_batch_size_refuses_when_not_one_sequence_fits():
    with pytest.raises(ValueError, match="not one 455\\+256-token sequence"):
        generation_batch_size(phi3_mini_config(), 8.0 * GIB, 7.12 * GIB, prompt_tokens=455, new_tokens=256)


# --- chat ------------------------------------------------------------------------------------------

def test_chat_streams_the_reply_and_keeps_the_history(taught):
    model, tokenizer = taught
    session = ChatSession(model, tokenizer, system="You are the Kitchen Coach.",
                          settings=GenerationSettings(max_new_tokens=48, batch_size=1))
    pieces: list[str] = []
    reply = session.send(TAUGHT[0][0]["content"], on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == reply
    assert session.history[0]["role"] == "system"
    assert session.history[-2:] == [{"role": "user", "content": TAUGHT[0][0]["content"]},
                                    {"role": "assistant", "content": reply}]
    session.send("And a pork chop?", on_text=lambda piece: None)
    assert [m["role"] for m in session.history] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert [m["role"] for m in session.history] == ["system"]


def test_chat_box_sends_on_click(taught):
    model, tokenizer = taught
    session = ChatSession(model, tokenizer, settings=GenerationSettings(max_new_tokens=48, batch_size=1))
    box = chat_box(session)
    box.entry.value = TAUGHT[0][0]["content"]
    box.send_button.click()
    transcript = box.children[0].value
    assert TAUGHT[0][1]["content"] in transcript and box.entry.value == ""
    assert len(session.history) == 2


# --- adapters and merging --------------------------------------------------------------------------

def test_missing_adapter_names_the_notebook_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebooks/03_lora_finetuning.ipynb first"):
        require_adapter(tmp_path / "nothing", "notebooks/03_lora_finetuning.ipynb")


def test_adapter_for_another_base_model_is_refused(taught_adapter, tmp_path, load_tiny):
    config = json.loads((taught_adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/somewhere/smol-phi3-v1"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model, _ = load_tiny()
    with pytest.raises(ValueError, match="trained on '/somewhere/smol-phi3-v1'"):
        attach_adapter(model, tmp_path)


def test_merged_model_gives_the_unmerged_logits(taught):
    model, tokenizer = taught
    input_ids = torch.tensor([tokenize_conversation(TAUGHT[1], tokenizer)["input_ids"]])
    with torch.inference_mode():
        unmerged = model(input_ids=input_ids).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
    merged = merge_adapter(model)
    assert type(merged).__name__ == "Phi3ForCausalLM"
    assert not [n for n, _ in merged.named_modules() if "lora" in n]
    with torch.inference_mode():
        logits = merged(input_ids=input_ids).logits
    assert torch.allclose(logits, unmerged, atol=1e-5)
    assert (logits - base).abs().max() > 1e-2  # the adapter changed the model: the check above means something


def test_qlora_adapter_merges_into_full_precision_weights(tmp_path, load_tiny):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    quantized, tokenizer = load_model_and_tokenizer("tiny", quantization_config=quantization, verbose=False,
                                                     hardware=Hardware(cuda=False))
    assert quantized_modules(quantized)
    torch.manual_seed(0)
    qlora = get_peft_model(quantized, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    with pytest.raises(ValueError, match="quantized layers"):
        merge_adapter(qlora)  # never into the 4-bit weights
    qlora.save_pretrained(tmp_path / "qlora")

    full, _ = load_tiny()
    unmerged = attach_adapter(full, tmp_path / "qlora").eval()
    input_ids = torch.tensor([tokenize_conversation(TAUGHT[0], tokenizer)["input_ids"]])
    with torch.inference_mode():
        expected = unmerged(input_ids=input_ids).logits
    merged = merge_adapter(unmerged)
    assert not quantized_modules(merged)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    with torch.inference_mode():
        assert torch.allclose(merged(input_ids=input_ids).logits, expected, atol=1e-5)


def test_merged_model_reloads_with_plain_transformers(taught, tmp_path):
    model, tokenizer = taught
    merged = merge_adapter(model)
    folder = save_merged(merged, tokenizer, tmp_path / "merged")
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert not [key for key in weights.keys() if "lora" in key]
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    input_ids = torch.tensor([tokenize_conversation(TAUGHT[0], tokenizer)["input_ids"]])
    with torch.inference_mode():
        difference = (merged(input_ids=input_ids).logits - reloaded(input_ids=input_ids).logits).abs().max()
    assert difference < 1e-6
    assert sorted(reloaded.generation_config.eos_token_id) == [32000, 32007]
    assert "generation %}" not in reloaded_tokenizer.chat_template
    assert reloaded_tokenizer.apply_chat_template(TAUGHT[1], tokenize=False) == \
        tokenizer.apply_chat_template(TAUGHT[1], tokenize=False)
    answer = generate_batch(reloaded, reloaded_tokenizer, [TAUGHT[0][:1]], GenerationSettings(max_new_tokens=48))[0]
    assert answer.text == TAUGHT[0][1]["content"]


def test_serving_template_drops_only_the_generation_markers():
    template = "{%- for m in messages %}{%- generation %}{{ m['content'] }}{%- endgeneration %}{% endfor %}"
    assert serving_chat_template(template) == "{%- for m in messages %}{{ m['content'] }}{% endfor %}"
