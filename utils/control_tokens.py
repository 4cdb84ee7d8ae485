"""Chat-template control tokens (``<|end|>``, ``<|assistant|>``, ``<|im_end|>``, ...) inside message text.

A control token typed into a message is rendered by the chat template as the real special token, so it can
close a turn and open a fake one: in training data that teaches the model invented turns, in a chat it lets
the user write the assistant's part. :func:`find_control_tokens` finds them; :func:`neutralise_control_tokens`
makes them plain text (a WORD JOINER, U+2060, after the ``<``: it looks the same, and no tokenizer reads it
as the special token).
"""

from __future__ import annotations

import re

WORD_JOINER = "\u2060"
# <|anything|> covers Phi-3 (<|end|>, <|user|>, <|assistant|>, <|system|>, <|endoftext|>), ChatML
# (<|im_start|>, <|im_end|>) and Llama 3 (<|eot_id|>, <|start_header_id|>); plus Llama 2's [INST] markers.
CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_.-]{1,40}\|>|\[/?INST\]|<</?SYS>>")


def find_control_tokens(text: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The control tokens in ``text``, in order of appearance (``extra``: a tokenizer's own special tokens)."""
    found = [match.group() for match in CONTROL_TOKEN.finditer(text)]
    found += [token for token in extra if token and token in text and token not in found]
    return found


def neutralise_control_tokens(text: str, extra: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` with every control token turned into plain text (a WORD JOINER after its first character)."""
    text = CONTROL_TOKEN.sub(lambda match: match.group()[0] + WORD_JOINER + match.group()[1:], text)
    for token in extra:
        if token and len(token) > 1 and token in text:
            text = text.replace(token, token[0] + WORD_JOINER + token[1:])
    return text
