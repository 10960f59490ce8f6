"""The RL loop: rollout -> reward -> advantages -> update -> log, each phase named and timed.

By default one optimizer step per batch of rollouts (on-policy), so the "old" log-probs of the clipped
surrogate are the detached current ones and no extra forward pass is spent on them. With `ppo_epochs` > 1 or
`num_minibatches` > 1 the batch is reused, and an `old_logprobs` phase first records the sampling policy's
log-probs. The reference policy is loaded only when `beta > 0`; under LoRA it is the same model with the
adapter disabled.

PPO (`algorithm: ppo`, advantage estimator `gae`) adds a critic (`value.py`: a value head on the policy's
backbone, or a separate value model): the `old_logprobs` phase also records its values, rewards are placed
on the last token of each assistant turn (environment step rewards) or of the episode, minus `beta` x KL per
token with `kl_in_reward`, GAE turns them into per-token advantages (whitened over the whole batch, all
processes), and the update adds the clipped value loss. Data-parallel through
accelerate: each step's prompts are split across processes with every prompt's group kept whole on one
process, loss denominators are global (see `algorithms.losses`), and only the main process writes.

Rollouts are `Episode`s (`rollout/episodes.py`): single-turn completions, or multi-turn conversations with a
sandboxed `CustomEnv` (`type: environment`) and MCP tools (`tools`). An optional SFT warm-start (`sft_file`)
trains the same policy object before the first RL step.

Not covered here: generation under FSDP/ZeRO-3 sharding (the configs in configs/accelerate/ are untested),
adaptive KL controllers (beta is fixed), a critic warm-up phase before policy updates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from runrl_engine import checkpoint as ckpt
from runrl_engine.algorithms import ppo as ppo_math
from runrl_engine.algorithms.advantages import get_advantage_estimator, uses_critic
from runrl_engine.algorithms.dapo import refill_prompts, soft_overlong_penalty, varied_groups
from runrl_engine.algorithms.logprobs import entropy_from_logits, selective_log_softmax
from runrl_engine.algorithms.losses import (entropy_quantile_threshold, high_entropy_mask, mask_truncated,
                                            policy_loss)
from runrl_engine.algorithms.sampler_correction import MAX_STATS as SAMPLER_MAX_STATS
from runrl_engine.algorithms.sampler_correction import SHARE_STATS as SAMPLER_SHARE_STATS
from runrl_engine.algorithms.sampler_correction import sampler_correction
from runrl_engine.batch import RolloutBatch, pad_left, pad_right
from runrl_engine.config import RunConfig, apply_overrides, load_config
from runrl_engine.data import PromptRow, load_prompts, load_sft
from runrl_engine.errors import ConfigError, DataError, TrainingAborted
from runrl_engine.forward import sequence_outputs
from runrl_engine.metrics import RunOutputs, step_peak_memory
from runrl_engine.models import load_policy, load_reference, load_tokenizer, resolve_device, resolve_dtype
from runrl_engine.rollout.backends import rollout_backend_for, rollout_phase
from runrl_engine.rollout.episodes import ChatRenderer, Episode, EpisodeSettings, run_episodes
from runrl_engine.rollout.hf import SamplingParams
from runrl_engine.sandbox import EnvSandbox, RewardSandbox, detect_isolation, inspect_user_code, install_requirements
from runrl_engine.sandbox.egress import EgressUnavailable
from runrl_engine.tools.template import add_tool_prompt
from runrl_engine.value import PolicyWithValue, load_critic

STRING_INFO_SAMPLES = 5  # RunRL shows 5 sampled string-valued info entries per step
# update statistics that are already each micro-batch's share of a whole-batch value (summed, not token-averaged)
ADDITIVE_STATS = {"loss", "pg_loss", "value_loss", "entropy"}
ADDITIVE_STATS |= set(SAMPLER_SHARE_STATS)  # the sampler-mismatch means, computed with global denominators
MAX_STATS = {"ratio_max", *SAMPLER_MAX_STATS}  # maxima: reduced by max over micro-batches, steps and processes


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    metrics: dict[str, Any]  # the last step's record
    history: list[dict[str, Any]] = field(default_factory=list)


class PromptSchedule:
    """Which training prompts a step uses: an endless stream of per-epoch seeded permutations, cut into
    consecutive slices of `prompts_per_step`. A pure function of (seed, step), so resuming is exact."""

    def __init__(self, num_prompts: int, prompts_per_step: int, seed: int):
        self.n, self.per_step, self.seed = num_prompts, prompts_per_step, seed

    def _epoch(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        return order

    def indices(self, step: int) -> list[int]:  # step counts from 1
        start = (step - 1) * self.per_step
        out: list[int] = []
        while len(out) < self.per_step:
            epoch, offset = divmod(start + len(out), self.n)
            out.extend(self._epoch(epoch)[offset: offset + self.per_step - len(out)])
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.per_step / self.n


def sample_seed(seed: int, step: int, prompt_index: int, sample_index: int, salt: int = 0) -> int:
    """A seed per completion that does not depend on how prompts are batched or split across processes."""
    return hash((seed, salt, step, prompt_index, sample_index)) & 0x7FFF_FFFF_FFFF_FFFF


class Trainer:
    def __init__(self, cfg: RunConfig, output_dir: Path, *, resume: bool = False, notes: Sequence[str] = ()):
        """`resume`: continue from the last checkpoint in `output_dir` (see `checkpoint.resume_point`); `notes`:
        lines for logs.txt once it is open (the CLI's word on how the resumed config was made)."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-load/save bars would flood logs; the run has its own progress
        self.cfg = cfg
        self.out = output_dir
        device = resolve_device(cfg)
        self._kernel_modes = deterministic_kernels() if cfg.deterministic else None  # before CUDA's first matmul
        self.compute_dtype = resolve_dtype(cfg, device)
        mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.compute_dtype, "no")
        # one learning-rate step per optimizer step: accelerate would otherwise step a prepared scheduler once per
        # process (it assumes per-process data loaders), running the schedule `num_processes` times too fast
        self.acc = Accelerator(cpu=device == "cpu", mixed_precision=mixed, step_scheduler_with_optimizer=False)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        set_seed(cfg.seed)
        if cfg.prompts_per_step % self.world:
            raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} does not split over {self.world} processes",
                              where="prompts_per_step", fix=f"use a multiple of {self.world}")
        if cfg.dynamic_sampling and self.world > 1:
            raise ConfigError(f"dynamic_sampling runs on one process, and this run has {self.world}",
                              where="dynamic_sampling", fix="train on one process (runrl train), or set "
                                                           "dynamic_sampling: false")
        local_rollouts = cfg.prompts_per_step // self.world * cfg.num_generations
        if cfg.num_minibatches > local_rollouts:
            raise ConfigError(f"num_minibatches={cfg.num_minibatches} is more than the {local_rollouts} rollouts each "
                              f"of {self.world} processes has per step", where="num_minibatches",
                              fix=f"use at most {local_rollouts}, or more prompts_per_step")
        # --resume decides first: a change that cannot happen mid-run is refused, and a complete run is left as it
        # is (run() says so), before any input is read or anything written, started or loaded
        self.resume_point = ckpt.resume_point(output_dir, cfg) if resume else None
        if self.resume_point is not None and self.resume_point.complete:
            return

        # user inputs first: fail on a bad file before spending time on the model
        self.env_mode = cfg.type == "environment"
        self.code_info = inspect_user_code(Path(cfg.reward_file), mode="environment" if self.env_mode else "function")
        rows = load_prompts(cfg.prompt_file)
        eval_file_rows = load_prompts(cfg.eval_prompt_file) if cfg.eval_prompt_file else None
        if cfg.sft_file:
            load_sft(cfg.sft_file)
        self.tokenizer = load_tokenizer(cfg)
        self.tools = self._start_tools()
        # a template that ignores `tools` gets them in its system turn; SFT and final/ share this tokenizer
        tool_prompt_added = bool(self.tool_schemas) and add_tool_prompt(self.tokenizer)
        self.renderer = ChatRenderer(self.tokenizer, self.tool_schemas)
        self.train_rows, self.eval_rows = self._split_and_tokenize(rows, eval_file_rows)
        self.schedule = PromptSchedule(len(self.train_rows), cfg.prompts_per_step, cfg.seed)
        steps_per_epoch = math.ceil(len(self.train_rows) / cfg.prompts_per_step)
        self.total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        self.steps_per_epoch, self.inputs = steps_per_epoch, ckpt.input_fingerprints(cfg)
        if resume and self.acc.is_main_process:  # what a crash logged after the checkpoint is logged again
            ckpt.trim_streams(output_dir, self.resume_point.step if self.resume_point else 0)
        self.outputs = RunOutputs(output_dir, enabled=self.acc.is_main_process, secrets=cfg.secrets(),
                                  total_steps=self.total_steps, config=cfg.to_dict(redact=True),
                                  report_to=cfg.report_to, wandb_project=cfg.wandb_project,
                                  run_name=cfg.run_name or output_dir.name, resume=resume)
        if self.acc.is_main_process:
            (output_dir / "config.yaml").write_text(cfg.to_yaml(redact=True))
        self.log = self.outputs.log
        for note in notes:
            self.log(note)
        self.log(f"{len(self.train_rows)} training prompts, {len(self.eval_rows)} held out; {self.total_steps} steps "
                 f"x {cfg.prompts_per_step} prompts x {cfg.num_generations} completions on {self.world} "
                 f"process(es), device {device}")
        if cfg.n_gpus is not None and cfg.n_gpus != self.world:
            self.log(f"warning: n_gpus is {cfg.n_gpus}, but this run has {self.world} process(es): runrl train starts "
                     f"one; runrl launch --multi_gpu --num_processes {cfg.n_gpus} train ... starts {cfg.n_gpus} "
                     "(runrl serve does that itself)")
        if self.skipped_prompts:
            self.log(f"skipped {self.skipped_prompts} prompt(s) longer than max_prompt_length={cfg.max_prompt_length}")
        if cfg.tools:
            names = ", ".join(t["function"]["name"] for t in self.tool_schemas) or "none (servers unreachable)"
            self.log(f"MCP tools from {len(cfg.tools)} server(s): {names}")
            if tool_prompt_added:
                self.log("the chat template ignores `tools`: tool schemas go into its system turn instead")
            for url, why in self.tool_connection_errors.items():
                self.log(f"MCP server {url} is unreachable at start ({why}); its tool calls will fail and be counted")

        # Isolation fails closed before anything costly: with `sandbox_isolation: bwrap` and no working
        # bubblewrap, no user code runs (not even pip) and the run stops with IsolationUnavailable.
        isolation = detect_isolation(cfg.sandbox_isolation)
        egress = self._egress_policy()
        if egress is not None and isolation.mode != "bwrap":
            raise EgressUnavailable(isolation.reason)  # a filtered network cannot be enforced without bubblewrap
        req_dir = self._install_requirements()
        # param dtype: fp32 master weights for full fine-tuning (bf16 autocast on GPU); LoRA keeps the frozen
        # base in the compute dtype and peft keeps the adapter in fp32.
        param_dtype = self.compute_dtype if cfg.lora_enabled else torch.float32
        policy = load_policy(cfg, device, param_dtype)
        self.ref_model = load_reference(cfg, device, param_dtype) if cfg.beta > 0 and not cfg.lora_enabled else None
        if cfg.sft_file and self.resume_point is None:
            from runrl_engine.sft import run_sft

            # SFT records carry their own counter (`sft_step`) so `step` stays the RL step everywhere
            def sft_metrics(record: dict[str, Any]) -> None:
                self.outputs.metrics({"phase": "sft", "sft_step": record.pop("step"), **record})

            run_sft(policy, self.tokenizer, cfg, output_dir, log=self.log, metrics=sft_metrics, device=device,
                    tools=self.tool_schemas or None)
        # PPO's critic: a value head on the policy (one forward gives both) or a separate value model
        self.use_critic = uses_critic(cfg.advantage_estimator)
        critic = None
        if self.use_critic and cfg.critic == "head":
            policy = PolicyWithValue(policy)
        elif self.use_critic:
            critic = load_critic(cfg, device, param_dtype)
        self.value_on_policy = isinstance(policy, PolicyWithValue)
        self.model_config = self._model_config(policy)  # what KV cache layers the shared-prompt forward needs
        self.params_sharded = self._params_sharded()
        if cfg.share_prompt_forward and self.params_sharded:
            self.log("share_prompt_forward is off under FSDP / DeepSpeed ZeRO-3 (sharded parameters): each prompt "
                     "is computed once per completion")
        value_params = (policy.value_parameters() if self.value_on_policy else
                        [p for p in critic.parameters() if p.requires_grad] if critic is not None else [])
        value_ids = {id(p) for p in value_params}
        params = [p for p in policy.parameters() if p.requires_grad and id(p) not in value_ids]
        groups: list[dict[str, Any]] = [{"params": params}]
        if value_params:
            groups.append({"params": value_params, "lr": cfg.critic_learning_rate or cfg.effective_learning_rate})
        # fused: one kernel over all parameters (TRL's default `adamw_torch_fused`); 15 -> 5.5 ms per step on
        # builtin:small, measured on CPU
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=cfg.effective_learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay, fused=fused)
        from transformers import get_scheduler

        self.updates_per_step = cfg.ppo_epochs * cfg.num_minibatches
        updates = self.total_steps * self.updates_per_step
        # transformers' "constant" ignores warm-up steps; "constant_with_warmup" is the same schedule with them
        schedule = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
        scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=int(cfg.warmup_ratio * updates),
                                  num_training_steps=updates)
        self.critic: torch.nn.Module | None = None
        if critic is None:
            self.model, self.optimizer, self.scheduler = self.acc.prepare(policy, optimizer, scheduler)
        else:
            self.model, self.critic, self.optimizer, self.scheduler = self.acc.prepare(policy, critic, optimizer,
                                                                                     scheduler)
        self.params, self.value_params = params, value_params
        # samples reused (or a critic baseline needed): record log-probs/values before the update changes them
        self.needs_old_pass = self.use_critic or self.updates_per_step > 1
        self.advantage_fn = get_advantage_estimator(cfg.advantage_estimator)
        # rollout_dtype: the precision the rollout engine samples in (None: the training's own autocast)
        self.rollout_dtype = None if cfg.rollout_dtype == "auto" else getattr(torch, cfg.rollout_dtype)
        if self.rollout_dtype is not None and self.rollout_dtype != self.compute_dtype:
            self.log(f"rollouts are sampled in {cfg.rollout_dtype}, training computes in "
                     f"{str(self.compute_dtype).removeprefix('torch.')}: sampling/* metrics measure the mismatch"
                     + (f"; importance_sampling_correction {cfg.importance_sampling_correction} corrects it"
                        if cfg.importance_sampling_correction != "none" else ""))
        self.rollout_backend = rollout_backend_for(cfg, world_size=self.world,
                                                   compute_dtype=self.rollout_dtype or self.compute_dtype)
        self.episode_settings = EpisodeSettings(
            sampling=SamplingParams(max_new_tokens=cfg.completion_length, temperature=cfg.temperature,
                                    top_p=cfg.top_p, top_k=cfg.top_k),
            stop_ids=self._stop_ids(), pad_id=self.tokenizer.pad_token_id, end_of_turn_id=self.tokenizer.eos_token_id,
            max_turns=cfg.max_turns if (self.env_mode or cfg.tools) else 1,
            max_episode_tokens=cfg.max_episode_tokens, max_tool_calls=cfg.max_tool_calls,
            tool_timeout_s=cfg.tool_timeout_s, backend=self.rollout_backend)
        eval_temperature = cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature
        self.eval_settings = dataclasses.replace(self.episode_settings, sampling=dataclasses.replace(
            self.episode_settings.sampling, temperature=eval_temperature))
        self.eval_generations = cfg.eval_num_generations or cfg.num_generations
        sandbox_cls = EnvSandbox if self.env_mode else RewardSandbox
        self.sandbox = sandbox_cls(Path(cfg.reward_file), num_workers=cfg.reward_workers,
                                   timeout_s=cfg.reward_timeout_s, memory_mb=cfg.reward_memory_mb,
                                   requirements_dir=req_dir, allow_network=cfg.reward_allow_network,
                                   secrets=self.outputs.secrets, log=self.log, isolation=cfg.sandbox_isolation,
                                   work_dir=output_dir / "sandbox" / f"rank{self.rank}", egress=egress,
                                   concurrency=cfg.reward_concurrency, sync_threads=cfg.reward_sync_threads,
                                   secret_env=cfg.reward_secrets)
        self.start_step, self.failed_reward_steps = 0, 0
        if resume:
            self._resume()

    # ---- set-up helpers -------------------------------------------------------------------------------------
    def _split_and_tokenize(self, rows: list[PromptRow], eval_file_rows: list[PromptRow] | None = None
                            ) -> tuple[list[tuple[PromptRow, list[int]]], list]:
        """(training rows, held-out rows), each with its prompt ids: the held-out rows are `eval_prompt_file`'s
        (at most `eval_max_prompts`, in file order) when given, else a seeded `eval_fraction` of the prompts."""
        cfg = self.cfg
        self.skipped_prompts = 0
        encoded = self._encode(rows, cfg.prompt_file)
        if eval_file_rows is not None:
            return encoded, self._encode(eval_file_rows, cfg.eval_prompt_file)[:cfg.eval_max_prompts]
        order = list(range(len(encoded)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = min(cfg.eval_max_prompts, int(len(encoded) * cfg.eval_fraction))
        if len(encoded) - n_eval < 1:
            n_eval = 0
        eval_rows = [encoded[i] for i in sorted(order[:n_eval])]
        train_rows = [encoded[i] for i in sorted(order[n_eval:])]
        return train_rows, eval_rows

    def _encode(self, rows: list[PromptRow], path: str) -> list[tuple[PromptRow, list[int]]]:
        """Rows with their prompt ids; prompts over `max_prompt_length` are skipped (counted)."""
        limit = self.cfg.max_prompt_length
        encoded = [(row, self.renderer.prompt_ids(row.messages)) for row in rows]
        kept = [(row, ids) for row, ids in encoded if len(ids) <= limit]
        if not kept:
            raise DataError(f"all {len(rows)} prompts are longer than max_prompt_length={limit} tokens",
                            where=path, fix="raise max_prompt_length or shorten the prompts")
        self.skipped_prompts += len(encoded) - len(kept)
        return kept

    def _egress_policy(self, *, for_pip: bool = False) -> Any:
        """The destination policy of user code's network (`reward_network: filtered`), or None (none, or the host's).
        The pip build always has network (it must reach the index); under `filtered` it gets the same policy."""
        cfg = self.cfg
        if not ((cfg.reward_allow_network or for_pip) and cfg.reward_network == "filtered"):
            return None
        from runrl_engine.netpolicy import DestinationPolicy

        return DestinationPolicy(
            allow_private=cfg.reward_allow_private_destinations, allowed=tuple(cfg.reward_allowed_destinations),
            hint="allowed by reward_allow_private_destinations or reward_allowed_destinations (under `runrl serve`: "
                 "the server's allow_private_destinations / allowed_destinations settings)")

    def _install_requirements(self) -> Path | None:
        if not self.cfg.package_requirements:
            return None
        target = self.out / "reward_env"
        if self.acc.is_main_process:
            self.log(f"installing package_requirements: {' '.join(self.cfg.package_requirements)}")
            install_requirements(self.cfg.package_requirements, target, log=self.log,
                                 isolation=self.cfg.sandbox_isolation, egress=self._egress_policy(for_pip=True))
        self.acc.wait_for_everyone()
        return target

    def _start_tools(self) -> Any:
        """The MCP runtime and the tool schemas rendered into every prompt (fetched once, at start)."""
        self.tool_schemas: list[dict[str, Any]] = []
        if not self.cfg.tools:
            return None
        from runrl_engine.netpolicy import DestinationPolicy
        from runrl_engine.tools.mcp_client import ToolRuntime

        runtime = ToolRuntime(policy=DestinationPolicy(
            allow_private=self.cfg.tool_allow_private_destinations, allowed=tuple(self.cfg.tool_allowed_destinations),
            hint="allowed by tool_allow_private_destinations or tool_allowed_destinations (under `runrl serve`: the "
                 "server's allow_private_destinations / allowed_destinations settings)"))
        probe = runtime.open_session(self.cfg.tools, call_timeout_s=self.cfg.tool_timeout_s)
        try:
            self.tool_schemas = probe.tool_schemas()
            self.tool_connection_errors = dict(probe.connection_errors)
        finally:
            probe.close()
        return runtime

    def _params_sharded(self) -> bool:
        """FSDP and ZeRO-3 gather a layer's parameters with hooks on that call's outputs; a gradient that enters the
        layer through a reused KV cache bypasses them, so the shared-prompt forward is kept off there."""
        from accelerate.utils import DistributedType

        kind = self.acc.distributed_type
        if kind == DistributedType.DEEPSPEED:
            plugin = self.acc.state.deepspeed_plugin
            return plugin is None or plugin.zero_stage == 3
        return kind in (DistributedType.FSDP, DistributedType.MEGATRON_LM)

    @staticmethod
    def _model_config(policy: torch.nn.Module) -> Any:
        model = policy.policy if isinstance(policy, PolicyWithValue) else policy
        return model.get_base_model().config if hasattr(model, "get_base_model") else model.config

    def _policy(self) -> torch.nn.Module:
        """The Hugging Face policy, unwrapped from DDP and (PPO's `critic: head`) from its value head."""
        model = self.acc.unwrap_model(self.model)
        return model.policy if isinstance(model, PolicyWithValue) else model

    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self._policy(), "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        return {i for i in ids if i is not None}

    def _resume(self) -> None:
        point = self.resume_point
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

    def _already_complete(self) -> TrainResult:
        """`--resume` of a run that has trained all its steps and written final/: say so, touch nothing."""
        point, main = self.resume_point, self.acc.is_main_process
        record = ckpt.announce_complete(point, main=main)
        return TrainResult(output_dir=self.out, final_dir=self.out / "final" if main else None, steps=point.step,
                           metrics=record)

    @contextlib.contextmanager
    def _timer(self, times: dict[str, float], name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0

    def _max(self, value: float) -> float:
        if self.world == 1:
            return value
        from accelerate.utils import gather

        return float(gather(torch.tensor([value], device=self.acc.device)).max())

    def _sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        if self.world > 1:
            t = self.acc.reduce(t, reduction="sum")
        return t.tolist()

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        if self.resume_point is not None and self.resume_point.complete:
            return self._already_complete()
        history: list[dict[str, Any]] = []
        record: dict[str, Any] = {}
        try:
            if self.cfg.eval_at_start and self.cfg.eval_every and self.eval_rows and self.start_step == 0:
                t0 = time.perf_counter()
                start = {"step": 0, "phase": "eval", "eval_reward_mean": self._evaluate(0),
                         "time/eval_s": time.perf_counter() - t0}
                self.outputs.metrics(start)
                self.log(f"step 0: eval reward {start['eval_reward_mean']:.3f} ({len(self.eval_rows)} held-out "
                         f"prompts x {self.eval_generations})")
                history.append(start)
            for step in range(self.start_step + 1, self.total_steps + 1):
                times: dict[str, float] = {}
                t0 = time.perf_counter()
                take_decode_stats = getattr(self.rollout_backend, "take_stats", None)
                if take_decode_stats is not None:
                    take_decode_stats()  # drop what an evaluation counted
                with self._timer(times, "rollout"):
                    episodes = self._rollout(self._my_prompts(step), step)
                if take_decode_stats is not None:  # the rollout's split: prefill, decode steps, weight packing
                    decode = take_decode_stats()
                    times.update(rollout_prefill=decode.prefill_s, rollout_decode=decode.decode_s,
                                 rollout_pack=decode.pack_s)
                with self._timer(times, "reward"):
                    self._score(episodes)
                    self._shape_rewards(episodes)
                # dynamic sampling: `trained` = the groups kept (refills included); `episodes` = all generated
                episodes, trained, sampling = self._dynamic_sampling(step, episodes, times)
                sampling.update(self._overlong_stats(episodes))
                batch = self._collate(trained) if trained else None  # none kept: no update this step
                if self.needs_old_pass and trained:
                    with self._timer(times, "old_logprobs"):
                        self._old_pass(batch)
                with self._timer(times, "advantages"):
                    adv_diag, critic_stats = self._advantages(batch, trained) if trained else ({}, {})
                with self._timer(times, "update"):
                    update_stats = {**self._update(batch, step), **critic_stats} if trained else {"loss": 0.0}
                record = self._record(step, episodes, batch, adv_diag, update_stats, times, time.perf_counter() - t0)
                record.update(sampling)
                if take_decode_stats is not None:
                    record["decode_steps"] = decode.steps  # this process's; time/rollout_decode_s / it = per step
                if self.cfg.eval_every and self.eval_rows and (step % self.cfg.eval_every == 0 or step == self.total_steps):
                    with self._timer(times, "eval"):
                        record["eval_reward_mean"] = self._evaluate(step)
                    record["time/eval_s"] = times["eval"]
                self.outputs.metrics(record)
                self.outputs.progress(step, record)
                history.append(record)
                self._check_reward_failures(episodes)
                # the last step always: a finished run can be extended exactly (`save_every: 0` = only then)
                if step == self.total_steps or (self.cfg.save_every and step % self.cfg.save_every == 0):
                    ckpt.save_checkpoint(self.acc, self.out, step, {
                        "step": step, "failed_reward_steps": self.failed_reward_steps, "total_steps": self.total_steps,
                        "steps_per_epoch": self.steps_per_epoch, "inputs": self.inputs}, self.cfg.keep_checkpoints)
            final = self._finish(trained=self.total_steps > self.start_step)
        finally:
            self.close()
        done = max(self.start_step, self.total_steps)  # the loop reached total_steps, or had nothing to do
        return TrainResult(output_dir=self.out, final_dir=final, steps=done,
                           metrics=record or ckpt.last_step_record(self.out, done), history=history)

    def close(self) -> None:
        if self._kernel_modes is not None:  # torch's flags are process-wide: give a later train() the caller's
            restore_kernel_modes(self._kernel_modes)
            self._kernel_modes = None
        if self.resume_point is not None and self.resume_point.complete:
            return  # nothing was started
        self.sandbox.close()
        self.rollout_backend.close()
        if self.tools is not None:
            self.tools.close()
        self.outputs.close()

    # ---- phases ---------------------------------------------------------------------------------------------
    def _my_prompts(self, step: int) -> list[tuple[int, PromptRow, list[int]]]:
        """This process's share of the step's prompts: (dataset index, row, prompt ids)."""
        indices = self.schedule.indices(step)
        share = len(indices) // self.world
        mine = indices[self.rank * share:(self.rank + 1) * share]
        return [(i, *self.train_rows[i]) for i in mine]

    def _rollout(self, prompts: Sequence[tuple[int, PromptRow, list[int]]], step: int, salt: int = 0, *,
                 evaluation: bool = False) -> list[Episode]:
        G = self.eval_generations if evaluation else self.cfg.num_generations
        settings = self.eval_settings if evaluation else self.episode_settings
        episodes = [Episode(row=row, prompt_index=idx, sample_index=g, prompt_ids=ids)
                    for idx, row, ids in prompts for g in range(G)]

        def seed_of(ep: Episode, turn: int) -> int:
            return sample_seed(self.cfg.seed, step, ep.prompt_index, ep.sample_index, salt * 1_000 + turn)

        model = self._policy()
        was_training = model.training
        model.eval()
        with self._rollout_precision(), rollout_phase(self.rollout_backend, model):  # wake, push weights; sleep after
            run_episodes(model, self.renderer, episodes, settings, seed_of, group_size=G,
                         env=self.sandbox if self.env_mode else None, tools=self.tools, tool_urls=self.cfg.tools)
        model.train(was_training)
        return episodes

    def _rollout_precision(self) -> Any:
        """The autocast rollouts run under: the training's (`rollout_dtype: auto`), or `rollout_dtype`'s (float32:
        none). The `hf` backend samples on the policy itself, so this is its whole precision setting."""
        if self.rollout_dtype is None:
            return self.acc.autocast()
        return torch.autocast(self.acc.device.type, dtype=self.rollout_dtype,
                              enabled=self.rollout_dtype != torch.float32)

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
        generated = list(episodes)
        kept: list[list[Episode]] = []
        dropped = refilled = refill_prompt_count = rounds = 0
        used = {ep.prompt_index for ep in episodes}

        def sort(new: list[Episode], refill: bool) -> None:
            nonlocal dropped, refilled
            rewards = torch.tensor([ep.reward for ep in new], dtype=torch.float32)  # as `_collate` gives advantages
            for g, varied in enumerate(varied_groups(rewards, G).tolist()):
                group = new[g * G:(g + 1) * G]
                if varied:
                    kept.append(group)
                    refilled += refill
                else:
                    dropped += 1
                    for ep in group:
                        ep.dropped = "zero_variance"

        sort(episodes, False)
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
            sort(more, True)
        for group in kept[target:]:
            for ep in group:
                ep.dropped = "surplus"
        trained = [ep for group in kept[:target] for ep in group]
        stats = {"dynamic_sampling/rounds": rounds, "dynamic_sampling/dropped_groups": dropped,
                 "dynamic_sampling/refill_prompts": refill_prompt_count,
                 "dynamic_sampling/refilled_groups": refilled - max(len(kept) - target, 0),  # surplus: the last
                 "dynamic_sampling/kept_groups": len(trained) // G,
                 "dynamic_sampling/surplus_groups": max(len(kept) - target, 0),
                 "dynamic_sampling/skipped_update": int(not trained)}
        if len(trained) < target * G:
            self.log(f"step {step}: dynamic sampling has {len(trained) // G} of {target} groups with differing "
                     f"rewards after {rounds} extra round(s) ({dropped} dropped); "
                     + ("training on those" if trained else "no update this step"))
        return generated, trained, stats

    def _collate(self, episodes: list[Episode]) -> RolloutBatch:
        """The step's episodes as one padded batch (advantages are filled in by `_advantages`)."""
        prompt_ids, prompt_mask = pad_left([ep.prompt_ids for ep in episodes], self.tokenizer.pad_token_id)
        rewards = torch.tensor([ep.reward for ep in episodes], dtype=torch.float32)
        dev = self.acc.device
        batch = RolloutBatch(
            prompt_ids=prompt_ids.to(dev), prompt_mask=prompt_mask.to(dev),
            completion_ids=pad_right([ep.tokens for ep in episodes], self.tokenizer.pad_token_id).to(dev),
            completion_mask=pad_right([[1] * len(ep.tokens) for ep in episodes], 0).to(dev),
            loss_mask=pad_right([[float(m) for m in ep.mask] for ep in episodes], 0.0, torch.float32).to(dev),
            advantages=torch.zeros_like(rewards).to(dev), rewards=rewards.to(dev),
            sampler_logp=self._sampler_logp(episodes))
        batch.truncated = torch.tensor([not ep.finished for ep in episodes], dtype=torch.bool, device=dev)
        if self.cfg.mask_truncated_completions:  # out of the loss, still in their groups' advantages (as TRL)
            batch.loss_mask = mask_truncated(batch.loss_mask, batch.truncated)
        return batch

    def _sampler_logp(self, episodes: list[Episode]) -> torch.Tensor | None:
        """[B, C] the rollout engine's log-probs of the tokens it sampled (the sampler-mismatch correction), or None
        when it reported none."""
        if not any(m and not math.isnan(x) for ep in episodes for x, m in zip(ep.sampler_logprobs, ep.mask)):
            return None
        return pad_right([ep.sampler_logprobs for ep in episodes], 0.0, torch.float32).to(self.acc.device)

    @torch.no_grad()
    def _old_pass(self, batch: RolloutBatch) -> None:
        """Before any update of this step: log-probs of the sampled tokens under the policy that sampled them
        (the clipped ratio's `old` when samples are reused; the in-reward KL), the critic's values at sampling
        time, and the reference log-probs when beta > 0. Same train mode as the update, so the first ratio is 1."""
        self.model.train()
        if self.critic is not None:
            self.critic.train()
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
                    logp, values, _ = self._forward(self.model, mb)
                    old_logp[index, :c] = logp.float()
                if self.critic is not None:
                    values = self._critic_values(mb)
                if old_values is not None:
                    old_values[index, :c] = values.float()
                if ref_logp is not None:
                    ref_logp[index, :c] = self._ref_logps(mb).float()
        batch.old_logp, batch.old_values, batch.ref_logp = old_logp, old_values, ref_logp

    def _advantages(self, batch: RolloutBatch, episodes: list[Episode]) -> tuple[dict[str, float], dict[str, float]]:
        """Fill `batch.advantages` (and `batch.returns` for GAE). Returns (estimator diagnostics, critic stats)."""
        cfg = self.cfg
        if not self.use_critic:
            opts: dict[str, Any] = {"scale_rewards": cfg.scale_rewards} if cfg.advantage_estimator == "grpo" else {}
            if opts and cfg.scale_rewards == "batch" and self.world > 1:  # the std of every process's rewards
                r = batch.rewards.double()
                n, total, squares = self._sum(len(r), float(r.sum()), float((r * r).sum()))
                opts["batch_std"] = math.sqrt(max(_mean_var(n, total, squares)[1], 0.0))
            advantages, diag = self.advantage_fn(batch.rewards.cpu(), cfg.num_generations, **opts)
            batch.advantages = advantages.to(batch.rewards.device)
            return {k: float(v) for k, v in diag.items()}, {}
        mask = batch.loss_mask
        kl = batch.old_logp - batch.ref_logp if cfg.kl_in_reward and batch.ref_logp is not None else None
        token_rewards = ppo_math.token_level_rewards(None, mask, kl=kl, kl_coef=cfg.beta,
                                                     turn_rewards=reward_positions(episodes, mask, self.env_mode))
        advantages, returns = self.advantage_fn(token_rewards, batch.old_values, mask, cfg.gamma, cfg.lam)
        # one all-reduce for every batch-wide statistic: advantages (whitening), returns, the critic's error, values
        _, old_values_sum, _ = ppo_math.whiten_stats(batch.old_values, mask)
        kl_sum = float(torch.where(mask.bool(), kl, 0.0).sum()) if kl is not None else 0.0
        (n, adv_sum, adv_sq, _, ret_sum, ret_sq, _, err_sum, err_sq, val_sum, kl_sum) = self._sum(
            *ppo_math.whiten_stats(advantages, mask), *ppo_math.whiten_stats(returns, mask),
            *ppo_math.whiten_stats(returns - batch.old_values, mask), old_values_sum, kl_sum)
        adv_mean, adv_var = _mean_var(n, adv_sum, adv_sq)
        if cfg.whiten_advantages:
            advantages = ppo_math.whiten(advantages, mask, mean=adv_mean, var=adv_var)
        batch.advantages, batch.returns = advantages, returns
        # how well the critic, as it was when these samples were drawn, predicted their returns (whole batch)
        returns_mean, returns_var = _mean_var(n, ret_sum, ret_sq)
        error_var = _mean_var(n, err_sum, err_sq)[1]
        critic = {"explained_variance": 1 - error_var / returns_var if returns_var > 0 else 0.0,
                  "value_mean": val_sum / max(n, 1), "returns_mean": returns_mean}
        if kl is not None:
            critic["kl_penalty_mean"] = kl_sum / max(n, 1)
        return {"advantage_mean_raw": adv_mean, "advantage_std_raw": math.sqrt(max(adv_var, 0.0))}, critic

    def _forward(self, model: torch.nn.Module, mb: RolloutBatch, *, entropy: bool = False,
                 entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Completion tokens' log-probs [b, C] (temperature-scaled, as they were sampled); the value head's
        values [b, C] when `model` is the policy carrying it; entropies [b, C] when asked (differentiable only
        with `entropy_grad`: for logging alone its full-vocabulary graph is not kept)."""
        C = mb.completion_ids.shape[1]
        values = None
        if model is self.model and self.value_on_policy:
            logits, values = self._outputs(model, mb, C + 1)
            values = values[:, :-1]
        else:
            def call(cache: Any = None, **inputs: Any) -> tuple[torch.Tensor]:
                return (model(**inputs, cache=cache, use_cache=cache is not None).logits,)

            (logits,) = self._outputs(call, mb, C + 1)
        logits = logits[:, :-1, :]
        if self.cfg.temperature != 1.0:
            logits = logits / self.cfg.temperature
        logp = selective_log_softmax(logits, mb.completion_ids)
        if not entropy:
            return logp, values, None
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            return logp, values, entropy_from_logits(logits)

    def _outputs(self, call: Any, mb: RolloutBatch, keep: int) -> tuple[torch.Tensor, ...]:
        """`call`'s outputs at each row's last `keep` positions, each distinct prompt of the micro-batch computed
        once (`forward.sequence_outputs`) unless gradient checkpointing would drop the cache it needs."""
        def as_tuple(**inputs: Any) -> tuple[torch.Tensor, ...]:
            out = call(**inputs)
            return out if isinstance(out, tuple) else (out,)

        share = (self.cfg.share_prompt_forward and not self.params_sharded
                 and not (self.cfg.gradient_checkpointing and torch.is_grad_enabled()))
        packed = self.cfg.padding_free and getattr(self.model_config, "_attn_implementation", None) in ("sdpa", "eager")
        return sequence_outputs(as_tuple, mb, keep, config=self.model_config, share_prompts=share, packed=packed)

    def _critic_values(self, mb: RolloutBatch) -> torch.Tensor:
        """The separate critic's values [b, C], aligned with the completion tokens' log-probs."""
        C = mb.completion_ids.shape[1]
        return self._outputs(self.critic, mb, C + 1)[0][:, :-1]

    @torch.no_grad()
    def _ref_logps(self, mb: RolloutBatch) -> torch.Tensor:
        if self.ref_model is not None:
            return self._forward(self.ref_model, mb)[0]
        policy = self._policy()
        with policy.disable_adapter():
            return self._forward(policy, mb)[0]

    def _update(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """`ppo_epochs` passes over the batch, each split into `num_minibatches` shuffled optimizer steps (one
        step over the whole batch by default). Returns the statistics averaged over those optimizer steps."""
        cfg = self.cfg
        self.model.train()
        if self.critic is not None:
            self.critic.train()
        totals: dict[str, float] = {}
        maxima: dict[str, float] = {"ratio_max": 0.0}
        for epoch in range(cfg.ppo_epochs):
            if cfg.num_minibatches == 1:
                parts = [batch]
            else:  # the same permutation on every process (each shuffles its own rows)
                gen = torch.Generator().manual_seed(sample_seed(cfg.seed, step, epoch, 0, salt=7))
                order = torch.randperm(len(batch), generator=gen).to(batch.rewards.device)
                parts = [batch.select(part) for part in order.tensor_split(cfg.num_minibatches)]
            for part in parts:
                for k, v in self._optimizer_step(part).items():
                    if k in MAX_STATS:
                        maxima[k] = max(maxima.get(k, 0.0), v)
                    else:
                        totals[k] = totals.get(k, 0.0) + v
        stats = {k: v / self.updates_per_step for k, v in totals.items()}
        stats.update(maxima)
        return stats

    def _no_sync(self, sync: bool) -> contextlib.ExitStack:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an optimizer step."""
        stack = contextlib.ExitStack()
        if not sync:
            for model in (self.model, self.critic):
                if model is not None:
                    stack.enter_context(self.acc.no_sync(model))
        return stack

    def _optimizer_step(self, batch: RolloutBatch) -> dict[str, float]:
        cfg = self.cfg
        n_seq, n_tok = (int(x) for x in self._sum(len(batch), float(batch.loss_mask.sum())))
        share = cfg.share_prompt_forward and not (self.params_sharded or cfg.gradient_checkpointing)
        micro = batch.micro_batches(cfg.micro_batch_size, share)
        want_entropy = self.use_critic or cfg.entropy_coef > 0
        sums: dict[str, float] = {"loss": 0.0}
        ratio_max = 0.0
        sampler_max: dict[str, float] = {}  # SAMPLER_MAX_STATS over this step's micro-batches
        # top_entropy_quantile: the high-entropy tokens of this optimizer step, per micro-batch (None: every token)
        keep, n_kept, loss_stats = self._high_entropy_tokens(micro, n_tok)
        loss_stats.update(self._truncation_stats(batch, n_seq, n_tok))
        for i, mb in enumerate(micro):
            with self._no_sync(i == len(micro) - 1), self.acc.autocast():
                if cfg.beta > 0 and mb.ref_logp is None:
                    mb.ref_logp = self._ref_logps(mb)
                logp, values, entropy = self._forward(self.model, mb, entropy=want_entropy,
                                                      entropy_grad=cfg.entropy_coef > 0)
                old = logp.detach() if mb.old_logp is None else mb.old_logp
                sampler_weights, sampler_diag = self._sampler_correction(mb, old, n_seq, n_tok)
                for k in [k for k in SAMPLER_MAX_STATS if k in sampler_diag]:
                    sampler_max[k] = max(sampler_max.get(k, 0.0), float(sampler_diag.pop(k)))
                loss, diag = policy_loss(logp, old, mb.advantages, mb.loss_mask, loss_type=cfg.loss_type,
                                         epsilon_low=cfg.epsilon, epsilon_high=cfg.clip_high,
                                         beta=0.0 if cfg.kl_in_reward else cfg.beta, ref_logp=mb.ref_logp,
                                         importance_sampling_level=cfg.importance_sampling_level,
                                         num_sequences=n_seq, num_tokens=n_tok,
                                         max_completion_length=cfg.completion_length, delta=cfg.delta,
                                         sapo_temperature_pos=cfg.sapo_temperature_pos,
                                         sapo_temperature_neg=cfg.sapo_temperature_neg,
                                         token_mask=None if keep is None else keep[i],
                                         sampler_weights=sampler_weights)
                diag.update(sampler_diag)
                diag.pop("num_tokens")
                ratio_max = max(ratio_max, float(diag.pop("ratio_max")))
                diag["approx_kl"] = ppo_math.approx_kl(logp, old, mb.loss_mask)
                if entropy is not None:
                    bonus = (ppo_math.masked_entropy(entropy, mb.loss_mask, num_tokens=n_tok) if keep is None else
                             ppo_math.masked_entropy(entropy, keep[i], num_tokens=n_kept))  # on the trained tokens
                    if cfg.entropy_coef > 0:
                        loss = loss - cfg.entropy_coef * bonus
                    diag["entropy"] = bonus.detach()
                if self.use_critic:
                    if self.critic is not None:
                        values = self._critic_values(mb)
                    vf, vf_diag = ppo_math.value_loss(values, mb.old_values, mb.returns, mb.loss_mask,
                                                      value_clip=cfg.value_clip, num_tokens=n_tok)
                    loss = loss + cfg.vf_coef * vf
                    diag["value_loss"] = vf.detach()
                    diag["value_clip_fraction"] = vf_diag["value_clip_fraction"]
                # DDP averages gradients over processes; the loss already uses global denominators.
                self.acc.backward(loss * self.world)
            sums["loss"] += float(loss.detach())
            tokens = float(mb.loss_mask.sum())
            for k, v in diag.items():
                sums[k] = sums.get(k, 0.0) + float(v) * (1.0 if k in ADDITIVE_STATS else tokens)
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
        keys = sorted(sums)
        totals = dict(zip(keys, self._sum(*(sums[k] for k in keys))))
        stats.update({k: (v if k in ADDITIVE_STATS else v / max(n_tok, 1)) for k, v in totals.items()})
        stats["clip_fraction"] = stats.get("clip_ratio/region_mean", 0.0)
        stats["ratio_max"] = self._max(ratio_max)
        stats.update({k: self._max(v) for k, v in sorted(sampler_max.items())})
        stats.setdefault("grad_norm", 0.0)
        stats.update(loss_stats)
        return stats

    def _high_entropy_tokens(self, micro: list[RolloutBatch], n_tok: int
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
                entropies.append(self._forward(self.model, mb, entropy=True)[2].float())
        local = torch.cat([e[mb.loss_mask.bool()] for e, mb in zip(entropies, micro)])
        if self.world > 1:  # every process's tokens, padded to one length with a sentinel no entropy can be
            padded = self.acc.pad_across_processes(local, dim=0, pad_index=-1.0)
            local = self.acc.gather(padded)
            local = local[local >= 0]
        threshold = entropy_quantile_threshold(local, 1.0 - q)
        masks = [high_entropy_mask(e, mb.loss_mask, q, threshold=threshold) for e, mb in zip(entropies, micro)]
        n_kept = int(self._sum(float(sum(int(m.sum()) for m in masks)))[0])
        return masks, n_kept, {"top_entropy/kept_fraction": n_kept / max(n_tok, 1)}

    def _truncation_stats(self, batch: RolloutBatch, n_seq: int, n_tok: int) -> dict[str, float]:
        """`mask_truncated_completions`: the fraction of this optimizer step's completions left out of the loss
        (1.0: every one was truncated, so the loss is 0 and only the optimizer's momentum moves the weights, as in
        TRL)."""
        if not self.cfg.mask_truncated_completions or batch.truncated is None:
            return {}
        masked = self._sum(float(batch.truncated.sum()))[0]
        if masked >= n_seq:
            self.log(f"every completion of this optimizer step ({n_seq}) was truncated and mask_truncated_completions "
                     "leaves them out: loss 0, nothing trained on")
        return {"masked_truncated_fraction": masked / max(n_seq, 1)}

    def _sampler_correction(self, mb: RolloutBatch, old: torch.Tensor, n_seq: int, n_tok: int
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

    def _evaluate(self, step: int) -> float:
        mine = [(i, *self.eval_rows[i]) for i in range(self.rank, len(self.eval_rows), self.world)]
        episodes = self._rollout(mine, step, salt=1, evaluation=True) if mine else []
        if episodes:
            self._score(episodes)
        total, count = self._sum(sum(ep.reward for ep in episodes), len(episodes))
        return total / max(count, 1)

    # ---- bookkeeping ----------------------------------------------------------------------------------------
    def _record(self, step: int, episodes: list[Episode], batch: RolloutBatch, adv_diag: dict[str, float],
                update: dict[str, float], times: dict[str, float], step_time: float) -> dict[str, Any]:
        from accelerate.utils import gather_object

        info_sums: dict[str, list[float]] = {}
        for ep in episodes:
            for k, v in ep.info.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    acc = info_sums.setdefault(k, [0.0, 0.0])
                    acc[0] += float(v)
                    acc[1] += 1
        local = {"rewards": [ep.reward for ep in episodes], "lengths": [sum(ep.mask) for ep in episodes],
                 "errors": sum(ep.error is not None for ep in episodes),
                 "truncated": sum(not ep.finished for ep in episodes), "info": info_sums,
                 "turns": sum(ep.turns for ep in episodes), "tool_calls": sum(ep.tool_calls for ep in episodes),
                 "tool_errors": sum(ep.tool_errors for ep in episodes)}
        parts = gather_object([local]) if self.world > 1 else [local]
        rewards = [r for p in parts for r in p["rewards"]]
        lengths = [n for p in parts for n in p["lengths"]]
        n = len(rewards)
        mean = sum(rewards) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(n - 1, 1))
        gen_tokens = sum(lengths)
        errors = sum(p["errors"] for p in parts)
        record: dict[str, Any] = {
            "step": step, "epoch": round(self.schedule.epoch_of(step), 4),
            "reward_mean": mean, "reward_std": std, "reward_min": min(rewards), "reward_max": max(rewards),
            ("env_errors" if self.env_mode else "reward_errors"): errors,
            "loss": update["loss"], "kl": update.get("kl", 0.0),
            "completion_length_mean": gen_tokens / n, "completion_length_min": min(lengths),
            "completion_length_max": max(lengths), "truncated_fraction": sum(p["truncated"] for p in parts) / n,
            "step_time_s": step_time, "tokens_per_s": gen_tokens / step_time if step_time > 0 else 0.0,
        }
        if self.env_mode or self.cfg.tools:
            record["turns_per_episode"] = sum(p["turns"] for p in parts) / n
        if self.cfg.tools:
            record["tool_calls_per_episode"] = sum(p["tool_calls"] for p in parts) / n
            record["tool_errors"] = sum(p["tool_errors"] for p in parts)
        record.update({k: v for k, v in update.items() if k not in record})
        record.update({f"advantage/{k}": v for k, v in adv_diag.items()})
        record.update({f"time/{k}_s": v for k, v in times.items()})
        record.update(step_peak_memory())  # peak_rss_mb (+ peak_vram_mb) since the previous record, then reset
        merged: dict[str, list[float]] = {}
        for p in parts:
            for k, (total, count) in p["info"].items():
                acc = merged.setdefault(k, [0.0, 0.0])
                acc[0] += total
                acc[1] += count
        record.update({f"reward_info/{k}": total / count for k, (total, count) in merged.items() if count})
        self._log_completions(step, episodes)
        return record

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
        if self.acc.is_main_process and not trained and (self.out / "final").is_dir():
            final = self.out / "final"
        elif self.acc.is_main_process:
            final = ckpt.export_final(self._policy(), self.tokenizer, self.out,
                                      merge_lora=self.cfg.merge_lora)
            self.log(f"final model written to {final}")
            if self.cfg.hf_name:  # the outcome goes to hf_push.json, which the server shows on the run
                ckpt.push_to_hub(final, self.cfg.hf_name, self.cfg.hf_token or os.environ.get("HF_TOKEN"), self.log,
                                 record=self.out / ckpt.PUSH_RECORD)
            else:  # a resume that dropped hf_name: no earlier push result describes this final/
                (self.out / ckpt.PUSH_RECORD).unlink(missing_ok=True)
        self.acc.wait_for_everyone()
        return final


def deterministic_kernels() -> dict[str, Any]:
    """`deterministic: true`: torch's deterministic kernels (an op without one raises RuntimeError, naming it;
    `warn_only` would keep e.g. the memory-efficient SDPA backward's atomics), the cuBLAS workspace setting torch asks
    for (read when cuBLAS makes its first handle: `runrl train` sets it in time; an in-process `train()` after CUDA
    matmuls needs it in the environment first), deterministic cuDNN without benchmarking, and flash-attn's
    deterministic backward (read by transformers per call). Returns the previous modes for
    `restore_kernel_modes`. On CPU nothing here is needed (see README "Reproducibility")."""
    previous = {"algorithms": torch.are_deterministic_algorithms_enabled(),
                "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                "cudnn_deterministic": torch.backends.cudnn.deterministic,
                "cudnn_benchmark": torch.backends.cudnn.benchmark}
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("FLASH_ATTENTION_DETERMINISTIC", "1")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    return previous


def restore_kernel_modes(previous: dict[str, Any]) -> None:
    torch.use_deterministic_algorithms(previous["algorithms"], warn_only=previous["warn_only"])
    torch.backends.cudnn.deterministic = previous["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = previous["cudnn_benchmark"]


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


def _mean_var(n: float, total: float, squares: float) -> tuple[float, float]:
    """Mean and unbiased variance from a count, a sum and a sum of squares (reduced over processes)."""
    mean = total / max(n, 1)
    return mean, (squares - n * mean * mean) / max(n - 1, 1)


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
    return Trainer(cfg, out, resume=resume).run()
