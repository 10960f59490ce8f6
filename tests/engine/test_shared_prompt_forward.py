"""The update's shared-prompt forward (`runrl_engine.forward`): each distinct prompt runs once per micro-batch, padded
or padding-free (one packed row), and log-probs, entropies, values, reference log-probs and gradients equal the plain
forward's; micro-batches keep a prompt's completions together; gradient checkpointing falls back to the plain
forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runrl_engine.batch import RolloutBatch, pad_left, pad_right
from runrl_engine.config import RunConfig
from runrl_engine.setup import build_run, params_sharded
from runrl_engine.trainer import Trainer

QS = Path(__file__).resolve().parents[2] / "configs" / "data" / "quickstart"


def make_trainer(tmp_path: Path, **over) -> Trainer:
    base = dict(model="builtin:tiny", prompt_file=str(QS / "prompts.jsonl"), reward_file=str(QS / "reward.py"),
                completion_length=12, max_steps=1, prompts_per_step=3, num_generations=4, micro_batch_size=12,
                eval_every=0, save_every=0, seed=0, log_completions=0, beta=0.1)
    base.update(over)
    return Trainer(build_run(RunConfig.from_dict(base), tmp_path))


def rollout_batch(trainer: Trainer) -> RolloutBatch:
    """The step's rollouts, with completions cut to lengths 12, 10, ..., 4 (the tiny model rarely stops early,
    real completions of a group end at different tokens), so rows carry right padding."""
    episodes = trainer._rollout(trainer._my_prompts(1), 1)
    trainer._score(episodes)
    batch = trainer._collate(episodes)
    for i in range(len(batch)):
        n = max(1, batch.completion_ids.shape[1] - 2 * (i % 5))
        batch.completion_mask[i, n:] = 0
        batch.loss_mask[i, n:] = 0
        batch.completion_ids[i, n:] = trainer.tokenizer.pad_token_id
    return batch.select(torch.arange(len(batch)))


def embedded_shapes(trainer: Trainer) -> list[tuple[int, ...]]:
    """Records the [rows, positions] of every forward through the policy's, the reference's and a critic's
    embeddings."""
    shapes: list[tuple[int, ...]] = []
    up = trainer.updater
    for model in (trainer.parts.policy(), up.ref_model, up.critic.lm if up.critic is not None else None):
        if model is not None:
            model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


def outputs(trainer: Trainer, mb: RolloutBatch, share: bool, packed: bool = False) -> dict[str, torch.Tensor]:
    up = trainer.updater
    trainer.cfg.share_prompt_forward, trainer.cfg.padding_free = share, packed
    up.model.zero_grad(set_to_none=True)
    if up.critic is not None:
        up.critic.zero_grad(set_to_none=True)
    logp, values, entropy = up.forward(up.model, mb, entropy=True, entropy_grad=True)
    out = {"logp": logp, "entropy": entropy, "ref": up.ref_logps(mb)}
    loss = (logp * mb.loss_mask).sum() + 0.1 * (entropy * mb.loss_mask).sum()
    if values is not None:
        out["values"] = values
        loss = loss + (values * mb.loss_mask).sum()
    if up.critic is not None:
        out["critic"] = up.critic_values(mb)
        loss = loss + (out["critic"] * mb.loss_mask).sum()
    loss.backward()
    named = list(up.model.named_parameters()) + (list(up.critic.named_parameters()) if up.critic else [])
    grads = {f"grad:{n}": p.grad.clone() for n, p in named if p.grad is not None}
    assert grads, "nothing was trained"
    return {**{k: v.detach() for k, v in out.items()}, **grads}


@pytest.mark.parametrize("over", [{}, {"use_lora": True, "lora_rank": 4, "lora_alpha": 8},
                                  {"algorithm": "ppo"}, {"algorithm": "ppo", "critic": "separate"}],
                         ids=["grpo", "lora", "ppo-head", "ppo-separate"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_shared_prompts_give_the_plain_forwards_results(tmp_path, tiny_model_dir, over, packed, monkeypatch):
    import runrl_engine.forward as forward

    # on the tiny model attention is a large share of the work, so packing would not pay (`_packing_pays`): force it
    monkeypatch.setattr(forward, "_packing_pays", lambda *args: packed)
    trainer = make_trainer(tmp_path, **over)
    try:
        mb = rollout_batch(trainer)
        if trainer.updater.use_critic:  # the value heads start at zero; give them weights so they say something
            for model in (trainer.acc.unwrap_model(trainer.updater.model), trainer.updater.critic):
                if model is not None and hasattr(model, "value_head"):
                    torch.nn.init.normal_(model.value_head.linear.weight, std=0.5,
                                          generator=torch.Generator().manual_seed(0))
        P, C = mb.prompt_ids.shape[1], mb.completion_ids.shape[1]
        first, group = mb.prompt_groups()
        assert len(first) == 3 and len(mb) == 12 and int(mb.prompt_mask.sum(1).min()) < P  # left padding in play
        shapes = embedded_shapes(trainer)
        shared = outputs(trainer, mb, share=True, packed=packed)
        # every forward (policy, reference or adapter-disabled policy, critic) ran the 3 prompts once: padded
        # as 3 rows then 12, or packed as one row of the prompts' real tokens then one of the completions'
        heads = [(1, int(mb.prompt_mask[first].sum()))] if packed else [(3, P)]
        tails = [(1, int(mb.completion_mask.sum()))] if packed else [(12, C)]
        assert int(mb.completion_mask.sum()) < 12 * C  # the completions differ in length: padding to drop
        assert shapes and all(s in heads + tails for s in shapes) and shapes.count(heads[0]) == shapes.count(tails[0])
        shapes.clear()
        plain = outputs(trainer, mb, share=False)
        assert shapes and all(s == (12, P + C) for s in shapes)
    finally:
        trainer.close()
    assert shared.keys() == plain.keys()
    sampled = mb.loss_mask.bool()
    for key in plain:
        if key.startswith("grad:"):
            scale = float(plain[key].abs().max())  # rounding, relative to the gradient's own size
            torch.testing.assert_close(shared[key], plain[key], rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m: f"{key}: {m}")
        else:
            torch.testing.assert_close(shared[key][sampled], plain[key][sampled], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{key}: {m}")


def test_gradient_checkpointing_keeps_the_plain_forward_where_gradients_flow(tmp_path, tiny_model_dir):
    trainer = make_trainer(tmp_path, gradient_checkpointing=True)
    try:
        mb = rollout_batch(trainer)
        P, C = mb.prompt_ids.shape[1], mb.completion_ids.shape[1]
        shapes = embedded_shapes(trainer)
        trainer.updater.model.train()
        with_checkpointing = outputs(trainer, mb, share=True)
        # the training forward is plain (transformers drops a KV cache in checkpointed layers); the reference pass,
        # without gradients, still shares its prompts
        assert shapes == [(12, P + C), (3, P), (12, C)]
        trainer.cfg.gradient_checkpointing = False
        plain = outputs(trainer, mb, share=False)
    finally:
        trainer.close()
    for key in plain:
        torch.testing.assert_close(with_checkpointing[key], plain[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{key}: {m}")


def _batch(prompts: list[list[int]], completions: list[list[int]]) -> RolloutBatch:
    p_ids, p_mask = pad_left(prompts, 0)
    return RolloutBatch(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=pad_right(completions, 0),
                        completion_mask=pad_right([[1] * len(c) for c in completions], 0),
                        loss_mask=pad_right([[1.0] * len(c) for c in completions], 0.0, torch.float32),
                        advantages=torch.zeros(len(prompts)), rewards=torch.zeros(len(prompts)))


def test_micro_batches_keep_a_prompts_completions_together_when_that_computes_less():
    a, b, c = [1, 2, 3], [4, 5], [6]
    lengths = [2, 9, 1, 4, 8, 3, 5, 7, 6]  # completion lengths of rows 0..8
    prompts = [a, b, c, a, b, c, a, b, c]
    batch = _batch(prompts, [[7] * n for n in lengths])
    first, group = batch.prompt_groups()
    assert sorted(first.tolist()) == [0, 1, 2] and [prompts[i] for i in first[group].tolist()] == prompts
    # totals (prompt + completion): a = rows 0, 3, 6 -> 5, 7, 8; b = rows 1, 4, 7 -> 11, 10, 9; c = 2, 5, 8 -> 2, 4, 7.
    # By length alone: [1, 4, 7], [6, 3, 8], [0, 5, 2] computes 2+27 + 2x3+3x6 + 2x3+3x3 = 68 positions; groups kept
    # together (ordered by their longest row, rows by length inside): 2+27 + 3+15 + 1+18 = 66.
    assert [i.tolist() for i in batch.micro_batch_indices(3)] == [[1, 4, 7], [6, 3, 8], [0, 5, 2]]
    assert [i.tolist() for i in batch.micro_batch_indices(3, share_prompts=True)] == [[1, 4, 7], [6, 3, 0], [8, 5, 2]]
    # one-token prompts, long and short completions in every group: bucketing by length computes less (48 vs 82)
    x, y = [1], [2]
    spread = _batch([x, x, x, x, y, y, y, y], [[7] * n for n in (10, 1, 10, 1, 10, 1, 10, 1)])
    assert ([i.tolist() for i in spread.micro_batch_indices(4, share_prompts=True)]
            == [i.tolist() for i in spread.micro_batch_indices(4)] == [[0, 2, 4, 6], [1, 3, 5, 7]])
    # distinct prompts: exactly the length-bucketed order
    distinct = _batch([[i + 1] * (i % 3 + 1) for i in range(9)], [[7] * n for n in lengths])
    assert ([i.tolist() for i in distinct.micro_batch_indices(4, share_prompts=True)]
            == [i.tolist() for i in distinct.micro_batch_indices(4)])


def test_sliding_window_models_keep_the_plain_forward():
    """A sliding-window cache would drop prompt positions the completions still need: no sharing there."""
    from transformers import Qwen2Config

    from runrl_engine.forward import completion_outputs

    sizes = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=64, vocab_size=50)
    batch = _batch([[1, 2, 3]] * 4, [[7] * n for n in (4, 2, 3, 1)])
    calls: list[tuple[int, ...]] = []

    def call(input_ids, cache, **kw):
        calls.append(tuple(input_ids.shape))
        if cache is not None:  # stands in for the model filling the cache
            for layer_idx in range(2):
                cache.update(torch.zeros(input_ids.shape[0], 1, input_ids.shape[1], 16),
                             torch.zeros(input_ids.shape[0], 1, input_ids.shape[1], 16), layer_idx)
        return (torch.zeros(input_ids.shape[0], kw["logits_to_keep"], 50),)

    full, sliding = Qwen2Config(**sizes), Qwen2Config(**sizes, use_sliding_window=True, sliding_window=16,
                                                        max_window_layers=0)
    out = completion_outputs(call, batch, config=full, share_prompts=True)
    assert calls == [(1, 3), (4, 4)] and out[0].shape == (4, 4, 50)
    calls.clear()
    out = completion_outputs(call, batch, config=sliding, share_prompts=True)
    assert calls == [(4, 7)] and out[0].shape == (4, 4, 50)


def test_sharded_parameters_keep_the_plain_forward():
    """FSDP and ZeRO-3 gather parameters per call: the trainer does not share prompts there (DDP and ZeRO-2 do)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    def sharded(kind, zero_stage=None):
        plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
        return params_sharded(SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin)))

    assert sharded(DistributedType.FSDP) and sharded(DistributedType.DEEPSPEED, 3)
    assert not sharded(DistributedType.DEEPSPEED, 2) and not sharded(DistributedType.MULTI_CPU)
    assert not sharded(DistributedType.MULTI_GPU) and not sharded(DistributedType.NO)


