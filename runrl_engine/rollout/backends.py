"""Rollout backends: what samples completions during the rollout phase, chosen by `rollout_backend`.

Every backend answers the call `rollout/hf.py`'s `generate` answers — prompt token ids in, `num_samples`
completions per prompt out (index = prompt_index * num_samples + sample_index), with the stop token kept when a
completion finished — plus three hooks the trainer calls between phases (the protocol and the shared types are in
`rollout/types.py`):

    wake()              before a rollout: re-acquire the memory generation needs (KV cache, weights)
    sync_weights(model) before a rollout: the engine's weights become the policy's current weights
    sleep()             after a rollout, before the update: hand generation memory back to training
    close()             end of run

Backends, registered by name; each class builds itself from a run's config (`from_config`) and says whether it
may run in a multi-process run (`multi_process`), so `rollout_backend_for` needs no switch on the name:

- `hf` (default): our KV-cached decode loop (`rollout/hf.py`) on the policy module itself. Each completion's
  randomness comes from its own seed, so results do not depend on batching; the hooks are no-ops.
- `paged`: transformers' continuous batching (`model.generate_batch`: paged KV cache, requests scheduled as they
  finish; flash attention when installed, else SDPA). Runs on CPU too (tested there on the builtin models), but more
  slowly there than `hf` (README, "Rollout backends and the GPU path"), so not worth it there. What it does not
  give: per-completion seeds (sampling draws from one torch generator seeded per call from the call's seeds, so a
  completion depends on what else is in the batch — runs are repeatable, but not batch-invariant); it reseeds
  torch's global RNG, which this backend saves and restores around the call. When the policy's parameters are not in
  the compute dtype (fp32 master weights with bf16 autocast on GPU) it generates from a copy of the policy in the
  compute dtype, refreshed by `sync_weights` (the generation thread does not inherit the caller's autocast).
- `vllm`: a colocated vLLM engine in this process (`LLM(..., enable_sleep_mode=True)`), imported only when
  selected. Its weights are pushed from the policy in-process before each rollout (`model.load_weights`, LoRA
  deltas folded in without touching the policy), and it sleeps (level 2: weights and KV cache released) during the
  update. Per-completion seeds go to vLLM's per-request `seed`, but vLLM's sampler is not ours: the same seed
  gives different tokens than `hf`. Its only end-to-end test is in tests/gpu/ (CUDA and vLLM needed); on CPU the
  tests check its weight push, its log-prob parsing, and the settings it takes from the config.

Every backend also reports the sampled tokens' log-probs under the distribution it drew them from (temperature,
top-k and top-p applied): `hf` from the probabilities it samples from, `paged` through `return_logprobs`, `vllm`
through `SamplingParams(logprobs=0)` with `logprobs_mode="processed_logprobs"` (not run here). The update compares
them with the trainer's own (`algorithms/sampler_correction.py`: `sampling/*` metrics, `importance_sampling_correction`).
`rollout_dtype` sets the precision a backend samples in: autocast around `hf`'s decode loop, `paged`'s compute-dtype
copy, vLLM's `dtype`.

Not covered: multi-process runs with `paged` or `vllm` (refused at start: untested under DDP, and FSDP sharding
would need gathered weights), tensor-parallel vLLM.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
from typing import TYPE_CHECKING, Any, Sequence

import torch

from runrl_engine.errors import ConfigError
from runrl_engine.registry import Registry
from runrl_engine.rollout import hf
from runrl_engine.rollout.types import Completion, RolloutBackend, SamplingParams

if TYPE_CHECKING:
    from runrl_engine.config import RunConfig

__all__ = ["ROLLOUT_BACKENDS", "RolloutBackend", "HFBackend", "PagedBackend", "VLLMBackend", "rollout_backend_for"]


class HFBackend:
    """`rollout/hf.py`'s decode loop on the policy itself (per-completion seeds, batch-invariant)."""

    name = "hf"
    multi_process = True  # each process samples its own prompts; nothing is shared between them

    def __init__(self) -> None:
        self.stats = hf.DecodeStats()  # summed over `generate` calls until `take_stats`

    @classmethod
    def from_config(cls, cfg: "RunConfig", *, compute_dtype: torch.dtype) -> "HFBackend":
        return cls()  # `rollout_dtype` is applied as autocast around the decode loop, by the caller

    def generate(self, model: torch.nn.Module, prompts: list[list[int]], *, num_samples: int, seeds: Sequence[int],
                 params: SamplingParams, stop_ids: set[int], pad_id: int) -> list[Completion]:
        return hf.generate(model, prompts, num_samples=num_samples, seeds=seeds, params=params, stop_ids=stop_ids,
                           pad_id=pad_id, stats=self.stats)

    def take_stats(self) -> hf.DecodeStats:
        """The decode timings since the last call (the trainer logs them per step), and start counting afresh."""
        stats, self.stats = self.stats, hf.DecodeStats()
        return stats

    def wake(self) -> None:
        pass

    def sync_weights(self, model: torch.nn.Module) -> None:
        pass

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class PagedBackend:
    """transformers' continuous batching (`generate_batch`) with a paged KV cache sized for each call."""

    name = "paged"
    multi_process = False  # untested under DDP; FSDP shards would need gathering first
    PAGE_SIZE = 256
    MAX_BATCH_TOKENS = 8192  # transformers' default cap on tokens per forward (prefill chunks beyond it)

    def __init__(self, compute_dtype: torch.dtype | None = None):
        self.compute_dtype = compute_dtype
        self._copy: torch.nn.Module | None = None  # compute-dtype copy of a policy kept in another dtype
        self._copy_of: torch.nn.Module | None = None

    @classmethod
    def from_config(cls, cfg: "RunConfig", *, compute_dtype: torch.dtype) -> "PagedBackend":
        return cls(compute_dtype=compute_dtype)

    def _needs_copy(self, model: torch.nn.Module) -> bool:
        if self.compute_dtype is None or _is_peft(model):  # peft casts between adapter and base dtypes itself
            return False
        return any(p.dtype != self.compute_dtype for p in model.parameters() if p.is_floating_point())

    def sync_weights(self, model: torch.nn.Module) -> None:
        if not self._needs_copy(model):
            self._copy = self._copy_of = None
            return
        if self._copy is None or self._copy_of is not model:
            self._copy = copy.deepcopy(model).to(self.compute_dtype).eval().requires_grad_(False)
            self._copy_of = model
            return
        with torch.no_grad():
            for dst, src in zip(self._copy.parameters(), model.parameters()):
                dst.copy_(src)

    def _engine(self, model: torch.nn.Module) -> torch.nn.Module:
        if self._needs_copy(model) and self._copy_of is not model:
            self.sync_weights(model)
        return self._copy if self._copy_of is model else model

    def generate(self, model: torch.nn.Module, prompts: list[list[int]], *, num_samples: int, seeds: Sequence[int],
                 params: SamplingParams, stop_ids: set[int], pad_id: int) -> list[Completion]:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        n = len(prompts) * num_samples
        assert len(seeds) == n, "one seed per completion"
        if not prompts:
            return []
        engine = self._engine(model)
        greedy = params.temperature == 0
        gen = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=not greedy,
                               temperature=None if greedy else params.temperature, top_p=None if greedy else params.top_p,
                               top_k=None if greedy else (params.top_k or None), eos_token_id=sorted(stop_ids),
                               pad_token_id=pad_id, num_return_sequences=num_samples)
        pages = sum(math.ceil((len(p) + params.max_new_tokens) / self.PAGE_SIZE) for p in prompts) * num_samples
        cb = ContinuousBatchingConfig(
            page_size=self.PAGE_SIZE, num_blocks=pages + 1,
            # the SDPA path materialises a [batch tokens, cached + batch tokens] mask: keep it no larger than needed
            max_batch_tokens=min(self.MAX_BATCH_TOKENS, sum(len(p) for p in prompts) + n),
            seed=hash(tuple(int(s) for s in seeds)) & 0x7FFF_FFFF, use_cuda_graph=False,
            return_logprobs=True)  # the log-softmax of the processed logits (temperature, top-k/top-p applied)
        device = next(engine.parameters()).device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        was_training = engine.training
        with torch.random.fork_rng(devices=devices):  # generate_batch reseeds the global RNG
            out = engine.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb, warmup=False)
        engine.train(was_training)
        # generate_batch orders each prompt's samples children first, then the parent request
        results = list(out.values())
        bad = [r.request_id for r in results if r.error is not None]
        if len(results) != n or bad:
            raise RuntimeError(f"paged generation returned {len(results)} of {n} completions"
                               + (f"; failed: {bad[:3]} ({results[0].error if results else ''})" if bad else ""))
        comps = []
        for r in results:
            tokens = list(r.generated_tokens)
            logprobs = [float(x) for x in r.logprobs] if len(r.logprobs) == len(tokens) else None
            comps.append(Completion(tokens=tokens, finished=bool(tokens) and tokens[-1] in stop_ids,
                                    logprobs=logprobs))
        return comps

    def wake(self) -> None:
        pass

    def sleep(self) -> None:
        pass  # the paged cache lives only for one generate_batch call

    def close(self) -> None:
        self._copy = self._copy_of = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_weights(model: torch.nn.Module):
    """(name, tensor) pairs under the checkpoint names vLLM's `load_weights` expects. A peft model yields its base
    weights with each LoRA delta added (computed fresh, so the policy's own weights are never merged/unmerged)."""
    deltas: dict[str, torch.Tensor] = {}
    peft = _is_peft(model)
    if peft:
        from peft.tuners.lora import LoraLayer

        for mname, module in model.named_modules():
            if isinstance(module, LoraLayer) and not getattr(module, "merged", False):
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        key = f"{mname}.base_layer.weight"
                        delta = module.get_delta_weight(adapter)
                        deltas[key] = deltas[key] + delta if key in deltas else delta
    with torch.no_grad():
        for name, p in model.named_parameters():
            if peft and ("lora_" in name or "original_module" in name):
                continue
            w = p.detach()
            if name in deltas:
                w = w + deltas[name].to(w.dtype)
            if peft:
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                name = name.replace("modules_to_save.default.", "")
            yield name, w


