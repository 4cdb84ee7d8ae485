"""utils.tokenization: chat-template rendering, the assistant-only loss mask, lengths and batches, on the real Phi-3
tokenizer (the tiny model's) and the smol model's ChatML one."""

from __future__ import annotations

import logging

import pytest
from trl.chat_template_utils import phi3_chat_template

from utils.data import to_sft_dataset
from utils.models import load_tokenizer
from utils.phi3 import PHI3_SPECIAL_TOKENS
from utils.tokenization import (
    IGNORE_INDEX,
    assistant_spans,
    conversation_batches,
    conversation_length,
    fit_to_length,
    mark_assistant_tokens,
    special_token_ids,
    token_table,
    token_texts,
    tokenize_conversation,
    truncate_at_turn,
)

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
def smol():  # tests using it are marked slow: on a fresh clone this builds the smol model (about a minute)
    """SmolLM2's own ChatML tokenizer, with the course's training template."""
    return load_tokenizer("smol")


def test_phi3_special_token_ids(tiny_tokenizer):
    for token, token_id in PHI3_SPECIAL_TOKENS.items():
        assert tiny_tokenizer.convert_tokens_to_ids(token) == token_id
        assert token_id in special_token_ids(tiny_tokenizer)
    assert tiny_tokenizer.eos_token == "<|endoftext|>"


def test_phi3_training_template_renders_like_the_models_own(tiny_tokenizer):
    # The generation markers change the mask, never the text.
    for kwargs in ({}, {"add_generation_prompt": True}):
        messages = MESSAGES if not kwargs else MESSAGES[:-1]
        ours = tiny_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        original = tiny_tokenizer.apply_chat_template(messages, tokenize=False, chat_template=phi3_chat_template, **kwargs)
        assert ours == original
    assert ours.startswith("<|system|>\nYou are Kitchen Coach.<|end|>\n<|user|>\n") and ours.endswith("<|assistant|>\n")


def test_phi3_ids_follow_the_template(tiny_tokenizer):
    ids = tokenize_conversation(MESSAGES, tiny_tokenizer)["input_ids"]
    assert ids[0] == PHI3_SPECIAL_TOKENS["<|system|>"] and ids[-1] == PHI3_SPECIAL_TOKENS["<|endoftext|>"]
    assert ids.count(PHI3_SPECIAL_TOKENS["<|user|>"]) == 2 and ids.count(PHI3_SPECIAL_TOKENS["<|assistant|>"]) == 2
    assert ids.count(PHI3_SPECIAL_TOKENS["<|end|>"]) == len(MESSAGES)  # every turn is closed
    assert ids == tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]


def test_phi3_mask_covers_exactly_the_replies_and_their_end(tiny_tokenizer):
    spans = assistant_spans(MESSAGES, tiny_tokenizer)
    assert len(spans) == len(ANSWERS)
    for span, answer in zip(spans, ANSWERS):
        text = tiny_tokenizer.decode(span)
        assert text.startswith(answer + "<|end|>"), text  # the model learns to stop with <|end|>
        assert span.count(PHI3_SPECIAL_TOKENS["<|end|>"]) == 1
        # What follows <|end|> is the template's newline (tokenised by sentencepiece as "▁" + "\n").
        assert tiny_tokenizer.convert_ids_to_tokens(span[span.index(PHI3_SPECIAL_TOKENS["<|end|>"]) + 1:][:2]) == ["▁", "<0x0A>"]
    assert spans[-1][-1] == PHI3_SPECIAL_TOKENS["<|endoftext|>"]  # and the final eos
    assert all(PHI3_SPECIAL_TOKENS["<|endoftext|>"] not in span for span in spans[:-1])


def test_phi3_unlabelled_tokens_hold_the_prompts_and_no_reply(tiny_tokenizer):
    encoded = tokenize_conversation(MESSAGES, tiny_tokenizer)
    outside = tiny_tokenizer.decode([t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label == IGNORE_INDEX])
    assert all(prompt in outside for prompt in PROMPTS)
    assert not any(answer.splitlines()[0] in outside for answer in ANSWERS)
    assert outside.count("<|assistant|>") == 2  # the role header is context, not a target


@pytest.mark.slow
def test_smol_chatml_mask_ends_with_im_end(smol):
    spans = assistant_spans(MESSAGES, smol)
    assert [smol.decode(span) for span in spans] == [answer + "<|im_end|>" for answer in ANSWERS]
    assert all(span[-1] == smol.convert_tokens_to_ids("<|im_end|>") == smol.eos_token_id for span in spans)


