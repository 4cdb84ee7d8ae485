"""Conversation data: the shipped splits, loaders for common formats, validation, Phi-3 formatting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from utils.paths import DATA_DIR

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100  # label value that the loss ignores


def split_path(split: str) -> Path:
    """Path of a shipped split (``train``, ``validation`` or ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; the shipped splits are {', '.join(SPLITS)}.")
    return DATA_DIR / f"{split}.jsonl"


def load_split(split: str) -> list[dict[str, Any]]:
    """The shipped split as a list of ``{"messages": [...]}`` conversations."""
    path = split_path(split)
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer: Any, max_length: int | None = None
) -> dict[str, list[int]]:
    """Render with the chat template; labels are the token ids on assistant tokens and -100 elsewhere.

    Uses ``apply_chat_template(..., return_assistant_tokens_mask=True)``, which needs a template with
    ``{% generation %}`` markers (the model registry installs one).
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