def vllm_token_logprobs(token_ids: Sequence[int], logprobs: Any) -> list[float]:
    """The sampled tokens' log-probs from a vLLM `CompletionOutput.logprobs` (one {token id: Logprob} dict per
    token, the sampled id among its keys with `SamplingParams(logprobs=0)`); NaN where one is missing."""
    out = []
    for k, token in enumerate(token_ids):
        entry = logprobs[k] if logprobs is not None and k < len(logprobs) else None
        value = entry.get(token) if isinstance(entry, dict) else None
        value = getattr(value, "logprob", value)
        out.append(float(value) if isinstance(value, (int, float)) else math.nan)
    return out


class VLLMBackend:
    """A vLLM engine colocated in this process: asleep during updates, weights pushed before each rollout."""

    name = "vllm"
    multi_process = False  # untested under DDP; FSDP shards would need gathering first

    def __init__(self, model_path: str, *, dtype: torch.dtype, max_model_len: int, gpu_memory_utilization: float,
                 seed: int = 0, max_num_seqs: int = 256):
        try:
            import vllm
        except ImportError as exc:
            raise ConfigError(f"rollout_backend 'vllm' needs the vllm package ({exc})", where="rollout_backend",
                              fix="`pip install vllm` on a CUDA machine (it brings its own torch build), or use "
                                  "`rollout_backend: hf` or `paged`") from None
        if not torch.cuda.is_available():
            raise ConfigError("rollout_backend 'vllm' needs a CUDA device", where="rollout_backend",
                              fix="use `rollout_backend: hf` (or `paged`) on CPU")
        # in-process engine: the external launcher runs vLLM's worker in this process (world of one), so its
        # model object is reachable for in-place weight loading
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
        self._vllm = vllm
        self.dtype = dtype
        self.llm = vllm.LLM(model=model_path, dtype=str(dtype).removeprefix("torch."), seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            max_num_seqs=max_num_seqs, enable_sleep_mode=True, enable_prefix_caching=True,
                            distributed_executor_backend="external_launcher", load_format="dummy",
                            # the sampled tokens' log-probs after temperature and top-k/top-p, as TRL asks of vLLM
                            # for its importance-sampling correction (the raw model's would bias it)
                            logprobs_mode="processed_logprobs")
        self.llm.sleep(level=2)  # weights come from the policy before the first rollout
        self.asleep = True

    @classmethod
    def from_config(cls, cfg: "RunConfig", *, compute_dtype: torch.dtype) -> "VLLMBackend":
        from runrl_engine.tiny import resolve_model_path

        # the engine's context must hold the longest sequence a rollout can build: a whole episode when multi-turn
        multi_turn = cfg.type == "environment" or bool(cfg.tools)
        max_len = cfg.max_episode_tokens if multi_turn else cfg.max_prompt_length + cfg.completion_length
        return cls(model_path=resolve_model_path(cfg.model), dtype=compute_dtype, max_model_len=max_len,
                   seed=cfg.seed, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)

    def _model(self) -> Any:
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        for path in (("model_runner", "model"), ("worker", "model_runner", "model")):
            obj = worker
            try:
                for attr in path:
                    obj = getattr(obj, attr)
                return obj
            except AttributeError:
                continue
        raise RuntimeError("cannot reach the vLLM model object in-process (vLLM's internal layout changed); "
                           "use rollout_backend: hf or paged")

    def wake(self) -> None:
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up()
            self.asleep = False

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.wake()
        target = self._model()
        for name, w in vllm_weights(model):
            target.load_weights([(name, w.to(self.dtype))])
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def generate(self, model: torch.nn.Module, prompts: list[list[int]], *, num_samples: int, seeds: Sequence[int],
                 params: SamplingParams, stop_ids: set[int], pad_id: int) -> list[Completion]:
        n = len(prompts) * num_samples
        assert len(seeds) == n, "one seed per completion"
        self.wake()
        SP = self._vllm.SamplingParams
        # one request per completion so each carries its own seed; prefix caching shares each prompt's prefill
        requests = [{"prompt_token_ids": p} for p in prompts for _ in range(num_samples)]
        sampling = [SP(n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
                       max_tokens=params.max_new_tokens, seed=int(s), stop_token_ids=sorted(stop_ids),
                       detokenize=False, logprobs=0) for s in seeds]  # logprobs=0: the sampled token's only
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        comps = []
        for out in outputs:
            o = out.outputs[0]
            tokens = list(o.token_ids)
            logprobs = vllm_token_logprobs(tokens, o.logprobs)
            finished = o.finish_reason == "stop"
            if finished and (not tokens or tokens[-1] not in stop_ids):
                # keep the stop token in the sequence (the policy sampled it and is trained on it)
                stop = o.stop_reason if isinstance(o.stop_reason, int) else min(stop_ids)
                tokens.append(stop)
                logprobs.append(math.nan)  # vLLM did not report it: no correction on that token
            comps.append(Completion(tokens=tokens, finished=finished, logprobs=logprobs))
        return comps

    def close(self) -> None:
        self.llm = None


ROLLOUT_BACKENDS = Registry("rollout_backend", "rollout backend")
for _backend in (HFBackend, PagedBackend, VLLMBackend):
    ROLLOUT_BACKENDS.register(_backend.name)(_backend)


def rollout_backend_for(cfg: "RunConfig", *, world_size: int, compute_dtype: torch.dtype) -> RolloutBackend:
    """The backend a RunConfig asks for, built by its registry entry from the config. ConfigError for an unknown
    name (listing the valid ones), or for a single-process backend in a multi-process run (before it is built)."""
    name = cfg.rollout_backend
    backend = ROLLOUT_BACKENDS.lookup(name)
    if not backend.multi_process and world_size > 1:
        raise ConfigError(f"rollout_backend {name!r} is single-process only (this run has {world_size} processes)",
                          where="rollout_backend", fix="use `rollout_backend: hf` for multi-GPU runs, or launch one process")
    return backend.from_config(cfg, compute_dtype=compute_dtype)


@contextlib.contextmanager
def rollout_phase(backend: Any, model: torch.nn.Module):
    """wake -> sync_weights -> (generate ...) -> sleep, as the trainer runs a rollout."""
    backend.wake()
    backend.sync_weights(model)
    try:
        yield backend
    finally:
        backend.sleep()
