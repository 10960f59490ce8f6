"""RunConfig: the one typed description of a training run.

Keys mirror RunRL's run parameters (`model`, `type`, `prompt_file`, `reward_file`, `completion_length`,
`epochs`, `learning_rate_multiplier`, LoRA settings, ...) plus flat engine keys (`algorithm`, `loss_type`,
`num_generations`, ...), so `runrl train CONFIG --set key=value` reaches every one of them.

Every field is typed, defaulted and documented once, in its `help`; ranges and choices live next to it and
are checked once, at load, with an error that names the key and says how to fix it. Relative file paths in
a YAML file resolve against the directory of that file.

This module does not import torch (the server imports it), and it does not check that files exist or that
the model loads: `data.py`, the sandbox and `models.py` do that with their own precise errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from runrl_engine.errors import ConfigError
from runrl_engine.secrets import SERVED_MARK

REDACTED = SERVED_MARK  # how a secret field reads in a config shown to anyone


def _f(default: Any, help: str, *, ge: float | None = None, le: float | None = None, gt: float | None = None,
       secret: bool = False, path: bool = False, legacy: dict[Any, Any] | None = None) -> Any:
    """A documented field. `ge`/`le`/`gt` bound numbers; Literal types carry the allowed choices; `legacy` maps
    values an older version of the key took (e.g. a bool) to the choice they mean now."""
    meta = {"help": help, "ge": ge, "le": le, "gt": gt, "secret": secret, "path": path, "legacy": legacy}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    # ---- RunRL run parameters (spec §2.1) ----------------------------------------------------------------
    model: str = _f("", "HF model id, local model directory, a `.gguf` file, or a builtin offline model "
                        "(`builtin:tiny`, `builtin:small`, `builtin:smollm2-135m-instruct`).")
    type: Literal["reward_function", "environment"] = _f(
        "reward_function", "`reward_function`: single-turn, scored by `reward_fn`; `environment`: multi-turn "
                           "`CustomEnv` (its code also comes in `reward_file`).")
    prompt_file: str = _f("", "Prompt JSONL: one object per line with a `prompt` message list; other fields "
                              "are passed to the reward / environment.", path=True)
    reward_file: str = _f("", "Python file defining `reward_fn(completion, **row)` (or a `CustomEnv` class "
                              "for `type: environment`).", path=True)
    sft_file: str | None = _f(None, "Optional SFT JSONL for a supervised warm-start before RL.", path=True)
    tools: list[str] = _f([], "MCP server URLs whose tools the model may call during rollouts.")
    completion_length: int = _f(1024, "Maximum new tokens per completion (per assistant turn).", ge=1, le=32768)
    epochs: int = _f(1, "Passes over the training prompts (ignored when `max_steps` is set).", ge=1, le=100)
    learning_rate: float | None = _f(None, "Base learning rate; unset means 5e-6 for full fine-tuning and "
                                           "2e-5 with LoRA.", gt=0, le=1)
    learning_rate_multiplier: float = _f(1.0, "Multiplies the learning rate (RunRL's knob).", ge=0.1, le=10)
    use_lora: bool = _f(False, "Train a LoRA adapter instead of all weights.")
    lora_rank: int = _f(16, "LoRA rank (0 disables LoRA even when `use_lora` is true).", ge=0, le=1024)
    lora_alpha: int = _f(16, "LoRA alpha (typically 2x the rank).", ge=1, le=4096)
    lora_dropout: float = _f(0.0, "LoRA dropout.", ge=0, le=0.9)
    lora_target_modules: list[str] = _f(["all-linear"], "Modules LoRA adapts (peft names; `all-linear` = every "
                                                        "linear layer but the output head).")
    package_requirements: list[str] = _f([], "pip requirement specifiers installed for the reward/environment "
                                             "code only.")
    hf_token: str | None = _f(None, "Hugging Face token for gated/private models and for pushing `hf_name`.",
                              secret=True)
    hf_name: str | None = _f(None, "Hugging Face repo (`user/name`) to push the final model to.")

    # ---- algorithm -----------------------------------------------------------------------------------------
    algorithm: Literal["grpo", "ppo"] = _f("grpo", "RL algorithm: `grpo` (critic-free, group-relative "
                                                     "advantages) or `ppo` (a learned critic and GAE).")
    # The choices below are the keys of the registries in `algorithms/` (a test keeps them equal); they are
    # spelled out here so that validating a config never imports torch.
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"] = _f(
        "dapo", "Policy loss, TRL 1.16's names: `grpo`, `dr_grpo`, `dapo`, `bnpo` = the PPO clip with that token "
                "normalisation; `cispo` = a capped, detached IS weight times the log-prob (cap `epsilon_high`, "
                "required; dapo's normalisation); `sapo` = a soft sigmoid gate instead of the clip "
                "(`sapo_temperature_pos/neg`; grpo's normalisation). See README and `algorithms/losses.py`.")
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"] | None = _f(
        None, "How rewards become advantages: `grpo`, `dr_grpo`, `rloo`, `reinforce_pp` (within each prompt's "
              "group) or `gae` (with the critic of `algorithm: ppo`); unset = `grpo`, or `gae` under ppo.")
    importance_sampling_level: Literal["token", "sequence"] = _f(
        "token", "Policy ratio per token (PPO/GRPO) or per sequence (GSPO: the geometric mean of its tokens').")
    importance_sampling_correction: Literal["none", "tis", "mis"] = _f(
        "none", "Correct for a rollout engine that samples from another distribution than the trainer computes "
                "(vLLM, `rollout_dtype`, other kernels): each token's policy loss is weighted by r = trainer / "
                "sampler probability of the sampled token at sampling time; `tis` = min(r, cap) (truncated IS), "
                "`mis` = r, or 0 above the cap (masked IS); `none` = no weight. The mismatch is logged either way "
                "(`sampling/*`). TRL: vllm_importance_sampling_correction with _mode token_truncate = tis, "
                "token_mask = mis (sequence_* = `importance_sampling_correction_level: sequence`).")
    importance_sampling_correction_level: Literal["token", "sequence"] = _f(
        "token", "Ratio of `importance_sampling_correction` per token, or per sequence (the product of its "
                 "tokens' ratios, as TRL's sequence_truncate / sequence_mask).")
    importance_sampling_cap: float = _f(2.0, "The cap of `importance_sampling_correction` (TRL: "
                                             "vllm_importance_sampling_clip_max, default 3 there; 2 as in the TIS "
                                             "paper and verl).", gt=0, le=1e6)
    ppo_epochs: int = _f(1, "Passes over each rollout batch; > 1 reuses the samples with real old log-probs.",
                         ge=1, le=100)
    num_minibatches: int = _f(1, "Optimizer steps per pass over each rollout batch (the batch is split into this "
                                 "many shuffled minibatches).", ge=1, le=4096)
    entropy_coef: float = _f(0.0, "Entropy bonus: `entropy_coef` times the token-mean entropy is subtracted "
                                  "from the loss.", ge=0, le=10)
    kl_in_reward: bool = _f(False, "PPO: put `beta` times the per-token KL to the reference into the rewards "
                                   "(before GAE) instead of adding it to the loss.")
    critic: Literal["head", "separate"] = _f(
        "head", "PPO value model: `head` = a value head on the policy's backbone (trained with the policy, and "
                "with its LoRA adapter); `separate` = a second copy of the model with its own value head.")
    vf_coef: float = _f(0.1, "PPO: weight of the value loss.", ge=0, le=100)
    value_clip: float | None = _f(0.2, "PPO: clip range of the value update around the old values (null = no "
                                       "clipping).", ge=0)
    gamma: float = _f(1.0, "PPO/GAE discount per token.", ge=0, le=1)
    lam: float = _f(0.95, "PPO/GAE lambda.", ge=0, le=1)
    whiten_advantages: bool = _f(True, "PPO/GAE: normalise advantages to mean 0, std 1 over the batch.")
    critic_learning_rate: float | None = _f(None, "Learning rate of the value head / critic; unset = the policy's "
                                                  "learning rate.", gt=0, le=1)
    scale_rewards: Literal["group", "batch", "none"] = _f(
        "group", "How the `grpo` estimator scales group-centred rewards (TRL 1.16): `group` divides by each "
                 "group's std, `batch` by the std of all the step's rewards (PPO Lite), `none` only centres "
                 "(Dr. GRPO). The old `true` / `false` still mean `group` / `none`.",
        legacy={True: "group", False: "none"})
    dynamic_sampling: bool = _f(
        False, "DAPO dynamic sampling: drop each group whose rewards are all equal (its advantages are 0) and "
               "generate more prompts to refill the step, at most `dynamic_sampling_max_rounds` extra rounds; a "
               "step still short then trains on the groups it has, and skips its update when it has none. "
               "Single-process runs, critic-free algorithms.")
    dynamic_sampling_max_rounds: int = _f(3, "With `dynamic_sampling`: most extra generation rounds per step.",
                                          ge=0, le=100)
    overlong_penalty: bool = _f(
        False, "DAPO soft overlong punishment, added to each training reward: 0 up to `overlong_max_length - "
               "overlong_buffer_length` sampled tokens, then linear down to `-overlong_penalty_factor` at "
               "`overlong_max_length`, and that beyond (TRL's `get_soft_overlong_punishment`). Not evaluation.")
    overlong_max_length: int | None = _f(None, "L_max of the overlong penalty (sampled tokens of an episode, all "
                                               "turns); unset = `completion_length`.", ge=1, le=10_000_000)
    overlong_buffer_length: int | None = _f(None, "L_cache of the overlong penalty (the span over which it grows "
                                                  "to its full size); unset = a fifth of L_max (DAPO: 4096 of "
                                                  "20480); 0 = none below L_max, full beyond.", ge=0, le=10_000_000)
    overlong_penalty_factor: float = _f(1.0, "The overlong penalty's full size (DAPO and TRL: 1).", ge=0, le=1000)
    num_generations: int = _f(8, "Completions sampled per prompt (the GRPO group size).", ge=1, le=1024)
    prompts_per_step: int = _f(8, "Prompts per optimizer step (all processes together).", ge=1, le=100000)
    micro_batch_size: int = _f(8, "Sequences per training forward/backward (gradient accumulation unit).",
                               ge=1, le=100000)
    max_steps: int | None = _f(None, "Optimizer steps to run; unset means `epochs` passes over the prompts.",
                               ge=1)
    max_prompt_length: int = _f(1024, "Prompts longer than this many tokens are skipped (and counted).",
                                ge=1, le=1_000_000)
    temperature: float = _f(1.0, "Sampling temperature for rollouts.", gt=0, le=10)
    top_p: float = _f(1.0, "Nucleus sampling for rollouts.", gt=0, le=1)
    top_k: int = _f(0, "Top-k sampling for rollouts (0 = off).", ge=0)
    beta: float = _f(0.0, "KL coefficient to the reference policy (k3 estimator); 0 loads no reference.",
                     ge=0, le=100)
    epsilon: float = _f(0.2, "Lower clip range of the policy ratio.", gt=0, le=10)
    epsilon_high: float | None = _f(None, "Upper clip range (DAPO clip-higher); unset means `epsilon`. Under "
                                          "`loss_type: cispo` it is the cap of the IS weight itself (ScaleRL's "
                                          "eps_max, 5.0 recommended), required and >= 1.", gt=0, le=10)
    delta: float | None = _f(None, "Two-sided clip (INTELLECT-2, TRL's `delta`): the ratio of a token with a "
                                   "negative advantage is bounded by `delta` too; must be > 1 + `epsilon_high`; "
                                   "clip loss types only; unset = off.", gt=1, le=100)
    sapo_temperature_pos: float = _f(1.0, "`loss_type: sapo`: gate temperature of tokens with a positive "
                                          "advantage (larger = the gate closes faster off-policy).", gt=0, le=100)
    sapo_temperature_neg: float = _f(1.05, "`loss_type: sapo`: gate temperature of tokens with a zero or negative "
                                           "advantage.", gt=0, le=100)
    top_entropy_quantile: float = _f(1.0, "Train the policy loss only on the tokens whose entropy is in this top "
                                          "fraction of the optimizer step's tokens (\"Beyond the 80/20 Rule\": "
                                          "0.2); 1 = every token, 0 = only the highest-entropy one.", ge=0, le=1)
    mask_truncated_completions: bool = _f(False, "Leave completions that did not end by themselves (cut at "
                                                 "`completion_length`, or out of turns / episode tokens) out of the "
                                                 "loss (DAPO); they still count in their group's advantages.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).", ge=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0, le=1)
    adam_beta1: float = _f(0.9, "AdamW beta1.", ge=0, le=1)
    adam_beta2: float = _f(0.999, "AdamW beta2.", ge=0, le=1)
    warmup_ratio: float = _f(0.0, "Fraction of steps with linear learning-rate warm-up.", ge=0, le=1)
    lr_scheduler: Literal["constant", "linear", "cosine"] = _f("constant", "Learning-rate schedule after warm-up.")

    # ---- multi-turn / SFT ----------------------------------------------------------------------------------
    max_turns: int = _f(10, "Most assistant turns in one multi-turn episode (environment or tool runs).",
                        ge=1, le=1000)
    max_episode_tokens: int = _f(8192, "Most tokens in one episode, prompt included; a turn that could pass it is "
                                       "not started (the episode counts as truncated).", ge=2, le=10_000_000)
    max_tool_calls: int = _f(8, "Most MCP tool calls in one episode; later calls get an error message.", ge=0)
    tool_timeout_s: float = _f(30.0, "Timeout of one MCP tool call, seconds.", gt=0)
    tool_allow_private_destinations: bool = _f(
        True, "Let the trainer connect to MCP servers on loopback, private, link-local and other non-public "
              "addresses (public ones are always allowed). True suits `runrl train` on your own box; "
              "`runrl serve` forces its own setting (`allow_private_destinations`, default false).")
    tool_allowed_destinations: list[str] = _f(
        [], "MCP destinations allowed even when non-public: `host:port`, `host`, an IP or a CIDR, e.g. "
            "`127.0.0.1:8765`. `runrl serve` forces its `allowed_destinations`.")
    sft_epochs: int = _f(1, "Epochs of SFT warm-start over `sft_file`.", ge=1, le=100)
    sft_learning_rate: float = _f(2e-5, "Learning rate of the SFT warm-start.", gt=0, le=1)

    # ---- reward sandbox ------------------------------------------------------------------------------------
    reward_workers: int = _f(2, "Sandbox worker processes running the reward/environment code.", ge=1, le=256)
    reward_timeout_s: float = _f(30.0, "Per-call timeout of the reward/environment code, seconds.", gt=0)
    reward_concurrency: int = _f(
        8, "Calls of an `async def reward_fn` in flight at once in each sandbox worker, on the worker's one event "
           "loop (an LLM judge over HTTP waits, it does not compute); each call keeps its own "
           "`reward_timeout_s`. 1 = one at a time. Plain `def reward_fn` runs one at a time unless "
           "`reward_sync_threads`; the batch `reward_func` form and environments always do.", ge=1, le=256)
    reward_sync_threads: bool = _f(
        False, "Also run a plain `def reward_fn` concurrently, in `reward_concurrency` threads per worker (for "
               "code that blocks on I/O, e.g. `requests`); the code must then be thread-safe. A call that times "
               "out in a thread cannot be stopped: its worker is replaced after its other calls finish.")
    reward_secrets: dict[str, str] = _f(
        {}, "Secrets for the reward/environment code, `{NAME: value}` (e.g. a judge's API key): set as "
            "environment variables of each sandbox worker before the code loads (`os.environ[NAME]`), passed "
            "over its private pipe; never in config.yaml, logs or the API's run object (redacted). Names: "
            "letters, digits and `_`, not PATH, HOME, PYTHON*, LD_*, *_PROXY, LANG, LC_*, TZ or RUNRL_*.",
        secret=True)
    reward_memory_mb: int = _f(4096, "Memory limit (RLIMIT_DATA: heap and anonymous mappings) of each sandbox worker, MiB.", ge=64)
    reward_allow_network: bool = _f(True, "Let reward code reach the network (LLM judges); false isolates it "
                                          "where the host supports it.")
    reward_network: Literal["host", "filtered"] = _f(
        "host", "With reward_allow_network: `host` shares the host's network (loopback, private addresses and "
                "cloud metadata included); `filtered` gives user code only an HTTP(S) proxy that connects to "
                "public addresses and to `reward_allowed_destinations` (bubblewrap only: refused without it). "
                "`runrl serve` forces `filtered`. The pip build keeps the host network.")
    reward_allow_private_destinations: bool = _f(
        False, "With reward_network: filtered, let user code reach loopback, private, link-local and other "
               "non-public addresses too. `runrl serve` forces its `allow_private_destinations`.")
    reward_allowed_destinations: list[str] = _f(
        [], "With reward_network: filtered, non-public destinations user code may still reach: `host:port`, "
            "`host`, an IP or a CIDR. `runrl serve` forces its `allowed_destinations`.")
    sandbox_isolation: Literal["auto", "bwrap", "subprocess"] = _f(
        "auto", "How user code (rewards, environments, pip builds) is isolated: `auto` uses bubblewrap when a "
                "trial sandbox starts here, else a plain subprocess (with a warning); `bwrap` refuses to run "
                "without a working bubblewrap (`runrl serve` forces this unless started with "
                "--allow-unisolated); `subprocess` never uses namespaces.")
    max_failed_reward_steps: int = _f(3, "Stop the run after this many consecutive steps whose rewards all "
                                         "failed.", ge=1)

    # ---- evaluation, checkpoints, logging -----------------------------------------------------------------
    seed: int = _f(0, "Seed for data order, sampling and initialisation.")
    eval_fraction: float = _f(0.05, "Fraction of prompts held out for evaluation (at most `eval_max_prompts`).",
                              ge=0, le=0.5)
    eval_max_prompts: int = _f(64, "Cap on held-out evaluation prompts.", ge=0)
    eval_prompt_file: str | None = _f(None, "Held-out prompt JSONL (same format as `prompt_file`) scored at eval "
                                            "time; when set, `eval_fraction` is not used.", path=True)
    eval_every: int = _f(10, "Score the held-out prompts every N steps (0 = never; also at the end).", ge=0)
    eval_at_start: bool = _f(False, "Also score the held-out prompts before the first step (a `step: 0` record).")
    eval_temperature: float | None = _f(None, "Sampling temperature at eval time; 0 = greedy; unset = "
                                              "`temperature`.", ge=0, le=10)
    eval_num_generations: int | None = _f(None, "Completions per held-out prompt; unset = `num_generations`.",
                                          ge=1, le=1024)
    save_every: int = _f(50, "Write a resumable checkpoint every N steps and at the last step (0 = only at the "
                             "last step).", ge=0)
    keep_checkpoints: int = _f(2, "How many step checkpoints to keep (the newest; the last step's among them).", ge=1)
    merge_lora: bool = _f(True, "Merge the LoRA adapter into the base weights in `final/`.")
    report_to: list[Literal["wandb"]] = _f([], "Experiment trackers (`wandb`; offline unless WANDB_API_KEY is set).")
    wandb_project: str = _f("runrl-engine", "W&B project name.")
    run_name: str | None = _f(None, "Name shown in logs and trackers; defaults to the output directory's name.")
    log_completions: int = _f(64, "Completions written to completions.jsonl per step (0 = none).", ge=0)

    # ---- device / precision --------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "Where to train; `auto` = CUDA if present.")
    n_gpus: int | None = _f(None, "GPUs the run gets under `runrl serve` (RunRL's create key): one process each, "
                                  "started with `accelerate launch --num_processes N`; unset = 1. `runrl train` "
                                  "starts one process whatever it says (`runrl launch --multi_gpu --num_processes N` "
                                  "starts N) and logs a warning when it differs from the process count.",
                            ge=1, le=1024)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Training precision; `auto` = bfloat16 on CUDA, float32 on CPU.")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = _f(
        "auto", "Attention kernel; `auto` = sdpa.")
    gradient_checkpointing: bool = _f(False, "Trade compute for activation memory.")
    share_prompt_forward: bool = _f(
        True, "In the update, compute each prompt once for all its completions in a micro-batch and reuse its "
              "keys/values (the plain forward's result up to rounding; not under gradient checkpointing, FSDP or "
              "DeepSpeed ZeRO-3).")
    padding_free: bool = _f(
        True, "With `share_prompt_forward`, run a micro-batch's update forward over its real tokens only (one "
              "packed row, a block-causal attention mask) instead of rows padded to the longest completion, when a "
              "FLOP count says that computes less (sdpa and eager attention); SFT batches likewise.")
    num_threads: int | None = _f(None, "CPU threads for torch (unset = torch's default).", ge=1)
    deterministic: bool = _f(
        False, "Deterministic kernels where the device needs them (CUDA): `torch.use_deterministic_algorithms` (an "
               "op without a deterministic kernel then raises), CUBLAS_WORKSPACE_CONFIG=:4096:8, deterministic "
               "cuDNN and flash-attn backward. Not needed on CPU, where runs repeat exactly on the same machine "
               "with the same `num_threads`.")
    rollout_backend: Literal["hf", "paged", "vllm"] = _f(
        "hf", "What generates rollouts: `hf` (our KV-cached loop, per-completion seeds), `paged` (transformers' "
              "continuous batching), `vllm` (colocated vLLM, needs `pip install vllm` and CUDA); `paged`/`vllm` "
              "are single-process only.")
    rollout_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Precision rollouts are sampled in: `auto` = the training precision; `bfloat16` / `float16` "
                "sample under that autocast (`hf`), from a copy in that dtype (`paged`) or as vLLM's dtype, while "
                "training keeps its own, so sampler and trainer differ (`sampling/*` metrics, "
                "`importance_sampling_correction`); `float32` = no autocast.")
    vllm_gpu_memory_utilization: float = _f(0.3, "Fraction of GPU memory the colocated vLLM engine may take "
                                                 "(weights + KV cache) while awake; `rollout_backend: vllm` only.",
                                            gt=0, le=0.95)

    # ------------------------------------------------------------------------------------------------------
    @property
    def lora_enabled(self) -> bool:
        return self.use_lora and self.lora_rank > 0

    @property
    def effective_learning_rate(self) -> float:
        base = self.learning_rate if self.learning_rate is not None else (2e-5 if self.lora_enabled else 5e-6)
        return base * self.learning_rate_multiplier

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def overlong_max(self) -> int:
        return self.completion_length if self.overlong_max_length is None else self.overlong_max_length

    @property
    def overlong_buffer(self) -> int:
        return self.overlong_max // 5 if self.overlong_buffer_length is None else self.overlong_buffer_length

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config", base_dir: Path | None = None,
                  origins: dict[str, str] | None = None) -> "RunConfig":
        """Build and validate. `source` names where the values came from in error messages, and `origins` where
        single keys came from instead (`{"epochs": "--set epochs=3"}`); relative file paths resolve against
        `base_dir` when given."""
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping of keys to values, got {type(data).__name__}", where=source,
                              fix="write the config as `key: value` lines")
        known = {f.name: f for f in dataclasses.fields(cls)}
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, raw in data.items():
            origin = (origins or {}).get(key)
            if key not in known:
                raise ConfigError(f"unknown key {key!r}", where=origin or source, fix=_suggest(str(key), known))
            values[key] = _coerce(key, raw, hints[key], known[key].metadata, source, origin)
            if known[key].metadata.get("path") and base_dir is not None and values[key]:
                p = Path(values[key]).expanduser()
                values[key] = str(p if p.is_absolute() else (base_dir / p))
        cfg = cls(**values)
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        for name in ("model", "prompt_file", "reward_file"):
            if not getattr(self, name):
                raise ConfigError(f"required key {name!r} is missing", where=source,
                                  fix=f"add `{name}: ...` ({_help(name)})")
        if self.hf_name:  # the Hub's own repo-id rules, checked before training rather than at the push
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.hf_name)
            except HFValidationError as exc:
                reason = str(exc).split(" Use `repo_type`")[0]
                raise ConfigError(f"not a Hugging Face repo id: {reason}", where=f"{source}: hf_name",
                                  fix="write `name` or `namespace/name`, e.g. alice/qwen3-4b-rl") from None
        ppo = self.algorithm == "ppo"
        if self.advantage_estimator is None:
            self.advantage_estimator = "gae" if ppo else "grpo"
        critic_estimator = self.advantage_estimator == "gae"  # the registry's critic estimators (a test checks)
        if ppo and not critic_estimator:
            raise ConfigError(f"algorithm 'ppo' trains a critic for GAE, but advantage_estimator is "
                              f"{self.advantage_estimator!r}, which needs none", where=f"{source}: advantage_estimator",
                              fix=f"use `algorithm: grpo` with advantage_estimator {self.advantage_estimator!r} "
                                  "(ppo_epochs, num_minibatches and entropy_coef work there too), or "
                                  "`advantage_estimator: gae`")
        if critic_estimator and not ppo:
            raise ConfigError("advantage_estimator 'gae' needs the critic that `algorithm: ppo` trains",
                              where=f"{source}: advantage_estimator",
                              fix="set `algorithm: ppo`, or pick grpo, dr_grpo, rloo or reinforce_pp")
        if self.kl_in_reward and not critic_estimator:
            raise ConfigError("kl_in_reward puts the KL penalty into per-token rewards, which only GAE uses",
                              where=f"{source}: kl_in_reward",
                              fix="set `algorithm: ppo`, or keep the KL as a loss term (kl_in_reward: false)")
        self._validate_policy_loss(source)
        if self.reward_allow_network and self.reward_network == "filtered" and self.sandbox_isolation == "subprocess":
            raise ConfigError("reward_network: filtered needs a bubblewrap sandbox, and sandbox_isolation is "
                              "subprocess", where=f"{source}: reward_network",
                              fix="use sandbox_isolation: auto or bwrap, or reward_network: host")
        _check_reward_secrets(self.reward_secrets, f"{source}: reward_secrets")
        for key in ("tool_allowed_destinations", "reward_allowed_destinations"):
            from runrl_engine.netpolicy import parse_destination

            for entry in getattr(self, key):
                try:
                    parse_destination(entry)
                except ValueError as exc:
                    raise ConfigError(str(exc), where=f"{source}: {key}",
                                      fix="write host:port, host, an IP or a CIDR, e.g. 127.0.0.1:8765") from None
        if self.dynamic_sampling and ppo:
            raise ConfigError("dynamic_sampling drops groups whose group-relative advantages are 0, and "
                              "algorithm 'ppo' takes its advantages from a critic instead",
                              where=f"{source}: dynamic_sampling",
                              fix="use `algorithm: grpo` (any advantage_estimator but gae), or dynamic_sampling: false")
        if self.dynamic_sampling and (self.n_gpus or 1) > 1:
            raise ConfigError(f"dynamic_sampling runs on one process, and n_gpus={self.n_gpus} starts one per GPU",
                              where=f"{source}: dynamic_sampling", fix="set n_gpus: 1, or dynamic_sampling: false")
        if self.dynamic_sampling and self.num_generations < 2:
            raise ConfigError("dynamic_sampling keeps groups whose rewards differ, and a group of one never does",
                              where=f"{source}: dynamic_sampling", fix="set num_generations >= 2")
        if self.overlong_penalty:
            if self.overlong_buffer > self.overlong_max:
                raise ConfigError(f"overlong_buffer_length={self.overlong_buffer} is more than the overlong "
                                  f"penalty's max length {self.overlong_max}",
                                  where=f"{source}: overlong_buffer_length",
                                  fix=f"use at most {self.overlong_max} (overlong_max_length, unset = "
                                      "completion_length)")
            if ppo and self.type == "environment":
                raise ConfigError("overlong_penalty changes an episode's reward, and PPO in an environment credits "
                                  "the per-turn step rewards instead", where=f"{source}: overlong_penalty",
                                  fix="use `algorithm: grpo`, or overlong_penalty: false")
        rollouts = self.prompts_per_step * self.num_generations
        if self.num_minibatches > rollouts:
            raise ConfigError(f"num_minibatches={self.num_minibatches} is more than the {rollouts} rollouts of a step "
                              f"(prompts_per_step x num_generations)", where=f"{source}: num_minibatches",
                              fix=f"use at most {rollouts}")

    def _validate_policy_loss(self, source: str) -> None:
        """The keys that only make sense with some `loss_type`s (see `algorithms/losses.py`)."""
        if self.loss_type == "cispo" and (self.epsilon_high is None or self.epsilon_high < 1):
            raise ConfigError(f"loss_type cispo caps the importance weight at epsilon_high itself (not at 1 + "
                              f"epsilon_high), and epsilon_high is {self.epsilon_high!r}: unset would cap it at "
                              f"epsilon={self.epsilon:g}, below the on-policy ratio 1",
                              where=f"{source}: epsilon_high",
                              fix="set epsilon_high (>= 1) to the most an importance weight may be, e.g. 5.0 "
                                  "(ScaleRL's eps_max, TRL's recommendation)")
        if self.delta is not None:
            if self.loss_type in ("cispo", "sapo"):
                raise ConfigError(f"delta bounds the PPO clip's unclipped branch, and loss_type {self.loss_type} has "
                                  "no clip", where=f"{source}: delta",
                                  fix="unset delta, or use loss_type grpo, dr_grpo, dapo or bnpo")
            if self.delta <= 1 + self.clip_high:
                raise ConfigError(f"delta={self.delta:g} is not above 1 + epsilon_high = {1 + self.clip_high:g}, "
                                  "so it would also cut the clip's own upper bound for positive advantages",
                                  where=f"{source}: delta", fix=f"use a delta above {1 + self.clip_high:g} "
                                                                "(INTELLECT-2 uses 4), or unset it")

    # ---- output ---------------------------------------------------------------------------------------------
    def to_dict(self, *, redact: bool = False) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if redact and f.metadata.get("secret") and value:
                value = {k: REDACTED for k in value} if isinstance(value, dict) else REDACTED
            out[f.name] = list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value
        return out

    def to_yaml(self, *, redact: bool = True) -> str:
        return yaml.safe_dump(self.to_dict(redact=redact), sort_keys=False, allow_unicode=True)

    def secrets(self) -> list[str]:
        """Secret values set in this config, for log redaction (each value of a `{NAME: value}` secret)."""
        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                out.extend(v for v in value.values() if v) if isinstance(value, dict) else out.append(value)
        return out


def load_config(path: str | Path, overrides: Sequence[str] = (), secrets: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config and apply `key=value` overrides (values parsed as YAML scalars), then `secrets`
    (secret keys only, e.g. `hf_token`: how `runrl serve` hands a run its secrets without writing them down)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", where=str(path), fix="pass the path of a YAML run config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        # the context mark (where an unclosed bracket or quote opened) is where the mistake usually is
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        end = getattr(exc, "problem_mark", None)
        detail = f"{context}: {problem}" if context else problem
        if end is not None and end is not mark:
            detail += f" (at line {end.line + 1})"
        raise ConfigError(f"malformed YAML, {detail}", where=where, fix="fix the YAML syntax at that line") from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", where=str(path), fix="save the config as UTF-8 YAML") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of keys to values", where=str(path), fix="write `key: value` lines")
    data = apply_overrides(data, overrides)
    # a mistake in an override is reported against it, not against the YAML file it replaces a value of
    origins = {item.partition("=")[0].strip(): f"--set {item}" for item in overrides}
    if secrets:
        secret_keys = {f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("secret")}
        wrong = sorted(k for k in secrets if k not in secret_keys)
        if wrong:
            raise ConfigError(f"{wrong} are not secret keys", where="--secrets-stdin",
                              fix=f"pass only {sorted(secret_keys)} this way; other keys belong in the YAML")
        data.update(secrets)
    return RunConfig.from_dict(data, source=str(path), base_dir=path.resolve().parent, origins=origins)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`["epochs=3", "tools=[http://a/mcp]"]` -> data with those keys set (values parsed as YAML)."""
    out = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"bad override {item!r}", where="--set", fix="write overrides as key=value")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
    return out


