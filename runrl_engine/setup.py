"""Building a run: `build_run(cfg, output_dir)` makes everything the RL loop needs, once, before its first step.

In order, each a named phase: the accelerator and the process-count checks (`start_processes`); `--resume`'s
decision (a run already complete stops here, before any input is read); the user's inputs, read and checked
before anything costly (`load_inputs`: reward/env code, prompts split and tokenised, MCP tool schemas); the run
directory's streams (`open_outputs`); sandbox isolation and `package_requirements`; the models, critic,
optimizer and learning-rate schedule (`build_models`); the rollout backend and the episode settings
(`build_rollout`); the sandbox that runs user code. The result is a `RunParts`, frozen: the loop reads it and
never rebinds its fields.

Not covered here: the SFT warm-start (`trainer.sft_warm_start` trains the built policy in place), loading a
checkpoint's weights and loop state (`Trainer`'s resume), the loop itself. The module is named for what it
does; setuptools reads only the repository root's setup.py, never one inside a package.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from runrl_engine import checkpoint as ckpt
from runrl_engine.algorithms.advantages import uses_critic
from runrl_engine.config import RunConfig
from runrl_engine.data import PromptRow, load_prompts, load_sft
from runrl_engine.errors import ConfigError, DataError
from runrl_engine.metrics import RunOutputs
from runrl_engine.models import load_policy, load_reference, load_tokenizer, resolve_device, resolve_dtype
from runrl_engine.rollout.backends import rollout_backend_for
from runrl_engine.rollout.episodes import ChatRenderer, EpisodeSettings
from runrl_engine.rollout.types import SamplingParams
from runrl_engine.rundir import RunDir
from runrl_engine.sandbox import EnvSandbox, RewardSandbox, detect_isolation, inspect_user_code, install_requirements
from runrl_engine.sandbox.egress import EgressUnavailable
from runrl_engine.schedule import PromptSchedule, held_out_count, plan_steps, steps_per_epoch
from runrl_engine.tools.template import add_tool_prompt
from runrl_engine.value import PolicyWithValue, load_critic

__all__ = ["CompletedRun", "Inputs", "Models", "RunParts", "Rollout", "build_run", "check_processes",
           "deterministic_kernels", "params_sharded", "restore_kernel_modes"]

EncodedRow = tuple[PromptRow, list[int]]


@dataclass(frozen=True)
class Inputs:
    """The run's data, read and tokenised: training and held-out prompts with their ids, and MCP tools."""

    tokenizer: Any
    renderer: ChatRenderer
    train_rows: list[EncodedRow]
    eval_rows: list[EncodedRow]
    skipped_prompts: int  # longer than max_prompt_length, in either file
    tools: Any  # the MCP runtime, or None
    tool_schemas: list[dict[str, Any]]
    tool_connection_errors: dict[str, str]
    tool_prompt_added: bool  # the chat template ignores `tools`: their schemas went into its system turn


@dataclass(frozen=True)
class Models:
    """The prepared models and what trains them. `model` carries the value head under `critic: head`; `critic` is
    the separate value model (`critic: separate`) or None; `ref_model` the frozen reference (beta > 0, no LoRA)."""

    model: torch.nn.Module
    critic: torch.nn.Module | None
    ref_model: torch.nn.Module | None
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]  # the policy's trained parameters (value head excluded)
    value_params: list[torch.nn.Parameter]  # the critic's, in the optimizer's second group
    use_critic: bool
    value_on_policy: bool
    model_config: Any  # the HF config the shared-prompt forward reads (KV cache layers, attention kind)
    params_sharded: bool  # FSDP / ZeRO-3: the shared-prompt forward stays off


@dataclass(frozen=True)
class Rollout:
    """What samples episodes: the backend, its precision, and the training and evaluation settings."""

    backend: Any
    dtype: torch.dtype | None  # the precision sampling runs in (None: the training's own autocast)
    settings: EpisodeSettings
    eval_settings: EpisodeSettings
    eval_generations: int


