"""Importance-sampling correction between the rollout engine and the trainer (issue 17):
`algorithms/sampler_correction.py` on hand-computed tensors, the sampler log-probs each backend reports (`hf`
single- and multi-turn, `paged`) against the trainer's full forward, and real runs on the builtin tiny model: fp32
sampling (sampler = trainer: weights 1, nothing capped) and bf16 sampling with fp32 training (`rollout_dtype`),
where the mismatch shows in `sampling/*` and `tis` / `mis` change the update."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from runrl_engine import train
from runrl_engine.algorithms.logprobs import selective_log_softmax
from runrl_engine.algorithms.losses import policy_loss
from runrl_engine.algorithms.sampler_correction import (CORRECTION_LEVELS, CORRECTION_MODES, importance_weights,
                                                        sampler_correction, sampler_log_ratio)
from runrl_engine.batch import pad_left, pad_right
from runrl_engine.config import RESUMABLE_KEYS, RunConfig
from runrl_engine.errors import ConfigError
from runrl_engine.rollout.backends import PagedBackend, vllm_token_logprobs
from runrl_engine.rollout.hf import generate, sample_with_logprobs
from runrl_engine.rollout.types import SamplingParams
from tests.engine.test_trainer import cfg as trainer_cfg

LN2, LN3 = math.log(2.0), math.log(3.0)
# fp32 sampling against the trainer's full forward: the cached decode adds in another order. Measured on
# builtin:tiny and builtin:small, max |difference| 1.4e-6 (mean 2e-7); asserted with a margin.
FP32_TOLERANCE = 1e-4


def close(a, b, tol=1e-6):
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    assert a == pytest.approx(b, abs=tol), (a, b)


# ---- the math, by hand ---------------------------------------------------------------------------------------

def _token_case():
    """One row, three trained tokens with trainer/sampler ratios 3, 0.5 and 1, then a padding position holding
    garbage (NaN trainer, inf sampler) that must not count."""
    sampler = torch.tensor([[0.0, 0.0, -1.0, float("inf")]])
    trainer = torch.tensor([[LN3, -LN2, -1.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    return trainer, sampler, mask


def test_token_level_tis_truncates_and_mis_masks_at_the_cap():
    trainer, sampler, mask = _token_case()
    w, diag = sampler_correction(trainer, sampler, mask, mode="tis", level="token", cap=2.0)
    assert w.tolist() == [[2.0, 0.5, 1.0, 1.0]]  # ratio 3 -> the cap; padding stays 1 (the loss has it at 0)
    w, _ = sampler_correction(trainer, sampler, mask, mode="mis", level="token", cap=2.0)
    assert w.tolist() == [[0.0, 0.5, 1.0, 1.0]]  # ratio 3 -> masked out; the others keep their ratio (TRL)
    w, _ = sampler_correction(trainer, sampler, mask, mode="none", level="token", cap=2.0)
    assert w.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    close(diag["sampling/logp_diff_mean"], (LN3 + LN2) / 3)
    close(diag["sampling/logp_diff_max"], LN3)
    close(diag["sampling/kl"], ((3 - 1 - LN3) + (0.5 - 1 + LN2) + 0.0) / 3)  # k3 = r - 1 - log r per token
    close(diag["sampling/is_ratio_mean"], (3 + 0.5 + 1) / 3)
    close(diag["sampling/is_ratio_max"], 3.0)
    close(diag["sampling/is_capped_fraction"], 1 / 3)
    assert all(torch.isfinite(v) for v in diag.values())


def test_sequence_level_uses_the_product_of_the_token_ratios():
    # row 0: ratios 1.5 and 2 -> 3 > cap 2; row 1: 0.5 and 0.5 -> 0.25; row 2: nothing trained -> 1
    trainer = torch.log(torch.tensor([[1.5, 2.0, 1.0], [0.5, 0.5, 1.0], [1.0, 1.0, 1.0]]))
    sampler = torch.zeros(3, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    trainer[1, 2] = 0.0  # row 1's third token: ratio 1
    w, diag = sampler_correction(trainer, sampler, mask, mode="tis", level="sequence", cap=2.0)
    assert w.shape == (3, 1)
    assert w.flatten().tolist() == pytest.approx([2.0, 0.25, 1.0])
    w, _ = sampler_correction(trainer, sampler, mask, mode="mis", level="sequence", cap=2.0)
    assert w.flatten().tolist() == pytest.approx([0.0, 0.25, 1.0])
    close(diag["sampling/is_ratio_mean"], (3 + 0.25 + 1) / 3)  # over sequences
    close(diag["sampling/is_ratio_max"], 3.0)
    close(diag["sampling/is_capped_fraction"], 1 / 3)
    close(diag["sampling/logp_diff_mean"], (math.log(1.5) + LN2 + 2 * LN2) / 5)  # over the 5 trained tokens


def test_nan_sampler_logprobs_mean_no_correction():
    trainer = torch.tensor([[-0.5, -2.0]])
    sampler = torch.tensor([[float("nan"), -2.0]])
    log_ratio = sampler_log_ratio(trainer, sampler, torch.ones(1, 2))
    assert log_ratio.tolist() == [[0.0, 0.0]]
    w, diag = sampler_correction(trainer, sampler, torch.ones(1, 2), mode="mis", cap=1.0)
    assert w.tolist() == [[1.0, 1.0]] and float(diag["sampling/is_capped_fraction"]) == 0.0


def test_sampler_equal_to_trainer_gives_weights_of_exactly_one():
    logp = torch.log_softmax(torch.randn(4, 6, 11, generator=torch.Generator().manual_seed(0)), -1)[..., 0]
    mask = (torch.arange(6) < torch.tensor([[6], [3], [1], [5]])).float()
    for mode in ("tis", "mis"):
        for level in CORRECTION_LEVELS:
            w, diag = sampler_correction(logp, logp.clone(), mask, mode=mode, level=level, cap=1.0)
            assert torch.equal(w, torch.ones_like(w))  # exactly: r = exp(0) = 1 is not above a cap of 1
            assert float(diag["sampling/logp_diff_max"]) == 0.0 and float(diag["sampling/kl"]) == 0.0
            assert float(diag["sampling/is_capped_fraction"]) == 0.0


def test_micro_batch_shares_add_up_to_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    trainer, sampler = -torch.rand(6, 5, generator=g), -torch.rand(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    for level in CORRECTION_LEVELS:
        _, whole = sampler_correction(trainer, sampler, mask, mode="tis", level=level, cap=1.1)
        parts = [sampler_correction(trainer[i:i + 2], sampler[i:i + 2], mask[i:i + 2], mode="tis", level=level,
                                    cap=1.1, num_tokens=int(mask.sum()), num_sequences=6)[1] for i in (0, 2, 4)]
        for key in ("sampling/logp_diff_mean", "sampling/kl", "sampling/is_ratio_mean", "sampling/is_capped_fraction"):
            close(sum(float(p[key]) for p in parts), whole[key])
        for key in ("sampling/logp_diff_max", "sampling/is_ratio_max"):
            close(max(float(p[key]) for p in parts), whole[key])


def test_importance_weights_refuses_unknown_modes_and_bad_caps():
    with pytest.raises(ValueError, match="tis"):
        importance_weights(torch.zeros(2), mode="clip", cap=2.0)
    with pytest.raises(ValueError, match="> 0"):
        importance_weights(torch.zeros(2), mode="tis", cap=0.0)
    with pytest.raises(ValueError, match="sequence"):
        sampler_correction(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), mode="tis", level="turn")


def test_the_weight_multiplies_each_tokens_policy_loss_not_the_kl():
    # on-policy (ratio 1): per-token loss = -A; bnpo weights = 1 / (trained tokens) = 1/3
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    mask = torch.ones(1, 3)
    adv = torch.tensor([2.0])
    w = torch.tensor([[2.0, 0.5, 0.0]])
    loss, diag = policy_loss(logp, logp.detach(), adv, mask, loss_type="bnpo", epsilon_low=0.2, sampler_weights=w)
    close(loss, -(2.0 * 2 + 2.0 * 0.5 + 0.0) / 3)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-4 / 3, -1 / 3, 0.0])  # -A * w / 3
    ref = logp.detach() - 0.1
    plain, _ = policy_loss(logp, logp.detach(), adv, mask, loss_type="bnpo", epsilon_low=0.2, beta=0.5, ref_logp=ref)
    weighted, _ = policy_loss(logp, logp.detach(), adv, mask, loss_type="bnpo", epsilon_low=0.2, beta=0.5,
                              ref_logp=ref, sampler_weights=w)
    kl = float((torch.exp(ref - logp) - (ref - logp) - 1).mean().detach())
    close(plain, -2.0 + 0.5 * kl)
    close(weighted, -5.0 / 3 + 0.5 * kl)  # the KL term is the same with and without the weights


# ---- the sampler's log-probs ---------------------------------------------------------------------------------

def test_sample_reports_the_log_prob_under_the_distribution_it_drew_from():
    logits = torch.log(torch.tensor([[0.25, 0.75], [0.6, 0.4]]))
    u = torch.tensor([0.9, 0.1])
    ids, logp = sample_with_logprobs(logits, u, SamplingParams(max_new_tokens=1))
    assert ids.tolist() == [1, 0] and logp.tolist() == pytest.approx([math.log(0.75), math.log(0.6)])
    # temperature 0.5 squares the odds: 0.75^2 / (0.25^2 + 0.75^2) = 0.9
    _, logp = sample_with_logprobs(logits[:1], u[:1], SamplingParams(max_new_tokens=1, temperature=0.5))
    close(logp[0], math.log(0.9))
    # top_k 1 (and top_p 0.5) leave one token: the sampler drew it with probability 1
    for params in (SamplingParams(max_new_tokens=1, top_k=1), SamplingParams(max_new_tokens=1, top_p=0.5)):
        ids, logp = sample_with_logprobs(logits, u, params)
        assert ids.tolist() == [1, 0] and logp.tolist() == [0.0, 0.0]
    # greedy: the plain model's log-prob of the argmax (as vLLM reports it)
    ids, logp = sample_with_logprobs(logits, u, SamplingParams(max_new_tokens=1, temperature=0))
    assert ids.tolist() == [1, 0] and logp.tolist() == pytest.approx([math.log(0.75), math.log(0.6)])


def _encode(tok, text):
    msgs = [{"role": "user", "content": text}]
    return tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _full_forward_logp(model, prompts, completions, pad_id, temperature=1.0):
    """The trainer's view: one full forward over prompt + completion, log-probs of the completion tokens [B, C]."""
    pi, pm = pad_left(prompts, pad_id)
    ci = pad_right(completions, pad_id)
    cm = pad_right([[1] * len(c) for c in completions], 0)
    ids, am = torch.cat([pi, ci], 1), torch.cat([pm, cm], 1)
    logits = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(1) - 1).clamp(min=0)).logits
    return selective_log_softmax(logits[:, pi.shape[1] - 1:-1] / temperature, ci), cm


