"""The RL loop: rollout -> reward -> advantages -> update -> log, each phase named and timed, over a built run.

`train()` reads a config, builds the run (`setup.build_run`), runs the optional SFT warm-start on its policy
(`sft_warm_start`) and then `Trainer(parts).run()`: one step per iteration of `_step`, a checkpoint at
`save_every` and at the end, final/ written (and pushed) when the loop trained.

By default one optimizer step per batch of rollouts (on-policy), so the "old" log-probs of the clipped
surrogate are the detached current ones and no extra forward pass is spent on them. With `ppo_epochs` > 1 or
`num_minibatches` > 1 the batch is reused, and an `old_logprobs` phase first records the sampling policy's
log-probs. The reference policy is loaded only when `beta > 0`; under LoRA it is the same model with the
adapter disabled. The forward passes, advantages and optimizer steps are `update.PolicyUpdate`'s.

PPO (`algorithm: ppo`, advantage estimator `gae`) adds a critic (`value.py`: a value head on the policy's
backbone, or a separate value model): the `old_logprobs` phase also records its values, rewards are placed
on the last token of each assistant turn (environment step rewards) or of the episode, minus `beta` x KL per
token with `kl_in_reward`, GAE turns them into per-token advantages (whitened over the whole batch, all
processes), and the update adds the clipped value loss. Data-parallel through
accelerate: each step's prompts are split across processes with every prompt's group kept whole on one
process, loss denominators are global (see `algorithms.losses`), and only the main process writes.

Rollouts are `Episode`s (`rollout/episodes.py`): single-turn completions, or multi-turn conversations with a
sandboxed `CustomEnv` (`type: environment`) and MCP tools (`tools`). Each step's record carries the run's
`total_steps` (the server's progress reads it) and the sandbox's timeouts, crashes and worker restarts
since the previous record (`sandbox/*`).

Not covered here: generation under FSDP/ZeRO-3 sharding (the configs in configs/accelerate/ are untested),
adaptive KL controllers (beta is fixed), a critic warm-up phase before policy updates.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from runrl_engine import checkpoint as ckpt
from runrl_engine.algorithms.dapo import refill_prompts, soft_overlong_penalty, varied_groups
from runrl_engine.algorithms.losses import mask_truncated
from runrl_engine.batch import RolloutBatch
from runrl_engine.config import RunConfig, apply_overrides, load_config
from runrl_engine.data import PromptRow
from runrl_engine.errors import TrainingAborted
from runrl_engine.metrics import step_peak_memory
from runrl_engine.rollout.backends import rollout_phase
from runrl_engine.rollout.episodes import Episode, run_episodes
from runrl_engine.records import episode_summary, merged_stats
from runrl_engine.rundir import RunDir
from runrl_engine.schedule import sample_seed
from runrl_engine.setup import CompletedRun, RunParts, build_run, restore_kernel_modes
from runrl_engine.update import PolicyUpdate, all_sum

__all__ = ["TrainResult", "Trainer", "default_output_dir", "run_training", "sft_warm_start", "train"]

STRING_INFO_SAMPLES = 5  # RunRL shows 5 sampled string-valued info entries per step
SANDBOX_COUNTS = ("timeouts", "crashes", "restarts")  # SandboxStats counters logged per step as `sandbox/<name>`


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    metrics: dict[str, Any]  # the last step's record
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(self, parts: RunParts):
        """The loop over `parts` (`setup.build_run`); with --resume, the checkpoint's weights and loop state."""
        self.parts, self.cfg, self.out, self.acc = parts, parts.cfg, parts.out, parts.acc
        self.world, self.rank, self.env_mode = self.acc.num_processes, self.acc.process_index, parts.env_mode
        self.outputs, self.log = parts.outputs, parts.outputs.log
        self.sandbox, self.rollout = parts.sandbox, parts.rollout
        inputs = parts.inputs
        self.tokenizer, self.renderer, self.tools = inputs.tokenizer, inputs.renderer, inputs.tools
        self.train_rows, self.eval_rows, self.tool_schemas = inputs.train_rows, inputs.eval_rows, inputs.tool_schemas
        self.schedule, self.total_steps = parts.schedule, parts.total_steps
        self.updater = PolicyUpdate(self.cfg, self.acc, parts.models, policy=parts.policy, log=self.log)
        self._kernel_modes = parts.kernel_modes
        self._sandbox_counts = self._sandbox_totals()
        self.start_step, self.failed_reward_steps = 0, 0
        if parts.resume:
            self._resume()

    def _resume(self) -> None:
        point = self.parts.resume_point
        if point is None:
            self.log("--resume: no checkpoint found, starting from step 0")
            return
        state = ckpt.load_checkpoint(self.acc, point.path)
        self.start_step = int(state["step"])
        self.failed_reward_steps = int(state.get("failed_reward_steps", 0))
        self.log(f"resumed from {point.path} at step {self.start_step} of {self.total_steps}")
        if point.changes:
            self.log("resumed with changes: " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in point.changes))
        run_length = int(state.get("total_steps", self.total_steps))
        if run_length != self.total_steps and (self.cfg.lr_scheduler != "constant" or self.cfg.warmup_ratio > 0):
            self.log(f"the learning-rate schedule ({self.cfg.lr_scheduler}, warmup_ratio {self.cfg.warmup_ratio:g}) "
                     f"spans the run's length: steps 1-{self.start_step} followed the {run_length}-step schedule, the "
                     f"rest follow the {self.total_steps}-step one, so the result differs from an uninterrupted "
                     f"{self.total_steps}-step run")
        if self.start_step >= self.total_steps:
            self.log(f"step {self.start_step} is done and final/ is missing: writing it from {point.path}")

    @contextlib.contextmanager
    def _timer(self, times: dict[str, float], name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0

    def _sum(self, *values: float) -> list[float]:
        return all_sum(self.acc, *values)

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        history: list[dict[str, Any]] = []
        record: dict[str, Any] = {}
        try:
            if self.cfg.eval_at_start and self.cfg.eval_every and self.eval_rows and self.start_step == 0:
                history.append(self._evaluate_at_start())
            for step in range(self.start_step + 1, self.total_steps + 1):
                record = self._step(step)
                history.append(record)
                # the last step always: a finished run can be extended exactly (`save_every: 0` = only then)
                if step == self.total_steps or (self.cfg.save_every and step % self.cfg.save_every == 0):
                    ckpt.save_checkpoint(self.acc, self.out, step, {
                        "step": step, "failed_reward_steps": self.failed_reward_steps, "total_steps": self.total_steps,
                        "steps_per_epoch": self.parts.steps_per_epoch, "inputs": self.parts.fingerprints},
                        self.cfg.keep_checkpoints)
            final = self._finish(trained=self.total_steps > self.start_step)
        finally:
            self.close()
        done = max(self.start_step, self.total_steps)  # the loop reached total_steps, or had nothing to do
        return TrainResult(output_dir=self.out, final_dir=final, steps=done,
                           metrics=record or ckpt.last_step_record(self.out, done), history=history)

    def _evaluate_at_start(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        start = {"step": 0, "phase": "eval", "eval_reward_mean": self._evaluate(0),
                 "time/eval_s": time.perf_counter() - t0}
        self.outputs.metrics(start)
        self.log(f"step 0: eval reward {start['eval_reward_mean']:.3f} ({len(self.eval_rows)} held-out "
                 f"prompts x {self.rollout.eval_generations})")
        return start

    def _step(self, step: int) -> dict[str, Any]:
        """One RL step, logged: its metrics record (written to metrics.jsonl before it is returned)."""
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        take_decode_stats = getattr(self.rollout.backend, "take_stats", None)
        if take_decode_stats is not None:
            take_decode_stats()  # drop what an evaluation counted
        with self._timer(times, "rollout"):
            episodes = self._rollout(self._my_prompts(step), step)
        if take_decode_stats is not None:  # the rollout's split: prefill, decode steps, weight packing
            decode = take_decode_stats()
            times.update(rollout_prefill=decode.prefill_s, rollout_decode=decode.decode_s, rollout_pack=decode.pack_s)
        with self._timer(times, "reward"):
            self._score(episodes)
            self._shape_rewards(episodes)
        # dynamic sampling: `trained` = the groups kept (refills included); `episodes` = all generated
        episodes, trained, sampling = self._dynamic_sampling(step, episodes, times)
        sampling.update(self._overlong_stats(episodes))
        batch = self._collate(trained) if trained else None  # none kept: no update this step
        adv_diag, update_stats = self._learn(step, batch, trained, times)
        record = self._record(step, episodes, adv_diag, update_stats, times, time.perf_counter() - t0)
        record.update(sampling)
        if take_decode_stats is not None:
            record["decode_steps"] = decode.steps  # this process's; time/rollout_decode_s / it = per step
        if self.cfg.eval_every and self.eval_rows and (step % self.cfg.eval_every == 0 or step == self.total_steps):
            with self._timer(times, "eval"):
                record["eval_reward_mean"] = self._evaluate(step)
            record["time/eval_s"] = times["eval"]
        self.outputs.metrics(record)
        self.outputs.progress(step, record)
        self._check_reward_failures(episodes)
        return record

    def _learn(self, step: int, batch: RolloutBatch | None, trained: list[Episode], times: dict[str, float]
               ) -> tuple[dict[str, float], dict[str, float]]:
        """old_logprobs -> advantages -> update on the kept episodes: (advantage diagnostics, update statistics)."""
        if self.updater.needs_old_pass and trained:
            with self._timer(times, "old_logprobs"):
                self.updater.old_pass(batch)
        with self._timer(times, "advantages"):
            adv_diag, critic_stats = (self.updater.advantages(batch, trained, step_rewards=self.env_mode)
                                      if trained else ({}, {}))
        with self._timer(times, "update"):
            update_stats = {**self.updater.update(batch, step), **critic_stats} if trained else {"loss": 0.0}
        return adv_diag, update_stats

    def close(self) -> None:
        if self._kernel_modes is not None:  # torch's flags are process-wide: give a later train() the caller's
            restore_kernel_modes(self._kernel_modes)
            self._kernel_modes = None
        self.parts.close()

    # ---- phases ---------------------------------------------------------------------------------------------
    def _my_prompts(self, step: int) -> list[tuple[int, PromptRow, list[int]]]:
        """This process's share of the step's prompts: (dataset index, row, prompt ids)."""
        indices = self.schedule.indices(step)
        share = len(indices) // self.world
        mine = indices[self.rank * share:(self.rank + 1) * share]
        return [(i, *self.train_rows[i]) for i in mine]

    def _rollout(self, prompts: Sequence[tuple[int, PromptRow, list[int]]], step: int, salt: int = 0, *,
                 evaluation: bool = False) -> list[Episode]:
        G = self.rollout.eval_generations if evaluation else self.cfg.num_generations
        settings = self.rollout.eval_settings if evaluation else self.rollout.settings
        episodes = [Episode(row=row, prompt_index=idx, sample_index=g, prompt_ids=ids)
                    for idx, row, ids in prompts for g in range(G)]

        def seed_of(ep: Episode, turn: int) -> int:
            return sample_seed(self.cfg.seed, step, ep.prompt_index, ep.sample_index, salt * 1_000 + turn)

        model = self.parts.policy()
        was_training = model.training
        model.eval()
        with self._rollout_precision(), rollout_phase(self.rollout.backend, model):  # wake, push weights; sleep after
            run_episodes(model, self.renderer, episodes, settings, seed_of, group_size=G,
                         env=self.sandbox if self.env_mode else None, tools=self.tools, tool_urls=self.cfg.tools)
        model.train(was_training)
        return episodes

    def _rollout_precision(self) -> Any:
        """The autocast rollouts run under: the training's (`rollout_dtype: auto`), or `rollout_dtype`'s (float32:
        none). The `hf` backend samples on the policy itself, so this is its whole precision setting."""
        if self.rollout.dtype is None:
            return self.acc.autocast()
        return torch.autocast(self.acc.device.type, dtype=self.rollout.dtype,
                              enabled=self.rollout.dtype != torch.float32)

    def _score(self, episodes: list[Episode]) -> None:
        """Reward-function runs: score each episode's final text. (Environment runs were scored by `step`.)"""
        if self.env_mode:
            return
        results = self.sandbox.score([ep.final_text for ep in episodes], [ep.row.fields for ep in episodes])
        for ep, r in zip(episodes, results):
            ep.reward, ep.info, ep.error = r.reward, r.info, r.error

    def _shape_rewards(self, episodes: list[Episode]) -> None:
        """`overlong_penalty`: DAPO's soft overlong punishment added to each scored training reward (never at
        evaluation; an episode whose reward failed keeps its 0). The length is the episode's sampled tokens."""
        cfg = self.cfg
        scored = [ep for ep in episodes if ep.error is None]
        if not cfg.overlong_penalty or not scored:
            return
        penalties = soft_overlong_penalty([sum(ep.mask) for ep in scored], cfg.overlong_max, cfg.overlong_buffer,
                                          cfg.overlong_penalty_factor)
        for ep, penalty in zip(scored, penalties):
            ep.reward += penalty

    def _overlong_stats(self, episodes: list[Episode]) -> dict[str, float]:
        """The step's overlong penalties (recomputed from the lengths `_shape_rewards` used): mean and share < 0."""
        cfg = self.cfg
        scored = [ep for ep in episodes if ep.error is None]
        if not cfg.overlong_penalty or not scored:
            return {}
        penalties = soft_overlong_penalty([sum(ep.mask) for ep in scored], cfg.overlong_max, cfg.overlong_buffer,
                                          cfg.overlong_penalty_factor)
        return {"overlong/penalty_mean": sum(penalties) / len(penalties),
                "overlong/penalised_fraction": sum(p < 0 for p in penalties) / len(penalties)}

    def _dynamic_sampling(self, step: int, episodes: list[Episode], times: dict[str, float]
                          ) -> tuple[list[Episode], list[Episode], dict[str, float]]:
        """DAPO dynamic sampling (`dynamic_sampling`): drop the groups whose rewards are all equal and refill the
        step with more prompts, round after round (at most `dynamic_sampling_max_rounds`), until it has
        `prompts_per_step` groups whose rewards differ; groups past that are surplus, not trained. Refill prompts
        are drawn at random, seeded by (seed, step, round), from the training prompts this step has not used, so
        a resumed run draws the same ones and the epoch schedule is not moved. Returns (every episode generated,
        the episodes to train on: whole groups, none of them flat, [] when none was kept, the metrics); episodes
        not trained on carry `dropped` ("zero_variance" or "surplus"). Without the option: (episodes, episodes,
        {})."""
        cfg, G = self.cfg, self.cfg.num_generations
        if not cfg.dynamic_sampling:
            return episodes, episodes, {}
        target = cfg.prompts_per_step
        generated, kept = list(episodes), varied_only(episodes, G)
        dropped, refilled, refill_prompt_count, rounds = len(episodes) // G - len(kept), 0, 0, 0
        used = {ep.prompt_index for ep in episodes}
        while len(kept) < target and rounds < cfg.dynamic_sampling_max_rounds:
            pool = [i for i in range(len(self.train_rows)) if i not in used]
            if not pool:
                break
            want = refill_prompts(target - len(kept), len(kept), len(generated) // G, target)
            rounds += 1
            picks = random.Random(sample_seed(cfg.seed, step, rounds, 0, salt=11)).sample(pool, min(want, len(pool)))
            used.update(picks)
            refill_prompt_count += len(picks)
            with self._timer(times, "rollout"):
                more = self._rollout([(i, *self.train_rows[i]) for i in picks], step)
            with self._timer(times, "reward"):
                self._score(more)
                self._shape_rewards(more)
            generated.extend(more)
            groups = varied_only(more, G)
            kept, refilled, dropped = kept + groups, refilled + len(groups), dropped + len(more) // G - len(groups)
        for group in kept[target:]:
            for ep in group:
                ep.dropped = "surplus"
        trained = [ep for group in kept[:target] for ep in group]
        surplus = max(len(kept) - target, 0)
        stats = {"dynamic_sampling/rounds": rounds, "dynamic_sampling/dropped_groups": dropped,
                 "dynamic_sampling/refill_prompts": refill_prompt_count,
                 "dynamic_sampling/refilled_groups": refilled - surplus,  # surplus groups are the last ones kept
                 "dynamic_sampling/kept_groups": len(trained) // G, "dynamic_sampling/surplus_groups": surplus,
                 "dynamic_sampling/skipped_update": int(not trained)}
        if len(trained) < target * G:
            self.log(f"step {step}: dynamic sampling has {len(trained) // G} of {target} groups with differing "
                     f"rewards after {rounds} extra round(s) ({dropped} dropped); "
                     + ("training on those" if trained else "no update this step"))
        return generated, trained, stats

    def _collate(self, episodes: list[Episode]) -> RolloutBatch:
        """The step's episodes as one padded batch (advantages are filled in by `PolicyUpdate.advantages`)."""
        batch = RolloutBatch.from_episodes(episodes, self.tokenizer.pad_token_id, self.acc.device)
        if self.cfg.mask_truncated_completions:  # out of the loss, still in their groups' advantages (as TRL)
            batch.loss_mask = mask_truncated(batch.loss_mask, batch.truncated)
        return batch

    def _evaluate(self, step: int) -> float:
        """The mean reward over the held-out prompts (each process rolls out its share)."""
        mine = [(i, *self.eval_rows[i]) for i in range(self.rank, len(self.eval_rows), self.world)]
        episodes = self._rollout(mine, step, salt=1, evaluation=True) if mine else []
        if episodes:
            self._score(episodes)
        total, count = self._sum(sum(ep.reward for ep in episodes), len(episodes))
        return total / max(count, 1)

    # ---- bookkeeping ----------------------------------------------------------------------------------------
    def _record(self, step: int, episodes: list[Episode], adv_diag: dict[str, float], update: dict[str, float],
                times: dict[str, float], step_time: float) -> dict[str, Any]:
        from accelerate.utils import gather_object

        local = episode_summary(episodes)
        parts = gather_object([local]) if self.world > 1 else [local]
        record: dict[str, Any] = {"step": step, "total_steps": self.total_steps,
                                  "epoch": round(self.schedule.epoch_of(step), 4)}
        record.update(merged_stats(parts, env_mode=self.env_mode, tools=bool(self.cfg.tools), step_time=step_time))
        record["loss"], record["kl"] = update["loss"], update.get("kl", 0.0)
        record.update({k: v for k, v in update.items() if k not in record})
        record.update({f"advantage/{k}": v for k, v in adv_diag.items()})
        record.update({f"time/{k}_s": v for k, v in times.items()})
        record.update(step_peak_memory())  # peak_rss_mb (+ peak_vram_mb) since the previous record, then reset
        record.update(self._sandbox_stats())
        self._log_completions(step, episodes)
        return record

    def _sandbox_totals(self) -> list[int]:
        stats = self.sandbox.stats
        return [getattr(stats, name) for name in SANDBOX_COUNTS]

    def _sandbox_stats(self) -> dict[str, int]:
        """`sandbox/timeouts`, `sandbox/crashes`, `sandbox/restarts`: the user-code workers' counts since the
        previous record (evaluation included), summed over processes."""
        now = self._sandbox_totals()
        since = self._sum(*(a - b for a, b in zip(now, self._sandbox_counts)))
        self._sandbox_counts = now
        return {f"sandbox/{name}": int(n) for name, n in zip(SANDBOX_COUNTS, since)}

    def _log_completions(self, step: int, episodes: list[Episode]) -> None:
        from accelerate.utils import gather_object

        first_error = next((ep.error for ep in episodes if ep.error), None)
        if first_error:
            self.log(f"{'environment' if self.env_mode else 'reward'} error: {first_error}")
        limit = self.cfg.log_completions
        if not limit:
            return
        mine = []
        for ep in episodes[: max(limit // self.world, 1)]:
            record = {"step": step, "prompt": ep.row.messages, "completion": ep.final_text, "reward": ep.reward,
                      "finished": ep.finished, "info": ep.info}
            if ep.multi_turn:
                record.update(messages=ep.messages, turns=ep.turns, step_rewards=ep.step_rewards)
            if ep.tool_calls:
                record.update(tool_calls=ep.tool_calls, tool_errors=ep.tool_errors)
            if ep.error:
                record["error"] = ep.error
            if ep.dropped:
                record["dropped"] = ep.dropped  # dynamic sampling did not train on it, and why
            mine.append(record)
        records = (gather_object(mine) if self.world > 1 else mine)[:limit]
        # numbers are charted per step; strings are kept for a few sampled completions only (as RunRL shows)
        keep_strings = set(random.Random(step).sample(range(len(records)), min(STRING_INFO_SAMPLES, len(records))))
        for i, r in enumerate(records):
            if i not in keep_strings:
                r["info"] = {k: v for k, v in r["info"].items() if not isinstance(v, str)}
        self.outputs.completions(records)

    def _check_reward_failures(self, episodes: list[Episode]) -> None:
        failed, total = self._sum(sum(ep.error is not None for ep in episodes), len(episodes))
        self.failed_reward_steps = self.failed_reward_steps + 1 if failed == total else 0
        if self.failed_reward_steps >= self.cfg.max_failed_reward_steps:
            what = "environment episode" if self.env_mode else "reward"
            first = next((ep.error for ep in episodes if ep.error), "see logs.txt")
            raise TrainingAborted(f"every {what} failed for {self.failed_reward_steps} consecutive steps; "
                                  f"stopping instead of training on zeros. First error:\n{first}",
                                  where=self.cfg.reward_file, fix="fix the code (run `runrl validate "
                                  f"{'env' if self.env_mode else 'reward'} FILE --prompts PROMPTS` to try it on a few rows)")

    def _finish(self, *, trained: bool) -> Path | None:
        """Write final/ (and push it) when this run trained, or when a resumed run's final/ is missing; never
        rewrite one that nothing changed."""
        self.acc.wait_for_everyone()
        final = None
        if self.acc.is_main_process and not trained and RunDir(self.out).final.is_dir():
            final = RunDir(self.out).final
        elif self.acc.is_main_process:
            final = ckpt.export_final(self.parts.policy(), self.tokenizer, self.out,
                                      merge_lora=self.cfg.merge_lora)
            self.log(f"final model written to {final}")
            if self.cfg.hf_name:  # the outcome goes to hf_push.json, which the server shows on the run
                ckpt.push_to_hub(final, self.cfg.hf_name, self.cfg.hf_token or os.environ.get("HF_TOKEN"), self.log,
                                 record=RunDir(self.out).hub_push)
            else:  # a resume that dropped hf_name: no earlier push result describes this final/
                RunDir(self.out).hub_push.unlink(missing_ok=True)
        self.acc.wait_for_everyone()
        return final


def sft_warm_start(parts: RunParts) -> None:
    """`sft_file`: a supervised pass that trains the built policy in place before the first RL step (`sft.py`);
    not on a resumed run, whose checkpoint already holds it. SFT records carry their own counter (`sft_step`), so
    `step` stays the RL step everywhere."""
    cfg = parts.cfg
    if not cfg.sft_file or parts.resume_point is not None:
        return
    from runrl_engine.sft import run_sft

    def sft_metrics(record: dict[str, Any]) -> None:
        parts.outputs.metrics({"phase": "sft", "sft_step": record.pop("step"), **record})

    run_sft(parts.policy(), parts.inputs.tokenizer, cfg, parts.out, log=parts.outputs.log, metrics=sft_metrics,
            device=parts.device, tools=parts.inputs.tool_schemas or None)


def run_training(cfg: RunConfig, output_dir: Path, *, resume: bool = False, notes: Sequence[str] = ()) -> TrainResult:
    """Build the run, warm-start it with SFT, train it. `resume`: continue from the last checkpoint in
    `output_dir`; `notes`: lines for logs.txt (the CLI's word on how the resumed config was made)."""
    parts = build_run(cfg, output_dir, resume=resume, notes=notes)
    if isinstance(parts, CompletedRun):
        return _already_complete(parts)
    try:
        sft_warm_start(parts)
        trainer = Trainer(parts)
    except BaseException:
        if parts.kernel_modes is not None:
            restore_kernel_modes(parts.kernel_modes)
        parts.close()  # the sandbox's workers and the tools' sessions are running already
        raise
    return trainer.run()


def _already_complete(done: CompletedRun) -> TrainResult:
    """`--resume` of a run that has trained all its steps and written final/: say so, touch nothing."""
    if done.kernel_modes is not None:
        restore_kernel_modes(done.kernel_modes)
    record = ckpt.announce_complete(done.point, main=done.main)
    return TrainResult(output_dir=done.out, final_dir=RunDir(done.out).final if done.main else None,
                       steps=done.point.step, metrics=record)


def varied_only(episodes: list[Episode], group_size: int) -> list[list[Episode]]:
    """The groups (consecutive `group_size` episodes) whose rewards differ; the others' episodes are marked
    `dropped = "zero_variance"`. Rewards compared in float32, as `_collate` hands them to the advantages."""
    rewards = torch.tensor([ep.reward for ep in episodes], dtype=torch.float32)
    kept = []
    for g, varied in enumerate(varied_groups(rewards, group_size).tolist()):
        group = episodes[g * group_size:(g + 1) * group_size]
        if varied:
            kept.append(group)
        else:
            for ep in group:
                ep.dropped = "zero_variance"
    return kept


def default_output_dir() -> Path:
    return Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")


def train(config: RunConfig | dict | str | Path, *, output_dir: str | Path | None = None, resume: bool = False,
          overrides: Sequence[str] = ()) -> TrainResult:
    """Run RL training. `config` is a RunConfig, a dict of config keys, or a YAML path.

    Returns the output directory, the final model directory and the metrics of every step.
    """
    if isinstance(config, (str, Path)):
        cfg = load_config(config, overrides)
    else:
        data = config.to_dict() if isinstance(config, RunConfig) else dict(config)
        cfg = RunConfig.from_dict(apply_overrides(data, overrides))
    out = Path(output_dir) if output_dir else default_output_dir()
    return run_training(cfg, out, resume=resume)
