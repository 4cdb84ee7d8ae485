"""Conversation data: the shipped splits, loaders for common formats, validation, Phi-3 formatting.

Every loader returns conversations in the *messages* format that chat templates and trl's SFTTrainer
read: ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``, with an
optional system message first, then user and assistant turns alternating, ending with the assistant.

Bad input never passes silently: by default the first bad record raises :class:`DataValidationError`
naming the file, the line (or record index), the field and the fix; with ``lenient=True`` bad records
are skipped and every skip is reported (:attr:`LoadResult.skipped`, and a logged warning).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from utils.paths import DATA_DIR

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100  # label value that the loss ignores
ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_response")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
LENGTH_POLICIES = ("count", "truncate", "drop")
HOUSE_STYLE_FIRST = "In short: "  # every assistant reply in the shipped set starts with this line...
HOUSE_STYLE_LAST = "Tip: "  # ...and ends with this one

_LENIENT_HINT = "Or pass lenient=True to skip bad records (each skip is reported)."
_FORMAT_HELP = (
    'messages: {"messages": [{"role", "content"}, ...]}; '
    'sharegpt: {"conversations": [{"from", "value"}, ...]}; '
    'alpaca: {"instruction", "input" (optional), "output", "system" (optional)}; '
    "prompt_response: columns named by prompt_column / response_column"
)
_SURROGATE = re.compile("[\ud800-\udfff]")  # where undecodable bytes end up (errors="surrogateescape")


# --- problems and results ---------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One bad record: where it is, which field, what is wrong, and what to do about it."""

    source: str
    location: str  # "line 7", "line 12 (record 3)" or "index 2"
    field: str  # "messages[1].role", "output", "response", or "(line)" / "(record)" for the whole record
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.source}, {self.location}, field {self.field!r}: {self.message}. Fix: {self.fix}."


class DataValidationError(ValueError):
    """A record (or a whole file) that cannot be used; the message names file, line, field and the fix."""

    def __init__(self, problem: Problem, *, hint: bool = True) -> None:
        self.problem = problem
        super().__init__(f"{problem} {_LENIENT_HINT}" if hint else str(problem))


class _Bad(Exception):
    """Raised inside a record's conversion; turned into a :class:`Problem` with the record's location."""

    def __init__(self, field: str, message: str, fix: str) -> None:
        super().__init__(message)
        self.field, self.message, self.fix = field, message, fix


@dataclass
class LoadResult:
    """Conversations in the messages format, the format they came in, and every record that was skipped."""

    conversations: list[dict[str, Any]]
    format: str
    source: str
    how: str  # "named by the caller" or "detected from the keys of line 1"
    records: int
    skipped: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.conversations)

    def report(self) -> str:
        """A readable summary: format and how it was found, counts, and one line per skipped record."""
        head = (f"{self.source}: {self.format} format ({self.how}); {self.records} records, "
                f"{len(self.conversations)} kept, {len(self.skipped)} skipped")
        return "\n".join([head, *(f"  skipped {p}" for p in self.skipped)])


# --- reading records from files, datasets and lists ------------------------------------------------


def _line_of(text: str, position: int) -> int:
    """1-based line number of a character position."""
    return text.count("\n", 0, position) + 1


