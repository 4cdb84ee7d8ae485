"""utils.evaluation: assistant-token loss, task metrics, results JSON."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from utils.evaluation import (
    LossResult,
    assistant_token_loss,
    opening_logprob,
    prompts_and_references,
    read_results,
    score_answers,
    summarize_generations,
    write_results,
)
from utils.generation import Generated, GenerationSettings, render_prompt
from utils.tokenization import IGNORE_INDEX, tokenize_conversation

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Why rest a steak?"},
                  {"role": "assistant", "content": "In short: the juices settle.\nTip: rest it five minutes."}]},
    {"messages": [{"role": "system", "content": "You are the Kitchen Coach."},
                  {"role": "user", "content": "My mayonnaise split. Can I save it?"},
                  {"role": "assistant", "content": "In short: yes.\nStart a new yolk and whisk the split mix in.\n"
                                                   "Tip: add the oil drop by drop."},
                  {"role": "user", "content": "And if it splits again?"},
                  {"role": "assistant", "content": "In short: your oil is too cold or too fast.\nTip: go slower."}]},
    {"messages": [{"role": "user", "content": "Salt the pasta water?"},
                  {"role": "assistant", "content": "Yes, generously."}]},
]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(load_tiny):
    """One tiny Phi-3 (random weights) and its tokenizer for the tests that only read it."""
    return load_tiny()


# --- loss ------------------------------------------------------------------------------------------

def test_loss_of_one_conversation_is_the_model_loss_on_assistant_labels(tiny):
    model, tokenizer = tiny
    row = tokenize_conversation(CONVERSATIONS[1]["messages"], tokenizer)
    with torch.inference_mode():
        expected = model(**{k: torch.tensor([v]) for k, v in row.items()}).loss.item()
    result = assistant_token_loss(model, tokenizer, CONVERSATIONS[1:2])
    assert result.assistant_tokens == sum(label != IGNORE_INDEX for label in row["labels"][1:])
    assert result.assistant_tokens < len(row["input_ids"]) / 2 + 20  # the prompts are not scored
    assert result.loss == pytest.approx(expected, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_padded_batches_give_the_token_weighted_mean_of_single_conversations(tiny):
    model, tokenizer = tiny
    singles = [assistant_token_loss(model, tokenizer, [c]) for c in CONVERSATIONS]
    batched = assistant_token_loss(model, tokenizer, CONVERSATIONS, batch_size=3)
    tokens = sum(s.assistant_tokens for s in singles)
    assert batched.assistant_tokens == tokens and batched.conversations == 3
    assert batched.loss == pytest.approx(sum(s.loss * s.assistant_tokens for s in singles) / tokens, abs=1e-5)


def test_loss_runs_through_an_active_adapter(load_tiny):
    model, tokenizer = load_tiny()
    base = assistant_token_loss(model, tokenizer, CONVERSATIONS)
    torch.manual_seed(0)
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["qkv_proj", "down_proj"],
                                               init_lora_weights=False)).eval()
    row = tokenize_conversation(CONVERSATIONS[0]["messages"], tokenizer)
    with torch.inference_mode():
        expected = adapted(**{k: torch.tensor([v]) for k, v in row.items()}).loss.item()
    assert assistant_token_loss(adapted, tokenizer, CONVERSATIONS[:1]).loss == pytest.approx(expected, abs=1e-5)
    assert abs(assistant_token_loss(adapted, tokenizer, CONVERSATIONS).loss - base.loss) > 1e-3


def test_loss_without_assistant_tokens_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="No assistant tokens"):
        assistant_token_loss(model, tokenizer, CONVERSATIONS[:1], max_length=5)


# --- how likely an answer opens with a phrase -------------------------------------------------------

def reference_opening_logprob(model, tokenizer, messages, opening):
    """The same quantity from a plain forward pass over the whole text: sum of log-softmax at the opening's tokens."""
    prompt = render_prompt(messages, tokenizer)
    start = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    ids = tokenizer(prompt + opening, add_special_tokens=False).input_ids
    with torch.inference_mode():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(start, len(ids)))


