"""The update over a `RolloutBatch`: forward passes, advantages, and each optimizer step's loss and statistics.

`PolicyUpdate` holds a built run's models and optimizer (`setup.Models`) and runs, for the trainer's phases:

- `forward` / `critic_values` / `ref_logps`: the completion tokens' log-probs (temperature-scaled, as sampled),
  values and entropies, as one `TokenOutputs` for the plain policy and the value-head policy alike, each distinct
  prompt of a micro-batch computed once where that is exact (`forward.completion_outputs`);
- `old_pass`: log-probs, values and reference log-probs at sampling time, before anything moves;
- `advantages`: the registered estimator (`algorithms.advantages`); GAE's whitening and the critic's statistics
  from batch-wide moments reduced over processes in one all-reduce (`global_moments`);
- `update`: `ppo_epochs` x `num_minibatches` optimizer steps, each summing micro-batch losses with global
  denominators (`algorithms.losses`, `algorithms.ppo.combined_loss`); every statistic is reduced the way
  `REDUCTIONS` declares (a share of the step's value: summed; a per-token mean: token-weighted; a maximum).

The math lives in `algorithms/`; this module decides which tensors go in and how results are reduced across
micro-batches, optimizer steps and processes. Not covered: rollouts, rewards, logging (the trainer's).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from runrl_engine.algorithms import ppo as ppo_math
from runrl_engine.algorithms.advantages import advantage_options, get_advantage_estimator
from runrl_engine.algorithms.logprobs import entropy_from_logits, selective_log_softmax
from runrl_engine.algorithms.losses import entropy_quantile_threshold, high_entropy_mask, policy_loss
from runrl_engine.algorithms.sampler_correction import MAX_STATS as SAMPLER_MAX_STATS
from runrl_engine.algorithms.sampler_correction import SHARE_STATS as SAMPLER_SHARE_STATS
from runrl_engine.algorithms.sampler_correction import sampler_correction
from runrl_engine.batch import RolloutBatch
from runrl_engine.config import RunConfig
from runrl_engine.forward import PerToken, completion_outputs
from runrl_engine.rollout.episodes import Episode
from runrl_engine.schedule import sample_seed
from runrl_engine.setup import Models

__all__ = ["MAX", "REDUCTIONS", "SUM", "TOKEN_MEAN", "Moments", "PolicyUpdate", "StepStats", "TokenOutputs",
           "all_max", "all_sum", "global_moments", "reduction_of", "reward_positions"]

# How each update statistic combines over micro-batches and processes (and optimizer steps: MAX by max, the
# rest averaged). SUM: already each micro-batch's share of the whole step's value (global denominators);
# MAX: a maximum; TOKEN_MEAN (every key not named): a per-micro-batch token mean, weighted by its tokens.
SUM, TOKEN_MEAN, MAX, WEIGHT = "sum", "token_mean", "max", "weight"
REDUCTIONS: dict[str, str] = {
    "loss": SUM, "pg_loss": SUM, "value_loss": SUM, "entropy": SUM,
    **{k: SUM for k in SAMPLER_SHARE_STATS},
    "ratio_max": MAX, **{k: MAX for k in SAMPLER_MAX_STATS},
    "num_tokens": WEIGHT,  # the micro-batch's selected tokens: the weight of its token means, not a statistic
}


def reduction_of(key: str) -> str:
    return REDUCTIONS.get(key, TOKEN_MEAN)


def all_sum(acc: Any, *values: float) -> list[float]:
    """`values` summed over processes (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        t = acc.reduce(t, reduction="sum")
    return t.tolist()


def all_max(acc: Any, value: float) -> float:
    if acc.num_processes == 1:
        return value
    from accelerate.utils import gather

    return float(gather(torch.tensor([value], device=acc.device)).max())


class StepStats:
    """One optimizer step's statistics, accumulated over its micro-batches by `REDUCTIONS`."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {"loss": 0.0}
        self.maxima: dict[str, float] = {"ratio_max": 0.0}

    def add(self, diag: dict[str, Any], tokens: float) -> None:
        for k, v in diag.items():
            how = reduction_of(k)
            if how == MAX:
                self.maxima[k] = max(self.maxima.get(k, 0.0), float(v))
            elif how != WEIGHT:
                self.sums[k] = self.sums.get(k, 0.0) + float(v) * (1.0 if how == SUM else tokens)

    def reduce(self, acc: Any, n_tok: int) -> dict[str, float]:
        """Over processes: sums in one all-reduce, token means divided by the step's global token count."""
        keys = sorted(self.sums)
        totals = dict(zip(keys, all_sum(acc, *(self.sums[k] for k in keys))))
        out = {k: (v if reduction_of(k) == SUM else v / max(n_tok, 1)) for k, v in totals.items()}
        out.update({k: all_max(acc, v) for k, v in sorted(self.maxima.items())})
        return out


def mean_over_steps(steps: Sequence[dict[str, float]]) -> dict[str, float]:
    """Several optimizer steps' statistics as one record: maxima by max, everything else averaged."""
    totals: dict[str, float] = {}
    maxima: dict[str, float] = {"ratio_max": 0.0}
    for stats in steps:
        for k, v in stats.items():
            if reduction_of(k) == MAX:
                maxima[k] = max(maxima.get(k, 0.0), v)
            else:
                totals[k] = totals.get(k, 0.0) + v
    return {**{k: v / len(steps) for k, v in totals.items()}, **maxima}


@dataclass(frozen=True)
class Moments:
    """Count, mean and unbiased variance of a tensor's selected positions, over every process."""

    n: float
    mean: float
    var: float


def global_moments(acc: Any, mask: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, Moments]:
    """Each tensor's `Moments` over `mask`'s selected positions on all processes, in one all-reduce."""
    local = [s for x in tensors.values() for s in ppo_math.whiten_stats(x, mask)]
    reduced = all_sum(acc, *local)
    out = {}
    for i, name in enumerate(tensors):
        n, total, squares = reduced[3 * i: 3 * i + 3]
        mean = total / max(n, 1)
        out[name] = Moments(n, mean, (squares - n * mean * mean) / max(n - 1, 1))
    return out


class TokenOutputs(NamedTuple):
    """Per completion token, [b, C]: log-probs; the value head's values (None without one); entropies (None unless
    asked)."""

    logp: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor | None


def reward_positions(episodes: Sequence[Episode], loss_mask: torch.Tensor,
                     step_rewards: bool) -> list[tuple[int, int, float]]:
    """(row, token, reward) triples placing each episode's reward for GAE. With `step_rewards` (environment
    runs) each step reward sits on the last sampled token of the assistant turn the environment judged (recorded
    when it stepped, so turns answered by a tool instead are skipped); otherwise, or for an episode that ended in
    an error, the episode's reward sits on its last sampled token. loss_mask: [B, C]."""
    out: list[tuple[int, int, float]] = []
    for row, (ep, ends) in enumerate(zip(episodes, ppo_math.turn_end_positions(loss_mask))):
        if not ends:
            continue  # nothing sampled, nothing to credit
        if step_rewards and ep.step_rewards and ep.error is None:
            out.extend((row, end, r) for end, r in zip(ep.step_reward_ends, ep.step_rewards, strict=True))
        else:
            out.append((row, ends[-1], ep.reward))
    return out


class PolicyUpdate:
    """The forward passes and optimizer steps of one run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, acc: Any, models: Models, *, policy: Callable[[], torch.nn.Module],
                 log: Callable[[str], None]):
        """`policy`: the unwrapped Hugging Face policy (the reference under LoRA is it, adapter disabled)."""
        self.cfg, self.acc, self.world, self.log, self.policy = cfg, acc, acc.num_processes, log, policy
        self.model, self.critic, self.ref_model = models.model, models.critic, models.ref_model
        self.optimizer, self.scheduler = models.optimizer, models.scheduler
        self.params, self.value_params = models.params, models.value_params
        self.use_critic, self.value_on_policy = models.use_critic, models.value_on_policy
        self.model_config, self.params_sharded = models.model_config, models.params_sharded
        self.updates_per_step = cfg.ppo_epochs * cfg.num_minibatches
        # samples reused (or a critic baseline needed): record log-probs/values before the update changes them
        self.needs_old_pass = self.use_critic or self.updates_per_step > 1
        self.advantage_fn = get_advantage_estimator(cfg.advantage_estimator)

    # ---- forward passes --------------------------------------------------------------------------------------
    def forward(self, model: torch.nn.Module, mb: RolloutBatch, *, entropy: bool = False,
                entropy_grad: bool = False) -> TokenOutputs:
        """Completion tokens' log-probs [b, C] (temperature-scaled, as they were sampled); the value head's
        values [b, C] when `model` is the policy carrying it; entropies [b, C] when asked (differentiable only
        with `entropy_grad`: for logging alone its full-vocabulary graph is not kept)."""
        temperature, keep_grad = self.cfg.temperature, entropy_grad and torch.is_grad_enabled()

        def per_token(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if temperature != 1.0:
                logits = logits / temperature
            logp = selective_log_softmax(logits, targets)
            if not entropy:
                return (logp,)
            with torch.set_grad_enabled(keep_grad):
                return logp, entropy_from_logits(logits)

        if model is self.model and self.value_on_policy:
            call = model
        else:
            def call(cache: Any = None, **inputs: Any) -> torch.Tensor:
                return model(**inputs, cache=cache, use_cache=cache is not None).logits
        per_tok = 2 if entropy else 1
        outs = self.outputs(call, mb, per_token=per_token)  # per-token outputs, then the value head's if any
        return TokenOutputs(outs[0], outs[per_tok] if len(outs) > per_tok else None, outs[1] if entropy else None)

    def outputs(self, call: Any, mb: RolloutBatch, per_token: PerToken | None = None) -> tuple[torch.Tensor, ...]:
        """`call`'s outputs for each completion token, the first through `per_token` when given
        (`forward.completion_outputs`), each distinct prompt of the micro-batch computed once unless gradient
        checkpointing would drop the cache it needs."""
        def as_tuple(**inputs: Any) -> tuple[torch.Tensor, ...]:
            out = call(**inputs)
            return out if isinstance(out, tuple) else (out,)

        share = (self.cfg.share_prompt_forward and not self.params_sharded
                 and not (self.cfg.gradient_checkpointing and torch.is_grad_enabled()))
        packed = self.cfg.padding_free and getattr(self.model_config, "_attn_implementation", None) in ("sdpa", "eager")
        return completion_outputs(as_tuple, mb, per_token, config=self.model_config, share_prompts=share,
                                  packed=packed)

    def critic_values(self, mb: RolloutBatch) -> torch.Tensor:
        """The separate critic's values [b, C], aligned with the completion tokens' log-probs."""
        return self.outputs(self.critic, mb)[0]

    @torch.no_grad()
    def ref_logps(self, mb: RolloutBatch) -> torch.Tensor:
        if self.ref_model is not None:
            return self.forward(self.ref_model, mb).logp
        policy = self.policy()
        with policy.disable_adapter():
            return self.forward(policy, mb).logp

    def _train_mode(self) -> None:
        self.model.train()
        if self.critic is not None:
            self.critic.train()

    @torch.no_grad()
    def old_pass(self, batch: RolloutBatch) -> None:
        """Before any update of this step: log-probs of the sampled tokens under the policy that sampled them
        (the clipped ratio's `old` when samples are reused; the in-reward KL), the critic's values at sampling
        time, and the reference log-probs when beta > 0. Same train mode as the update, so the first ratio is 1."""
        self._train_mode()
        B, C = batch.completion_ids.shape
        dev = self.acc.device
        # the policy's forward is needed for reused samples and the in-reward KL; with the value head it is the
        # critic's forward too. Otherwise (one update, separate critic) the update's detached log-probs serve.
        policy_pass = self.updates_per_step > 1 or self.cfg.kl_in_reward or self.value_on_policy
        old_logp = torch.zeros(B, C, device=dev) if policy_pass else None
        old_values = torch.zeros(B, C, device=dev) if self.use_critic else None
        ref_logp = torch.zeros(B, C, device=dev) if self.cfg.beta > 0 else None
        share = self.cfg.share_prompt_forward and not self.params_sharded
        for index in batch.micro_batch_indices(self.cfg.micro_batch_size, share):
            mb = batch.select(index)
            c = mb.completion_ids.shape[1]
            with self.acc.autocast():
                if policy_pass:
                    logp, values, _ = self.forward(self.model, mb)
                    old_logp[index, :c] = logp.float()
                if self.critic is not None:
                    values = self.critic_values(mb)
                if old_values is not None:
                    old_values[index, :c] = values.float()
                if ref_logp is not None:
                    ref_logp[index, :c] = self.ref_logps(mb).float()
        batch.old_logp, batch.old_values, batch.ref_logp = old_logp, old_values, ref_logp

    # ---- advantages ------------------------------------------------------------------------------------------
    def advantages(self, batch: RolloutBatch, episodes: list[Episode], *, step_rewards: bool
                   ) -> tuple[dict[str, float], dict[str, float]]:
        """Fill `batch.advantages` (and `batch.returns` for a critic estimator). Returns (estimator diagnostics,
        critic stats). `step_rewards`: environment runs credit each step reward at its turn's end."""
        cfg = self.cfg
        if not self.use_critic:
            opts: dict[str, Any] = {k: getattr(cfg, k) for k in advantage_options(cfg.advantage_estimator)}
            if opts.get("scale_rewards") == "batch" and self.world > 1:  # the std of every process's rewards
                r = batch.rewards.double()
                n, total, squares = all_sum(self.acc, len(r), float(r.sum()), float((r * r).sum()))
                mean = total / max(n, 1)
                opts["batch_std"] = math.sqrt(max((squares - n * mean * mean) / max(n - 1, 1), 0.0))
            advantages, diag = self.advantage_fn(batch.rewards.cpu(), cfg.num_generations, **opts)
            batch.advantages = advantages.to(batch.rewards.device)
            return {k: float(v) for k, v in diag.items()}, {}
        mask = batch.loss_mask
        kl = batch.old_logp - batch.ref_logp if cfg.kl_in_reward and batch.ref_logp is not None else None
        token_rewards = ppo_math.token_level_rewards(None, mask, kl=kl, kl_coef=cfg.beta,
                                                     turn_rewards=reward_positions(episodes, mask, step_rewards))
        advantages, returns = self.advantage_fn(token_rewards, batch.old_values, mask, cfg.gamma, cfg.lam)
        tensors = {"advantages": advantages, "returns": returns, "error": returns - batch.old_values,
                   "values": batch.old_values}
        if kl is not None:
            tensors["kl"] = kl
        m = global_moments(self.acc, mask, tensors)
        if cfg.whiten_advantages:
            advantages = ppo_math.whiten(advantages, mask, mean=m["advantages"].mean, var=m["advantages"].var)
        batch.advantages, batch.returns = advantages, returns
        # how well the critic, as it was when these samples were drawn, predicted their returns (whole batch)
        critic = {"explained_variance": ppo_math.explained_variance_from(m["returns"].var, m["error"].var),
                  "value_mean": m["values"].mean, "returns_mean": m["returns"].mean}
        if kl is not None:
            critic["kl_penalty_mean"] = m["kl"].mean
        return ({"advantage_mean_raw": m["advantages"].mean,
                 "advantage_std_raw": math.sqrt(max(m["advantages"].var, 0.0))}, critic)

    # ---- optimizer steps -------------------------------------------------------------------------------------
    def update(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """`ppo_epochs` passes over the batch, each split into `num_minibatches` shuffled optimizer steps (one
        step over the whole batch by default). Returns the statistics averaged over those optimizer steps."""
        cfg = self.cfg
        self._train_mode()
        steps = []
        for epoch in range(cfg.ppo_epochs):
            if cfg.num_minibatches == 1:
                parts = [batch]
            else:  # the same permutation on every process (each shuffles its own rows)
                gen = torch.Generator().manual_seed(sample_seed(cfg.seed, step, epoch, 0, salt=7))
                order = torch.randperm(len(batch), generator=gen).to(batch.rewards.device)
                parts = [batch.select(part) for part in order.tensor_split(cfg.num_minibatches)]
            steps.extend(self.optimizer_step(part) for part in parts)
        return mean_over_steps(steps)

    def _no_sync(self, sync: bool) -> contextlib.ExitStack:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an optimizer step."""
        stack = contextlib.ExitStack()
        if not sync:
            for model in (self.model, self.critic):
                if model is not None:
                    stack.enter_context(self.acc.no_sync(model))
        return stack

    def optimizer_step(self, batch: RolloutBatch) -> dict[str, float]:
        """One optimizer step over `batch`, its micro-batches' gradients accumulated with global denominators."""
        cfg = self.cfg
        n_seq, n_tok = (int(x) for x in all_sum(self.acc, len(batch), float(batch.loss_mask.sum())))
        share = cfg.share_prompt_forward and not (self.params_sharded or cfg.gradient_checkpointing)
        micro = batch.micro_batches(cfg.micro_batch_size, share)
        # top_entropy_quantile: the high-entropy tokens of this optimizer step, per micro-batch (None: every token)
        keep, n_kept, loss_stats = self.high_entropy_tokens(micro, n_tok)
        loss_stats.update(self.truncation_stats(batch, n_seq))
        acc_stats = StepStats()
        for i, mb in enumerate(micro):
            with self._no_sync(i == len(micro) - 1), self.acc.autocast():
                loss, diag = self._micro_batch_loss(mb, n_seq, n_tok, None if keep is None else keep[i], n_kept)
                # DDP averages gradients over processes; the loss already uses global denominators.
                self.acc.backward(loss * self.world)
            acc_stats.add(diag, float(mb.loss_mask.sum()))
        # the learning rates this step used (the scheduler steps below)
        stats: dict[str, float] = {"learning_rate": self.optimizer.param_groups[0]["lr"]}
        if self.value_params:
            stats["critic_learning_rate"] = self.optimizer.param_groups[1]["lr"]
        if cfg.max_grad_norm > 0:
            stats["grad_norm"] = float(self.acc.clip_grad_norm_(self.params, cfg.max_grad_norm))
            if self.value_params:
                stats["value_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.value_params, cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats.update(acc_stats.reduce(self.acc, n_tok))
        stats["clip_fraction"] = stats.get("clip_ratio/region_mean", 0.0)
        stats.setdefault("grad_norm", 0.0)
        stats.update(loss_stats)
        return stats

    def _micro_batch_loss(self, mb: RolloutBatch, n_seq: int, n_tok: int, keep: torch.Tensor | None,
                          n_kept: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The micro-batch's share of the step's loss (policy, entropy bonus, value loss) and its diagnostics."""
        cfg = self.cfg
        if cfg.beta > 0 and mb.ref_logp is None:
            mb.ref_logp = self.ref_logps(mb)
        logp, values, entropy = self.forward(self.model, mb, entropy=self.use_critic or cfg.entropy_coef > 0,
                                             entropy_grad=cfg.entropy_coef > 0)
        old = logp.detach() if mb.old_logp is None else mb.old_logp
        sampler_weights, sampler_diag = self.sampler_correction(mb, old, n_seq, n_tok)
        pg, diag = policy_loss(logp, old, mb.advantages, mb.loss_mask, loss_type=cfg.loss_type,
                               epsilon_low=cfg.epsilon, epsilon_high=cfg.clip_high,
                               beta=0.0 if cfg.kl_in_reward else cfg.beta, ref_logp=mb.ref_logp,
                               importance_sampling_level=cfg.importance_sampling_level,
                               num_sequences=n_seq, num_tokens=n_tok, max_completion_length=cfg.completion_length,
                               delta=cfg.delta, sapo_temperature_pos=cfg.sapo_temperature_pos,
                               sapo_temperature_neg=cfg.sapo_temperature_neg, token_mask=keep,
                               sampler_weights=sampler_weights)
        diag.update(sampler_diag)
        diag["approx_kl"] = ppo_math.approx_kl(logp, old, mb.loss_mask)
        bonus = vf = None
        if entropy is not None:
            bonus = (ppo_math.masked_entropy(entropy, mb.loss_mask, num_tokens=n_tok) if keep is None else
                     ppo_math.masked_entropy(entropy, keep, num_tokens=n_kept))  # on the trained tokens
            diag["entropy"] = bonus.detach()
        if self.use_critic:
            if self.critic is not None:
                values = self.critic_values(mb)
            vf, vf_diag = ppo_math.value_loss(values, mb.old_values, mb.returns, mb.loss_mask,
                                              value_clip=cfg.value_clip, num_tokens=n_tok)
            diag["value_loss"] = vf.detach()
            diag["value_clip_fraction"] = vf_diag["value_clip_fraction"]
        loss = ppo_math.combined_loss(pg, entropy=bonus, entropy_coef=cfg.entropy_coef, value=vf,
                                      vf_coef=cfg.vf_coef)
        diag["loss"] = loss.detach()
        return loss, diag

    def high_entropy_tokens(self, micro: list[RolloutBatch], n_tok: int
                            ) -> tuple[list[torch.Tensor] | None, int, dict[str, float]]:
        """`top_entropy_quantile` < 1: each micro-batch's tokens whose entropy is at or above the `1 - q` quantile
        of all the optimizer step's trained tokens (every micro-batch, every process), from one no-grad forward
        of the step under the current weights. TRL 1.16 takes the quantile over each micro-batch (gathered across
        processes); over the whole step the selection does not depend on `micro_batch_size`, and both are the same
        for one micro-batch. Returns (masks or None, kept tokens over all processes, {fraction kept})."""
        q = self.cfg.top_entropy_quantile
        if q >= 1.0:
            return None, n_tok, {}
        entropies = []
        with torch.no_grad(), self.acc.autocast():
            for mb in micro:
                entropies.append(self.forward(self.model, mb, entropy=True).entropy.float())
        local = torch.cat([e[mb.loss_mask.bool()] for e, mb in zip(entropies, micro)])
        if self.world > 1:  # every process's tokens, padded to one length with a sentinel no entropy can be
            padded = self.acc.pad_across_processes(local, dim=0, pad_index=-1.0)
            local = self.acc.gather(padded)
            local = local[local >= 0]
        threshold = entropy_quantile_threshold(local, 1.0 - q)
        masks = [high_entropy_mask(e, mb.loss_mask, q, threshold=threshold) for e, mb in zip(entropies, micro)]
        n_kept = int(all_sum(self.acc, float(sum(int(m.sum()) for m in masks)))[0])
        return masks, n_kept, {"top_entropy/kept_fraction": n_kept / max(n_tok, 1)}

    def truncation_stats(self, batch: RolloutBatch, n_seq: int) -> dict[str, float]:
        """`mask_truncated_completions`: the fraction of this optimizer step's completions left out of the loss
        (1.0: every one was truncated, so the loss is 0 and only the optimizer's momentum moves the weights, as in
        TRL)."""
        if not self.cfg.mask_truncated_completions or batch.truncated is None:
            return {}
        masked = all_sum(self.acc, float(batch.truncated.sum()))[0]
        if masked >= n_seq:
            self.log(f"every completion of this optimizer step ({n_seq}) was truncated and mask_truncated_completions "
                     "leaves them out: loss 0, nothing trained on")
        return {"masked_truncated_fraction": masked / max(n_seq, 1)}

    def sampler_correction(self, mb: RolloutBatch, old: torch.Tensor, n_seq: int, n_tok: int
                           ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The rollout engine against the trainer on `mb` (`algorithms/sampler_correction.py`): the weights that
        multiply each token's policy loss (None: `importance_sampling_correction: none`, or no sampler log-probs)
        and the `sampling/*` diagnostics, from the trainer's log-probs at sampling time (`old`) and the sampler's."""
        if mb.sampler_logp is None:
            return None, {}
        cfg = self.cfg
        weights, diag = sampler_correction(old, mb.sampler_logp, mb.loss_mask, mode=cfg.importance_sampling_correction,
                                           level=cfg.importance_sampling_correction_level,
                                           cap=cfg.importance_sampling_cap, num_tokens=n_tok, num_sequences=n_seq)
        return (None if cfg.importance_sampling_correction == "none" else weights), diag
