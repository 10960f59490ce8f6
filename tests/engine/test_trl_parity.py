"""Our `policy_loss` against TRL 1.16's own GRPO loss on identical inputs.

TRL's number comes from its real code path: a `GRPOTrainer` built offline on the builtin tiny model
(`runrl_engine.tiny`), whose `_compute_loss(model, inputs)` runs its fused-LM-head forward and its loss. Ours is
computed from the same model's logits with `selective_log_softmax`. Both the loss values and the gradients on
every model parameter must agree, for each loss_type with and without the KL term, across gradient
accumulation (where TRL's bnpo is documented to differ: it normalises by the micro-batch's own token count), and
with sequence-level importance sampling (GSPO); likewise the cispo and sapo surrogates, the two-sided clip
`delta` and the `top_entropy_quantile` token mask (whose entropies come from the same logits).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from runrl_engine.algorithms import (  # noqa: E402
    entropy_from_logits,
    high_entropy_mask,
    policy_loss,
    selective_log_softmax,
)
from runrl_engine.tiny import build_tiny_model  # noqa: E402

MAX_COMPLETION_LENGTH = 8  # dr_grpo's constant; wider than the completions below on purpose
EPSILON, EPSILON_HIGH = 0.2, 0.28


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model("tiny", cache_dir=tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="module")
def make_trainer(tiny_dir, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    dataset = Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h"]})

    def make(loss_type: str, beta: float, grad_accum: int = 1, kl_bias_correction: bool = True,
             importance_sampling_level: str = "token", **extra) -> GRPOTrainer:  # extra: more GRPOConfig keys
        args = GRPOConfig(
            output_dir=str(tmp_path_factory.mktemp("grpo")),
            loss_type=loss_type,
            importance_sampling_level=importance_sampling_level,
            beta=beta,
            use_bias_correction_kl=kl_bias_correction,
            epsilon=EPSILON,
            epsilon_high=extra.pop("epsilon_high", EPSILON_HIGH),
            max_completion_length=MAX_COMPLETION_LENGTH,
            num_generations=2,
            per_device_train_batch_size=4 // grad_accum,
            gradient_accumulation_steps=grad_accum,
            bf16=False,
            activation_checkpointing=False,  # `gradient_checkpointing` is its deprecated alias in transformers 5
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            seed=0,
            **extra,
        )
        trainer = GRPOTrainer(
            model=str(tiny_dir),  # a path, so TRL can also load the reference model itself when beta > 0
            reward_funcs=lambda completions, **_: [0.0] * len(completions),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        assert not trainer.args.gradient_checkpointing and not trainer.args.bf16
        assert trainer.accelerator.num_processes == 1
        trainer.model.train()  # "train" mode: TRL scales by the accumulation steps (no dropout in this model)
        # Set by HF Trainer's training loop from the number of micro-batches in the accumulation window.
        trainer.current_gradient_accumulation_steps = grad_accum
        return trainer

    return make


def _batch(vocab_size: int):
    """Left-padded prompts, right-padded completions (TRL's layout); pads hold the pad id 0."""
    g = torch.Generator().manual_seed(0)
    prompt_lengths, completion_lengths = [3, 2, 4, 1], [6, 3, 5, 1]
    batch, prompt_width, width = 4, 4, 6
    prompt_ids = torch.zeros(batch, prompt_width, dtype=torch.long)
    prompt_mask = torch.zeros(batch, prompt_width, dtype=torch.long)
    completion_ids = torch.zeros(batch, width, dtype=torch.long)
    completion_mask = torch.zeros(batch, width, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        prompt_ids[i, prompt_width - p :] = torch.randint(10, vocab_size, (p,), generator=g)
        prompt_mask[i, prompt_width - p :] = 1
        completion_ids[i, :c] = torch.randint(10, vocab_size, (c,), generator=g)
        completion_mask[i, :c] = 1
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5]),
    }


def _our_logp(model, batch):
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # the unpatched forward
    width = batch["completion_ids"].shape[1]
    return selective_log_softmax(logits[:, -width - 1 : -1], batch["completion_ids"])