def test_opening_logprob_is_the_log_probability_of_the_opening_tokens(tiny):
    model, tokenizer = tiny
    prompts, _ = prompts_and_references(CONVERSATIONS)
    expected = [reference_opening_logprob(model, tokenizer, p, "In short:") for p in prompts]
    assert opening_logprob(model, tokenizer, prompts, "In short:", batch_size=3) == pytest.approx(expected, abs=1e-4)
    assert opening_logprob(model, tokenizer, prompts[:1], "In short:") == pytest.approx(expected[:1], abs=1e-4)
    assert all(value < 0 for value in expected)


def test_opening_logprob_runs_through_an_active_adapter(load_tiny):
    model, tokenizer = load_tiny()
    prompts, _ = prompts_and_references(CONVERSATIONS[:2])
    base = opening_logprob(model, tokenizer, prompts, "In short:")
    torch.manual_seed(0)
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["qkv_proj", "down_proj"],
                                               init_lora_weights=False)).eval()
    expected = [reference_opening_logprob(adapted, tokenizer, p, "In short:") for p in prompts]
    assert opening_logprob(adapted, tokenizer, prompts, "In short:") == pytest.approx(expected, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(expected, base)) > 1e-3


def test_opening_with_a_trailing_space_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="without a trailing space"):
        opening_logprob(model, tokenizer, [CONVERSATIONS[0]["messages"][:1]], "In short: ")


# --- metrics ---------------------------------------------------------------------------------------

def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence():
    def rouge_l(prediction: str, reference: str) -> float:
        return score_answers([prediction], [reference])["rouge_l"]

    assert rouge_l("Rest the steak.", "Rest the steak.") == pytest.approx(1.0)
    assert rouge_l("boil", "Rest the steak.") == 0.0
    # LCS "the cat sat" = 3 words: precision 3/3, recall 3/6, F1 = 2/3.
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)


def test_scores_count_house_style_and_average_rouge():
    styled = "In short: yes.\nWhisk it.\nTip: go slowly."
    scores = score_answers([styled, "Just whisk it."], [styled, styled])
    assert scores["house_style"] == pytest.approx(0.5)
    # "just whisk it" against 8 stemmed words: LCS "whisk it", precision 2/3, recall 2/8, F1 = 4/11.
    assert scores["rouge_l"] == pytest.approx((1.0 + 4 / 11) / 2)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_answers(["a", "b"], ["a"])


def test_summary_reports_how_answers_ended():
    answers = [Generated("In short: yes.\nTip: salt.", [1, 2, 3], True), Generated("rambling", [4] * 9, False)]
    summary = summarize_generations(answers, ["In short: yes.\nTip: salt.", "x"])
    assert summary["stopped"] == 0.5 and summary["mean_new_tokens"] == 6.0 and summary["house_style"] == 0.5


def test_prompts_end_before_the_last_assistant_turn():
    prompts, references = prompts_and_references(CONVERSATIONS)
    assert prompts[1] == CONVERSATIONS[1]["messages"][:-1] and prompts[1][-1]["role"] == "user"
    assert references[1] == "In short: your oil is too cold or too fast.\nTip: go slower."
    with pytest.raises(ValueError, match="Test conversation 2 does not end"):
        prompts_and_references([CONVERSATIONS[0], {"messages": CONVERSATIONS[0]["messages"][:1]}])


# --- results ---------------------------------------------------------------------------------------

def test_results_round_trip_with_settings_and_environment(tmp_path):
    path = write_results(tmp_path / "metrics" / "evaluation.json", {
        "model": "tiny", "adapters": {"lora": Path("/x/adapters/lora")},
        "generation_settings": GenerationSettings(max_new_tokens=16),
        "loss": {"base": LossResult(2.0, math.exp(2.0), 10, 1)},
    })
    results = read_results(path)
    assert results["adapters"]["lora"] == "/x/adapters/lora"
    assert results["generation_settings"]["max_new_tokens"] == 16 and results["generation_settings"]["do_sample"] is False
    assert results["loss"]["base"]["assistant_tokens"] == 10
    assert {"torch", "transformers", "peft", "device"} <= set(results["environment"]) and results["created"]