def test_labels_equal_ids_on_the_mask(tiny_tokenizer):
    encoded = tokenize_conversation(MESSAGES, tiny_tokenizer)
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == len(encoded["attention_mask"])
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded["input_ids"], encoded["labels"]))
    cut = tokenize_conversation(MESSAGES, tiny_tokenizer, max_length=10)
    assert len(cut["input_ids"]) == 10 and cut["labels"] == encoded["labels"][:10]


def test_a_template_without_generation_markers_is_refused(tiny_tokenizer):
    plain = load_tokenizer("tiny")
    plain.chat_template = phi3_chat_template
    with pytest.raises(ValueError, match="generation"):
        tokenize_conversation(MESSAGES, plain)


def test_token_table_and_marked_text(tiny_tokenizer):
    table = token_table(MESSAGES, tiny_tokenizer)
    assert list(table.columns) == ["id", "token", "special", "in_loss"]
    assert table["in_loss"].sum() == sum(map(len, assistant_spans(MESSAGES, tiny_tokenizer)))
    assert table.loc[table["id"] == PHI3_SPECIAL_TOKENS["<|user|>"], "special"].all()
    marked = mark_assistant_tokens(MESSAGES, tiny_tokenizer)
    assert marked.count("[[") == marked.count("]]") == 2
    assert f"<|assistant|> \n[[{ANSWERS[0]}<|end|>" in marked
    assert "<span style='background:#c8f7c5'>In short:" in mark_assistant_tokens(MESSAGES, tiny_tokenizer, html=True)


# --- lengths: count, truncate at a turn boundary, drop --------------------------------------------------


def test_truncation_keeps_whole_turns_and_ends_on_the_assistant(tiny_tokenizer):
    first_exchange = conversation_length(MESSAGES[:3], tiny_tokenizer)
    full = conversation_length(MESSAGES, tiny_tokenizer)
    assert first_exchange < full
    assert truncate_at_turn(MESSAGES, tiny_tokenizer, full) == MESSAGES
    assert truncate_at_turn(MESSAGES, tiny_tokenizer, full - 1) == MESSAGES[:3]
    assert truncate_at_turn(MESSAGES, tiny_tokenizer, first_exchange - 1) is None


@pytest.mark.parametrize("policy, kept_lengths, truncated, dropped", [
    ("count", ["short", "long", "huge"], 0, 0),
    ("truncate", ["short", "first"], 1, 1),
    ("drop", ["short"], 0, 2),
])
def test_length_policies(tiny_tokenizer, policy, kept_lengths, truncated, dropped):
    short = {"messages": MESSAGES[1:3]}
    long = {"messages": MESSAGES, "id": "long"}
    huge = {"messages": [{"role": "user", "content": "Tell me everything. " * 200}, MESSAGES[2]]}
    limit = conversation_length(MESSAGES[:3], tiny_tokenizer)  # the first exchange of `long` fits exactly
    kept, report = fit_to_length([short, long, huge], tiny_tokenizer, limit, policy)
    names = {id(short["messages"]): "short", id(long["messages"]): "long", id(huge["messages"]): "huge"}
    assert [names.get(id(c["messages"]), "first") for c in kept] == kept_lengths
    assert (report.over, report.truncated, report.dropped) == (2, truncated, dropped)
    assert report.lengths == [conversation_length(c["messages"], tiny_tokenizer) for c in (short, long, huge)]
    if policy == "truncate":
        assert kept[1] == {"messages": MESSAGES[:3], "id": "long"}
    assert f"2 over max_length={limit} ({policy})" in str(report)


def test_the_length_report_is_returned_not_also_logged(tiny_tokenizer, caplog):
    """Callers print the report once (notebooks 01, 03, 04, the script); a logged copy printed it twice."""
    huge = {"messages": [{"role": "user", "content": "Tell me everything. " * 200}, MESSAGES[2]]}
    with caplog.at_level(logging.DEBUG, logger="utils"):
        kept, report = fit_to_length([huge, {"messages": MESSAGES[1:3]}], tiny_tokenizer, 64, "truncate")
    assert (len(kept), report.over, report.dropped) == (1, 1, 1)
    assert [record.getMessage() for record in caplog.records if record.name.startswith("utils")] == []


def test_unknown_length_policy(tiny_tokenizer):
    with pytest.raises(ValueError, match="Unknown length policy 'cut'"):
        fit_to_length([{"messages": MESSAGES}], tiny_tokenizer, 100, "cut")


def test_sft_dataset_tokenizes_like_tokenize_conversation(tiny_tokenizer):
    dataset = to_sft_dataset([{"messages": MESSAGES}])
    assert tokenize_conversation(dataset[0]["messages"], tiny_tokenizer) == tokenize_conversation(MESSAGES, tiny_tokenizer)


