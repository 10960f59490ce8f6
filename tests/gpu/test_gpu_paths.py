"""The GPU path on a CUDA device: bf16 training steps (fp32 master weights, bf16 autocast, SDPA attention) with
each rollout backend, on the builtin tiny model. Marked `gpu` (deselected by the default `-m 'not gpu'`) and skipped
without CUDA; run on a GPU machine with `pytest -m gpu tests/gpu`."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from safetensors.torch import load_file

from runrl_engine import train
from runrl_engine.rollout.backends import PagedBackend
from runrl_engine.rollout.types import SamplingParams
from tests.engine.test_trainer import cfg

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def gpu_cfg(**over):
    return cfg(device="cuda", dtype="bfloat16", attn_implementation="sdpa", max_steps=3, **over)


@pytest.mark.parametrize("backend", ["hf", "paged"])
@pytest.mark.parametrize("lora", [False, True])
def test_bf16_training_steps(tmp_path, tiny_model_dir, backend, lora):
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    result = train(gpu_cfg(rollout_backend=backend, use_lora=lora, lora_rank=8, merge_lora=True),
                   output_dir=tmp_path)
    assert len(result.history) == 3
    for h in result.history:
        assert math.isfinite(h["loss"]) and h["completion_length_mean"] > 0
        assert h["peak_vram_mb"] > 0 and h["time/rollout_s"] > 0
    after = load_file(str(tmp_path / "final" / "model.safetensors"))
    changed = [k for k in before if k in after and not torch.equal(before[k].float(), after[k].float())]
    assert changed, "no weight changed after 3 bf16 steps"


def test_paged_backend_generates_from_a_refreshed_bf16_copy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").cuda()  # fp32 master
    paged = PagedBackend(compute_dtype=torch.bfloat16)
    paged.sync_weights(model)
    engine = paged._engine(model)
    assert engine is not model and next(engine.parameters()).dtype == torch.bfloat16
    assert next(engine.parameters()).device.type == "cuda"
    comps = paged.generate(model, [[1, 2, 3], [4, 5]], num_samples=4, seeds=list(range(8)),
                           params=SamplingParams(max_new_tokens=16), stop_ids={507}, pad_id=505)
    assert len(comps) == 8 and all(1 <= len(c.tokens) <= 16 for c in comps)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    paged.sync_weights(model)
    for a, b in zip(engine.parameters(), model.parameters()):
        assert torch.equal(a, b.to(torch.bfloat16))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_bf16_training_steps_with_colocated_vllm(tmp_path, tiny_model_dir):
    result = train(gpu_cfg(rollout_backend="vllm", vllm_gpu_memory_utilization=0.2), output_dir=tmp_path)
    assert len(result.history) == 3
    assert all(math.isfinite(h["loss"]) and h["completion_length_mean"] > 0 for h in result.history)


@pytest.mark.parametrize("critic", ["head", "separate"])
def test_bf16_ppo_steps(tmp_path, tiny_model_dir, critic):
    """PPO on CUDA: the value head runs in fp32 under bf16 autocast; values, losses and the critic stay finite."""
    result = train(gpu_cfg(algorithm="ppo", critic=critic, ppo_epochs=2, num_minibatches=2), output_dir=tmp_path)
    assert len(result.history) == 3
    for h in result.history:
        for key in ("loss", "value_loss", "explained_variance", "approx_kl", "entropy", "value_mean"):
            assert math.isfinite(h[key]), (key, h[key])
    assert result.history[-1]["value_mean"] != 0.0