def field_help() -> dict[str, str]:
    """key -> help text, for `runrl train --help-config` and docs."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(RunConfig)}


# ---- helpers ---------------------------------------------------------------------------------------------

def _help(name: str) -> str:
    return field_help()[name]


def _suggest(key: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}? ({_help(close[0])})"
    return "remove it; valid keys are listed in README.md (Configuration)"


# Names reward_secrets may not set: the worker's own environment (paths, interpreter, proxy, locale) and RUNRL_*.
_RESERVED_ENV = re.compile(r"PATH|HOME|TMPDIR|TZ|LANG|LANGUAGE|PWD|SHELL|USER|PYTHON.*|LD_.*|LC_.*|RUNRL_.*|"
                           r"(HTTPS?|ALL|NO|FTP)_PROXY", re.IGNORECASE)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _check_reward_secrets(secrets: dict[str, str], where: str) -> None:
    if len(secrets) > 32:
        raise ConfigError(f"{len(secrets)} entries; at most 32", where=where, fix="pass fewer secrets")
    for name, value in secrets.items():
        if not _ENV_NAME.fullmatch(name) or _RESERVED_ENV.fullmatch(name):
            raise ConfigError(f"{name!r} cannot be a secret's name", where=where,
                              fix="use an environment-variable name of letters, digits and _ (e.g. JUDGE_API_KEY), "
                                  "not PATH, HOME, PYTHON*, LD_*, *_PROXY, LANG, LC_*, TZ or RUNRL_*")
        if not 4 <= len(value) <= 8192 or "\0" in value:
            raise ConfigError(f"the value of {name!r} must be 4 to 8192 characters without NUL", where=where,
                              fix="pass the secret's full value (shorter ones could not be redacted from logs)")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None)) + " (or null)"
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_describe(get_args(tp)[0])} to {_describe(get_args(tp)[1])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, meta: Any, source: str, at: str | None = None) -> Any:
    """`value` as type `tp`; a mistake is reported at `at` (e.g. `--set epochs=x`), else at `source: key`."""
    where = at or f"{source}: {key}"
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], meta, source, at)
    if origin is Literal:
        legacy = meta.get("legacy") or {}
        if isinstance(value, bool) and value in legacy:
            value = legacy[value]
        if value not in args:
            raise ConfigError(f"{value!r} is not allowed", where=where,
                              fix=f"use one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `--set tools=http://x/mcp` means a one-item list
        if value is None:
            value = []
        if not isinstance(value, list):
            raise ConfigError(f"expected {_describe(tp)}, got {value!r}", where=where, fix="write a YAML list")
        return [_coerce(key, v, args[0], {}, source, at) for v in value]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):  # the value is never shown: a secret may be a mapping given the wrong way
            raise ConfigError(f"expected {_describe(tp)}, got {type(value).__name__}", where=where,
                              fix="write a YAML mapping, e.g. {JUDGE_API_KEY: ...}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ConfigError(f"expected {_describe(tp)}; the entry {k!r} is not", where=where,
                                  fix="quote the names and the values")
            out[k] = v
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true or false, got {value!r}", where=where, fix="write true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"expected an integer, got {value!r}", where=where, fix=_range_text(meta) or "write a whole number")
        value = int(value)
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads `1e-5` as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"expected a number, got {value!r}", where=where, fix=_range_text(meta) or "write a number")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", where=where, fix="quote the value")
        return value
    ge, le, gt = meta.get("ge"), meta.get("le"), meta.get("gt")
    if (ge is not None and value < ge) or (le is not None and value > le) or (gt is not None and value <= gt):
        raise ConfigError(f"{value!r} is out of range", where=where, fix=_range_text(meta))
    return value


def _range_text(meta: Any) -> str:
    ge, le, gt = meta.get("ge"), meta.get("le"), meta.get("gt")
    lo = f">= {ge:g}" if ge is not None else (f"> {gt:g}" if gt is not None else None)
    hi = f"<= {le:g}" if le is not None else None
    parts = [p for p in (lo, hi) if p]
    return f"allowed range: {' and '.join(parts)}" if parts else ""


# ---- resume ----------------------------------------------------------------------------------------------

# Keys a resumed run may change (everything else is refused: the checkpoint's weights, optimizer state and data
# order were made under it). Grouped by why a change is safe mid-run.
RESUMABLE_KEYS = frozenset({
    # the run's length: more steps continue from the last one, fewer than are done leave nothing to do
    "max_steps", "epochs",
    # evaluation, which never feeds the update
    "eval_every", "eval_at_start", "eval_temperature", "eval_num_generations",
    # checkpoints, outputs and trackers
    "save_every", "keep_checkpoints", "merge_lora", "hf_name", "hf_token", "report_to", "wandb_project",
    "run_name", "log_completions",
    # how the same computation runs on this machine (memory, threads, kernels, the rollout engine)
    "micro_batch_size", "num_threads", "deterministic", "gradient_checkpointing", "attn_implementation",
    "share_prompt_forward", "padding_free", "rollout_backend", "rollout_dtype", "vllm_gpu_memory_utilization",
    # how user code and tools are run and bounded (not what they compute)
    "reward_workers", "reward_timeout_s", "reward_concurrency", "reward_sync_threads", "reward_memory_mb",
    "reward_allow_network", "reward_network",
    "reward_allow_private_destinations", "reward_allowed_destinations", "sandbox_isolation",
    "max_failed_reward_steps", "tool_timeout_s", "tool_allow_private_destinations", "tool_allowed_destinations",
})


def _stored_config(path: Path) -> dict[str, Any]:
    """A run directory's `config.yaml` (the resolved config, secrets redacted) as a validated dict without
    its secret keys."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the run's stored config ({type(exc).__name__})", where=str(path),
                          fix="restore it, or start a new run with another --output directory") from None
    secret = {f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("secret")}
    data = {k: v for k, v in (data or {}).items() if k not in secret}
    return RunConfig.from_dict(data, source=str(path)).to_dict()


