"""Rollout backends (rollout/backends.py) on CPU: the registry, `hf` equal to the decode loop it wraps, `paged`
(transformers' continuous batching) on the tiny model, the weight push vLLM would receive, and a clear error when
vLLM is missing. The GPU side is in tests/gpu/."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
import torch

from runrl_engine.config import RunConfig
from runrl_engine.errors import ConfigError
from runrl_engine.rollout import backends
from runrl_engine.rollout.backends import HFBackend, PagedBackend, rollout_backend_for, vllm_weights
from runrl_engine.rollout.hf import generate
from runrl_engine.rollout.types import SamplingParams


def encode(tok, text):
    msgs = [{"role": "user", "content": text}]
    return tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]


def test_config_choices_are_the_registry():
    hints = typing.get_type_hints(RunConfig)
    assert set(typing.get_args(hints["rollout_backend"])) == set(backends.ROLLOUT_BACKENDS)
    assert RunConfig().rollout_backend == "hf"


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        rollout_backend_for(RunConfig(rollout_backend="sglang"), world_size=1, compute_dtype=torch.float32)
    assert "'sglang'" in str(err.value) and "hf, paged, vllm" in str(err.value)
    assert err.value.where == "rollout_backend"


@pytest.mark.parametrize("name", ["paged", "vllm"])
def test_multi_process_runs_refuse_the_single_process_backends(name):
    with pytest.raises(ConfigError, match="single-process only"):
        rollout_backend_for(RunConfig(rollout_backend=name), world_size=2, compute_dtype=torch.float32)
    assert isinstance(rollout_backend_for(RunConfig(), world_size=2, compute_dtype=torch.float32), HFBackend)


def test_each_backend_is_built_from_the_config_by_its_registry_entry(monkeypatch):
    from types import SimpleNamespace

    from runrl_engine.rollout.backends import VLLMBackend

    assert isinstance(rollout_backend_for(RunConfig(), world_size=1, compute_dtype=torch.bfloat16), HFBackend)
    paged = rollout_backend_for(RunConfig(rollout_backend="paged"), world_size=1, compute_dtype=torch.bfloat16)
    assert isinstance(paged, PagedBackend) and paged.compute_dtype == torch.bfloat16

    built = []  # what a stand-in vLLM engine was constructed with

    class FakeLLM:
        def __init__(self, **kwargs):
            built.append(kwargs)

        def sleep(self, level):
            pass

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        # the backend sets them for its in-process engine. setenv first: monkeypatch undoes only what it saw, and
        # a delenv of an unset name records nothing, which would leave the backend's values to every later test
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    single = RunConfig(model="/models/m", rollout_backend="vllm", max_prompt_length=100, completion_length=28,
                       seed=3, vllm_gpu_memory_utilization=0.25)
    multi = RunConfig(model="/models/m", rollout_backend="vllm", type="environment", max_episode_tokens=700)
    for cfg in (single, multi):
        assert isinstance(rollout_backend_for(cfg, world_size=1, compute_dtype=torch.bfloat16), VLLMBackend)
    # the engine's context holds a prompt and its completion, or a whole episode when multi-turn
    assert [(b["model"], b["dtype"], b["max_model_len"], b["seed"], b["gpu_memory_utilization"]) for b in built] == [
        ("/models/m", "bfloat16", 128, 3, 0.25), ("/models/m", "bfloat16", 700, 0, 0.3)]
    with pytest.raises(ConfigError, match="single-process only"):
        rollout_backend_for(single, world_size=2, compute_dtype=torch.bfloat16)
    assert len(built) == 2  # refused before an engine was built


def test_the_shared_rollout_types_import_no_torch():
    code = ("import sys, runrl_engine.rollout.types as t; t.SamplingParams(max_new_tokens=1); "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_vllm_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ConfigError) as err:
        rollout_backend_for(RunConfig(model="x", rollout_backend="vllm"), world_size=1, compute_dtype=torch.bfloat16)
    assert "pip install vllm" in str(err.value)


def test_hf_backend_is_the_decode_loop(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    prompts = [encode(tok, "hi"), encode(tok, "a longer prompt with more words")]
    kw = dict(num_samples=3, seeds=[5, 6, 7, 8, 9, 10], params=SamplingParams(max_new_tokens=10),
              stop_ids={tok.eos_token_id}, pad_id=tok.pad_token_id)
    ours = HFBackend().generate(model, prompts, **kw)
    direct = generate(model, prompts, **kw)
    assert [(c.tokens, c.finished) for c in ours] == [(c.tokens, c.finished) for c in direct]
    assert len({tuple(c.tokens) for c in ours}) == 6  # seeds differ, so samples do


def test_paged_backend_on_cpu(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    prompts = [encode(tok, "hi"), encode(tok, "a longer prompt with more words")]
    paged = PagedBackend()
    kw = dict(num_samples=4, seeds=list(range(8)), params=SamplingParams(max_new_tokens=12),
              stop_ids={tok.eos_token_id}, pad_id=tok.pad_token_id)
    rng = torch.random.get_rng_state()
    comps = paged.generate(model, prompts, **kw)
    assert torch.equal(torch.random.get_rng_state(), rng)  # generate_batch's reseeding does not leak out
    assert model.config._attn_implementation == "sdpa" and not model.training
    assert len(comps) == 8
    for c in comps:
        assert 1 <= len(c.tokens) <= 12 and c.finished == (c.tokens[-1] == tok.eos_token_id)
        assert all(0 <= t < 512 for t in c.tokens)
    assert len({tuple(c.tokens) for c in comps}) == 8
    again = paged.generate(model, prompts, **kw)
    assert [c.tokens for c in again] == [c.tokens for c in comps]  # the same call repeats exactly
    other = paged.generate(model, prompts, **{**kw, "seeds": list(range(100, 108))})
    assert [c.tokens for c in other] != [c.tokens for c in comps]


def test_paged_backend_stops_on_any_stop_id(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    comps = PagedBackend().generate(model, [encode(tok, "hello")], num_samples=8, seeds=list(range(8)),
                                    params=SamplingParams(max_new_tokens=40), stop_ids=set(range(512)) - {0},
                                    pad_id=tok.pad_token_id)
    # every token but id 0 stops: each sample ends at its first non-0 token, which is kept
    for c in comps:
        assert c.finished == (c.tokens[-1] != 0) and all(t == 0 for t in c.tokens[:-1])


def test_paged_backend_generates_from_a_compute_dtype_copy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # fp32 master weights
    paged = PagedBackend(compute_dtype=torch.bfloat16)
    paged.sync_weights(model)
    engine = paged._engine(model)
    assert engine is not model and next(engine.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # an "update"
    paged.sync_weights(model)
    assert paged._engine(model) is engine  # refreshed in place, not rebuilt
    for a, b in zip(engine.parameters(), model.parameters()):
        assert torch.equal(a, b.to(torch.bfloat16))
    comps = paged.generate(model, [[1, 2, 3]], num_samples=2, seeds=[1, 2], params=SamplingParams(max_new_tokens=5),
                           stop_ids={0}, pad_id=0)
    assert len(comps) == 2 and all(1 <= len(c.tokens) <= 5 for c in comps)
    assert PagedBackend(compute_dtype=torch.float32)._engine(model) is model


def test_vllm_weights_fold_lora_into_checkpoint_names(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = {n for n, _ in base.named_parameters()}
    assert dict(vllm_weights(base)).keys() == names  # full model: its own names

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # a trained-looking adapter (B starts at 0)
    before = {n: p.clone() for n, p in peft_model.named_parameters()}
    pushed = dict(vllm_weights(peft_model))
    assert pushed.keys() == names
    merged = dict(peft_model.merge_and_unload().named_parameters())
    for n in names:
        torch.testing.assert_close(pushed[n], merged[n])
    assert any(not torch.equal(pushed[n], base.state_dict()[n]) for n in names)  # the deltas are in
    assert all(torch.equal(before[n], p) for n, p in before.items())  # computing them changed nothing


def test_training_with_the_paged_backend(tmp_path, tiny_model_dir):
    from tests.engine.test_trainer import cfg
    from runrl_engine import train

    result = train(cfg(rollout_backend="paged", max_steps=2), output_dir=tmp_path)
    assert len(result.history) == 2 and all(h["completion_length_mean"] > 0 for h in result.history)
    assert (tmp_path / "final" / "model.safetensors").exists()
