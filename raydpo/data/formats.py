"""Preference record formats: detection, validation, normalisation.

Four shapes are accepted (``data.format`` names one, or ``auto`` detects per
record):

* ``standard``        ``{"prompt": str, "chosen": str, "rejected": str}``
* ``conversational``  ``{"prompt": [msg...], "chosen": [assistant msg...], "rejected": [...]}``
* ``openai``          OpenAI preference fine-tuning: ``{"input": {"messages": [...], "tools": [...]?},
                      "preferred_output": [assistant msg...], "non_preferred_output": [...]}``
* ``implicit``        only ``chosen`` and ``rejected``, whole transcripts (strings or
                      message lists) sharing a prefix, which becomes the prompt.
* ``sft``             ``{"prompt": str, "completion": str}`` demonstrations for the SFT
                      stage (stored with rejected = chosen; the SFT loss reads chosen only).

Every record becomes a `NormalizedPair` or a `BadRecord` naming its source,
line (1-based, for JSONL) or row (0-based, for Parquet) and reason. Pure
Python: no Ray, no torch. Conversations stay as messages here; the tokenizer
stage renders them with the chat template.
"""

from __future__ import annotations

from raydpo.errors import DataError  # noqa: F401  (raised here; importers may take it from raydpo.errors)

import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("standard", "conversational", "openai", "implicit", "sft")
PROMPT_ROLES = {"system", "user", "assistant", "tool", "developer"}


@dataclass(frozen=True)
class NormalizedPair:
    """One good record. `prompt`/`chosen`/`rejected` are text, or JSON-encoded
    message lists when `is_chat` (Arrow needs one column type per field)."""

    prompt: str
    chosen: str
    rejected: str
    is_chat: bool
    tools: str  # JSON list of tool specs for chat templates, or ""
    source: str
    line: int


@dataclass(frozen=True)
class BadRecord:
    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


@dataclass
class ValidationReport:
    good: int = 0
    bad: Counter = field(default_factory=Counter)  # reason class -> count
    examples: list[BadRecord] = field(default_factory=list)  # first few, for the user
    max_examples: int = 20

    def add_bad(self, bad: BadRecord) -> None:
        self.bad[reason_class(bad.reason)] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(bad)

    def summary(self) -> str:
        lines = [f"good records: {self.good}", f"bad records:  {sum(self.bad.values())}"]
        for reason, n in self.bad.most_common():
            lines.append(f"  {n:6d}  {reason}")
        return "\n".join(lines)


def reason_class(reason: str) -> str:
    """The reason without record-specific detail, for counting: text before ' ('."""
    return reason.split(" (", 1)[0]


class _Bad(Exception):
    pass


# ---------------------------------------------------------------- messages


def _check_messages(value: Any, name: str, *, assistant_only: bool) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _Bad(f"{name} must be a non-empty list of messages")
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _Bad(f"{where} must be a message object (got {type(m).__name__})")
        role = m.get("role")
        if not isinstance(role, str):
            raise _Bad(f"{where}.role missing or not a string")
        if assistant_only and role != "assistant":
            raise _Bad(f"wrong role: {where}.role must be 'assistant' (got {role!r})")
        if not assistant_only and role not in PROMPT_ROLES:
            raise _Bad(f"wrong role: {where}.role {role!r} is not one of {sorted(PROMPT_ROLES)}")
        content = m.get("content")
        if content is None and m.get("tool_calls"):
            continue  # an assistant tool call may carry no text
        if not isinstance(content, str):
            raise _Bad(f"{where}.content missing or not a string")
        if assistant_only and not content.strip():
            raise _Bad(f"empty response ({where}.content)")
    return value


