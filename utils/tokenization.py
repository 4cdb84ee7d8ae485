"""Tokens, the assistant mask and lengths: a conversation as the model sees it through the chat template.

:func:`tokenize_conversation` renders a conversation with the tokenizer's chat template and labels only
the assistant's tokens (the loss is computed on those, ``IGNORE_INDEX`` elsewhere); the tables and the
marked text show it token by token. :func:`fit_to_length` applies a length policy, cutting long
conversations at a turn boundary; :func:`conversation_batches` pads them into batches for a hand-written
training loop. Loading and validating the conversations themselves is :mod:`utils.data`.
"""

from __future__ import annotations

import html as html_lib
import random
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from transformers import DataCollatorForSeq2Seq

from utils.data import load_split, to_sft_dataset
from utils.runtime import progress_bar

IGNORE_INDEX = -100  # label value that the loss ignores
LENGTH_POLICIES = ("count", "truncate", "drop")


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer: Any, max_length: int | None = None
) -> dict[str, list[int]]:
    """Render with the chat template; labels are the token ids on assistant tokens and -100 elsewhere.

    Uses ``apply_chat_template(..., return_assistant_tokens_mask=True)``, which needs a template with
    ``{% generation %}`` markers (the model registry installs one). ``max_length`` cuts the token list
    (possibly mid-turn, as trl does); :func:`fit_to_length` cuts at turn boundaries instead.
    """
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    input_ids = list(encoded["input_ids"])
    mask = list(encoded["assistant_masks"])
    if not any(mask):
        raise ValueError("The chat template marked no assistant tokens: it needs {% generation %} markers.")
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask)]
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def assistant_spans(messages: list[dict[str, str]], tokenizer: Any) -> list[list[int]]:
    """The runs of labelled (assistant) token ids, one per assistant turn: what the loss is computed on."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in tokenize_conversation(messages, tokenizer)["labels"]:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return spans


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token (bos/eos/pad and the chat markers such as ``<|user|>``)."""
    added = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def token_table(messages: list[dict[str, str]], tokenizer: Any) -> Any:
    """One row per token of the rendered conversation: position, id, token, special?, in the loss?"""
    encoded = tokenize_conversation(messages, tokenizer)
    special = special_token_ids(tokenizer)
    return pd.DataFrame({
        "id": encoded["input_ids"],
        "token": tokenizer.convert_ids_to_tokens(encoded["input_ids"]),
        "special": [token in special for token in encoded["input_ids"]],
        "in_loss": [label != IGNORE_INDEX for label in encoded["labels"]],
    }).rename_axis("position")


def token_texts(ids: list[int], tokenizer: Any) -> list[str]:
    """The text each token adds to the decoded string (spaces included; "" while a UTF-8 character is incomplete)."""
    pieces, done = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])  # decoding one token alone loses sentencepiece's leading spaces
        if text.endswith("\ufffd"):
            pieces.append("")
            continue
        pieces.append(text[len(done):])
        done = text
    return pieces


def mark_assistant_tokens(messages: list[dict[str, str]], tokenizer: Any, *, html: bool = False) -> str:
    """The rendered conversation with the loss-bearing tokens marked: ``[[...]]`` in text, green in HTML."""
    encoded = tokenize_conversation(messages, tokenizer)
    pieces = token_texts(encoded["input_ids"], tokenizer)
    in_loss = [label != IGNORE_INDEX for label in encoded["labels"]]
    out, inside = [], False
    for piece, keep in zip(pieces + [""], in_loss + [False]):
        if keep != inside:
            if html:
                out.append("<span style='background:#c8f7c5'>" if keep else "</span>")
            else:
                out.append("[[" if keep else "]]")
            inside = keep
        out.append(html_lib.escape(piece) if html else piece)
    text = "".join(out)
    return f"<pre style='white-space:pre-wrap'>{text}</pre>" if html else text