@dataclass(frozen=True)
class RunParts:
    """Everything the loop needs, built by `build_run`."""

    cfg: RunConfig
    out: Path
    acc: Any  # accelerate.Accelerator
    device: str
    compute_dtype: torch.dtype
    kernel_modes: dict[str, Any] | None  # the caller's kernel modes under `deterministic` (restored at close)
    resume: bool  # --resume was asked
    resume_point: ckpt.ResumePoint | None  # None: no checkpoint to resume from (or no --resume)
    inputs: Inputs
    schedule: PromptSchedule
    total_steps: int
    steps_per_epoch: int
    fingerprints: dict[str, str]  # the input files' hashes, saved with each checkpoint
    outputs: RunOutputs
    models: Models
    rollout: Rollout
    sandbox: Any  # RewardSandbox or EnvSandbox

    @property
    def env_mode(self) -> bool:
        return self.cfg.type == "environment"

    def policy(self) -> torch.nn.Module:
        """The Hugging Face policy, unwrapped from DDP and (PPO's `critic: head`) from its value head."""
        model = self.acc.unwrap_model(self.models.model)
        return model.policy if isinstance(model, PolicyWithValue) else model

    def close(self) -> None:
        """Stop what the build started (idempotent). The kernel modes are the caller's to restore."""
        self.sandbox.close()
        self.rollout.backend.close()
        if self.inputs.tools is not None:
            self.inputs.tools.close()
        self.outputs.close()


@dataclass(frozen=True)
class CompletedRun:
    """`--resume` of a run that has trained all its steps and written final/: nothing was built."""

    out: Path
    point: ckpt.ResumePoint
    main: bool
    kernel_modes: dict[str, Any] | None


@dataclass(frozen=True)
class _Start:
    acc: Any
    device: str
    compute_dtype: torch.dtype
    kernel_modes: dict[str, Any] | None


def build_run(cfg: RunConfig, output_dir: Path, *, resume: bool = False,
              notes: Sequence[str] = ()) -> RunParts | CompletedRun:
    """`resume`: continue from the last checkpoint in `output_dir` (see `checkpoint.resume_point`); `notes`:
    lines for logs.txt once it is open (the CLI's word on how the resumed config was made)."""
    start = start_processes(cfg)
    # --resume decides first: a change that cannot happen mid-run is refused, and a complete run is left as it
    # is, before any input is read or anything written, started or loaded
    point = ckpt.resume_point(output_dir, cfg) if resume else None
    if point is not None and point.complete:
        return CompletedRun(output_dir, point, start.acc.is_main_process, start.kernel_modes)
    inputs = load_inputs(cfg)
    schedule = PromptSchedule(len(inputs.train_rows), cfg.prompts_per_step, cfg.seed)
    total_steps = plan_steps(len(inputs.train_rows), cfg.prompts_per_step, cfg.epochs, cfg.max_steps)
    if resume and start.acc.is_main_process:  # what a crash logged after the checkpoint is logged again
        ckpt.trim_streams(output_dir, point.step if point else 0)
    outputs = open_outputs(cfg, output_dir, start, inputs, total_steps, resume=resume, notes=notes)
    # Isolation fails closed before anything costly: with `sandbox_isolation: bwrap` and no working
    # bubblewrap, no user code runs (not even pip) and the run stops with IsolationUnavailable.
    isolation = detect_isolation(cfg.sandbox_isolation)
    egress = egress_policy(cfg)
    if egress is not None and isolation.mode != "bwrap":
        raise EgressUnavailable(isolation.reason)  # a filtered network cannot be enforced without bubblewrap
    req_dir = _install_requirements(cfg, output_dir, start.acc, outputs.log)
    models = build_models(cfg, start, total_steps, outputs.log)
    rollout = build_rollout(cfg, start, inputs.tokenizer, models, outputs.log)
    sandbox_cls = EnvSandbox if cfg.type == "environment" else RewardSandbox
    sandbox = sandbox_cls(Path(cfg.reward_file), num_workers=cfg.reward_workers,
                          timeout_s=cfg.reward_timeout_s, memory_mb=cfg.reward_memory_mb,
                          requirements_dir=req_dir, allow_network=cfg.reward_allow_network,
                          secrets=outputs.secrets, log=outputs.log, isolation=cfg.sandbox_isolation,
                          work_dir=RunDir(output_dir).sandbox / f"rank{start.acc.process_index}", egress=egress,
                          concurrency=cfg.reward_concurrency, sync_threads=cfg.reward_sync_threads,
                          secret_env=cfg.reward_secrets)
    return RunParts(cfg=cfg, out=output_dir, acc=start.acc, device=start.device, compute_dtype=start.compute_dtype,
                    kernel_modes=start.kernel_modes, resume=resume, resume_point=point, inputs=inputs,
                    schedule=schedule, total_steps=total_steps,
                    steps_per_epoch=steps_per_epoch(len(inputs.train_rows), cfg.prompts_per_step),
                    fingerprints=ckpt.input_fingerprints(cfg), outputs=outputs, models=models, rollout=rollout,
                    sandbox=sandbox)