def _json_array_records(text: str) -> Iterator[tuple[str, Any]]:
    """The elements of a JSON array, each with the line it starts on (the whole text is valid JSON)."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"[\s,]*")
    position = whitespace.match(text, text.index("[") + 1).end()
    number = 0
    while text[position] != "]":
        value, end = decoder.raw_decode(text, position)
        number += 1
        yield f"line {_line_of(text, position)} (record {number})", value
        position = whitespace.match(text, end).end()


def _read_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are kept as surrogates so validation can point at them."""
    return path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _file_records(path: Path, kind: str, delimiter: str) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs; a line that is not JSON gives a :class:`_Bad` in place of the record."""
    text = _read_text(path)
    if kind == "json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise DataValidationError(Problem(
                str(path), f"line {error.lineno}", "(file)", f"invalid JSON at column {error.colno}: {error.msg}",
                "repair the file; a JSON array is parsed as a whole, so one broken record makes the whole file "
                "unreadable (JSON Lines, one record per line, lets lenient mode skip just that line)"), hint=False)
        yield from _json_array_records(text)
        return
    if kind in ("json", "jsonl"):  # JSON Lines (datasets' `to_json` also writes JSON Lines into .json files)
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                yield f"line {number}", _Bad("(line)", f"invalid JSON at column {error.colno}: {error.msg}",
                                             "write each record as one complete JSON object on its own line")
        return
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    for row in reader:
        yield f"line {reader.line_num}", row


def _hub_or_missing(source: str, split: str) -> Any:
    """A dataset from the Hugging Face Hub, or a clear error when ``source`` is neither a file nor reachable."""
    if Path(source).suffix.lower() in FILE_KINDS or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise FileNotFoundError(f"{source}: no such file. Check the path (relative paths start at {Path.cwd()}).")
    import datasets

    try:
        return datasets.load_dataset(source, split=split)
    except Exception as error:  # offline, unknown id, no such split: say which, and what to do
        raise FileNotFoundError(
            f"{source!r} is not a local file, and loading it from the Hugging Face Hub failed "
            f"({type(error).__name__}: {error}). Check the id and split, or download it and pass the file."
        ) from error


# --- converting one record into messages ------------------------------------------------------------


def _text(value: Any, field: str, *, required: bool = True) -> str:
    """A non-empty, valid-UTF-8 string, or :class:`_Bad` naming the field."""
    if value is None:
        if required:
            raise _Bad(field, "missing field", f"add a non-empty {field!r} string")
        return ""
    if not isinstance(value, str):
        raise _Bad(field, f"must be a string, got {type(value).__name__} {value!r:.40}", "write the text as a string")
    bad = _SURROGATE.search(value)
    if bad:
        code = ord(bad.group())
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"code point U+{code:04X}"
        raise _Bad(field, f"not valid UTF-8 ({byte} at character {bad.start()})",
                   "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or fix the garbled text")
    if required and not value.strip():
        raise _Bad(field, "empty text", "write the message, or remove the turn (and its reply)")
    return value


def _record(value: Any) -> Mapping[str, Any]:
    """The record itself, which must be an object."""
    if isinstance(value, _Bad):
        raise value
    if not isinstance(value, Mapping):
        raise _Bad("(record)", f"expected a JSON object, got {type(value).__name__}", f"use one of: {_FORMAT_HELP}")
    return value


def _turns(record: Mapping[str, Any], key: str) -> list[Any]:
    """The non-empty list of turns under ``key``."""
    turns = record.get(key)
    if turns is None:
        raise _Bad(key, "missing field", f"each record needs a {key!r} list of turns")
    if not isinstance(turns, list) or not turns:
        raise _Bad(key, f"must be a non-empty list, got {turns!r:.40}", f"put the turns in a list under {key!r}")
    return turns


def _check_order(messages: list[dict[str, str]], list_field: str = "messages", role_key: str = "role",
                 offset: int = 0) -> None:
    """Raise :class:`_Bad` unless: system first if present, then user/assistant alternating, ending on assistant.

    Fields are named as in the source: ``list_field[i].role_key``, where i is the message index minus ``offset``
    (the number of messages that came from elsewhere, such as ShareGPT's top-level ``system``).
    """
    def where(index: int) -> str:
        return f"{list_field}[{index - offset}].{role_key}" if index >= offset else "system"

    for index, message in enumerate(messages):
        if message["role"] == "system" and index > 0:
            raise _Bad(where(index), "a system message may only come first",
                       "move it to the start, or merge it into the first system message")
    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise _Bad(list_field, "only a system message, no user/assistant turns", "add the user's message and the reply")
    for index in range(start, len(messages)):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if messages[index]["role"] != expected:
            raise _Bad(where(index),
                       f"expected {'a user' if expected == 'user' else 'an assistant'} turn, found "
                       f"{messages[index]['role']!r}: turns must alternate user, assistant, user and so on",
                       "merge consecutive turns of the same role, or add the missing turn")
    if messages[-1]["role"] != "assistant":
        raise _Bad(where(len(messages) - 1), "the conversation ends with a user turn",
                   "end every conversation with the assistant's reply (it is what the model learns), "
                   "or remove the turn")


def _read_turns(
    record: Mapping[str, Any], list_key: str, role_key: str, content_key: str, roles: Mapping[str, str], noun: str
) -> list[dict[str, str]]:
    """The turns under ``list_key`` as ``{role, content}``, each role mapped through ``roles``."""
    messages = []
    for index, turn in enumerate(_turns(record, list_key)):
        where = f"{list_key}[{index}]"
        if not isinstance(turn, Mapping):
            raise _Bad(where, f"expected an object with {role_key} and {content_key}, got {turn!r:.40}",
                       f'write {{"{role_key}": ..., "{content_key}": ...}}')
        role = _text(turn.get(role_key), f"{where}.{role_key}")
        if role not in roles:
            raise _Bad(f"{where}.{role_key}", f"unknown {noun} {role!r}", f"use one of {', '.join(roles)}")
        messages.append({"role": roles[role], "content": _text(turn.get(content_key), f"{where}.{content_key}")})
    return messages


def _from_messages(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], set[str]]:
    """Messages format (OpenAI / Hugging Face): ``messages`` of ``{role, content}``."""
    messages = _read_turns(record, "messages", "role", "content", {role: role for role in ROLES}, "role")
    _check_order(messages)
    return messages, {"messages"}


def _from_sharegpt(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], set[str]]:
    """ShareGPT: ``conversations`` of ``{from, value}`` (system, human/user, gpt/assistant); optional ``system``."""
    messages = []
    if record.get("system") is not None and _text(record["system"], "system", required=False).strip():
        messages.append({"role": "system", "content": record["system"]})
    messages += _read_turns(record, "conversations", "from", "value", SHAREGPT_ROLES, "speaker")
    _check_order(messages, "conversations", "from", offset=len(messages) - len(record["conversations"]))
    return messages, {"conversations", "system"}


def _from_alpaca(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], set[str]]:
    """Alpaca: ``instruction`` + optional ``input`` (appended after a blank line) -> user; ``output`` -> assistant."""
    instruction = _text(record.get("instruction"), "instruction")
    extra = _text(record.get("input"), "input", required=False).strip()
    system = _text(record.get("system"), "system", required=False).strip()
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "system", "content": system}] if system else []
    reply = _text(record.get("output"), "output")
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages, {"instruction", "input", "output", "system"}


def _from_columns(
    record: Mapping[str, Any], prompt: str, response: str, system: str | None
) -> tuple[list[dict[str, str]], set[str]]:
    """A table row: the prompt column -> user, the response column -> assistant, an optional system column."""
    if None in record:  # csv.DictReader puts cells beyond the header under the key None
        raise _Bad("(row)", f"{len(record[None])} more cell(s) than the header has columns",
                   "quote cells that contain the delimiter, or remove the extra cells")
    messages = []
    if system is not None and _text(record.get(system), system, required=False).strip():
        messages.append({"role": "system", "content": record[system]})
    messages += [{"role": "user", "content": _text(record.get(prompt), prompt)},
                 {"role": "assistant", "content": _text(record.get(response), response)}]
    return messages, {prompt, response, system or ""}


def _detect_format(record: Any, prompt_column: str, response_column: str) -> str | None:
    """The format whose keys the record has, or None."""
    if not isinstance(record, Mapping):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if prompt_column in record and response_column in record:
        return "prompt_response"
    return None


# --- the one entry point ----------------------------------------------------------------------------


def _open_source(
    source: Any, format: str | None, split: str, columns: tuple[str, str, str | None]
) -> tuple[str, Iterator[tuple[str, Any]], str | None, str]:
    """(name, (location, record) pairs, format, how it was decided) for a file, a Dataset, a list or a Hub id."""
    if isinstance(source, (str, Path)) and Path(source).is_file():
        path = Path(source)
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_KINDS)}.")
        delimiter = "\t" if kind == "tsv" else ","
        if kind in ("csv", "tsv"):
            if format not in (None, "prompt_response"):
                raise ValueError(f"{path}: a {kind.upper()} file holds prompt/response columns, "
                                 f"not {format!r} records.")
            header = next(csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter), [])
            for column in columns:
                if column is not None and column not in header:
                    found = ", ".join(header) or "nothing"
                    raise DataValidationError(Problem(
                        str(path), "line 1", column, f"no column {column!r} in the header (found: {found})",
                        "rename the column, or name yours with prompt_column= / response_column= / system_column="),
                        hint=False)
            return str(path), _file_records(path, kind, delimiter), "prompt_response", f"a .{kind} file"
        return str(path), _file_records(path, kind, delimiter), format, "named by the caller" if format else ""
    if isinstance(source, (str, Path)):
        source = _hub_or_missing(str(source), split)
    if isinstance(source, Mapping):  # a DatasetDict, or one record passed on its own
        raise ValueError(f"Got a mapping with keys {', '.join(map(str, source))}: pass one split (e.g. data['train']) "
                         "or a list of records.")
    records = ((f"index {index}", record) for index, record in enumerate(source))
    return f"<{type(source).__name__}>", records, format, "named by the caller" if format else ""


def load_conversations(
    source: str | Path | Any,
    format: str | None = None,
    *,
    lenient: bool = False,
    prompt_column: str = "prompt",
    response_column: str = "response",
    system_column: str | None = None,
    split: str = "train",
) -> LoadResult:
    """Load conversations from a file, a ``datasets.Dataset``, a list of records or a Hub id, into messages.

    Files: ``.jsonl`` / ``.json`` (messages, ShareGPT or Alpaca records; a JSON array or JSON Lines),
    ``.csv`` / ``.tsv`` (``prompt_column`` and ``response_column``, optional ``system_column``).
    ``format`` (one of :data:`FORMATS`) is detected from the first record's keys when not given.
    ``split`` applies to Hub ids only. Strict by default; ``lenient=True`` skips and reports bad records.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"Unknown format {format!r}; choose one of {', '.join(FORMATS)} (or None to detect it).")
    name, records, format, how = _open_source(source, format, split, (prompt_column, response_column, system_column))
    converters = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
                  "prompt_response": lambda row: _from_columns(row, prompt_column, response_column, system_column)}
    conversations: list[dict[str, Any]] = []
    skipped: list[Problem] = []
    count = 0
    for location, record in records:
        count += 1
        if format is None and not isinstance(record, _Bad):  # an unreadable line says nothing about the format
            format = _detect_format(record, prompt_column, response_column)
            if format is None:
                keys = ", ".join(map(repr, record)) if isinstance(record, Mapping) else type(record).__name__
                raise DataValidationError(Problem(
                    name, location, "(record)", f"cannot tell the format from this record (keys: {keys})",
                    f"pass format= one of {', '.join(FORMATS)}; the formats look like this: {_FORMAT_HELP}"),
                    hint=False)
            how = f"detected from the keys of {location}"
        try:
            row = _record(record)
            messages, used = converters[format](row)
        except _Bad as bad:
            problem = Problem(name, location, bad.field, bad.message, bad.fix)
            if not lenient:
                raise DataValidationError(problem) from None
            skipped.append(problem)
            continue
        conversations.append({**{k: v for k, v in row.items() if k not in used}, "messages": messages})

    if count == 0:
        raise DataValidationError(Problem(name, "(whole source)", "(records)", "no records at all",
                                          "check that you passed the right file or split"), hint=False)
    result = LoadResult(conversations, format or "unknown", name, how or "no record could be read", count, skipped)
    if skipped:
        logger.warning("%s", result.report())
    return result


