"""What every rollout backend shares: the sampling settings in, the completions out, and the backend protocol.

A backend (`rollout/backends.py` registers `hf`, `paged` and `vllm`) takes prompt token ids and returns
`num_samples` completions per prompt (index = prompt_index * num_samples + sample_index), each with the stop token
kept when it finished and, where the engine reports them, the sampled tokens' log-probs. The multi-turn loop
(`rollout/episodes.py`) and the trainer talk to backends only through these types.

Not here: how any backend samples (`rollout/hf.py` is our decode loop), nor the registry that picks one by name.
This module imports no torch at import time, so code that only builds `SamplingParams` or reads `Completion`s
stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch

__all__ = ["SamplingParams", "Completion", "RolloutBackend"]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy (the most likely token; top-p/top-k have no effect then)
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Completion:
    tokens: list[int]  # sampled ids, the stop token included when `finished`
    finished: bool  # ended with a stop token (False: hit max_new_tokens)
    # the sampler's log-prob of each of `tokens` under the distribution it drew them from (temperature, top-k and
    # top-p applied; NaN where the engine gave none); None: the backend reports none
    logprobs: list[float] | None = None


@runtime_checkable
class RolloutBackend(Protocol):
    """A generation engine, registered by name in `rollout/backends.py`'s `ROLLOUT_BACKENDS`.

    The registry holds classes: `from_config` builds one from a run's config (it takes the settings it needs),
    and `multi_process` says whether it may run in a multi-process (DDP/FSDP) run. The trainer calls `wake` and
    `sync_weights` before each rollout, `sleep` after it (before the update), `close` at the end of the run.
    """

    name: ClassVar[str]
    multi_process: ClassVar[bool]

    @classmethod
    def from_config(cls, cfg: Any, *, compute_dtype: "torch.dtype") -> "RolloutBackend": ...

    def generate(self, model: "torch.nn.Module", prompts: list[list[int]], *, num_samples: int,
                 seeds: Sequence[int], params: SamplingParams, stop_ids: set[int], pad_id: int) -> list[Completion]: ...

    def wake(self) -> None: ...

    def sync_weights(self, model: "torch.nn.Module") -> None: ...

    def sleep(self) -> None: ...

    def close(self) -> None: ...