def _add_old_and_ref(batch, logp):
    """Old and reference log-probs near the current ones: ratios reach beyond [1 - eps, 1 + eps_high]."""
    g = torch.Generator().manual_seed(1)
    mask = batch["completion_mask"].bool()
    noise = (torch.rand(logp.shape, generator=g) - 0.5) * 0.8
    batch["old_per_token_logps"] = torch.where(mask, logp.detach() + noise, 0.0)
    batch["ref_per_token_logps"] = torch.where(mask, logp.detach() - noise * 0.5, 0.0)
    batch["num_items_in_batch"] = batch["completion_mask"].sum()  # TRL: gather(loss_mask.sum()).sum()
    return batch


def _rows(batch, start, stop):
    return {k: (v[start:stop] if k != "num_items_in_batch" else v) for k, v in batch.items()}


def _grads(model):
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _ours(trainer, batch, loss_type, beta, kl_bias_correction=True, **totals):
    logp = _our_logp(trainer.model, batch)
    loss, _ = policy_loss(
        logp, batch["old_per_token_logps"], batch["advantages"], batch["completion_mask"],
        loss_type=loss_type, epsilon_low=EPSILON, epsilon_high=EPSILON_HIGH, beta=beta,
        ref_logp=batch["ref_per_token_logps"], kl_bias_correction=kl_bias_correction,
        max_completion_length=MAX_COMPLETION_LENGTH, **totals,
    )
    return loss


def _assert_same_grads(ours, theirs):
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-4, msg=name)


# (beta, kl_bias_correction): TRL 1.16 defaults to use_bias_correction_kl=True; both settings are compared.
@pytest.mark.parametrize("beta, correction", [(0.0, True), (0.04, True), (0.04, False)])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_policy_loss_equals_trl_grpo_loss(make_trainer, loss_type, beta, correction):
    trainer = make_trainer(loss_type, beta, kl_bias_correction=correction)
    model = trainer.model
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        logp = _our_logp(model, batch)
    batch = _add_old_and_ref(batch, logp)

    # Log-probs: TRL's fused LM head vs selective_log_softmax on the full logits.
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        trl_logp, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, 6)
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(trl_logp[mask], logp[mask], atol=1e-5, rtol=1e-5)

    theirs = trainer._compute_loss(model, batch)
    theirs.backward()
    their_grads = _grads(model)
    # The noise must actually engage clipping, or the comparison would not cover it.
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] > 0

    ours = _ours(trainer, batch, loss_type, beta, kl_bias_correction=correction)
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-7, rtol=1e-5)
    _assert_same_grads(_grads(model), their_grads)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_gradient_accumulation_matches_trl(make_trainer, loss_type):
    """Two micro-batches of two: TRL's per-micro-batch losses vs ours with the step's global counts."""
    beta = 0.04
    trainer = make_trainer(loss_type, beta, grad_accum=2)
    model = trainer.model
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        logp = _our_logp(model, batch)
    batch = _add_old_and_ref(batch, logp)  # num_items_in_batch: tokens of the whole generation batch
    halves = [_rows(batch, 0, 2), _rows(batch, 2, 4)]
    totals = dict(num_sequences=4, num_tokens=int(batch["completion_mask"].sum()))

    whole = _ours(trainer, batch, loss_type, beta)
    whole.backward()
    whole_grads = _grads(model)

    theirs = [trainer._compute_loss(model, half) for half in halves]
    sum(theirs).backward()
    their_grads = _grads(model)

    if loss_type == "bnpo":
        # Deliberate difference: TRL averages each micro-batch's own token mean (here 9 and 6 tokens), ours is
        # the global token mean. TRL's number is ours with local counts, halved by the accumulation steps.
        local = [_ours(trainer, half, loss_type, beta) / 2 for half in halves]
        for mine, their in zip(local, theirs):
            torch.testing.assert_close(mine.detach(), their.detach(), atol=1e-7, rtol=1e-5)
        assert abs(sum(theirs).item() - whole.item()) > 1e-4
        return

    ours = [_ours(trainer, half, loss_type, beta, **totals) for half in halves]
    for mine, their in zip(ours, theirs):  # equal micro-batch by micro-batch, not only in total
        torch.testing.assert_close(mine.detach(), their.detach(), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(sum(theirs).detach(), whole.detach(), atol=1e-7, rtol=1e-5)
    _assert_same_grads(whole_grads, their_grads)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("bnpo", 0.0), ("dapo", 0.04)])
