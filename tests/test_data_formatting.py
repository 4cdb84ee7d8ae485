"""Chat-template rendering and the assistant-only loss mask, on the real Phi-3 tokenizer and the smol ChatML one."""

from __future__ import annotations

import pytest
from trl.chat_template_utils import phi3_chat_template

from utils.data import (
    IGNORE_INDEX,
    assistant_spans,
    conversation_length,
    fit_to_length,
    mark_assistant_tokens,
    special_token_ids,
    to_sft_dataset,
    token_table,
    token_texts,
    tokenize_conversation,
    truncate_at_turn,
)
from utils.models import PHI3_SPECIAL_TOKENS, load_tokenizer

MESSAGES = [
    {"role": "system", "content": "You are Kitchen Coach."},
    {"role": "user", "content": "Why is my bread dense?"},
    {"role": "assistant", "content": "In short: the dough did not rise enough.\nKnead longer and let it double.\nTip: Proof it somewhere warm."},
    {"role": "user", "content": "And if it is too sour?"},
    {"role": "assistant", "content": "In short: shorten the ferment.\nTip: Refrigerate the dough overnight instead."},
]
ANSWERS = [m["content"] for m in MESSAGES if m["role"] == "assistant"]
PROMPTS = [m["content"] for m in MESSAGES if m["role"] != "assistant"]


@pytest.fixture(scope="module")
def phi3():
    """The real Phi-3-mini tokenizer (the tiny model's), with trl's Phi-3 training template."""
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def smol():
    """SmolLM2's own ChatML tokenizer, with the course's training template."""
    return load_tokenizer("smol")


def test_phi3_special_token_ids(phi3):
    for token, token_id in PHI3_SPECIAL_TOKENS.items():
        assert phi3.convert_tokens_to_ids(token) == token_id
        assert token_id in special_token_ids(phi3)
    assert phi3.eos_token == "<|endoftext|>"


def test_phi3_training_template_renders_like_the_models_own(phi3):
    # The generation markers change the mask, never the text.
    for kwargs in ({}, {"add_generation_prompt": True}):
        messages = MESSAGES if not kwargs else MESSAGES[:-1]
        ours = phi3.apply_chat_template(messages, tokenize=False, **kwargs)
        original = phi3.apply_chat_template(messages, tokenize=False, chat_template=phi3_chat_template, **kwargs)
        assert ours == original
    assert ours.startswith("<|system|>\nYou are Kitchen Coach.<|end|>\n<|user|>\n") and ours.endswith("<|assistant|>\n")


def test_phi3_ids_follow_the_template(phi3):
    ids = tokenize_conversation(MESSAGES, phi3)["input_ids"]
    assert ids[0] == PHI3_SPECIAL_TOKENS["<|system|>"] and ids[-1] == PHI3_SPECIAL_TOKENS["<|endoftext|>"]
    assert ids.count(PHI3_SPECIAL_TOKENS["<|user|>"]) == 2 and ids.count(PHI3_SPECIAL_TOKENS["<|assistant|>"]) == 2
    assert ids.count(PHI3_SPECIAL_TOKENS["<|end|>"]) == len(MESSAGES)  # every turn is closed
    assert ids == phi3.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]


def test_phi3_mask_covers_exactly_the_replies_and_their_end(phi3):
    spans = assistant_spans(MESSAGES, phi3)
    assert len(spans) == len(ANSWERS)
    for span, answer in zip(spans, ANSWERS):
        text = phi3.decode(span)
        assert text.startswith(answer + "<|end|>"), text  # the model learns to stop with <|end|>
        assert span.count(PHI3_SPECIAL_TOKENS["<|end|>"]) == 1
        # What follows <|end|> is the template's newline (tokenised by sentencepiece as "▁" + "\n").
        assert phi3.convert_ids_to_tokens(span[span.index(PHI3_SPECIAL_TOKENS["<|end|>"]) + 1:][:2]) == ["▁", "<0x0A>"]
    assert spans[-1][-1] == PHI3_SPECIAL_TOKENS["<|endoftext|>"]  # and the final eos
    assert all(PHI3_SPECIAL_TOKENS["<|endoftext|>"] not in span for span in spans[:-1])


def test_phi3_unlabelled_tokens_hold_the_prompts_and_no_reply(phi3):
    encoded = tokenize_conversation(MESSAGES, phi3)
    outside = phi3.decode([t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label == IGNORE_INDEX])
    assert all(prompt in outside for prompt in PROMPTS)
    assert not any(answer.splitlines()[0] in outside for answer in ANSWERS)
    assert outside.count("<|assistant|>") == 2  # the role header is context, not a target


def test_smol_chatml_mask_ends_with_im_end(smol):
    spans = assistant_spans(MESSAGES, smol)
    assert [smol.decode(span) for span in spans] == [answer + "<|im_end|>" for answer in ANSWERS]
    assert all(span[-1] == smol.convert_tokens_to_ids("<|im_end|>") == smol.eos_token_id for span in spans)