def _text(value: Any, name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{name} must be a string (got {type(value).__name__})")
    if not allow_empty and not value.strip():
        raise _Bad(f"empty response ({name})" if name != "prompt" else "empty prompt")
    return value


def _shared_prefix_text(a: str, b: str) -> int:
    """Length of the common prefix of a and b, cut back to a whitespace boundary
    so the prompt never ends inside a word both responses happen to start with."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    if n < min(len(a), len(b)):
        while n > 0 and not a[n - 1].isspace():
            n -= 1
    return n


# ---------------------------------------------------------------- detection


def detect_format(rec: dict) -> str:
    if "input" in rec or "preferred_output" in rec or "non_preferred_output" in rec:
        return "openai"
    if "completion" in rec and "chosen" not in rec:
        return "sft"
    if "prompt" not in rec:
        return "implicit"
    return "conversational" if isinstance(rec.get("prompt"), list) else "standard"


def normalize(rec: Any, fmt: str, source: str, line: int) -> NormalizedPair:
    """Validate one decoded record; raise _Bad with the reason if it is not usable."""
    if not isinstance(rec, dict):
        raise _Bad(f"record must be a JSON object (got {type(rec).__name__})")
    fmt = detect_format(rec) if fmt == "auto" else fmt
    tools = ""
    if fmt == "standard":
        for key in ("prompt", "chosen", "rejected"):
            if key not in rec:
                raise _Bad(f"missing field '{key}'")
        prompt = _text(rec["prompt"], "prompt")
        chosen, rejected = _text(rec["chosen"], "chosen"), _text(rec["rejected"], "rejected")
        is_chat = False
    elif fmt == "conversational":
        for key in ("prompt", "chosen", "rejected"):
            if key not in rec:
                raise _Bad(f"missing field '{key}'")
        p = _check_messages(rec["prompt"], "prompt", assistant_only=False)
        c = _check_messages(rec["chosen"], "chosen", assistant_only=True)
        r = _check_messages(rec["rejected"], "rejected", assistant_only=True)
        prompt, chosen, rejected, is_chat = json.dumps(p), json.dumps(c), json.dumps(r), True
    elif fmt == "openai":
        inp = rec.get("input")
        if not isinstance(inp, dict):
            raise _Bad("missing field 'input' (an object with 'messages')")
        if "messages" not in inp:
            raise _Bad("missing field 'input.messages'")
        for key in ("preferred_output", "non_preferred_output"):
            if key not in rec:
                raise _Bad(f"missing field '{key}'")
        p = _check_messages(inp["messages"], "input.messages", assistant_only=False)
        c = _check_messages(rec["preferred_output"], "preferred_output", assistant_only=True)
        r = _check_messages(rec["non_preferred_output"], "non_preferred_output", assistant_only=True)
        if "tools" in inp:
            if not isinstance(inp["tools"], list):
                raise _Bad("input.tools must be a list")
            tools = json.dumps(inp["tools"])
        prompt, chosen, rejected, is_chat = json.dumps(p), json.dumps(c), json.dumps(r), True
    elif fmt == "implicit":
        for key in ("chosen", "rejected"):
            if key not in rec:
                raise _Bad(f"missing field '{key}'")
        c_all, r_all = rec["chosen"], rec["rejected"]
        if isinstance(c_all, str) and isinstance(r_all, str):
            n = _shared_prefix_text(c_all, r_all)
            if n == 0:
                raise _Bad("implicit prompt: chosen and rejected share no prefix")
            prompt, chosen, rejected, is_chat = c_all[:n], c_all[n:], r_all[n:], False
            _text(chosen, "chosen"), _text(rejected, "rejected")
        elif isinstance(c_all, list) and isinstance(r_all, list):
            _check_messages(c_all, "chosen", assistant_only=False)
            _check_messages(r_all, "rejected", assistant_only=False)
            n = 0
            while n < min(len(c_all), len(r_all)) and c_all[n] == r_all[n]:
                n += 1
            if n == 0:
                raise _Bad("implicit prompt: chosen and rejected share no leading message")
            p, c, r = c_all[:n], c_all[n:], r_all[n:]
            _check_messages(c, "chosen (after the shared prompt)", assistant_only=True)
            _check_messages(r, "rejected (after the shared prompt)", assistant_only=True)
            prompt, chosen, rejected, is_chat = json.dumps(p), json.dumps(c), json.dumps(r), True
        else:
            raise _Bad("implicit format: chosen and rejected must both be strings or both message lists")
    elif fmt == "sft":
        for key in ("prompt", "completion"):
            if key not in rec:
                raise _Bad(f"missing field '{key}'")
        prompt = _text(rec["prompt"], "prompt")
        completion = _text(rec["completion"], "completion")
        return NormalizedPair(prompt, completion, completion, False, "", source, line)
    else:
        raise _Bad(f"unknown format {fmt!r}; expected one of {FORMATS} or 'auto'")
    if chosen == rejected:
        raise _Bad("chosen identical to rejected")
    return NormalizedPair(prompt, chosen, rejected, is_chat, tools, source, line)


# ---------------------------------------------------------------- files


def jsonl_records(lines, source: str) -> Iterator[tuple[int, Any] | BadRecord]:
    """(line number, parsed JSON) for each line of `lines` (bytes), 1-based; blank lines
    skipped; a line that is not UTF-8 or not JSON is a BadRecord naming it."""
    for lineno, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield BadRecord(source, lineno, f"non-UTF-8 bytes (at byte {e.start})")
            continue
        if not text.strip():
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as e:
            yield BadRecord(source, lineno, f"invalid JSON ({e.msg} at column {e.colno})")


def iter_jsonl(data: bytes, source: str, fmt: str) -> Iterator[NormalizedPair | BadRecord]:
    """Records of a JSONL byte string; line numbers are 1-based; blank lines skipped."""
    for got in jsonl_records(io.BytesIO(data), source):
        if isinstance(got, BadRecord):
            yield got
            continue
        lineno, rec = got
        try:
            yield normalize(rec, fmt, source, lineno)
        except _Bad as e:
            yield BadRecord(source, lineno, str(e))


def iter_parquet(data: bytes, source: str, fmt: str) -> Iterator[NormalizedPair | BadRecord]:
    """Records of a Parquet byte string; rows are numbered from 0."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # pyarrow raises several types for corrupt files
        yield BadRecord(source, 0, f"unreadable Parquet file ({type(e).__name__}: {e})")
        return
    for row, rec in enumerate(table.to_pylist()):
        try:
            yield normalize(_drop_nulls(rec), fmt, source, row)
        except _Bad as e:
            yield BadRecord(source, row, str(e))


def _drop_nulls(value: Any) -> Any:
    """Parquet columns are shared by all rows: a field a row lacks reads as None.
    Drop those so the record looks as it would in JSON."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def iter_file(data: bytes, source: str, fmt: str) -> Iterator[NormalizedPair | BadRecord]:
    if source.endswith(".parquet"):
        return iter_parquet(data, source, fmt)
    return iter_jsonl(data, source, fmt)


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def list_files(path: str) -> list[str]:
    """Data files at `path` (a file, or a folder searched recursively), sorted."""
    from pathlib import Path

    p = Path(path)
    if p.is_file():
        return [str(p)]
    if not p.is_dir():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES
                   and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
    if not files:
        raise DataError(f"{path}: no {'/'.join(DATA_SUFFIXES)} files in this folder")
    return files


def validate_paths(
    paths: list[str], fmt: str = "auto", strict: bool = False
) -> tuple[list[NormalizedPair], ValidationReport]:
    """Read and validate every record in one process. Bad records are counted and
    skipped; with `strict`, the first one raises DataError naming it."""
    good: list[NormalizedPair] = []
    report = ValidationReport()
    for path in paths:
        for f in list_files(path):
            with open(f, "rb") as fh:
                data = fh.read()
            for rec in iter_file(data, f, fmt):
                if isinstance(rec, BadRecord):
                    if strict:
                        raise DataError(f"strict mode: bad record at {rec}")
                    report.add_bad(rec)
                else:
                    good.append(rec)
                    report.good += 1
    return good, report


def text_pairs(path: str, fmt: str = "auto") -> tuple[list[dict], int]:
    """The {prompt, chosen, rejected} text pairs of a preference file or folder, and how many
    records were skipped (bad ones, and chat pairs, which the held-out scorers do not render yet)."""
    pairs, report = validate_paths([path], fmt)
    text = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs if not p.is_chat]
    return text, sum(report.bad.values()) + len(pairs) - len(text)


def read_prompts(path: str) -> tuple[list[str], ValidationReport]:
    """Prompts of a prompt file or folder (JSONL or Parquet, a non-empty string 'prompt'
    column), in file order. Bad records are skipped, counted by reason and named by
    file and line (JSONL, 1-based) or row (Parquet, 0-based), as preference data is."""
    import pyarrow.parquet as pq

    report, prompts = ValidationReport(), []

    def take(rec: Any, source: str, line: int) -> None:
        if not isinstance(rec, dict):
            report.add_bad(BadRecord(source, line, f"a record must be a JSON object, got {type(rec).__name__}"))
        elif "prompt" not in rec:
            report.add_bad(BadRecord(source, line, f"missing 'prompt' (keys: {sorted(rec)[:5]})"))
        elif not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            report.add_bad(BadRecord(source, line, "'prompt' must be a non-empty string"))
        else:
            report.good += 1
            prompts.append(rec["prompt"])

    for source in list_files(path):
        if source.endswith(".parquet"):
            for row, rec in enumerate(pq.read_table(source).to_pylist()):
                take(rec, source, row)
            continue
        with open(source, "rb") as f:
            for got in jsonl_records(f, source):
                if isinstance(got, BadRecord):
                    report.add_bad(got)
                else:
                    take(got[1], source, got[0])
    return prompts, report