def test_gspo_loss_and_gradients_equal_trl_sequence_level(make_trainer, loss_type, beta):
    """TRL's real `_compute_loss` with importance_sampling_level="sequence" vs ours on the same model and tokens;
    with beta > 0 the KL term keeps per-token log-probs and is weighted by the sequence ratio (bias correction)."""
    trainer = make_trainer(loss_type, beta, importance_sampling_level="sequence")
    model = trainer.model
    batch = _batch(model.config.vocab_size)
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        logp = _our_logp(model, batch)
    # Per-row shifts of the old log-probs put row 0 (A > 0) above 1 + eps_high and row 1 (A < 0) below 1 - eps,
    # so the sequence-level clipping engages; per-token noise makes the mean matter.
    g = torch.Generator().manual_seed(1)
    shift = torch.tensor([[-0.3], [0.3], [0.05], [-0.1]])
    noise = (torch.rand(logp.shape, generator=g) - 0.5) * 0.2
    batch["old_per_token_logps"] = torch.where(mask, logp + shift + noise, 0.0)
    ref_logp = None
    if beta:
        ref_logp = torch.where(mask, logp + (torch.rand(logp.shape, generator=g) - 0.5) * 0.4, 0.0)
        batch["ref_per_token_logps"] = ref_logp
        batch["num_items_in_batch"] = batch["completion_mask"].sum()

    theirs = trainer._compute_loss(model, batch)
    theirs.backward()
    their_grads = _grads(model)
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] > 0

    ours, _ = policy_loss(
        _our_logp(model, batch), batch["old_per_token_logps"], batch["advantages"], batch["completion_mask"],
        loss_type=loss_type, epsilon_low=EPSILON, epsilon_high=EPSILON_HIGH, importance_sampling_level="sequence",
        beta=beta, ref_logp=ref_logp,
    )
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-6, rtol=1e-5)
    _assert_same_grads(_grads(model), their_grads)


# ------------------------------------------------------------------------ cispo, sapo, delta, top_entropy_quantile


def _prepared(trainer):
    model = trainer.model
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        logp = _our_logp(model, batch)
    return model, _add_old_and_ref(batch, logp)


def _ours_with(model, batch, loss_type, beta, epsilon_high=EPSILON_HIGH, token_mask=None, **options):
    loss, diag = policy_loss(
        _our_logp(model, batch), batch["old_per_token_logps"], batch["advantages"], batch["completion_mask"],
        loss_type=loss_type, epsilon_low=EPSILON, epsilon_high=epsilon_high, beta=beta,
        ref_logp=batch["ref_per_token_logps"], max_completion_length=MAX_COMPLETION_LENGTH, token_mask=token_mask,
        **options,
    )
    return loss, diag


def _compare(trainer, model, batch, ours_fn):
    theirs = trainer._compute_loss(model, batch)
    theirs.backward()
    their_grads = _grads(model)
    ours, diag = ours_fn()
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-7, rtol=1e-5)
    _assert_same_grads(_grads(model), their_grads)
    return diag