def resume_changes(stored: Path, cfg: RunConfig, *, where: str) -> list[tuple[str, Any, Any]]:
    """(key, the run's value, `cfg`'s value) for each key `cfg` changes against the run's `stored` config.yaml;
    ConfigError naming the keys when one is not in `RESUMABLE_KEYS`. Secrets are never compared."""
    old, new = _stored_config(stored), cfg.to_dict()
    changes = [(k, old[k], new[k]) for k in old if k in new and old[k] != new[k] and k != "hf_token"]
    refused = [(k, a, b) for k, a, b in changes if k not in RESUMABLE_KEYS]
    if refused:
        what = ", ".join(f"{k} ({a!r} in the run, {b!r} now)" for k, a, b in refused)
        raise ConfigError(f"{what}: cannot change when a run resumes (its checkpoint was trained under the run's "
                          "value)", where=where,
                          fix=f"resume without changing {', '.join(k for k, _, _ in refused)} (keys that may change: "
                              "max_steps, epochs, eval and save cadence, outputs and trackers, micro_batch_size and "
                              "other speed/memory keys, sandbox limits; see README 'Resuming a run'), or start a new "
                              "run with another --output directory")
    return changes


def resume_config(stored: Path, given: RunConfig, overrides: Sequence[str], *,
                  source: str) -> tuple[RunConfig, list[str]]:
    """The config `runrl train --resume` continues with: the run's own resolved `stored` config.yaml (its first
    `--set` overrides included), then this invocation's `overrides`; secrets come from `given` (this
    invocation's YAML, `--set` and `--secrets-stdin`), as config.yaml holds them redacted and nothing stores
    them. Also returns log lines naming the keys where the YAML `source` now differs from the run and is
    therefore not used."""
    base_dir = Path(source).resolve().parent
    data = apply_overrides(_stored_config(stored), overrides)
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("secret"):
            data[f.name] = getattr(given, f.name)
    cfg = RunConfig.from_dict(data, source=f"{stored} with --set", base_dir=base_dir)
    ours, yours = cfg.to_dict(redact=True), given.to_dict(redact=True)
    ignored = [f"{k} ({yours[k]!r} there, {ours[k]!r} in the run)" for k in ours if ours[k] != yours[k]]
    notes = []
    if ignored:
        notes.append(f"--resume continues with the run's config.yaml; {source} differs and is not used for: "
                     f"{', '.join(ignored)} (change a key with --set KEY=VALUE; README 'Resuming a run' lists "
                     "those that may change)")
    return cfg, notes
