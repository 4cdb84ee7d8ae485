"""The benchmark's data: multi-turn human chats from the ``chitchat-dataset`` package (MIT), as messages.

Each conversation of the Chit Chat Challenge corpus (7,168 chats between two people, 138,737
turns) becomes ``[{"role": "user"|"assistant", "content": ...}, ...]``: the first speaker is the
user, the other the assistant, consecutive utterances of one speaker are joined with newlines.
Subsets are drawn by seed and cut at turn boundaries (``utils.tokenization.truncate_at_turn``) to fit a token budget, so every benchmark
configuration trains on exactly the same conversations.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

PACKAGE = "chitchat_dataset"
INSTALL_HINT = "pip install chitchat-dataset==0.9.0 (pinned in requirements.txt; run `make venv`)"


def package_dir() -> Path:
    """Folder of the installed ``chitchat_dataset`` package (not imported: only its JSON is read)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The benchmark data set is missing: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def licence_text() -> str:
    """The MIT licence text shipped in the package's wheel (``*.dist-info/LICENSE``)."""
    from importlib import metadata

    files = metadata.distribution("chitchat-dataset").files or []
    for file in files:
        if file.name.upper().startswith("LICENSE"):
            return Path(file.locate()).read_text(encoding="utf-8")
    raise FileNotFoundError("chitchat-dataset's wheel ships no LICENSE file; reinstall it: " + INSTALL_HINT)


def chat_to_messages(chat: dict[str, Any], chat_id: str = "?") -> list[dict[str, str]]:
    """One corpus entry ``{"messages": [[{"text", "sender", ...}, ...], ...]}`` as user/assistant messages."""
    turns = chat.get("messages")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"chitchat conversation {chat_id}: expected a non-empty list under 'messages'")
    senders: list[str] = []
    messages: list[dict[str, str]] = []
    for number, turn in enumerate(turns):
        if not turn or any("text" not in u or "sender" not in u for u in turn):
            raise ValueError(f"chitchat conversation {chat_id}, turn {number}: each utterance needs 'text' and 'sender'")
        sender = turn[0]["sender"]
        if sender not in senders:
            senders.append(sender)
        role = "user" if sender == senders[0] else "assistant"
        text = "\n".join(u["text"].strip() for u in turn if u["text"].strip())
        if messages and messages[-1]["role"] == role:  # the same speaker again: one message
            messages[-1]["content"] += "\n" + text
        elif text:
            messages.append({"role": role, "content": text})
    return messages


def load_conversations() -> list[list[dict[str, str]]]:
    """Every multi-turn corpus conversation (user first, two assistant turns or more), in file order."""
    with open(package_dir() / "dataset.json", encoding="utf-8") as handle:
        corpus = json.load(handle)
    conversations = [chat_to_messages(chat, chat_id) for chat_id, chat in corpus.items()]
    return [c for c in conversations if len(c) >= 4 and c[0]["role"] == "user"]


def fit_to_budget(messages: list[dict[str, str]], tokenizer: Any, max_tokens: int) -> list[dict[str, str]] | None:
    """``utils.tokenization.truncate_at_turn``, kept only with two exchanges or more (None otherwise)."""
    from utils.tokenization import truncate_at_turn

    fitted = truncate_at_turn(messages, tokenizer, max_tokens)
    if fitted is None or sum(m["role"] == "assistant" for m in fitted) < 2:
        return None
    return fitted


def benchmark_split(
    tokenizer: Any, n_train: int, n_heldout: int, max_tokens: int, seed: int = 0
) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    """Disjoint train and held-out conversations drawn by ``seed``, each cut to ``max_tokens`` at a turn boundary."""
    conversations = load_conversations()
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    chosen: list[list[dict[str, str]]] = []
    for index in order:
        fitted = fit_to_budget(conversations[index], tokenizer, max_tokens)
        if fitted is not None:
            chosen.append(fitted)
        if len(chosen) == n_train + n_heldout:
            return chosen[:n_train], chosen[n_train:]
    raise ValueError(f"Only {len(chosen)} chitchat conversations fit {max_tokens} tokens; asked for "
                     f"{n_train} + {n_heldout}. Raise the token budget or ask for fewer.")
