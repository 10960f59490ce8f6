"""Tests for runrl_engine.tiny: the offline builtin models, their tokenizer and the ChatML template."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runrl_engine import tiny
from runrl_engine.errors import UserError

IM_END_NL = "<|im_end|>\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runrl_cache")


@pytest.fixture(scope="module")
def tiny_dir(cache) -> Path:
    return tiny.build_tiny_model("tiny", cache_dir=cache)


@pytest.fixture(scope="module")
def small_dir(cache) -> Path:
    return tiny.build_tiny_model("small", cache_dir=cache)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def raw_tok(tiny_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


def render(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# ids, names, errors, import cost


def test_is_builtin_and_passthrough():
    assert tiny.is_builtin("builtin:tiny") and tiny.is_builtin("builtin:nope")
    assert not tiny.is_builtin("Qwen/Qwen2.5-0.5B") and not tiny.is_builtin("/models/tiny")
    assert tiny.resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert tiny.resolve_model_path("./local/dir") == "./local/dir"
    assert set(tiny.BUILTIN_MODELS) == {"tiny", "small"}


def test_unknown_builtin_lists_valid_names(tmp_path):
    with pytest.raises(UserError) as err:
        tiny.resolve_model_path("builtin:huge")
    text = str(err.value)
    assert "builtin:huge" in text and "builtin:tiny" in text and "builtin:small" in text
    with pytest.raises(UserError):
        tiny.build_tiny_model("huge", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # failed before touching the cache


def test_import_does_not_pull_torch_or_transformers():
    code = "import sys, runrl_engine.tiny; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_resolve_uses_runrl_cache_dir(monkeypatch, cache, tiny_dir):
    monkeypatch.setenv("RUNRL_CACHE_DIR", str(cache))
    assert tiny.resolve_model_path("builtin:tiny") == str(tiny_dir)


# ---------------------------------------------------------------------------------------------------------------
# model


@pytest.mark.parametrize(
    "name, dims, n_params",
    [
        # hidden, layers, heads, kv heads, intermediate. Params: embeddings (tied with lm_head) + per layer
        # q/k/v (with bias) + o + gate/up/down + 2 norms, + final norm. tiny: 32768 + 2*61696 + 64.
        ("tiny", (64, 2, 4, 2, 256), 156_224),
        ("small", (256, 4, 8, 4, 1024), 4_067_584),
    ],
)
def test_architecture_is_exact(name, dims, n_params, tiny_dir, small_dir):
    from transformers import AutoModelForCausalLM

    model_dir = {"tiny": tiny_dir, "small": small_dir}[name]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    c = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and c.model_type == "qwen2"
    hidden, layers, heads, kv_heads, inter = dims
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == dims
    assert c.vocab_size == 512 and c.max_position_embeddings == 2048 and c.tie_word_embeddings
    head_dim = hidden // heads
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (heads * head_dim, hidden)
    assert attn.k_proj.weight.shape == (kv_heads * head_dim, hidden)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (inter, hidden)
    assert len(model.model.layers) == layers
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert (model_dir / "model.safetensors").is_file()


def test_generate_runs(tiny_dir, tok):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count the letters"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]


def test_build_is_deterministic(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    other = tiny.build_tiny_model("tiny", cache_dir=tmp_path)
    assert other != tiny_dir and other.name == tiny_dir.name
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert a["model.embed_tokens.weight"].std() > 0  # really initialised, not zeros
    assert (tiny_dir / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    assert (tiny_dir / "tokenizer_config.json").read_bytes() == (other / "tokenizer_config.json").read_bytes()


def test_build_does_not_disturb_global_rng(tmp_path):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_model("tiny", cache_dir=tmp_path)
    assert torch.rand(3).equal(expected)


def test_cached_call_is_fast_and_does_not_rebuild(monkeypatch, cache, tiny_dir):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny, "_write_model_dir", fail)
    start = time.perf_counter()
    assert tiny.build_tiny_model("tiny", cache_dir=cache) == tiny_dir
    assert time.perf_counter() - start < 0.5
    assert {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()} == before


def test_cache_dir_name_carries_version_and_fingerprint(tiny_dir, small_dir, monkeypatch):
    assert tiny_dir.name == f"tiny-v{tiny.BUILDER_VERSION}-{tiny.fingerprint('tiny')}"
    assert tiny.fingerprint("tiny") != tiny.fingerprint("small")
    old = tiny.fingerprint("tiny")
    monkeypatch.setattr(tiny, "CHAT_TEMPLATE", tiny.CHAT_TEMPLATE + " ")
    assert tiny.fingerprint("tiny") != old
    stamp = json.loads((tiny_dir / tiny.STAMP_FILE).read_text())
    assert stamp["fingerprint"] == old and stamp["special_token_ids"]["<|im_end|>"] == 507


def _fake_writer(marker: str):
    def write(name, spec, out):
        (out / "who").write_text(marker)
        (out / tiny.STAMP_FILE).write_text("{}")

    return write


def test_concurrent_builder_that_wins_is_kept(monkeypatch, tmp_path):
    """Another process publishes while we build: we keep theirs and leave no temporary directory behind."""
    final = tmp_path / "builtin" / f"tiny-v{tiny.BUILDER_VERSION}-{tiny.fingerprint('tiny')}"

    def racing_writer(name, spec, out):
        _fake_writer("ours")(name, spec, out)
        final.mkdir(parents=True)  # the other builder renames its finished directory into place now
        _fake_writer("theirs")(name, spec, final)

    monkeypatch.setattr(tiny, "_write_model_dir", racing_writer)
    assert tiny.build_tiny_model("tiny", cache_dir=tmp_path) == final
    assert (final / "who").read_text() == "theirs"
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_damaged_cache_dir_is_replaced(monkeypatch, tmp_path):
    final = tmp_path / "builtin" / f"tiny-v{tiny.BUILDER_VERSION}-{tiny.fingerprint('tiny')}"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # half a model, no stamp
    monkeypatch.setattr(tiny, "_write_model_dir", _fake_writer("new"))
    assert tiny.build_tiny_model("tiny", cache_dir=tmp_path) == final
    assert (final / "who").read_text() == "new" and not (final / "config.json").exists()
    assert [p.name for p in final.parent.iterdir()] == [final.name]
    assert os.stat(final).st_mode & 0o777 == 0o755


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def _varied_texts(tok) -> list[str]:
    rng = random.Random(7)
    alphabet = ("abcXYZ019 \n\t\r.,!?'\"{}[]:;_-+*/\\<>|@#$%^&()~`" "éüßñçøÅ" "日本語中文한국어" "Ωπλ" "🙂👍🏽🚀"
                "\u00a0\u2009\u3000" "e\u0301" "\u200d")
    texts = [
        "", " ", "  leading and trailing  ", "Hello world", "a\n\nb\r\n\tc   \n  d",
        "0123456789 3.14159 -42 1e-9 1,000,000", "don't I'll WE'RE you've",
        "naïve café — “quotes” … ½ © ™", "日本語のテキスト、中文，한국어!", "emoji 🙂👍🏽 family 👨‍👩‍👧",
        "decomposed e\u0301 vs composed é", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|im_end|>",
        "<tool_response>\n42\n</tool_response><|endoftext|>", "<|im_end|><|im_end|>x<tool_call>",
        "Count the letters in strawberry. The answer is 10.",
    ]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    texts.append(render(tok, _conversation(), tools=[_WEATHER_TOOL], add_generation_prompt=True))
    return texts


def test_autotokenizer_ids_match_raw_tokenizers(tok, raw_tok):
    # transformers 5 loads model_type qwen2 through Qwen2Tokenizer, which rebuilds the backend from vocab+merges
    # with its own normaliser/pre-tokeniser; ours must be the same layout for ids to agree.
    for text in _varied_texts(tok):
        expected = raw_tok.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False) == expected, text
        assert tok(text)["input_ids"] == raw_tok.encode(text).ids, text


def test_autotokenizer_backend_is_the_saved_one(tok, raw_tok):
    # Stronger than sampling texts: the backend Qwen2Tokenizer rebuilds (normaliser, pre-tokeniser, BPE model,
    # added tokens, decoder, post-processor) serialises exactly like tokenizer.json, so ids agree on any text.
    assert type(tok).__name__ == "Qwen2Tokenizer"  # the DESIGN.md gotcha: model_type qwen2 forces this class
    assert json.loads(tok.backend_tokenizer.to_str()) == json.loads(raw_tok.to_str())


def test_pretokenizer_regex_is_qwen2s():
    from transformers.models.qwen2 import tokenization_qwen2

    assert tiny.PRETOKENIZE_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX


def test_chat_template_ids_match_raw_tokenizers(tok, raw_tok):
    ids = tok.apply_chat_template(_conversation(), tools=[_WEATHER_TOOL], tokenize=True, return_dict=False)
    text = render(tok, _conversation(), tools=[_WEATHER_TOOL])
    assert ids == raw_tok.encode(text).ids
    assert tok.decode(ids) == text


def test_vocab_and_special_tokens(tok, raw_tok, tiny_dir):
    assert len(tok) == 512 and raw_tok.get_vocab_size(with_added_tokens=True) == 512
    expected = {"<|endoftext|>": 505, "<|im_start|>": 506, "<|im_end|>": 507, "<tool_call>": 508,
                "</tool_call>": 509, "<tool_response>": 510, "</tool_response>": 511}
    for token, token_id in expected.items():
        assert tok.encode(token, add_special_tokens=False) == [token_id]
        assert tok.encode(f"x{token}y", add_special_tokens=False)[1:-1] == [token_id]
        assert raw_tok.encode(token).ids == [token_id]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 507)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 505)
    assert tok.bos_token is None and tok.model_max_length == 2048
    config = json.loads((tiny_dir / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (507, 505)
    # ChatML control tokens are skipped by skip_special_tokens; tool tags stay visible for the tool-call parser.
    ids = tok.encode("<|im_start|>a<tool_call>b</tool_call><|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "a<tool_call>b</tool_call>"


def test_roundtrip_is_lossless(tok, raw_tok):
    import unicodedata

    for text in _varied_texts(tok):
        text = unicodedata.normalize("NFC", text)  # the tokenizer NFC-normalises, like Qwen2's
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert raw_tok.decode(ids, skip_special_tokens=False) == text
    # every single byte is reachable: no <unk>, no loss, even for text the BPE never saw
    text = "".join(chr(c) for c in range(1, 0x250)) + "\U0001f600\U000e0001"
    assert tok.decode(tok.encode(unicodedata.normalize("NFC", text))) == unicodedata.normalize("NFC", text)


def test_common_words_are_compressed(tok):
    # a trained BPE, not a bare byte tokenizer: common words take fewer tokens than bytes
    text = "Count the letters in the word and give the answer. The tool_call returns a number."
    assert len(tok.encode(text, add_special_tokens=False)) < 0.6 * len(text.encode())


# ---------------------------------------------------------------------------------------------------------------
# chat template

_WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather for a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}


def _conversation() -> list[dict]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
        ]},
        {"role": "tool", "name": "get_weather", "content": "18C"},
        {"role": "tool", "name": "get_time", "content": "12:00"},
        {"role": "assistant", "content": "18C at noon."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Rome?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "25C"},
        {"role": "assistant", "content": "25C."},
    ]


# What the template renders after "<|im_start|>assistant\n" for each assistant message above, up to <|im_end|>.
_ASSISTANT_BODIES = {
    2: 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
       '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>',
    5: "18C at noon.",
    7: '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
    9: "25C.",
}

_TOOLS_SYSTEM = (
    "<|im_start|>system\nYou are terse.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
    "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(_WEATHER_TOOL)
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n"
)


def test_template_renders_every_role_exactly(tok):
    expected = (
        _TOOLS_SYSTEM
        + "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        + "<|im_start|>assistant\n" + _ASSISTANT_BODIES[2] + IM_END_NL
        + "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n12:00\n</tool_response>"
        + IM_END_NL
        + "<|im_start|>assistant\n18C at noon.<|im_end|>\n"
        + "<|im_start|>user\nAnd Rome?<|im_end|>\n"
        + "<|im_start|>assistant\n" + _ASSISTANT_BODIES[7] + IM_END_NL
        + "<|im_start|>user\n<tool_response>\n25C\n</tool_response><|im_end|>\n"
        + "<|im_start|>assistant\n25C.<|im_end|>\n"
    )
    assert render(tok, _conversation(), tools=[_WEATHER_TOOL]) == expected


def test_template_without_tools_and_generation_prompt(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render(tok, messages) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    assert render(tok, messages, add_generation_prompt=True).endswith("U<|im_end|>\n<|im_start|>assistant\n")
    # no default system prompt is invented
    assert render(tok, messages[1:]) == "<|im_start|>user\nU<|im_end|>\n"
    # tools without a system message: the tools block is the system turn
    with_tools = render(tok, messages[1:], tools=[_WEATHER_TOOL], add_generation_prompt=True)
    assert with_tools.startswith("<|im_start|>system\n# Tools\n\n") and "<tools>\n{" in with_tools
    assert with_tools.endswith("</tool_call><|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    # a conversation ending in tool results, ready for the next assistant turn
    after_tool = _conversation()[:5]
    assert render(tok, after_tool, add_generation_prompt=True).endswith(
        "<tool_response>\n12:00\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("tools", [None, [_WEATHER_TOOL]])
def test_incremental_rendering_equals_full_rendering(tok, tools):
    """The multi-turn trainer renders a prompt, appends the sampled assistant text + <|im_end|>, adds the next
    observation and renders again; that must never rewrite what was already there."""
    messages = _conversation()
    text = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tok, messages[:k], tools=tools, add_generation_prompt=True)
        assert prompt.startswith(text), f"turn {k} rewrote earlier text"
        text = prompt + _ASSISTANT_BODIES[k] + IM_END_NL
        assert text == render(tok, messages[: k + 1], tools=tools)
    full = render(tok, messages, tools=tools)
    assert text == full
    # token level too: each prompt's ids are a prefix of the whole conversation's ids
    full_ids = tok.encode(full, add_special_tokens=False)
    for k in _ASSISTANT_BODIES:
        prompt_ids = tok.encode(render(tok, messages[:k], tools=tools, add_generation_prompt=True),
                                add_special_tokens=False)
        assert full_ids[: len(prompt_ids)] == prompt_ids


def test_assistant_mask_covers_body_and_stop_token(tok):
    out = tok.apply_chat_template(_conversation()[:6], tools=[_WEATHER_TOOL], return_dict=True,
                                  return_assistant_tokens_mask=True)
    trained = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert trained == _ASSISTANT_BODIES[2] + "<|im_end|>" + _ASSISTANT_BODIES[5] + "<|im_end|>"


def test_trl_accepts_template_for_training(tok):
    from trl.chat_template_utils import (
        get_training_chat_template,
        is_chat_template_stop_token_trained,
        supports_tool_calling,
    )

    assert supports_tool_calling(tok)
    assert is_chat_template_stop_token_trained(tok)
    assert get_training_chat_template(tok) is None  # prefix-preserving with generation markers: used as is
