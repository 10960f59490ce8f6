import json

import pytest

from runrl_engine.data import load_prompts, load_sft, validate_prompt_file, validate_sft_file
from runrl_engine.errors import DataError


def jsonl(tmp_path, lines, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def msg(text, role="user"):
    return {"role": role, "content": text}


def test_rows_keep_every_field_and_accept_messages_alias(tmp_path):
    path = jsonl(tmp_path, [{"prompt": [msg("hi")], "expected_result": 406, "difficulty": "hard"}, "",
                            {"messages": [msg("sys", "system"), msg("yo")], "extra_info": 1}])
    rows = load_prompts(path)
    assert [r.line for r in rows] == [1, 3]
    assert rows[0].fields == {"prompt": [msg("hi")], "expected_result": 406, "difficulty": "hard"}
    assert rows[1].fields["prompt"] == [msg("sys", "system"), msg("yo")] and "messages" not in rows[1].fields


@pytest.mark.parametrize("line,problem", [
    ("{not json", "invalid JSON"),
    ('["a"]', "JSON object"),
    ('{"question": "x"}', "missing `prompt`"),
    ('{"prompt": "just text"}', "non-empty list"),
    ('{"prompt": [{"role": "robot", "content": "x"}]}', "role"),
    ('{"prompt": [{"role": "user", "content": 5}]}', "content"),
])
def test_errors_name_file_line_and_problem(tmp_path, line, problem):
    path = jsonl(tmp_path, [{"prompt": [msg("ok")]}, line])
    with pytest.raises(DataError) as err:
        load_prompts(path)
    assert f"{path}:2:" in err.value.render() and problem in err.value.render()


def test_validator_reports_everything(tmp_path):
    path = jsonl(tmp_path, [{"prompt": [msg("a")], "x": 1}, "{bad", {"prompt": [msg("b")]}, {"nope": 1}])
    report = validate_prompt_file(path).to_dict()
    assert report["valid"] is False
    assert report["details"]["total_lines"] == 4 and report["details"]["valid_lines"] == 2
    assert report["details"]["invalid_lines"] == [2, 4] and report["details"]["extra_fields"] == ["x"]
    assert report["error"].startswith("line 2:")
    good = validate_prompt_file(jsonl(tmp_path, [{"prompt": [msg("a")]}] * 3, "g.jsonl")).to_dict()
    assert good["valid"] and "at least 50" in good["warnings"][0]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="prompt file is empty"):
        load_prompts(jsonl(tmp_path, [""]))
    assert validate_prompt_file(tmp_path / "nope.jsonl").valid is False


def test_sft_formats(tmp_path):
    path = jsonl(tmp_path, [{"messages": [msg("q"), msg("a", "assistant")]},
                            {"prompt": [msg("q")], "completion": "a"},
                            {"prompt": [msg("q")], "completion": [msg("a", "assistant")]}])
    examples = load_sft(path)
    assert [e.messages[-1] for e in examples] == [msg("a", "assistant")] * 3
    bad = jsonl(tmp_path, [{"messages": [msg("q")]}, {"prompt": [msg("q")]}], "bad.jsonl")
    report = validate_sft_file(bad).to_dict()
    assert not report["valid"] and "end with an assistant" in report["errors"][0] and "line 2" in report["errors"][1]
    with pytest.raises(DataError, match=f"{bad}:1"):
        load_sft(bad)