# ---- processes ---------------------------------------------------------------------------------------------
def start_processes(cfg: RunConfig) -> _Start:
    """The accelerator (one per process), seeds, threads, deterministic kernels; then `check_processes`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load/save bars would flood logs; the run has its own progress
    device = resolve_device(cfg)
    kernel_modes = deterministic_kernels() if cfg.deterministic else None  # before CUDA's first matmul
    compute_dtype = resolve_dtype(cfg, device)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype, "no")
    # one learning-rate step per optimizer step: accelerate would otherwise step a prepared scheduler once per
    # process (it assumes per-process data loaders), running the schedule `num_processes` times too fast
    acc = Accelerator(cpu=device == "cpu", mixed_precision=mixed, step_scheduler_with_optimizer=False)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)
    check_processes(cfg, acc.num_processes)
    return _Start(acc, device, compute_dtype, kernel_modes)


def check_processes(cfg: RunConfig, world: int) -> None:
    """What the config asks that this number of processes cannot do. config.py validates what it can know at load
    (`n_gpus`, and these same limits for one process); the process count is known only once the run starts."""
    if cfg.prompts_per_step % world:
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} does not split over {world} processes",
                          where="prompts_per_step", fix=f"use a multiple of {world}")
    if cfg.dynamic_sampling and world > 1:
        raise ConfigError(f"dynamic_sampling runs on one process, and this run has {world}",
                          where="dynamic_sampling", fix="train on one process (runrl train), or set "
                                                       "dynamic_sampling: false")
    local_rollouts = cfg.prompts_per_step // world * cfg.num_generations
    if cfg.num_minibatches > local_rollouts:
        raise ConfigError(f"num_minibatches={cfg.num_minibatches} is more than the {local_rollouts} rollouts each "
                          f"of {world} processes has per step", where="num_minibatches",
                          fix=f"use at most {local_rollouts}, or more prompts_per_step")


def deterministic_kernels() -> dict[str, Any]:
    """`deterministic: true`: torch's deterministic kernels (an op without one raises RuntimeError, naming it;
    `warn_only` would keep e.g. the memory-efficient SDPA backward's atomics), the cuBLAS workspace setting torch asks
    for (read when cuBLAS makes its first handle: `runrl train` sets it in time; an in-process `train()` after CUDA
    matmuls needs it in the environment first), deterministic cuDNN without benchmarking, and flash-attn's
    deterministic backward (read by transformers per call). Returns the previous modes for
    `restore_kernel_modes`. On CPU nothing here is needed (see README "Reproducibility")."""
    import os

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


# ---- inputs ------------------------------------------------------------------------------------------------
def load_inputs(cfg: RunConfig) -> Inputs:
    """User inputs first: fail on a bad file before spending time on the model. The reward/env code is checked
    statically, the prompt (and SFT) files parsed, then the tokenizer, the MCP tools' schemas and the prompts' ids."""
    inspect_user_code(Path(cfg.reward_file), mode="environment" if cfg.type == "environment" else "function")
    rows = load_prompts(cfg.prompt_file)
    eval_file_rows = load_prompts(cfg.eval_prompt_file) if cfg.eval_prompt_file else None
    if cfg.sft_file:
        load_sft(cfg.sft_file)
    tokenizer = load_tokenizer(cfg)
    tools, schemas, connection_errors = _start_tools(cfg)
    # a template that ignores `tools` gets them in its system turn; SFT and final/ share this tokenizer
    tool_prompt_added = bool(schemas) and add_tool_prompt(tokenizer)
    renderer = ChatRenderer(tokenizer, schemas)
    train_rows, skipped = _encode(renderer, rows, cfg.prompt_file, cfg.max_prompt_length)
    if eval_file_rows is not None:
        eval_rows, skipped_eval = _encode(renderer, eval_file_rows, cfg.eval_prompt_file, cfg.max_prompt_length)
        train_rows, eval_rows, skipped = train_rows, eval_rows[:cfg.eval_max_prompts], skipped + skipped_eval
    else:
        train_rows, eval_rows = _split(train_rows, cfg)
    return Inputs(tokenizer=tokenizer, renderer=renderer, train_rows=train_rows, eval_rows=eval_rows,
                  skipped_prompts=skipped, tools=tools, tool_schemas=schemas,
                  tool_connection_errors=connection_errors, tool_prompt_added=tool_prompt_added)


def _split(encoded: list[EncodedRow], cfg: RunConfig) -> tuple[list[EncodedRow], list[EncodedRow]]:
    """(training rows, held-out rows): a seeded `eval_fraction` of the prompts (at most `eval_max_prompts`) is
    held out, each side in file order."""
    order = list(range(len(encoded)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = held_out_count(len(encoded), cfg.eval_fraction, cfg.eval_max_prompts)
    return [encoded[i] for i in sorted(order[n_eval:])], [encoded[i] for i in sorted(order[:n_eval])]


def _encode(renderer: ChatRenderer, rows: list[PromptRow], path: str, limit: int) -> tuple[list[EncodedRow], int]:
    """Rows with their prompt ids, and how many were skipped for being over `max_prompt_length` tokens."""
    encoded = [(row, renderer.prompt_ids(row.messages)) for row in rows]
    kept = [(row, ids) for row, ids in encoded if len(ids) <= limit]
    if not kept:
        raise DataError(f"all {len(rows)} prompts are longer than max_prompt_length={limit} tokens",
                        where=path, fix="raise max_prompt_length or shorten the prompts")
    return kept, len(encoded) - len(kept)


def _start_tools(cfg: RunConfig) -> tuple[Any, list[dict[str, Any]], dict[str, str]]:
    """The MCP runtime, the tool schemas rendered into every prompt (fetched once, at start) and the servers
    unreachable then; (None, [], {}) without `tools`."""
    if not cfg.tools:
        return None, [], {}
    from runrl_engine.netpolicy import DestinationPolicy
    from runrl_engine.tools.mcp_client import ToolRuntime

    runtime = ToolRuntime(policy=DestinationPolicy(
        allow_private=cfg.tool_allow_private_destinations, allowed=tuple(cfg.tool_allowed_destinations),
        hint="allowed by tool_allow_private_destinations or tool_allowed_destinations (under `runrl serve`: the "
             "server's allow_private_destinations / allowed_destinations settings)"))
    probe = runtime.open_session(cfg.tools, call_timeout_s=cfg.tool_timeout_s)
    try:
        return runtime, probe.tool_schemas(), dict(probe.connection_errors)
    finally:
        probe.close()


# ---- outputs -----------------------------------------------------------------------------------------------
def open_outputs(cfg: RunConfig, output_dir: Path, start: _Start, inputs: Inputs, total_steps: int, *,
                 resume: bool, notes: Sequence[str]) -> RunOutputs:
    """The run directory's streams and config.yaml, and the run's opening lines in logs.txt."""
    acc = start.acc
    world = acc.num_processes
    outputs = RunOutputs(output_dir, enabled=acc.is_main_process, secrets=cfg.secrets(),
                         total_steps=total_steps, config=cfg.to_dict(redact=True),
                         report_to=cfg.report_to, wandb_project=cfg.wandb_project,
                         run_name=cfg.run_name or output_dir.name, resume=resume)
    if acc.is_main_process:
        RunDir(output_dir).config.write_text(cfg.to_yaml(redact=True))
    log = outputs.log
    for note in notes:
        log(note)
    log(f"{len(inputs.train_rows)} training prompts, {len(inputs.eval_rows)} held out; {total_steps} steps "
        f"x {cfg.prompts_per_step} prompts x {cfg.num_generations} completions on {world} "
        f"process(es), device {start.device}")
    if cfg.n_gpus is not None and cfg.n_gpus != world:
        log(f"warning: n_gpus is {cfg.n_gpus}, but this run has {world} process(es): runrl train starts "
            f"one; runrl launch --multi_gpu --num_processes {cfg.n_gpus} train ... starts {cfg.n_gpus} "
            "(runrl serve does that itself)")
    if inputs.skipped_prompts:
        log(f"skipped {inputs.skipped_prompts} prompt(s) longer than max_prompt_length={cfg.max_prompt_length}")
    if cfg.tools:
        names = ", ".join(t["function"]["name"] for t in inputs.tool_schemas) or "none (servers unreachable)"
        log(f"MCP tools from {len(cfg.tools)} server(s): {names}")
        if inputs.tool_prompt_added:
            log("the chat template ignores `tools`: tool schemas go into its system turn instead")
        for url, why in inputs.tool_connection_errors.items():
            log(f"MCP server {url} is unreachable at start ({why}); its tool calls will fail and be counted")
    return outputs


# ---- user code's environment -------------------------------------------------------------------------------
def egress_policy(cfg: RunConfig, *, for_pip: bool = False) -> Any:
    """The destination policy of user code's network (`reward_network: filtered`), or None (none, or the host's).
    The pip build always has network (it must reach the index); under `filtered` it gets the same policy."""
    if not ((cfg.reward_allow_network or for_pip) and cfg.reward_network == "filtered"):
        return None
    from runrl_engine.netpolicy import DestinationPolicy

    return DestinationPolicy(
        allow_private=cfg.reward_allow_private_destinations, allowed=tuple(cfg.reward_allowed_destinations),
        hint="allowed by reward_allow_private_destinations or reward_allowed_destinations (under `runrl serve`: "
             "the server's allow_private_destinations / allowed_destinations settings)")


def _install_requirements(cfg: RunConfig, output_dir: Path, acc: Any, log: Any) -> Path | None:
    """`package_requirements`, installed once (main process) into the run's own environment for the workers."""
    if not cfg.package_requirements:
        return None
    target = RunDir(output_dir).reward_env
    if acc.is_main_process:
        log(f"installing package_requirements: {' '.join(cfg.package_requirements)}")
        install_requirements(cfg.package_requirements, target, log=log, isolation=cfg.sandbox_isolation,
                             egress=egress_policy(cfg, for_pip=True))
    acc.wait_for_everyone()
    return target


