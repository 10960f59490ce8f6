"""RunRL's legacy create-run keys (spec §2.2: the v0.1 API's `create_run`), taken by `POST /runs` too: each is
mapped onto the engine's config or accepted and ignored with a warning, never silently dropped.

| legacy key | becomes |
|---|---|
| `kl_beta` | `beta` (KL coefficient to the reference; 0 loads no reference model) |
| `max_seq_length: N` | prompt + completion at most N tokens: `max_prompt_length = N - completion_length` (longer prompts are skipped, and counted in logs.txt) and `max_episode_tokens = N` (multi-turn: the whole episode, prompt included) |
| `n_gpus` | itself: an engine key (RunConfig.n_gpus), the GPUs the run gets (server/gpus.py) |
| `gpu_type`, `turbo` | nothing: RunRL's hosted hardware choices; a warning in the run's history (at create) and logs.txt |

A bad value is a 422 naming the legacy key; a legacy key given with a different value for its engine key
(`kl_beta` and `beta`, `max_seq_length` and `max_prompt_length` / `max_episode_tokens`) is a 422 too, since
which one was meant is not ours to guess. The legacy keys stay in `parameters` (as sent), next to what they set.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from runrl_engine.config import RunConfig
from server.gpus import describe

LEGACY_KEYS = ("kl_beta", "max_seq_length", "gpu_type", "turbo")  # and n_gpus, a RunConfig key itself
_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _bounds(name: str) -> tuple[float, float]:
    meta = _FIELDS[name].metadata
    return meta["ge"], meta["le"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def map_legacy(body: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    """The engine config keys the legacy keys of `body` set; problems go into `errors` under the legacy key."""
    out: dict[str, Any] = {}
    if body.get("kl_beta") is not None:
        value, (lo, hi) = body["kl_beta"], _bounds("beta")
        if not _is_number(value) or not lo <= value <= hi:
            errors["kl_beta"] = f"must be a number between {lo:g} and {hi:g} (it sets beta, the KL coefficient)"
        elif body.get("beta") is not None and body["beta"] != value:
            errors["kl_beta"] = (f"is RunRL's legacy name of beta, and beta is {body['beta']!r}; give one of them")
        else:
            out["beta"] = value
    if body.get("max_seq_length") is not None:
        value = body["max_seq_length"]
        completion = body.get("completion_length", _FIELDS["completion_length"].default)
        given = [k for k in ("max_prompt_length", "max_episode_tokens") if body.get(k) is not None]
        if not _is_number(completion) or not float(completion).is_integer():
            pass  # completion_length's own error is reported
        elif given:
            errors["max_seq_length"] = (f"sets max_prompt_length and max_episode_tokens, and {given[0]} is given "
                                        "too; give max_seq_length or those keys")
        else:
            completion = int(completion)
            lo = completion + 1
            hi = min(_bounds("max_episode_tokens")[1], completion + _bounds("max_prompt_length")[1])
            if not _is_number(value) or not float(value).is_integer() or not lo <= value <= hi:
                errors["max_seq_length"] = (f"must be an integer between {lo} and {hi:g}: it bounds prompt + "
                                            f"completion, and completion_length is {completion}")
            else:
                out.update(max_prompt_length=int(value) - completion, max_episode_tokens=int(value))
    if body.get("gpu_type") is not None and not isinstance(body["gpu_type"], str):
        errors["gpu_type"] = "must be a string such as H100 (it is accepted and ignored here)"
    if body.get("turbo") is not None and not isinstance(body["turbo"], bool):
        errors["turbo"] = "must be true or false (it is accepted and ignored here)"
    return out


def ignored_warnings(parameters: dict[str, Any], gpus: Sequence[str] | None) -> list[str]:
    """What a run asked for that this server ignores (from its `parameters`, the create body as sent)."""
    out = []
    if isinstance(parameters.get("gpu_type"), str):
        out.append(f"gpu_type {parameters['gpu_type']!r} is ignored: {describe(gpus)}, and n_gpus says how many "
                   "of them a run gets")
    if parameters.get("turbo") is True:
        out.append("turbo is ignored: it is RunRL's hosted 8xH100 mode, which this server does not have")
    return out