def conversation_length(messages: list[dict[str, str]], tokenizer: Any) -> int:
    """Number of tokens of the conversation rendered with the tokenizer's chat template."""
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def truncate_at_turn(messages: list[dict[str, str]], tokenizer: Any, max_length: int) -> list[dict[str, str]] | None:
    """The longest prefix that fits in ``max_length`` tokens and ends with an assistant turn, or None."""
    for end in range(len(messages), 0, -1):
        if messages[end - 1]["role"] == "assistant" and conversation_length(messages[:end], tokenizer) <= max_length:
            return messages[:end]
    return None


@dataclass
class LengthReport:
    """Token lengths before any cut, and what the policy did to the conversations over ``max_length``."""

    max_length: int
    policy: str
    lengths: list[int]
    truncated: int = 0
    dropped: int = 0

    @property
    def over(self) -> int:
        """How many conversations were longer than ``max_length``."""
        return sum(length > self.max_length for length in self.lengths)

    def __str__(self) -> str:
        return (f"{len(self.lengths)} conversations, longest {max(self.lengths, default=0)} tokens; "
                f"{self.over} over max_length={self.max_length} ({self.policy}): "
                f"{self.truncated} truncated at a turn boundary, {self.dropped} dropped")


def fit_to_length(
    conversations: list[dict[str, Any]], tokenizer: Any, max_length: int, policy: str = "truncate"
) -> tuple[list[dict[str, Any]], LengthReport]:
    """Apply a length policy: ``count`` (keep all), ``truncate`` (at a turn boundary; drop if none fits), ``drop``.

    Returns the kept conversations and a :class:`LengthReport`; print the report to say what was cut.
    """
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"Unknown length policy {policy!r}; choose one of {', '.join(LENGTH_POLICIES)}.")
    lengths = [conversation_length(c["messages"], tokenizer)
               for c in progress_bar(conversations, desc="tokenizing", unit="conversation", disable=len(conversations) < 100)]
    report = LengthReport(max_length, policy, lengths)
    kept = []
    for conversation, length in zip(conversations, report.lengths):
        if length <= max_length or policy == "count":
            kept.append(conversation)
            continue
        shorter = truncate_at_turn(conversation["messages"], tokenizer, max_length) if policy == "truncate" else None
        if shorter is None:
            report.dropped += 1
        else:
            report.truncated += 1
            kept.append({**conversation, "messages": shorter})
    return kept, report


def load_sft_split(
    split: str, tokenizer: Any, max_length: int, policy: str = "truncate"
) -> tuple[Any, LengthReport]:
    """A shipped split, validated and fitted to ``max_length``, as a Dataset for SFTTrainer, with its length report."""
    conversations, report = fit_to_length(load_split(split), tokenizer, max_length, policy)
    return to_sft_dataset(conversations), report


def conversation_batches(
    conversations: list[dict[str, Any]], tokenizer: Any, *, batch_size: int, max_length: int, seed: int,
    policy: str = "truncate",
) -> tuple[list[dict[str, torch.Tensor]], LengthReport]:
    """Shuffled, padded batches with assistant-only labels, every row cut at a turn boundary; and the length report.

    Conversations over ``max_length`` tokens go through :func:`fit_to_length` first (``truncate``:
    keep the longest prefix that ends with an assistant reply, drop it if none fits; ``drop``), so no row ends
    inside a reply. Labels are -100 on the other turns and on the padding.
    """
    if policy not in ("truncate", "drop"):
        raise ValueError(f"Length policy {policy!r}: conversation_batches keeps every row within max_length, so "
                         f"choose 'truncate' (at a turn boundary) or 'drop'.")
    fitted, report = fit_to_length(conversations, tokenizer, max_length, policy)
    if not fitted:
        raise ValueError(f"No conversation fits in max_length={max_length} tokens ({report}): raise max_length.")
    rows = [tokenize_conversation(c["messages"], tokenizer) for c in fitted]
    random.Random(seed).shuffle(rows)
    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    return [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)], report
