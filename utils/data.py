"""Conversation data: the shipped splits, loaders for common formats, and validation with clear errors.

Every loader returns conversations in the *messages* format that chat templates and trl's SFTTrainer
read: ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``, with an
optional system message first, then user and assistant turns alternating, ending with the assistant.

Bad input never passes silently: by default the first bad record raises :class:`DataValidationError`
naming the file, the line (or record index), the field and the fix; with ``lenient=True`` bad records
are skipped and every skip is reported (:attr:`LoadResult.skipped`, and a logged warning).
Turning conversations into tokens, masks and lengths is :mod:`utils.tokenization`.
"""

from __future__ import annotations

import contextvars
import csv
import io
import json
import logging
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import datasets

from utils.control_tokens import find_control_tokens, neutralise_control_tokens
from utils.paths import DATA_DIR

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_response")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
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
CONTROL_TOKEN_POLICIES = ("reject", "escape")
_control_tokens: contextvars.ContextVar[str] = contextvars.ContextVar("control_tokens", default="reject")
_TURN_KEYS_NOTE = "the series trains on each turn's role and text only"


def printable(text: str) -> str:
    """``text`` with undecodable bytes shown as ``\\xNN`` and lone surrogates as ``\\udNNN``: always printable."""
    return _SURROGATE.sub(lambda m: (f"\\x{ord(m.group()) - 0xDC00:02x}" if 0xDC80 <= ord(m.group()) <= 0xDCFF
                                     else f"\\u{ord(m.group()):04x}"), text)


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
        return printable(f"{self.source}, {self.location}, field {self.field!r}: {self.message}. Fix: {self.fix}.")


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


def _wide_encoding(data: bytes) -> str | None:
    """``UTF-16``/``UTF-32`` (byte-order mark) or ``UTF-16LE``/``-BE`` (NUL bytes between ASCII), else None."""
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    head = data[:4096]
    if not head or head.count(b"\x00") * 4 < len(head):  # UTF-8 text has no NUL bytes; UTF-16 ASCII has one in two
        return None
    if head.count(b"\x00") * 4 >= len(head) * 3:
        return "UTF-32LE" if head[:1] != b"\x00" else "UTF-32BE"
    return "UTF-16LE" if head[1::2].count(b"\x00") > head[::2].count(b"\x00") else "UTF-16BE"


def _read_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are kept as surrogates so validation can point at them."""
    data = path.read_bytes()
    wide = _wide_encoding(data)
    if wide is not None:
        family = wide[:6]
        raise DataValidationError(Problem(
            str(path), "(whole file)", "(encoding)", f"this is {family} text ({wide}), but the loader reads UTF-8",
            f"convert it: `iconv -f {wide} -t UTF-8 {path.name} > {path.stem}-utf8{path.suffix}` (or in Python: "
            f"Path(out).write_text(Path(src).read_text(encoding='{wide.lower()}'), encoding='utf-8'))"), hint=False)
    return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _json_loads(text: str) -> Any:
    """``json.loads``, with nesting beyond Python's recursion limit as a ValueError instead of a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


_TOO_DEEP = ("JSON nested too deeply for the parser (hundreds of levels of [ or {)",
             "a conversation needs only messages -> turns -> role and content: flatten the record")


