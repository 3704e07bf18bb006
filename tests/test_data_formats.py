"""Record formats and validation: every shape is accepted, every class of bad
record is reported with file, line and reason, and good records survive."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydpo.data.formats import BadRecord, DataError, NormalizedPair, iter_jsonl, validate_paths
from tests.helpers.proc import run_py

# The example from OpenAI's preference fine-tuning guide, in its exact shape.
OPENAI_EXAMPLE = {
    "input": {
        "messages": [{"role": "user", "content": "Hello, can you tell me how cold San Francisco is today?"}],
        "tools": [],
        "parallel_tool_calls": True,
    },
    "preferred_output": [
        {
            "role": "assistant",
            "content": "Today in San Francisco, it is not quite cold as expected. Morning clouds will give away "
            "to sunshine, with a high near 68°F (20°C) and a low around 57°F (14°C).",
        }
    ],
    "non_preferred_output": [{"role": "assistant", "content": "It is not particularly cold in San Francisco today."}],
}
STANDARD = {"prompt": "about: apple | max 5\n", "chosen": " apple please.", "rejected": " pear"}
CONVERSATIONAL = {
    "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5"}],
}


def parse(rec, fmt="auto"):
    [out] = list(iter_jsonl(json.dumps(rec).encode() + b"\n", "f.jsonl", fmt))
    return out


def test_standard():
    p = parse(STANDARD)
    assert p == NormalizedPair(STANDARD["prompt"], " apple please.", " pear", False, "", "f.jsonl", 1)


def test_conversational():
    p = parse(CONVERSATIONAL)
    assert p.is_chat and json.loads(p.prompt) == CONVERSATIONAL["prompt"]
    assert json.loads(p.chosen) == CONVERSATIONAL["chosen"] and json.loads(p.rejected) == CONVERSATIONAL["rejected"]


def test_openai_preference_example():
    p = parse(OPENAI_EXAMPLE)
    assert p.is_chat
    assert json.loads(p.prompt) == OPENAI_EXAMPLE["input"]["messages"]
    assert json.loads(p.chosen)[0]["content"].startswith("Today in San Francisco")
    assert json.loads(p.rejected)[0]["content"] == "It is not particularly cold in San Francisco today."
    assert json.loads(p.tools) == []
    assert parse(OPENAI_EXAMPLE, fmt="openai") == p  # named explicitly: same result


def test_implicit_text_prompt_is_shared_prefix_cut_at_a_word():
    p = parse({"chosen": "Q: colour of sky?\nA: blue sky", "rejected": "Q: colour of sky?\nA: black"})
    # common prefix "...A: bl" is cut back to the whitespace boundary
    assert (p.prompt, p.chosen, p.rejected) == ("Q: colour of sky?\nA: ", "blue sky", "black")


def test_implicit_messages_prompt_is_shared_messages():
    user = {"role": "user", "content": "hi"}
    p = parse({"chosen": [user, {"role": "assistant", "content": "hello"}],
               "rejected": [user, {"role": "assistant", "content": "go away"}]})
    assert json.loads(p.prompt) == [user] and json.loads(p.chosen) == [{"role": "assistant", "content": "hello"}]


BAD_CASES = [
    (b"{not json", "invalid JSON"),
    (json.dumps({"prompt": "p", "chosen": "c"}).encode(), "missing field 'rejected'"),
    (json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"}).encode(), "chosen must be a string (got int)"),
    (json.dumps({"prompt": "p", "chosen": "   ", "rejected": "r"}).encode(), "empty response (chosen)"),
    (json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}).encode(), "chosen identical to rejected"),
    (json.dumps({**CONVERSATIONAL, "chosen": [{"role": "user", "content": "4"}]}).encode(),
     "wrong role: chosen[0].role must be 'assistant' (got 'user')"),
    (json.dumps({**OPENAI_EXAMPLE, "preferred_output": [{"role": "assistant", "content": ""}]}).encode(),
     "empty response (preferred_output[0].content)"),
    (json.dumps({"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}).encode(),
     "input.messages must be a non-empty list of messages"),
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "non-UTF-8 bytes (at byte 15)"),
    (b"[1, 2]", "record must be a JSON object (got list)"),
]


@pytest.mark.parametrize("line, reason", BAD_CASES)
def test_bad_record_named_and_good_records_survive(tmp_path, line, reason):
    f = tmp_path / "mixed.jsonl"
    good = json.dumps(STANDARD).encode()
    f.write_bytes(good + b"\n" + line + b"\n\n" + good + b"\n")
    pairs, report = validate_paths([str(f)])
    assert [p.line for p in pairs] == [1, 4]  # the blank line 3 is skipped, line numbers stay true
    assert report.good == 2 and sum(report.bad.values()) == 1
    [bad] = report.examples
    assert bad.source == str(f) and bad.line == 2
    assert bad.reason.startswith(reason), bad.reason
    with pytest.raises(DataError, match=f"strict mode: bad record at {f}:2: "):
        validate_paths([str(f)], strict=True)


def test_counts_by_reason_over_a_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_text("\n".join([json.dumps(STANDARD), "{", "{"]))
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}))
    (tmp_path / "_ignored.jsonl").write_text("{")
    pairs, report = validate_paths([str(tmp_path)])
    assert report.good == 1
    assert dict(report.bad) == {"invalid JSON": 2, "chosen identical to rejected": 1}
    assert "good records: 1" in report.summary() and "2  invalid JSON" in report.summary()


def test_parquet_rows_are_numbered_and_null_fields_dropped(tmp_path):
    rows = [STANDARD, {"prompt": "p", "chosen": "c", "rejected": None}, {**STANDARD, "chosen": " other"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    pairs, report = validate_paths([str(tmp_path / "d.parquet")])
    assert [p.line for p in pairs] == [0, 2]
    assert [str(b) for b in report.examples] == [f"{tmp_path}/d.parquet:1: missing field 'rejected'"]


def test_openai_parquet_nested_structs(tmp_path):
    pq.write_table(pa.Table.from_pylist([OPENAI_EXAMPLE]), tmp_path / "o.parquet")
    [p], report = validate_paths([str(tmp_path)])
    assert json.loads(p.prompt) == OPENAI_EXAMPLE["input"]["messages"] and not report.bad


def test_missing_path():
    with pytest.raises(DataError, match="no such file or folder"):
        validate_paths(["/nonexistent/x"])


def test_cli_validate(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(STANDARD) + "\n{\n")
    r = run_py(["-m", "raydpo.cli", "data", "validate", f], timeout=60)
    assert r.returncode == 1
    assert f"BAD {f}:2: invalid JSON" in r.stdout and "good records: 1" in r.stdout
    f.write_text(json.dumps(STANDARD) + "\n")
    assert run_py(["-m", "raydpo.cli", "data", "validate", f], timeout=60).returncode == 0


def test_bad_record_str():
    assert str(BadRecord("a.jsonl", 3, "invalid JSON")) == "a.jsonl:3: invalid JSON"