def test_hf_sampler_logprobs_equal_the_trainers_in_fp32(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    prompts = [_encode(tok, "hi"), _encode(tok, "a longer prompt with more words in it")]
    for temperature in (1.0, 0.7):
        comps = generate(model, prompts, num_samples=4, seeds=list(range(8)),
                         params=SamplingParams(max_new_tokens=16, temperature=temperature),
                         stop_ids={tok.eos_token_id}, pad_id=tok.pad_token_id)
        assert all(len(c.logprobs) == len(c.tokens) for c in comps)
        trainer, cm = _full_forward_logp(model, [p for p in prompts for _ in range(4)], [c.tokens for c in comps],
                                         tok.pad_token_id, temperature)
        sampler = pad_right([c.logprobs for c in comps], 0.0, torch.float32)
        assert float(((trainer - sampler).abs() * cm).max()) < FP32_TOLERANCE
        for mode in ("tis", "mis"):
            w, diag = sampler_correction(trainer, sampler, cm, mode=mode, cap=2.0)
            assert float((w - 1).abs().max()) < FP32_TOLERANCE and float(diag["sampling/is_capped_fraction"]) == 0


def test_bf16_sampling_differs_from_fp32_training(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    prompts = [_encode(tok, "a longer prompt with more words in it")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        comps = generate(model, prompts, num_samples=4, seeds=list(range(4)), params=SamplingParams(max_new_tokens=16),
                         stop_ids={tok.eos_token_id}, pad_id=tok.pad_token_id)
    trainer, cm = _full_forward_logp(model, prompts * 4, [c.tokens for c in comps], tok.pad_token_id)
    sampler = pad_right([c.logprobs for c in comps], 0.0, torch.float32)
    diff = ((trainer - sampler).abs() * cm)
    # measured on builtin:tiny: mean 4-7e-4, max 2e-3 (fp32 sampling: mean 2e-7, max 1.4e-6)
    assert float(diff.sum() / cm.sum()) > FP32_TOLERANCE and float(diff.max()) > 10 * FP32_TOLERANCE


def test_multi_turn_sampler_logprobs_line_up_with_the_episode(tmp_path, tiny_model_and_tokenizer):
    from runrl_engine.data import PromptRow
    from runrl_engine.rollout.episodes import ChatRenderer, Episode, EpisodeSettings, run_episodes
    from runrl_engine.sandbox import EnvSandbox

    model, tok = tiny_model_and_tokenizer
    code = tmp_path / "env.py"
    code.write_text("class CustomEnv:\n    def setup(self, **row):\n        self.n = 0\n"
                    "    def step(self, action):\n        self.n += 1\n"
                    "        return {'observation': f'turn {self.n}', 'reward': 0.5, 'done': False}\n")
    renderer = ChatRenderer(tok)
    prompt = [{"role": "user", "content": "Say something."}]
    row = PromptRow(prompt, {"prompt": prompt}, 1)
    episodes = [Episode(row=row, prompt_index=0, sample_index=g, prompt_ids=renderer.prompt_ids(prompt))
                for g in range(2)]
    settings = EpisodeSettings(sampling=SamplingParams(max_new_tokens=5), stop_ids={tok.eos_token_id},
                               pad_id=tok.pad_token_id, max_turns=3, end_of_turn_id=tok.eos_token_id)
    with EnvSandbox(code, num_workers=1, timeout_s=5.0, work_dir=tmp_path / "sb") as env:
        run_episodes(model, renderer, episodes, settings, lambda ep, turn: 100 * ep.sample_index + turn,
                     group_size=2, env=env)
    trainer, _ = _full_forward_logp(model, [ep.prompt_ids for ep in episodes], [ep.tokens for ep in episodes],
                                    tok.pad_token_id)
    for k, ep in enumerate(episodes):
        assert ep.turns == 3 and len(ep.sampler_logprobs) == len(ep.tokens) == len(ep.mask)
        assert 0 in ep.mask  # observations were inserted between the turns
        for t, (m, lp) in enumerate(zip(ep.mask, ep.sampler_logprobs)):
            if m:
                assert abs(float(trainer[k, t]) - lp) < FP32_TOLERANCE, (k, t)
            else:
                assert lp == 0.0


def test_paged_backend_reports_the_processed_logprobs(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    prompts = [_encode(tok, "hi"), _encode(tok, "a longer prompt with more words in it")]
    for top_p in (1.0, 0.9):
        comps = PagedBackend().generate(model, prompts, num_samples=2, seeds=[1, 2, 3, 4],
                                        params=SamplingParams(max_new_tokens=8, top_p=top_p),
                                        stop_ids={tok.eos_token_id}, pad_id=tok.pad_token_id)
        assert all(c.logprobs is not None and len(c.logprobs) == len(c.tokens) for c in comps)
        trainer, cm = _full_forward_logp(model, [p for p in prompts for _ in range(2)], [c.tokens for c in comps],
                                         tok.pad_token_id)
        log_ratio = sampler_log_ratio(trainer, pad_right([c.logprobs for c in comps], 0.0, torch.float32), cm)
        if top_p == 1.0:
            assert float(log_ratio.abs().max()) < FP32_TOLERANCE
        else:  # the nucleus was renormalised: the sampler gave each kept token more than the model does
            assert float(log_ratio.max()) < FP32_TOLERANCE and float(log_ratio.min()) < -0.01


def test_vllm_logprob_entries_are_read_per_token():
    class Logprob:  # the shape of vllm.sequence.Logprob (vLLM is not installed here; the engine path is untested)
        def __init__(self, logprob):
            self.logprob = logprob

    entries = [{5: Logprob(-0.25)}, {7: Logprob(-1.5), 9: Logprob(-0.1)}, None]
    out = vllm_token_logprobs([5, 7, 8], entries)
    assert out[:2] == [-0.25, -1.5] and math.isnan(out[2])
    assert all(math.isnan(x) for x in vllm_token_logprobs([1, 2], None))


# ---- config ----------------------------------------------------------------------------------------------------

def test_config_keys_choices_and_resume():
    hints = typing.get_type_hints(RunConfig)
    assert typing.get_args(hints["importance_sampling_correction"]) == CORRECTION_MODES
    assert typing.get_args(hints["importance_sampling_correction_level"]) == CORRECTION_LEVELS
    base = dict(model="builtin:tiny", prompt_file="p.jsonl", reward_file="r.py")
    cfg = RunConfig.from_dict(base)
    assert (cfg.importance_sampling_correction, cfg.importance_sampling_correction_level,
            cfg.importance_sampling_cap, cfg.rollout_dtype) == ("none", "token", 2.0, "auto")
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({**base, "importance_sampling_correction": "token_truncate"})
    assert "importance_sampling_correction" in str(err.value) and "'tis'" in str(err.value)
    with pytest.raises(ConfigError, match="importance_sampling_cap"):
        RunConfig.from_dict({**base, "importance_sampling_cap": 0})
    with pytest.raises(ConfigError) as err:  # a TRL user's key name points at ours
        RunConfig.from_dict({**base, "vllm_importance_sampling_correction": True})
    assert "importance_sampling_correction" in err.value.fix
    # the rollout engine's precision may change on resume (as rollout_backend); the correction changes the loss
    assert "rollout_dtype" in RESUMABLE_KEYS
    assert not {"importance_sampling_correction", "importance_sampling_correction_level",
                "importance_sampling_cap"} & RESUMABLE_KEYS


# ---- real runs ---------------------------------------------------------------------------------------------------

def cfg(**over):
    return trainer_cfg(**{"max_steps": 1, **over})  # test_trainer's tiny quickstart run, one step


def test_fp32_run_has_no_mismatch_and_weights_of_one(tmp_path, tiny_model_dir):
    result = train(cfg(importance_sampling_correction="mis", importance_sampling_cap=1 + FP32_TOLERANCE),
                   output_dir=tmp_path)
    m = result.history[-1]
    assert m["sampling/logp_diff_max"] < FP32_TOLERANCE and m["sampling/kl"] < FP32_TOLERANCE
    assert abs(m["sampling/is_ratio_mean"] - 1) < FP32_TOLERANCE and m["sampling/is_ratio_max"] < 1 + FP32_TOLERANCE
    assert m["sampling/is_capped_fraction"] == 0.0  # not one token masked


@pytest.mark.slow  # three short runs: ~15 s on an idle 2-core machine
def test_bf16_sampling_shows_the_mismatch_and_the_correction_changes_the_update(tmp_path, tiny_model_dir):
    variants = {"none": {}, "mis": dict(importance_sampling_correction="mis", importance_sampling_cap=1.0),
                "tis": dict(importance_sampling_correction="tis", max_steps=2)}
    runs = {name: train(cfg(rollout_dtype="bfloat16", **over), output_dir=tmp_path / name).history
            for name, over in variants.items()}
    none, mis, tis = runs["none"][0], runs["mis"][0], runs["tis"]
    assert none["sampling/logp_diff_mean"] > FP32_TOLERANCE and none["sampling/kl"] > 0
    # the same rollouts (same seed and precision), so the same mismatch; mis with cap 1 drops every token whose
    # ratio is above 1 (about half of them), so the update's loss differs
    assert mis["sampling/logp_diff_mean"] == none["sampling/logp_diff_mean"]
    assert 0.2 < mis["sampling/is_capped_fraction"] < 0.8
    assert mis["loss"] != pytest.approx(none["loss"], abs=1e-6)
    # tis at the default cap: nothing is near it; it trains (both steps, finite loss, weights moved)
    assert len(tis) == 2 and all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in tis)
    assert all(h["sampling/is_capped_fraction"] == 0.0 and h["sampling/logp_diff_mean"] > FP32_TOLERANCE
               for h in tis)
    logs = (tmp_path / "tis" / "logs.txt").read_text()
    assert "rollouts are sampled in bfloat16, training computes in float32" in logs