def test_token_texts_join_to_the_decoded_text(tiny_tokenizer):
    ids = tokenize_conversation([{"role": "user", "content": "Heat to 75 °C, then crème brûlée 🍮"},
                                 {"role": "assistant", "content": "In short: ok.\nTip: go."}], tiny_tokenizer)["input_ids"]
    pieces = token_texts(ids, tiny_tokenizer)
    assert len(pieces) == len(ids) and "".join(pieces) == tiny_tokenizer.decode(ids)


def test_trl_sft_trainer_trains_on_the_same_tokens(tiny_tokenizer, load_tiny, tmp_path):
    """trl's own preparation (assistant_only_loss=True) gives exactly tokenize_conversation's ids and labels."""
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_tiny(for_training=True)
    conversations = [{"messages": MESSAGES}, {"messages": MESSAGES[1:3]}]
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False,
                     assistant_only_loss=True,
                     max_length=None, report_to="none", dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_sft_dataset(conversations), processing_class=tokenizer)
    for row, conversation in zip(trainer.train_dataset, conversations):
        ours = tokenize_conversation(conversation["messages"], tiny_tokenizer)
        assert row["input_ids"] == ours["input_ids"] and row["labels"] == ours["labels"]


# --- batches for a hand-written training loop ------------------------------------------------------

def _chat(*turns: str) -> dict:
    """A conversation from alternating user / assistant texts."""
    return {"messages": [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]}


def test_conversation_batches_pad_labels_with_ignore_index(tiny_tokenizer) -> None:
    tokenizer = tiny_tokenizer
    chats = [_chat("Why rest steak?", "In short: juices settle.\nTip: tent it with foil."),
             _chat("Salt pasta water? " * 30, "In short: yes.\nTip: taste it.")]
    batches, report = conversation_batches(chats, tokenizer, batch_size=2, max_length=64, seed=0)
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 1  # no reply of the long one fits: dropped
    assert (report.dropped, report.truncated) == (1, 0)
    batch = conversation_batches(chats[:1] * 3, tokenizer, batch_size=2, max_length=64, seed=0)[0][0]
    assert batch["input_ids"].shape == batch["labels"].shape
    assert ((batch["labels"] == -100) | (batch["labels"] == batch["input_ids"])).all()
    with pytest.raises(ValueError, match="max_length"):
        conversation_batches(chats[1:], tokenizer, batch_size=2, max_length=64, seed=0)
    with pytest.raises(ValueError, match="truncate"):
        conversation_batches(chats, tokenizer, batch_size=2, max_length=64, seed=0, policy="count")


def test_conversation_batches_never_end_a_row_inside_an_assistant_reply(tiny_tokenizer) -> None:
    """Every row is the chat template's own rendering of a prefix that ends with a whole reply (and its <|end|>)."""
    tokenizer = tiny_tokenizer
    long_reply = ("In short: yes, rest it too.\n" + "Chicken keeps cooking while it rests, so pull it early. " * 8
                  + "\nTip: tent it.")
    chats = [_chat("Why rest steak?", "In short: juices settle.\nTip: tent it with foil."),
             _chat("Should fish rest?", "In short: briefly.\nTip: a minute.", "And chicken?", long_reply),
             _chat("Salt pasta water? " * 30, "In short: yes.\nTip: taste it.")]
    max_length = 80
    batches, report = conversation_batches(chats, tokenizer, batch_size=2, max_length=max_length, seed=0)

    def rendered(messages: list[dict]) -> tuple[int, ...]:
        return tuple(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"])

    whole_turns = {rendered(c["messages"][:end]) for c in chats
                   for end in range(2, len(c["messages"]) + 1, 2)}  # every prefix ending with an assistant reply
    rows = [tuple(ids[mask.bool()].tolist()) for batch in batches
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert len(rendered(chats[1]["messages"])) > max_length >= len(rendered(chats[1]["messages"][:2]))
    assert all(row in whole_turns for row in rows), "a row was cut inside a turn"
    assert sorted(rows) == sorted([rendered(chats[0]["messages"]), rendered(chats[1]["messages"][:2])])
    assert (report.truncated, report.dropped) == (1, 1)
    end, eos = tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id
    for batch in batches:  # and the loss of every row ends with the reply's <|end|> and the final eos
        for labels, mask in zip(batch["labels"], batch["attention_mask"]):
            labelled = labels[mask.bool() & (labels != -100)].tolist()
            assert labelled[-1] == eos and end in labelled[-4:], tokenizer.decode(labelled[-8:])