@contextmanager
def _no_field_limit() -> Iterator[None]:
    """Lift the csv module's 131072-character cell limit while reading, then restore it (it is global)."""
    old = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _parse_table(text: str, delimiter: str, quoting: int) -> tuple[list[str], list[tuple[int, int, dict[Any, Any]]]]:
    """Header and (first line, last line, row), rows shaped as csv.DictReader shapes them (extra cells under None)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    header: list[str] | None = None
    rows = []
    start = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise _QuoteError(start, str(error)) from None
        if header is None:
            header = cells
        elif cells:
            row: dict[Any, Any] = dict(zip(header, cells))
            row.update({key: None for key in header[len(cells):]})
            if len(cells) > len(header):
                row[None] = cells[len(header):]
            rows.append((start, reader.line_num, row))
        start = reader.line_num + 1
    return header or [], rows


class _QuoteError(Exception):
    """A csv quoting error, with the line on which the broken row starts."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def _read_table(path: Path, kind: str, delimiter: str) -> tuple[list[str], list[tuple[int, int, dict[Any, Any]]], str]:
    """(header, rows, note) of a CSV/TSV file; a TSV whose quotes are not CSV quoting is read with quotes as text."""
    text = _read_text(path)
    with _no_field_limit():
        try:
            header, rows = _parse_table(text, delimiter, csv.QUOTE_MINIMAL)
            note = ""
        except _QuoteError as error:
            if kind != "tsv":
                raise DataValidationError(Problem(
                    str(path), f"line {error.line}", "(row)",
                    f"a quote in the row starting here is not closed where CSV expects ({error}); an unclosed quote "
                    "swallows the rows after it, so nothing after it can be trusted",
                    'close the quote, write a quote inside a quoted cell as "", or save the file again from the '
                    "spreadsheet as CSV"), hint=False) from None
            header, rows = _parse_table(text, delimiter, csv.QUOTE_NONE)
            note = "; quotes read as text (not CSV-style TSV quoting)"
    return header, rows, note