def test_labels_equal_ids_on_the_mask(phi3):
    encoded = tokenize_conversation(MESSAGES, phi3)
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == len(encoded["attention_mask"])
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded["input_ids"], encoded["labels"]))
    cut = tokenize_conversation(MESSAGES, phi3, max_length=10)
    assert len(cut["input_ids"]) == 10 and cut["labels"] == encoded["labels"][:10]


def test_a_template_without_generation_markers_is_refused(phi3):
    plain = load_tokenizer("tiny")
    plain.chat_template = phi3_chat_template
    with pytest.raises(ValueError, match="generation"):
        tokenize_conversation(MESSAGES, plain)


def test_token_table_and_marked_text(phi3):
    table = token_table(MESSAGES, phi3)
    assert list(table.columns) == ["id", "token", "special", "in_loss"]
    assert table["in_loss"].sum() == sum(map(len, assistant_spans(MESSAGES, phi3)))
    assert table.loc[table["id"] == PHI3_SPECIAL_TOKENS["<|user|>"], "special"].all()
    marked = mark_assistant_tokens(MESSAGES, phi3)
    assert marked.count("[[") == marked.count("]]") == 2
    assert f"<|assistant|> \n[[{ANSWERS[0]}<|end|>" in marked
    assert "<span style='background:#c8f7c5'>In short:" in mark_assistant_tokens(MESSAGES, phi3, html=True)


# --- lengths: count, truncate at a turn boundary, drop --------------------------------------------------


def test_truncation_keeps_whole_turns_and_ends_on_the_assistant(phi3):
    first_exchange = conversation_length(MESSAGES[:3], phi3)
    full = conversation_length(MESSAGES, phi3)
    assert first_exchange < full
    assert truncate_at_turn(MESSAGES, phi3, full) == MESSAGES
    assert truncate_at_turn(MESSAGES, phi3, full - 1) == MESSAGES[:3]
    assert truncate_at_turn(MESSAGES, phi3, first_exchange - 1) is None


@pytest.mark.parametrize("policy, kept_lengths, truncated, dropped", [
    ("count", ["short", "long", "huge"], 0, 0),
    ("truncate", ["short", "first"], 1, 1),
    ("drop", ["short"], 0, 2),
])
def test_length_policies(phi3, policy, kept_lengths, truncated, dropped):
    short = {"messages": MESSAGES[1:3]}
    long = {"messages": MESSAGES, "id": "long"}
    huge = {"messages": [{"role": "user", "content": "Tell me everything. " * 200}, MESSAGES[2]]}
    limit = conversation_length(MESSAGES[:3], phi3)  # the first exchange of `long` fits exactly
    kept, report = fit_to_length([short, long, huge], phi3, limit, policy)
    names = {id(short["messages"]): "short", id(long["messages"]): "long", id(huge["messages"]): "huge"}
    assert [names.get(id(c["messages"]), "first") for c in kept] == kept_lengths
    assert (report.over, report.truncated, report.dropped) == (2, truncated, dropped)
    assert report.lengths == [conversation_length(c["messages"], phi3) for c in (short, long, huge)]
    if policy == "truncate":
        assert kept[1] == {"messages": MESSAGES[:3], "id": "long"}
    assert f"2 over max_length={limit} ({policy})" in str(report)


def test_unknown_length_policy(phi3):
    with pytest.raises(ValueError, match="Unknown length policy 'cut'"):
        fit_to_length([{"messages": MESSAGES}], phi3, 100, "cut")


def test_sft_dataset_tokenizes_like_tokenize_conversation(phi3):
    dataset = to_sft_dataset([{"messages": MESSAGES}])
    assert tokenize_conversation(dataset[0]["messages"], phi3) == tokenize_conversation(MESSAGES, phi3)


def test_token_texts_join_to_the_decoded_text(phi3):
    ids = tokenize_conversation([{"role": "user", "content": "Heat to 75 °C, then crème brûlée 🍮"},
                                 {"role": "assistant", "content": "In short: ok.\nTip: go."}], phi3)["input_ids"]
    pieces = token_texts(ids, phi3)
    assert len(pieces) == len(ids) and "".join(pieces) == phi3.decode(ids)


def test_trl_sft_trainer_trains_on_the_same_tokens(phi3, tmp_path):
    """trl's own preparation (assistant_only_loss=True) gives exactly tokenize_conversation's ids and labels."""
    from trl import SFTConfig, SFTTrainer

    from utils.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny", verbose=False)
    conversations = [{"messages": MESSAGES}, {"messages": MESSAGES[1:3]}]
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False,
                     assistant_only_loss=True,
                     max_length=None, report_to="none", dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_sft_dataset(conversations), processing_class=tokenizer)
    for row, conversation in zip(trainer.train_dataset, conversations):
        ours = tokenize_conversation(conversation["messages"], phi3)
        assert row["input_ids"] == ours["input_ids"] and row["labels"] == ours["labels"]