# --- the shipped splits -------------------------------------------------------------------------------


def split_path(split: str) -> Path:
    """Path of a shipped split (``train``, ``validation`` or ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; the shipped splits are {', '.join(SPLITS)}.")
    return DATA_DIR / f"{split}.jsonl"


def load_split(split: str) -> list[dict[str, Any]]:
    """The shipped split as a list of ``{"messages": [...]}`` conversations, validated strictly."""
    path = split_path(split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the shipped data set lives in data/ of the course repository.")
    return load_conversations(path, format="messages").conversations


def follows_house_style(text: str) -> bool:
    """True when a reply's first line starts with ``In short: `` and its last line with ``Tip: `` (each with text)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (len(lines) >= 2
            and lines[0].startswith(HOUSE_STYLE_FIRST) and bool(lines[0][len(HOUSE_STYLE_FIRST):].strip())
            and lines[-1].startswith(HOUSE_STYLE_LAST) and bool(lines[-1][len(HOUSE_STYLE_LAST):].strip()))


# --- tokens, the assistant mask, and lengths ---------------------------------------------------------


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
    import pandas as pd

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
    import html as html_lib

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
    """Apply a length policy: ``count`` (keep all), ``truncate`` (at a turn boundary; drop if none fits), ``drop``."""
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"Unknown length policy {policy!r}; choose one of {', '.join(LENGTH_POLICIES)}.")
    report = LengthReport(max_length, policy, [conversation_length(c["messages"], tokenizer) for c in conversations])
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
    if report.over:
        logger.warning("Length: %s", report)
    return kept, report


def to_sft_dataset(conversations: list[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` with one ``messages`` column: what trl's SFTTrainer tokenizes itself."""
    import datasets

    return datasets.Dataset.from_list([{"messages": c["messages"]} for c in conversations])


def load_sft_split(
    split: str, tokenizer: Any, max_length: int, policy: str = "truncate"
) -> tuple[Any, LengthReport]:
    """A shipped split, validated and fitted to ``max_length``, as a Dataset for SFTTrainer, with its length report."""
    conversations, report = fit_to_length(load_split(split), tokenizer, max_length, policy)
    return to_sft_dataset(conversations), report
