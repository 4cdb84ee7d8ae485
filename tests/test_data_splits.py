"""The shipped splits: they validate strictly, follow the house style, and share no conversation."""

from __future__ import annotations

import itertools
import re

import pytest

from utils.data import SPLITS, follows_house_style, load_split, split_path


def normalise(text: str) -> str:
    """Lower case, punctuation and spacing removed: near-identical prompts compare equal."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def splits():
    return {split: load_split(split) for split in SPLITS}  # load_split validates: a bad record raises


def test_every_split_is_present_and_non_empty(splits):
    for split, conversations in splits.items():
        assert split_path(split).is_file()
        assert conversations, f"{split} is empty"
    assert len(splits["train"]) > len(splits["validation"]) and len(splits["train"]) > len(splits["test"])


def test_every_reply_follows_the_house_style(splits):
    offenders = [(split, index, message["content"][:60])
                 for split, conversations in splits.items() for index, conversation in enumerate(conversations)
                 for message in conversation["messages"]
                 if message["role"] == "assistant" and not follows_house_style(message["content"])]
    assert not offenders, offenders[:5]


def test_splits_share_no_prompt(splits):
    prompts = {split: {normalise(m["content"]) for c in conversations for m in c["messages"] if m["role"] == "user"}
               for split, conversations in splits.items()}
    for first, second in itertools.combinations(SPLITS, 2):
        shared = prompts[first] & prompts[second]
        assert not shared, f"{first} and {second} share user messages: {sorted(shared)[:3]}"


def test_no_conversation_is_repeated(splits):
    openings = [normalise(c["messages"][1 if c["messages"][0]["role"] == "system" else 0]["content"])
                for conversations in splits.values() for c in conversations]
    repeated = sorted(text for text in set(openings) if openings.count(text) > 1)
    assert not repeated, f"conversations opening with the same user message: {repeated[:3]}"