@pytest.mark.parametrize("loss_type, beta, config, options", [
    # CISPO: epsilon_high is the cap of the IS weight itself; 1.1 caps part of the noisy ratios (0.67..1.49)
    ("cispo", 0.0, {"epsilon_high": 1.1}, {"epsilon_high": 1.1}),
    ("cispo", 0.04, {"epsilon_high": 1.1}, {"epsilon_high": 1.1}),
    ("sapo", 0.04, {}, {}),  # TRL's default temperatures (1.0, 1.05) are ours
    ("sapo", 0.0, {"sapo_temperature_pos": 2.0, "sapo_temperature_neg": 3.0},
     {"sapo_temperature_pos": 2.0, "sapo_temperature_neg": 3.0}),
])
def test_cispo_and_sapo_equal_trl(make_trainer, loss_type, config, options, beta):
    trainer = make_trainer(loss_type, beta, **config)
    model, batch = _prepared(trainer)
    diag = _compare(trainer, model, batch, lambda: _ours_with(model, batch, loss_type, beta, **options))
    if loss_type == "cispo":  # the cap engaged, and both count it alike
        assert trainer._metrics["train"]["cispo_clip_ratio"][-1] > 0
        assert diag["cispo_clip_ratio"].item() == pytest.approx(trainer._metrics["train"]["cispo_clip_ratio"][-1])
    else:
        assert diag["sapo/gate_mean"] < 1  # off-policy tokens: the gate attenuated them


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_cispo_and_sapo_gradient_accumulation_match_trl(make_trainer, loss_type):
    """Two micro-batches of two: cispo's global token count and sapo's per-sequence means with the step's totals."""
    config = {"epsilon_high": 1.1} if loss_type == "cispo" else {}
    trainer = make_trainer(loss_type, 0.04, grad_accum=2, **config)
    model, batch = _prepared(trainer)
    totals = dict(num_sequences=4, num_tokens=int(batch["completion_mask"].sum()))
    halves = [_rows(batch, 0, 2), _rows(batch, 2, 4)]
    theirs = [trainer._compute_loss(model, half) for half in halves]
    sum(theirs).backward()
    their_grads = _grads(model)
    ours = [_ours_with(model, half, loss_type, 0.04, **config, **totals)[0] for half in halves]
    for mine, their in zip(ours, theirs):
        torch.testing.assert_close(mine.detach(), their.detach(), atol=1e-7, rtol=1e-5)
    sum(ours).backward()
    _assert_same_grads(_grads(model), their_grads)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_two_sided_clip_delta_equals_trl(make_trainer, loss_type):
    trainer = make_trainer(loss_type, 0.04, delta=1.3)
    model, batch = _prepared(trainer)
    # rows 1 and 3 (A < 0): old log-probs 0.4 lower, so ratios reach e^0.8 = 2.2, above delta
    mask = batch["completion_mask"].bool()
    shift = torch.tensor([[0.0], [0.4], [0.0], [0.4]])
    batch["old_per_token_logps"] = torch.where(mask, batch["old_per_token_logps"] - shift, 0.0)
    diag = _compare(trainer, model, batch, lambda: _ours_with(model, batch, loss_type, 0.04, delta=1.3))
    assert diag["clip_ratio/delta_mean"] > 0  # some A < 0 tokens have ratios above 1.3: the bound engaged


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_top_entropy_quantile_equals_trl(make_trainer, loss_type):
    """TRL masks the surrogate by its `get_high_entropy_mask` over the micro-batch; ours takes the entropies of the
    same logits through `high_entropy_mask` (one micro-batch on one process: the trainer's step-wide quantile is
    this one)."""
    config = {"epsilon_high": 1.1} if loss_type == "cispo" else {}
    trainer = make_trainer(loss_type, 0.04, top_entropy_quantile=0.4, **config)
    model, batch = _prepared(trainer)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -width - 1 : -1]
        entropies = entropy_from_logits(logits)
        _, their_entropies, _ = trainer._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, width, compute_entropy=True)
    mask = batch["completion_mask"]
    torch.testing.assert_close(entropies[mask.bool()], their_entropies[mask.bool()], atol=1e-5, rtol=1e-5)
    keep = high_entropy_mask(entropies, mask, 0.4)
    assert keep.sum() == 6  # 40% of 15 tokens, the threshold itself included
    torch.testing.assert_close(keep, trainer.get_high_entropy_mask(their_entropies, mask, 0.6))
    _compare(trainer, model, batch, lambda: _ours_with(model, batch, loss_type, 0.04, token_mask=keep, **config))


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_cispo_and_sapo_sequence_level_equal_trl(make_trainer, loss_type):
    """importance_sampling_level="sequence": cispo caps (and detaches) the sequence ratio, sapo gates it."""
    config = {"epsilon_high": 1.1} if loss_type == "cispo" else {}
    trainer = make_trainer(loss_type, 0.04, importance_sampling_level="sequence", **config)
    model, batch = _prepared(trainer)
    mask = batch["completion_mask"].bool()
    shift = torch.tensor([[-0.3], [0.3], [0.05], [-0.1]])  # row 0's sequence ratio above the 1.1 cap
    batch["old_per_token_logps"] = torch.where(mask, batch["old_per_token_logps"] + shift, 0.0)
    _compare(trainer, model, batch, lambda: _ours_with(model, batch, loss_type, 0.04,
                                                      importance_sampling_level="sequence", **config))
    if loss_type == "cispo":
        assert trainer._metrics["train"]["cispo_clip_ratio"][-1] > 0