# ---- models ------------------------------------------------------------------------------------------------
def build_models(cfg: RunConfig, start: _Start, total_steps: int, log: Any) -> Models:
    """Policy, reference, critic, optimizer and schedule, prepared by accelerate."""
    acc, device = start.acc, start.device
    # param dtype: fp32 master weights for full fine-tuning (bf16 autocast on GPU); LoRA keeps the frozen
    # base in the compute dtype and peft keeps the adapter in fp32.
    param_dtype = start.compute_dtype if cfg.lora_enabled else torch.float32
    policy = load_policy(cfg, device, param_dtype)
    ref_model = load_reference(cfg, device, param_dtype) if cfg.beta > 0 and not cfg.lora_enabled else None
    # PPO's critic: a value head on the policy (one forward gives both) or a separate value model
    use_critic = uses_critic(cfg.advantage_estimator)
    critic = None
    if use_critic and cfg.critic == "head":
        policy = PolicyWithValue(policy)
    elif use_critic:
        critic = load_critic(cfg, device, param_dtype)
    value_on_policy = isinstance(policy, PolicyWithValue)
    sharded = params_sharded(acc)
    if cfg.share_prompt_forward and sharded:
        log("share_prompt_forward is off under FSDP / DeepSpeed ZeRO-3 (sharded parameters): each prompt "
            "is computed once per completion")
    value_params = (policy.value_parameters() if value_on_policy else
                    [p for p in critic.parameters() if p.requires_grad] if critic is not None else [])
    value_ids = {id(p) for p in value_params}
    params = [p for p in policy.parameters() if p.requires_grad and id(p) not in value_ids]
    optimizer = _optimizer(cfg, params, value_params)
    scheduler = _scheduler(cfg, optimizer, total_steps * cfg.ppo_epochs * cfg.num_minibatches)
    model_config = _model_config(policy)  # what KV cache layers the shared-prompt forward needs
    if critic is None:
        model, optimizer, scheduler = acc.prepare(policy, optimizer, scheduler)
    else:
        model, critic, optimizer, scheduler = acc.prepare(policy, critic, optimizer, scheduler)
    return Models(model=model, critic=critic, ref_model=ref_model, optimizer=optimizer, scheduler=scheduler,
                  params=params, value_params=value_params, use_critic=use_critic, value_on_policy=value_on_policy,
                  model_config=model_config, params_sharded=sharded)