def test_packing_is_chosen_when_it_computes_less():
    """SmolLM2-135M's shape, 8 completions of one 50-token prompt: no padding -> the padded layout (the packed row's
    masked attention over all pairs costs more), a third of the positions padding -> packed; and a small model with
    long sequences, where attention dominates, stays padded."""
    from transformers import LlamaConfig

    from runrl_engine.forward import _packing_pays

    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, vocab_size=49152)
    full = _batch([[1] * 50] * 8, [[7] * 64] * 8)
    ragged = _batch([[1] * 50] * 8, [[7] * n for n in (64, 60, 52, 44, 40, 36, 30, 20)])
    assert not _packing_pays(full, full.prompt_groups()[0], smollm2)
    assert _packing_pays(ragged, ragged.prompt_groups()[0], smollm2)
    small = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=100)
    long = _batch([[1] * 50] * 8, [[7] * n for n in (2000, 1900, 1500, 1200, 1000, 800, 600, 400)])
    assert not _packing_pays(long, long.prompt_groups()[0], small)


def test_sft_packs_rows_only_where_padding_costs_more():
    """The same count for SFT batches (`packed_rows_pay`): SmolLM2, 8 conversations per batch."""
    from transformers import LlamaConfig

    from runrl_engine.forward import packed_rows_pay

    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, vocab_size=49152)
    assert not packed_rows_pay(smollm2, [[150] * 8, [120] * 8])  # no padding at all
    assert not packed_rows_pay(smollm2, [[150, 140, 130, 125, 120, 115, 110, 60]])  # ~17 % padding: about even
    assert packed_rows_pay(smollm2, [[300, 40, 30, 30, 20, 20, 20, 20]])  # mostly padding
