"""Loaders, format detection, validation of every kind of bad record, lenient mode, the house style."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest

from utils.data import (
    FORMATS,
    DataValidationError,
    conversations_dataset,
    follows_house_style,
    load_conversations,
    to_sft_dataset,
)
from utils.paths import DATA_DIR

EXAMPLES = DATA_DIR / "examples"
REPLY = "In short: yes.\nBecause.\nTip: Taste as you go."


def chat(*turns: tuple[str, str]) -> dict:
    """A messages record from (role, content) pairs."""
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def write_jsonl(path: Path, *records: object) -> Path:
    """One JSON record per line; strings are written as they are (for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def roles(conversation: dict) -> list[str]:
    return [message["role"] for message in conversation["messages"]]


# --- every loader on the shipped examples -------------------------------------------------------------


def test_sharegpt_json_maps_speakers_and_keeps_other_fields():
    result = load_conversations(EXAMPLES / "sharegpt.json")
    assert result.format == "sharegpt" and result.how == "detected from the keys of line 2 (record 1)"
    assert (len(result), result.records, result.skipped) == (3, 3, [])
    first = result.conversations[0]
    assert first["id"] == "sharegpt-1"  # nothing lost: unused fields stay with the conversation
    assert roles(first) == ["system", "user", "assistant", "user", "assistant"]
    assert first["messages"][1]["content"] == "Why does my rice turn out mushy?"
    assert roles(result.conversations[1]) == ["user", "assistant"]  # "user"/"assistant" spellings accepted too


def test_alpaca_json_joins_input_and_uses_system():
    result = load_conversations(EXAMPLES / "alpaca.json")
    assert result.format == "alpaca" and len(result) == 3
    no_input, with_input, with_system = result.conversations
    assert no_input["messages"][0] == {"role": "user", "content": "Explain why onions make you cry."}
    assert with_input["messages"][0]["content"] == (
        "Convert this amount for a recipe that serves 6 instead of 4.\n\n300 g flour")
    assert roles(with_system) == ["system", "user", "assistant"]
    assert with_system["messages"][0]["content"] == "You are Kitchen Coach. Answer briefly."


def test_alpaca_jsonl():
    result = load_conversations(EXAMPLES / "alpaca.jsonl")
    assert (result.format, result.how, len(result)) == ("alpaca", "detected from the keys of line 1", 2)
    assert result.conversations[1]["messages"][0]["content"].endswith("\n\nI have milk and lemons.")


def test_openai_messages_json():
    result = load_conversations(EXAMPLES / "openai_messages.json")
    assert result.format == "messages" and len(result) == 2
    assert roles(result.conversations[1]) == ["user", "assistant", "user", "assistant"]


def test_csv_keeps_multiline_cells():
    result = load_conversations(EXAMPLES / "prompt_response.csv")
    assert (result.format, result.how, len(result)) == ("prompt_response", "a .csv file", 2)
    reply = result.conversations[0]["messages"][1]["content"]
    assert reply.count("\n") == 2 and follows_house_style(reply)


def test_tsv_with_named_columns():
    result = load_conversations(EXAMPLES / "prompt_response.tsv", prompt_column="question", response_column="answer")
    assert len(result) == 2
    assert result.conversations[1]["messages"][0] == {"role": "user", "content": "Why should meat rest after cooking?"}


def test_csv_system_column(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("sys,prompt,response\nBe brief.,Hi?,Hello.\n,Why?,Because.\n", encoding="utf-8")
    result = load_conversations(path, system_column="sys")
    assert roles(result.conversations[0]) == ["system", "user", "assistant"]
    assert roles(result.conversations[1]) == ["user", "assistant"]  # an empty system cell means no system turn


def test_every_example_reply_follows_the_house_style():
    files = {"sharegpt.json": {}, "alpaca.json": {}, "alpaca.jsonl": {}, "openai_messages.json": {},
             "prompt_response.csv": {}, "prompt_response.tsv": dict(prompt_column="question", response_column="answer")}
    replies = [m["content"] for name, kwargs in files.items()
               for c in load_conversations(EXAMPLES / name, **kwargs).conversations
               for m in c["messages"] if m["role"] == "assistant"]
    assert len(replies) == 16 and all(map(follows_house_style, replies))


def test_datasets_dataset_and_list_sources():
    records = [chat(("user", "Hi"), ("assistant", REPLY)), chat(("user", "Bye"), ("assistant", REPLY))]
    from_dataset = load_conversations(datasets.Dataset.from_list(records))
    assert (from_dataset.format, from_dataset.how) == ("messages", "detected from the keys of index 0")
    assert from_dataset.conversations == load_conversations(records).conversations == records


def test_json_lines_inside_a_json_file(tmp_path):
    path = tmp_path / "exported.json"  # datasets' Dataset.to_json writes JSON Lines, even into a .json file
    datasets.Dataset.from_list([chat(("user", "Hi"), ("assistant", REPLY))]).to_json(path)
    assert len(load_conversations(path)) == 1


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(chat(("user", "Hi"), ("assistant", REPLY))).encode() + b"\n")
    assert len(load_conversations(path)) == 1


def test_named_format_is_used_and_checked(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", {"instruction": "Hi", "output": REPLY})
    assert load_conversations(path, format="alpaca").how == "named by the caller"
    with pytest.raises(DataValidationError, match=r"a\.jsonl, line 1, field 'messages': missing field"):
        load_conversations(path, format="messages")
    with pytest.raises(ValueError, match="Unknown format 'chatml'"):
        load_conversations(path, format="chatml")
    assert set(FORMATS) == {"messages", "sharegpt", "alpaca", "prompt_response"}


def test_undetectable_format_names_the_keys(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", {"question": "Hi", "answer": REPLY})
    with pytest.raises(DataValidationError) as error:
        load_conversations(path)
    assert "odd.jsonl, line 1" in str(error.value) and "'question', 'answer'" in str(error.value)
    assert "format=" in str(error.value)


def test_missing_file_unsupported_type_and_split_dicts(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl: no such file"):
        load_conversations(tmp_path / "nothing.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_conversations(tmp_path / "notes.txt")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([chat(("user", "Hi"), ("assistant", REPLY))])})
    with pytest.raises(ValueError, match=r"keys train: pass one split"):
        load_conversations(splits)


def test_hub_id_offline_gives_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a local file, and loading it from the Hugging Face Hub failed"):
        load_conversations("nobody-here/no-such-dataset")


def test_sft_dataset_has_only_messages():
    records = [{**chat(("user", "Hi"), ("assistant", REPLY)), "id": 7}]
    dataset = to_sft_dataset(load_conversations(records).conversations)
    assert dataset.column_names == ["messages"] and dataset[0]["messages"] == records[0]["messages"]


# --- every kind of bad record: strict mode names file, line and field ----------------------------------

GOOD = chat(("user", "Hi"), ("assistant", REPLY))
BAD_RECORDS = {
    "invalid JSON": ('{"messages": [', "(line)", "invalid JSON"),
    "not an object": ('["user", "Hi"]', "(record)", "expected a JSON object, got list"),
    "missing messages": ({"conversation": []}, "messages", "missing field"),
    "messages not a list": ({"messages": "Hi"}, "messages", "must be a non-empty list"),
    "empty messages": ({"messages": []}, "messages", "must be a non-empty list"),
    "turn not an object": ({"messages": ["Hi"]}, "messages[0]", "expected an object"),
    "unknown role": (chat(("user", "Hi"), ("bot", REPLY)), "messages[1].role", "unknown role 'bot'"),
    "missing role": ({"messages": [{"content": "Hi"}]}, "messages[0].role", "missing field"),
    "missing content": ({"messages": [{"role": "user"}]}, "messages[0].content", "missing field"),
    "empty content": (chat(("user", ""), ("assistant", REPLY)), "messages[0].content", "empty text"),
    "blank content": (chat(("user", "Hi"), ("assistant", " \n ")), "messages[1].content", "empty text"),
    "content not a string": ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "must be a string, got int"),
    "content is null": ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "missing field"),
    "two user turns": (chat(("user", "Hi"), ("user", "Hello?"), ("assistant", REPLY)), "messages[1].role",
                       "expected an assistant turn, found 'user'"),
    "starts with assistant": (chat(("assistant", REPLY),), "messages[0].role", "expected a user turn, found 'assistant'"),
    "system not first": (chat(("user", "Hi"), ("system", "Be brief."), ("assistant", REPLY)), "messages[1].role",
                         "a system message may only come first"),
    "only a system turn": (chat(("system", "Be brief."),), "messages", "only a system message"),
    "ends with user": (chat(("user", "Hi"), ("assistant", REPLY), ("user", "Thanks")), "messages[2].role",
                       "ends with a user turn"),
    "lone surrogate": (chat(("user", "Hi \udce9"), ("assistant", REPLY)), "messages[0].content", "not valid UTF-8"),
}


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_bad_record_is_named_by_file_line_and_field(tmp_path, kind):
    record, field, message = BAD_RECORDS[kind]
    path = write_jsonl(tmp_path / "chats.jsonl", GOOD, GOOD, record, GOOD)
    with pytest.raises(DataValidationError) as error:
        load_conversations(path, format="messages")
    problem = error.value.problem
    assert (problem.source, problem.location, problem.field) == (str(path), "line 3", field)
    assert message in problem.message and problem.fix
    assert str(error.value).startswith(f"{path}, line 3, field {field!r}: ")
    assert "Fix: " in str(error.value) and "lenient=True" in str(error.value)


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_lenient_mode_skips_and_reports_each_bad_record(tmp_path, kind):
    record, field, _ = BAD_RECORDS[kind]
    path = write_jsonl(tmp_path / "chats.jsonl", GOOD, record, GOOD)
    result = load_conversations(path, format="messages", lenient=True)
    assert (result.records, len(result), len(result.skipped)) == (3, 2, 1)
    assert (result.skipped[0].location, result.skipped[0].field) == ("line 2", field)


def test_invalid_utf8_bytes_are_located(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"messages": [{"role": "user", "content": "Cr\xe8me?"}]}\n')
    with pytest.raises(DataValidationError, match=r"line 2, field 'messages\[0\].content': not valid UTF-8 \(byte 0xe8"):
        load_conversations(path)


def test_broken_example_file_strict_and_lenient(caplog):
    path = EXAMPLES / "broken.jsonl"
    with pytest.raises(DataValidationError, match=r"broken.jsonl, line 2, field '\(line\)': invalid JSON"):
        load_conversations(path)
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        result = load_conversations(path, lenient=True)
    assert (result.records, len(result), len(result.skipped)) == (12, 2, 10)
    assert [p.location for p in result.skipped] == [f"line {n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 10, 12)]
    assert "12 records, 2 kept, 10 skipped" in caplog.text  # a lenient skip is never silent
    assert result.report().count("\n  skipped ") == 10


def test_sharegpt_bad_speaker_and_alternation(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": REPLY}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bing", "value": REPLY}]},
        {"conversations": [{"from": "gpt", "value": REPLY}]},
    ], indent=1), encoding="utf-8")
    result = load_conversations(path, lenient=True)
    assert [(p.location, p.field) for p in result.skipped] == [
        ("line 14 (record 2)", "conversations[1].from"), ("line 26 (record 3)", "conversations[0].from")]
    assert "unknown speaker 'bing'" in result.skipped[0].message
    assert "expected a user turn, found 'assistant'" in result.skipped[1].message