def _file_records(path: Path, kind: str, delimiter: str) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs; a line that is not JSON gives a :class:`_Bad` in place of the record."""
    if kind in ("csv", "tsv"):
        text = ""
    else:
        text = _read_text(path)
    if kind == "json" and text.lstrip().startswith("["):
        try:
            _json_loads(text)
        except ValueError as error:
            if not isinstance(error, json.JSONDecodeError):
                problem = Problem(str(path), "(whole file)", "(file)", *_TOO_DEEP)
                raise DataValidationError(problem, hint=False) from None
            raise DataValidationError(Problem(
                str(path), f"line {error.lineno}", "(file)", f"invalid JSON at column {error.colno}: {error.msg}",
                "repair the file; a JSON array is parsed as a whole, so one broken record makes the whole file "
                "unreadable (JSON Lines, one record per line, lets lenient mode skip just that line)"), hint=False)
        try:
            yield from _json_array_records(text)
        except RecursionError:
            raise DataValidationError(Problem(str(path), "(whole file)", "(file)", *_TOO_DEEP), hint=False) from None
        return
    if kind in ("json", "jsonl"):  # JSON Lines (datasets' `to_json` also writes JSON Lines into .json files)
        # Lines end at "\n" only: str.splitlines() would also split at U+2028, U+2029 and U+0085, which valid
        # JSON may hold raw inside its strings.
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                yield f"line {number}", _json_loads(line)
            except json.JSONDecodeError as error:
                yield f"line {number}", _Bad("(line)", f"invalid JSON at column {error.colno}: {error.msg}",
                                             "write each record as one complete JSON object on its own line")
            except ValueError:
                yield f"line {number}", _Bad("(line)", *_TOO_DEEP)
        return
    _, rows, _ = _read_table(path, kind, delimiter)
    for start, end, row in rows:
        short = [key for key, value in row.items() if value is None]
        spanning = [key for key, value in row.items() if isinstance(value, str) and "\n" in value]
        if short and spanning:  # a quote opened in one row and closed rows later: those rows became one cell
            yield f"line {end}", _Bad(spanning[0], f"a quoted cell opens on line {start} and runs to line {end}, and "
                                      f"the row lacks {', '.join(map(repr, short))}: an unclosed quote has swallowed "
                                      "the rows after it", 'close the quote where the cell ends (a quote inside a '
                                      'quoted cell is written "")')
            continue
        # Spreadsheet exports end lines inside cells with \r\n or \r: the training text gets \n.
        yield f"line {end}", {key: value.replace("\r\n", "\n").replace("\r", "\n") if isinstance(value, str)
                              else value for key, value in row.items()}


def _hub_or_missing(source: str, split: str) -> Any:
    """A dataset from the Hugging Face Hub, or a clear error when ``source`` is neither a file nor reachable."""
    if Path(source).suffix.lower() in FILE_KINDS or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise FileNotFoundError(f"{source}: no such file. Check the path (relative paths start at {Path.cwd()}).")
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
    tokens = find_control_tokens(value)
    if tokens:
        if _control_tokens.get() == "escape":
            return neutralise_control_tokens(value)
        more = f" (and {len(tokens) - 1} more: {', '.join(sorted(set(tokens[1:])))})" if len(tokens) > 1 else ""
        raise _Bad(field, f"contains the chat-template control token {tokens[0]}{more}: the chat template would "
                          "render it as a real turn boundary and inject a fake turn into the training text",
                   "remove it, or pass control_tokens='escape' to keep it as plain text")
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
        _check_turn_keys(turn, where, role_key, content_key)
        role = _text(turn.get(role_key), f"{where}.{role_key}")
        if role not in roles:
            raise _Bad(f"{where}.{role_key}", f"unknown {noun} {role!r}", f"use one of {', '.join(roles)}")
        messages.append({"role": roles[role], "content": _text(turn.get(content_key), f"{where}.{content_key}")})
    return messages


def _check_turn_keys(turn: Mapping[str, Any], where: str, role_key: str, content_key: str) -> None:
    """Refuse per-turn keys that would change the meaning if dropped: ``weight`` other than 1, and any other key."""
    for key in turn:
        if key in (role_key, content_key) or turn[key] is None:  # None: absent (datasets fills missing keys so)
            continue
        if key == "weight":
            weight = turn[key]
            if type(weight) in (int, float) and weight == 1:
                continue
            raise _Bad(f"{where}.weight", f"weight {weight!r}: in OpenAI's fine-tuning format weight 0 means 'do not "
                       "train on this turn', and this series trains on every assistant turn, so the weight cannot "
                       "be honoured", "end the conversation before that turn (or split it into two conversations "
                       "without it), or set weight to 1")
        raise _Bad(f"{where}.{key}", f"unknown per-turn key {key!r}: {_TURN_KEYS_NOTE}, so it would be dropped "
                   "silently", f"remove {key!r} from the turns, or fold what it says into the text")


def _from_messages(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], set[str]]:
    """Messages format (OpenAI / Hugging Face): ``messages`` of ``{role, content}``; optional top-level ``system``."""
    messages = _read_turns(record, "messages", "role", "content", {role: role for role in ROLES}, "role")
    system = _text(record.get("system"), "system", required=False)
    offset = 0
    if system.strip():
        if messages[0]["role"] == "system":
            raise _Bad("system", "a top-level system prompt and a system message in messages[0]: which one applies?",
                       "keep one of them")
        messages.insert(0, {"role": "system", "content": system})
        offset = 1
    _check_order(messages, offset=offset)
    return messages, {"messages", "system"}


def _from_sharegpt(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], set[str]]:
    """ShareGPT: ``conversations`` of ``{from, value}`` (system, human/user, gpt/assistant); optional ``system``."""
    messages = []
    system = _text(record.get("system"), "system", required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    messages += _read_turns(record, "conversations", "from", "value", SHAREGPT_ROLES, "speaker")
    _check_order(messages, "conversations", "from", offset=len(messages) - len(record["conversations"]))
    return messages, {"conversations", "system"}


def _from_alpaca(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], set[str]]:
    """Alpaca: ``instruction`` + optional ``input`` (appended after a blank line) -> user; ``output`` -> assistant.

    ``history`` (optional): earlier ``[instruction, output]`` pairs, which become the turns before.
    """
    instruction = _text(record.get("instruction"), "instruction")
    extra = _text(record.get("input"), "input", required=False).strip()
    system = _text(record.get("system"), "system", required=False).strip()
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "system", "content": system}] if system else []
    history = record.get("history")
    if history is not None and not isinstance(history, list):
        raise _Bad("history", f"must be a list of [instruction, output] pairs, got {type(history).__name__}",
                   'write "history": [["earlier question", "earlier answer"], ...]')
    for index, pair in enumerate(history or []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise _Bad(f"history[{index}]", f"expected an [instruction, output] pair, got {pair!r:.60}",
                       "give each earlier turn as a two-item list: the question and the answer")
        messages += [{"role": "user", "content": _text(pair[0], f"history[{index}][0]")},
                     {"role": "assistant", "content": _text(pair[1], f"history[{index}][1]")}]
    reply = _text(record.get("output"), "output")
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages, {"instruction", "input", "output", "system", "history"}


def _from_columns(
    record: Mapping[str, Any], prompt: str, response: str, system: str | None
) -> tuple[list[dict[str, str]], set[str]]:
    """A table row: the prompt column -> user, the response column -> assistant, an optional system column."""
    if None in record:  # cells beyond the header are kept under the key None (as csv.DictReader does)
        raise _Bad("(row)", f"{len(record[None])} more cell(s) than the header has columns",
                   "quote cells that contain the delimiter, or remove the extra cells")
    messages = []
    system_text = _text(record.get(system), system, required=False) if system is not None else ""
    if system_text.strip():
        messages.append({"role": "system", "content": system_text})
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
            header, _, note = _read_table(path, kind, delimiter)
            for column in columns:
                if column is not None and column not in header:
                    found = ", ".join(header) or "nothing"
                    raise DataValidationError(Problem(
                        str(path), "line 1", column, f"no column {column!r} in the header (found: {found})",
                        "rename the column, or name yours with prompt_column= / response_column= / system_column="),
                        hint=False)
            return str(path), _file_records(path, kind, delimiter), "prompt_response", f"a .{kind} file{note}"
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
    control_tokens: str = "reject",
) -> LoadResult:
    """Load conversations from a file, a ``datasets.Dataset``, a list of records or a Hub id, into messages.

    Files: ``.jsonl`` / ``.json`` (messages, ShareGPT or Alpaca records; a JSON array or JSON Lines),
    ``.csv`` / ``.tsv`` (``prompt_column`` and ``response_column``, optional ``system_column``).
    ``format`` (one of :data:`FORMATS`) is detected from the first record's keys when not given.
    ``split`` applies to Hub ids only. Strict by default; ``lenient=True`` skips and reports bad records
    (and refuses a source of which it keeps nothing). Chat-template control tokens (``<|end|>``, ...) in
    the text are refused (``control_tokens="reject"``) or made plain text (``"escape"``).
    """
    if control_tokens not in CONTROL_TOKEN_POLICIES:
        raise ValueError(f"Unknown control_tokens={control_tokens!r}; "
                         f"choose one of {', '.join(CONTROL_TOKEN_POLICIES)}.")
    policy = _control_tokens.set(control_tokens)
    try:
        return _load_conversations(source, format, lenient, prompt_column, response_column, system_column, split)
    finally:
        _control_tokens.reset(policy)


def _load_conversations(source: Any, format: str | None, lenient: bool, prompt_column: str, response_column: str,
                        system_column: str | None, split: str) -> LoadResult:
    """:func:`load_conversations` without the control-token policy."""
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
                problem = Problem(
                    name, location, "(record)", f"cannot tell the format from this record (keys: {keys})",
                    f"pass format= one of {', '.join(FORMATS)}; the formats look like this: {_FORMAT_HELP}")
                if not lenient:
                    raise DataValidationError(problem, hint=False)
                skipped.append(problem)  # the next records may still say which format this is
                continue
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
    if not conversations:
        first = "; ".join(f"{p.location}, field {p.field!r}: {p.message}" for p in skipped[:3])
        raise DataValidationError(Problem(
            name, "(whole source)", "(records)", f"all {count} records were skipped, none kept (first: {first})",
            "fix the records (lenient mode only skips some bad ones), or check the format and column names"),
            hint=False)
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


def to_sft_dataset(conversations: list[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` with one ``messages`` column: what trl's SFTTrainer tokenizes itself."""
    return datasets.Dataset.from_list([{"messages": c["messages"]} for c in conversations])


def conversations_dataset(rows: list[dict[str, Any]], name: str = "rows") -> Any:
    """A ``datasets.Dataset`` of ``messages``, after the same strict checks as every loader."""
    if not rows:
        raise ValueError(f"{name} is empty: there is nothing to train or evaluate on.")
    return to_sft_dataset(load_conversations(rows, format="messages").conversations)
