"""Prompt and SFT JSONL files: loading for training, and the checks behind `runrl validate` and the API.

Prompt file (spec §3.1): one JSON object per line with `prompt` (alias `messages`), a list of
`{"role": "system"|"user"|"assistant", "content": str}`; every other key is kept per row and reaches the
reward function / environment as a keyword argument. SFT file (spec §3.5): `{"messages": [...]}` ending
with an assistant turn, or `{"prompt": [...], "completion": str | [messages]}`.

One checker per format produces a list of problems (`file:line: what`), used both by the loaders (which
raise on the first problems) and by the validators (which report them all with counts). This module does
not tokenise: prompt length is checked by the trainer, which has the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from runrl_engine.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
PROMPT_ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 20
FEW_LINES = 50  # the RunRL docs recommend at least this many prompts


@dataclass
class PromptRow:
    """One training prompt: its messages and every other field of its JSONL line."""

    messages: list[dict[str, Any]]
    fields: dict[str, Any]  # all keys of the line, `prompt` included (the reward gets them all)
    line: int


@dataclass
class SFTExample:
    """One SFT conversation; the loss is on the assistant turns (`completion` ones in prompt/completion form)."""

    messages: list[dict[str, Any]]
    line: int


@dataclass
class ValidationReport:
    """What a validator found. `to_dict()` is the API's `ValidationResponse` payload."""

    valid: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "error": self.errors[0] if self.errors else None, "errors": self.errors,
                "warnings": self.warnings, "details": self.details}


# ---- line iteration ---------------------------------------------------------------------------------------

def _json_lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yields (line_number, parsed_object, error) for every non-blank line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", where=str(path), fix="check the path (relative paths resolve against "
                                                                 "the config file's directory)") from None
    except IsADirectoryError:
        raise DataError("is a directory, not a JSONL file", where=str(path)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError("not UTF-8 text", where=f"{path}:{line}", fix="save the file as UTF-8 JSONL") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as exc:
            yield number, None, f"invalid JSON ({exc.msg} at column {exc.colno})"


def _check_messages(messages: Any, key: str, roles: tuple[str, ...]) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"`{key}` must be a non-empty list of {{\"role\", \"content\"}} messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"`{key}[{i}]` must be an object with `role` and `content`"
        if m.get("role") not in roles:
            return f"`{key}[{i}].role` is {m.get('role')!r}; use one of {', '.join(roles)}"
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            return f"`{key}[{i}].content` must be a string"
    return None


# ---- prompts -----------------------------------------------------------------------------------------------

def _check_prompt_obj(obj: Any) -> tuple[PromptRow | None, str | None]:
    if not isinstance(obj, dict):
        return None, "each line must be a JSON object"
    key = "prompt" if "prompt" in obj else ("messages" if "messages" in obj else None)
    if key is None:
        return None, "missing `prompt` (a list of chat messages)"
    problem = _check_messages(obj[key], key, PROMPT_ROLES)
    if problem:
        return None, problem
    fields = dict(obj)
    if key == "messages":  # older docs' alias: the reward still sees it under `prompt`
        fields["prompt"] = fields.pop("messages")
    return PromptRow(messages=[dict(m) for m in obj[key]], fields=fields, line=0), None


def _load(path: Path, check: Callable[[Any], tuple[Any, str | None]], noun: str, fix: str) -> list:
    """Every good item of a JSONL file; raises `DataError` naming file:line for the first bad lines."""
    items, errors = [], []
    for number, obj, err in _json_lines(path):
        item, problem = (None, err) if err else check(obj)
        if problem:
            errors.append(f"{path}:{number}: {problem}")
        else:
            item.line = number
            items.append(item)
    if errors:
        shown = "\n  ".join(errors[:5]) + (f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise DataError(f"{len(errors)} bad line(s) in the {noun} file:\n  {shown}", where=str(path), fix=fix)
    if not items:
        raise DataError(f"the {noun} file is empty", where=str(path), fix="add one JSON object per line")
    return items


def load_prompts(path: str | Path) -> list[PromptRow]:
    """All rows of a prompt JSONL file; raises `DataError` naming file:line for the first bad lines."""
    return _load(Path(path), _check_prompt_obj, "prompt",
                 fix="each line must be {\"prompt\": [{\"role\": \"user\", \"content\": \"...\"}], ...}; "
                     "run `runrl validate prompt FILE` to list every problem")


def _validate(path: Path, check: Callable[[Any], tuple[Any, str | None]], noun: str) -> tuple[ValidationReport, list]:
    report = ValidationReport(valid=True)
    good, invalid_lines, total = [], [], 0
    try:
        for number, obj, err in _json_lines(path):
            total += 1
            item, problem = (None, err) if err else check(obj)
            if problem:
                invalid_lines.append(number)
                if len(report.errors) < MAX_REPORTED_ERRORS:
                    report.errors.append(f"line {number}: {problem}")
            else:
                good.append(item)
    except DataError as exc:
        report.valid = False
        report.errors.append(exc.render())
        return report, good
    if total == 0:
        report.errors.append(f"the file has no {noun}")
    report.valid = not report.errors
    report.details = {"total_lines": total, "valid_lines": len(good), "invalid_lines": invalid_lines[:100]}
    return report, good


def validate_prompt_file(path: str | Path) -> ValidationReport:
    """Every problem in a prompt file (not just the first), plus counts and the extra fields seen."""
    report, rows = _validate(Path(path), _check_prompt_obj, "prompts")
    extra = sorted({k for r in rows for k in r.fields if k != "prompt"})
    report.details["extra_fields"] = extra
    if rows and len(rows) < FEW_LINES:
        report.warnings.append(f"only {len(rows)} prompts; RunRL recommends at least {FEW_LINES}")
    inconsistent = [k for k in extra if any(k not in r.fields for r in rows)]
    if inconsistent:
        report.warnings.append(f"fields not on every line: {', '.join(inconsistent)} "
                               "(the reward function gets them only where present)")
    return report


# ---- SFT ---------------------------------------------------------------------------------------------------

def _check_sft_obj(obj: Any) -> tuple[SFTExample | None, str | None]:
    if not isinstance(obj, dict):
        return None, "each line must be a JSON object"
    if "messages" in obj:
        problem = _check_messages(obj["messages"], "messages", ROLES)
        if problem:
            return None, problem
        messages = [dict(m) for m in obj["messages"]]
    elif "prompt" in obj and "completion" in obj:
        problem = _check_messages(obj["prompt"], "prompt", ROLES)
        if problem:
            return None, problem
        completion = obj["completion"]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        problem = _check_messages(completion, "completion", ROLES)
        if problem:
            return None, problem
        messages = [dict(m) for m in obj["prompt"]] + [dict(m) for m in completion]
    else:
        return None, "expected `messages` (a conversation) or `prompt` + `completion`"
    if messages[-1]["role"] != "assistant":
        return None, "the conversation must end with an assistant message (that is what SFT learns)"
    return SFTExample(messages=messages, line=0), None


def load_sft(path: str | Path) -> list[SFTExample]:
    """All examples of an SFT JSONL file; raises `DataError` naming file:line for the first bad lines."""
    return _load(Path(path), _check_sft_obj, "SFT",
                 fix="each line must be {\"messages\": [..., {\"role\": \"assistant\", ...}]} or "
                     "{\"prompt\": [...], \"completion\": \"...\"}; run `runrl validate sft FILE`")


def validate_sft_file(path: str | Path) -> ValidationReport:
    report, _ = _validate(Path(path), _check_sft_obj, "examples")
    return report