def test_sharegpt_top_level_system_keeps_field_indexes(tmp_path):
    path = write_jsonl(tmp_path / "sg.jsonl", {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "human", "value": "Hello?"}, {"from": "gpt", "value": REPLY}]})
    with pytest.raises(DataValidationError, match=r"line 1, field 'conversations\[1\].from': expected an assistant"):
        load_conversations(path)
    path = write_jsonl(tmp_path / "ok.jsonl", {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": REPLY}]})
    assert roles(load_conversations(path).conversations[0]) == ["system", "user", "assistant"]


def test_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n', encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"broken.json, line 3, field '\(file\)': invalid JSON at column 17"):
        load_conversations(path, lenient=True)  # one broken record makes a JSON array unreadable as a whole


def test_alpaca_missing_output(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", {"instruction": "Hi", "output": REPLY}, {"instruction": "Bye", "output": ""})
    with pytest.raises(DataValidationError, match=r"a.jsonl, line 2, field 'output': empty text"):
        load_conversations(path)


def test_csv_missing_column(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,response\nHi?,Hello.\n", encoding="utf-8")
    with pytest.raises(DataValidationError) as error:
        load_conversations(path)
    assert str(error.value).startswith(f"{path}, line 1, field 'prompt': no column 'prompt' in the header "
                                       "(found: question, response)")
    assert "prompt_column=" in str(error.value)


def test_csv_bad_rows(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('prompt,response\nHi?,Hello.\n"Two\nlines?",\nA?,B.,C.\nShort?\n', encoding="utf-8")
    result = load_conversations(path, lenient=True)
    assert [(p.location, p.field) for p in result.skipped] == [
        ("line 4", "response"), ("line 5", "(row)"), ("line 6", "response")]
    assert [p.message for p in result.skipped] == ["empty text", "1 more cell(s) than the header has columns", "missing field"]


def test_empty_source(tmp_path):
    with pytest.raises(DataValidationError, match="no records at all"):
        load_conversations(write_jsonl(tmp_path / "empty.jsonl"))


# --- the house style -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("In short: yes.\nDetails.\nTip: Salt early.", True),
    ("In short: yes.\nTip: Salt early.\n", True),
    ("  In short: yes.\n\nDetails.\n\nTip: Salt early.  ", True),
    ("In short: yes.", False),
    ("Yes.\nTip: Salt early.", False),
    ("In short: yes.\nDetails.", False),
    ("In short:\nTip: Salt early.", False),
    ("In short: yes.\nTip: ", False),
    ("in short: yes.\ntip: salt.", False),
    ("Tip: Salt early.\nIn short: yes.", False),
])
def test_follows_house_style(text, expected):
    assert follows_house_style(text) is expected


def test_bad_rows_are_reported_by_index():
    with pytest.raises(ValueError, match="train is empty"):
        conversations_dataset([], "train")
    with pytest.raises(ValueError, match=r"index 1, field 'messages\[0\].role': the conversation ends with a user"):
        conversations_dataset([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                         "content": "yo"}]},
                                        {"messages": [{"role": "user", "content": "hi"}]}], "train")
    with pytest.raises(ValueError, match=r"index 0, field 'messages': missing field"):
        conversations_dataset([{"text": "hi"}], "train")