def _optimizer(cfg: RunConfig, params: list, value_params: list) -> torch.optim.Optimizer:
    """AdamW over the policy's parameters, and the critic's in a second group at `critic_learning_rate`."""
    groups: list[dict[str, Any]] = [{"params": params}]
    if value_params:
        groups.append({"params": value_params, "lr": cfg.critic_learning_rate or cfg.effective_learning_rate})
    # fused: one kernel over all parameters, as TRL's default `adamw_torch_fused`
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.effective_learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay, fused=fused)


def _scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, updates: int) -> Any:
    """The learning-rate schedule over the run's `updates` optimizer steps."""
    from transformers import get_scheduler

    # transformers' "constant" ignores warm-up steps; "constant_with_warmup" is the same schedule with them
    schedule = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return get_scheduler(schedule, optimizer, num_warmup_steps=int(cfg.warmup_ratio * updates),
                         num_training_steps=updates)


def params_sharded(acc: Any) -> bool:
    """FSDP and ZeRO-3 gather a layer's parameters with hooks on that call's outputs; a gradient that enters the
    layer through a reused KV cache bypasses them, so the shared-prompt forward is kept off there."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if kind == DistributedType.DEEPSPEED:
        plugin = acc.state.deepspeed_plugin
        return plugin is None or plugin.zero_stage == 3
    return kind in (DistributedType.FSDP, DistributedType.MEGATRON_LM)


def _model_config(policy: torch.nn.Module) -> Any:
    model = policy.policy if isinstance(policy, PolicyWithValue) else policy
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


# ---- rollout -----------------------------------------------------------------------------------------------
def build_rollout(cfg: RunConfig, start: _Start, tokenizer: Any, models: Models, log: Any) -> Rollout:
    """The rollout backend in its precision, and the sampling settings of training and evaluation episodes."""
    # rollout_dtype: the precision the rollout engine samples in (None: the training's own autocast)
    dtype = None if cfg.rollout_dtype == "auto" else getattr(torch, cfg.rollout_dtype)
    if dtype is not None and dtype != start.compute_dtype:
        log(f"rollouts are sampled in {cfg.rollout_dtype}, training computes in "
            f"{str(start.compute_dtype).removeprefix('torch.')}: sampling/* metrics measure the mismatch"
            + (f"; importance_sampling_correction {cfg.importance_sampling_correction} corrects it"
               if cfg.importance_sampling_correction != "none" else ""))
    backend = rollout_backend_for(cfg, world_size=start.acc.num_processes, compute_dtype=dtype or start.compute_dtype)
    multi_turn = cfg.type == "environment" or bool(cfg.tools)
    settings = EpisodeSettings(
        sampling=SamplingParams(max_new_tokens=cfg.completion_length, temperature=cfg.temperature,
                                top_p=cfg.top_p, top_k=cfg.top_k),
        stop_ids=_stop_ids(tokenizer, start.acc.unwrap_model(models.model)), pad_id=tokenizer.pad_token_id,
        end_of_turn_id=tokenizer.eos_token_id, max_turns=cfg.max_turns if multi_turn else 1,
        max_episode_tokens=cfg.max_episode_tokens, max_tool_calls=cfg.max_tool_calls,
        tool_timeout_s=cfg.tool_timeout_s, backend=backend)
    eval_temperature = cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature
    eval_settings = dataclasses.replace(settings, sampling=dataclasses.replace(settings.sampling,
                                                                               temperature=eval_temperature))
    return Rollout(backend=backend, dtype=dtype, settings=settings, eval_settings=eval_settings,
                   eval_generations=cfg.eval_num_generations or cfg.num_generations)


def _stop_ids(tokenizer: Any, model: torch.nn.Module) -> set[int]:
    """The tokens that end a completion: the tokenizer's EOS and the policy's generation config's."""
    policy = model.policy if isinstance(model, PolicyWithValue) else model
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return {i for i in ids if i is not None}
