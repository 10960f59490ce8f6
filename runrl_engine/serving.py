"""Serving a trained model: loading a run's `final/` for inference, and a continuous-batching decode loop.

`load_for_serving(final_dir)` loads what `checkpoint.export_final` wrote, through the trainer's own loaders
(`models.py`): a full model directory, or a LoRA adapter (`merge_lora: false`) on its base model, merged into the
base weights at load (one set of weights, so a decode step costs what the merged model's does and the fast CPU
step below applies; the base is needed in memory either way). The base is the one the adapter records
(`adapter_config.json`'s `base_model_name_or_path`: for builtin and GGUF models a directory in the engine's cache);
when that directory is gone (another machine, a cleared cache) the run's model id given as `base_model`
(`builtin:tiny`, a Hub id, ...) is loaded instead, which for builtin models rebuilds the same directory. On CUDA it
loads in bfloat16 on the first visible device, else float32 on CPU (`models.resolve_dtype`'s `auto`).

`Batcher` serves requests from one thread: every decode step runs all running completions as one batch, and
requests that arrive while others decode join the batch at the next step (their prompts prefilled together,
their keys and values merged into the running cache, left-padded as the rollout loop pads). Finished rows leave
at once. Each completion has its own sampling: `temperature` (0 = greedy), `top_p`, `max_tokens`, stop strings
(matched on the decoded text, which ends before the stop string) and a seed (its own random stream, so a seeded
completion's draws do not depend on what else is in the batch; the logits themselves may differ in the last bits
between batch sizes). The step is the rollout loop's: preallocated key/value buffers (`rollout/kv_cache.py`), and
on CPU for Llama-family models `LlamaDecodeStep` with packed weights (`rollout/cpu_decode.py`); elsewhere the
model's own forward.

Why not transformers' continuous batching (`generate_batch`/`init_continuous_batching`): measured in this project
at 0.24-0.31x of the rollout loop's tokens/s on CPU (README, `rollout_backend: paged`), one `do_sample` for the
whole batch (a greedy and a sampled request cannot share it), no per-request seed, and an API that changes between
transformers releases. vLLM is not used: it is not a dependency, needs CUDA, and is not installed where this was
written and tested.

Not covered: models whose cache layers are not plain full attention (sliding-window, chunked or shared-KV
layers keep transformers' layers, which cannot be merged): they are served one batch at a time (requests that
arrive while a batch decodes wait for it to finish, then start together). No prefix caching, no speculative
decoding, no log-probs, no chunked prefill (a long prompt's prefill delays the running rows' next step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers.cache_utils import DynamicCache

from runrl_engine.batch import pad_left
from runrl_engine.config import RunConfig
from runrl_engine.errors import UserError
from runrl_engine.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
from runrl_engine.rollout.cpu_decode import LlamaDecodeStep
from runrl_engine.rollout.kv_cache import PreallocatedKVLayer, decode_cache

GROW_TOKENS = 256  # key/value buffer growth per reallocation (tokens per row)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    device: str
    dtype: torch.dtype
    context: int  # the most tokens (prompt + completion) a sequence may hold
    stop_ids: set[int]  # token ids that end a completion (the tokenizer's and the generation config's EOS)
    base_model: str | None = None  # the base an adapter was merged into; None for a full model

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": str(self.dtype).removeprefix("torch."), "context": self.context,
                "adapter_base_model": self.base_model}


def adapter_base(final_dir: Path, base_model: str | None = None) -> str | None:
    """The base model an adapter-only `final_dir` is loaded on (None when `final_dir` is a full model): the one
    its adapter_config.json records when that is an existing directory, else `base_model` (the run's model id),
    else the recorded name as given (a Hub id)."""
    config = final_dir / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        recorded = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{config} is not a readable adapter config: {exc}", where=str(config)) from None
    if recorded and Path(recorded).is_dir():
        return recorded
    if base_model or recorded:
        return base_model or recorded
    raise UserError(f"{config} names no base model (base_model_name_or_path is empty)", where=str(config),
                    fix="deploy with the run's model id as the base model")


def load_for_serving(final_dir: str | Path, base_model: str | None = None, *, device: str = "auto",
                     dtype: str = "auto") -> LoadedModel:
    """The model in `final_dir` (a run's `final/`) and its tokenizer, in eval mode on the serving device."""
    final = Path(final_dir)
    cfg = RunConfig(model=str(final), device=device, dtype=dtype)  # type: ignore[arg-type]
    dev = resolve_device(cfg)
    dt = resolve_dtype(cfg, dev)
    tokenizer = load_tokenizer(cfg)
    base = adapter_base(final, base_model)
    if base is None:
        model = load_causal_lm(cfg, dev, dt)
    else:
        from peft import PeftModel

        model = load_causal_lm(dataclasses.replace(cfg, model=base), dev, dt)
        model = PeftModel.from_pretrained(model, str(final)).merge_and_unload()
    model.eval()
    stop = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 2048
    return LoadedModel(model=model, tokenizer=tokenizer, device=dev, dtype=dt, context=int(context),
                       stop_ids={i for i in stop if i is not None}, base_model=base)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # completion ends before the first occurrence of any of these
    seed: int | None = None  # None: a random one


@dataclass(frozen=True)
class Event:
    """What a job hears from the batcher thread: `delta` text of choice `index`, and when it ends its
    `finish` reason (`stop`, `length`, or `error` with the message in `delta`, index -1) and token count."""

    index: int
    delta: str = ""
    finish: str | None = None
    tokens: int = 0


@dataclass(eq=False)
class Job:
    """One request: `n` completions of one prompt. `on_event` is called on the batcher thread."""

    prompt: list[int]
    sampling: Sampling
    on_event: Callable[[Event], None]
    n: int = 1
    cancelled: bool = False  # set by the requester (client gone): its rows leave at the next step
    peak_batch: int = 0  # the most rows any of its decode steps ran with
    left: int = 0  # choices not finished yet (set when admitted)

    def cancel(self) -> None:
        self.cancelled = True


class _Text:
    """A completion's text as tokens arrive (decoded the way transformers' TextStreamer does: a token whose
    bytes end mid-character waits for the next one), its stop strings matched on it, and what may be sent."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.text, self.sent = "", 0
        self._pending: list[int] = []  # token ids since the last newline
        self._printed = 0  # chars of their decoding already in `text`
        self._searched = 0  # `text` before this offset holds no stop string

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string appeared (`text` is then cut before it)."""
        self._pending.append(token)
        decoded = self.tokenizer.decode(self._pending, skip_special_tokens=True)
        if decoded.endswith("\ufffd"):
            return False
        self.text += decoded[self._printed:]
        self._pending, self._printed = ([], 0) if decoded.endswith("\n") else (self._pending, len(decoded))
        return self._find_stop()

    def flush(self) -> bool:
        """Decode what waits for more bytes (the completion ends); True when that completes a stop string."""
        if not self._pending:
            return False
        self.text += self.tokenizer.decode(self._pending, skip_special_tokens=True)[self._printed:]
        self._pending = []
        return self._find_stop()

    def _find_stop(self) -> bool:
        if not self.stop:
            return False
        start = max(0, self._searched - max(len(s) for s in self.stop) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        self._searched = len(self.text)
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def take(self, final: bool) -> str:
        """The text not yet sent, less (unless `final`) a tail that could be the start of a stop string."""
        end = len(self.text)
        if not final:
            for s in self.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


@dataclass(eq=False)
class _Row:
    job: Job
    index: int  # choice index within the job
    rng: torch.Generator  # the row's own stream of uniforms (CPU), one draw per sampled token
    text: _Text
    real: int  # tokens of this row in the cache (its prompt and the completion tokens fed so far)
    pending: int = -1  # the sampled token to feed at the next step
    tokens: int = 0  # completion tokens sampled


@dataclass
class _Stats:
    requests: int = 0  # jobs finished
    completion_tokens: int = 0
    steps: int = 0  # decode steps
    row_steps: int = 0  # sum over steps of their batch sizes
    peak_batch_size: int = 0
    batch_steps: dict[int, int] = field(default_factory=dict)  # batch size -> decode steps run at that size


class Batcher:
    """Continuous batching over one loaded model, on a thread of its own (`start`, `submit`, `close`)."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int = 16, log: Callable[[str], None] | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.loaded, self.max_batch_size = loaded, max_batch_size
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device = torch.device(loaded.device)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.log = log or (lambda line: None)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []
        self._admitting: list[Job] = []  # jobs taken from `_waiting` whose prefill runs now
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, capacity]: 1 = attend; the first `_width` columns are used
        self._width = 0  # cache length (columns filled, padding included)
        self._capacity = 0
        self._mergeable = True  # False once a cache is not made of PreallocatedKVLayer: no joining mid-batch
        self._step_fn: LlamaDecodeStep | None | bool = False  # False = not built yet
        self._stats = _Stats()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="runrl-batcher", daemon=True)

    # ---- the requester's side (any thread) ----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if not 1 <= job.n <= self.max_batch_size:
            raise ValueError(f"n must be between 1 and the batch size {self.max_batch_size}")
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = self._stats
            return {"max_batch_size": self.max_batch_size, "joins_running_batch": self._mergeable,
                    "running": len(self._rows),
                    "waiting": sum(j.n for j in self._waiting) + self._queue.qsize(), "requests": s.requests,
                    "completion_tokens": s.completion_tokens, "steps": s.steps, "row_steps": s.row_steps,
                    "peak_batch_size": s.peak_batch_size,
                    "batch_steps": {str(k): v for k, v in sorted(s.batch_steps.items())}}

    # ---- the batcher thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._rows and not self._waiting:
                    job = self._queue.get()  # idle: block until a request comes
                    if job is None:
                        return
                    self._waiting.append(job)
                while True:  # everything that arrived meanwhile
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        return
                    self._waiting.append(job)
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as exc:  # a failed forward (out of memory, ...): fail what it held, keep serving
                    self.log("batcher: a step failed:\n" + traceback.format_exc())
                    message = f"generation failed: {type(exc).__name__}: {exc}"
                    for job in {r.job for r in self._rows} | set(self._admitting):
                        job.on_event(Event(index=-1, delta=message, finish="error"))
                    self._admitting = []
                    self._reset()

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._width, self._capacity = [], None, None, 0, 0

    def _drop_cancelled(self) -> None:
        self._waiting = [j for j in self._waiting if not j.cancelled]
        if any(r.job.cancelled for r in self._rows):
            self._keep([i for i, r in enumerate(self._rows) if not r.job.cancelled])

    def _admit(self) -> None:
        """Prefill the waiting jobs that fit (first come, first served: one that does not fit waits, and those
        behind it too) and merge them into the running batch."""
        if not self._waiting or (self._rows and not self._mergeable):
            return
        free, jobs = self.max_batch_size - len(self._rows), []
        while self._waiting and self._waiting[0].n <= free:
            free -= self._waiting[0].n
            jobs.append(self._waiting.pop(0))
        if not jobs:
            return
        self._admitting = jobs  # failed with the step if the prefill fails
        ids, mask = pad_left([j.prompt for j in jobs], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        width = ids.shape[1]
        cache = decode_cache(self.model, width)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
                         cache=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1, :]
        expand = torch.tensor([k for k, j in enumerate(jobs) for _ in range(j.n)], device=self.device)
        if expand.numel() != len(jobs):  # n > 1: each choice a row of its own, sharing the prompt's prefill
            cache.batch_select_indices(expand)
            logits, mask = logits[expand], mask[expand]
        for j in jobs:
            j.left = j.n
        rows = [_Row(job=j, index=i, rng=torch.Generator().manual_seed(self._seed(j, i)), real=len(j.prompt),
                     text=_Text(self.tokenizer, j.sampling.stop)) for j in jobs for i in range(j.n)]
        keep = [k for k, (row, token) in enumerate(zip(rows, self._sample(logits, rows))) if not self._emit(row, token)]
        self._admitting = []
        mergeable = all(isinstance(layer, PreallocatedKVLayer) for layer in cache.layers)
        if not keep:
            return
        if not mergeable:  # transformers' own cache layers: this batch runs alone, in the cache it has
            self._mergeable = False
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            full = torch.ones(len(keep), width + max(r.job.sampling.max_tokens for r in rows) + 1,
                              dtype=mask.dtype, device=self.device)
            full[:, :width] = mask[index]
            self._rows, self._cache, self._mask, self._width = [rows[k] for k in keep], cache, full, width
            self._capacity = full.shape[1]
            return
        blocks = [(self._rows, self._cache, self._mask, self._width)] if self._rows else []
        blocks.append(([rows[k] for k in keep], cache, mask, width, keep))
        self._merge(blocks)

    @staticmethod
    def _seed(job: Job, index: int) -> int:
        seed = job.sampling.seed
        return int.from_bytes(os.urandom(7), "little") if seed is None else (seed + index) % 2**63

    def _merge(self, blocks: list[tuple]) -> None:
        """Lay the blocks' rows (each block: rows, cache, mask, width[, which of the cache's rows]) into new
        buffers, right-aligned at the longest row: leading columns that are padding in every row are dropped."""
        rows = [r for block in blocks for r in block[0]]
        width = max(r.real for r in rows)
        capacity = width + 1 + min(GROW_TOKENS, max(r.job.sampling.max_tokens - r.tokens for r in rows))
        n = len(rows)
        first = blocks[0][1].layers
        new_k = [layer._k.new_zeros(n, layer._k.shape[1], capacity, layer._k.shape[3]) for layer in first]
        new_v = [layer._v.new_zeros(n, layer._v.shape[1], capacity, layer._v.shape[3]) for layer in first]
        mask = torch.ones(n, capacity, dtype=torch.long, device=self.device)
        mask[:, :width] = 0
        at = 0
        for block in blocks:
            b_rows, b_cache, b_mask, b_width = block[:4]
            index = torch.tensor(block[4], device=self.device) if len(block) > 4 else None
            cols = min(b_width, width)
            for layer, k, v in zip(b_cache.layers, new_k, new_v):
                src_k, src_v = layer._k[:, :, b_width - cols:b_width], layer._v[:, :, b_width - cols:b_width]
                if index is not None:
                    src_k, src_v = src_k[index], src_v[index]
                k[at:at + len(b_rows), :, width - cols:width] = src_k
                v[at:at + len(b_rows), :, width - cols:width] = src_v
            src_mask = b_mask[:, b_width - cols:b_width]
            mask[at:at + len(b_rows), width - cols:width] = src_mask if index is None else src_mask[index]
            at += len(b_rows)
        cache = DynamicCache()
        cache.layers = []
        for k, v in zip(new_k, new_v):
            layer = PreallocatedKVLayer(capacity)
            layer._k, layer._v, layer.length, layer.device, layer.is_initialized = k, v, width, k.device, True
            layer._views()
            cache.layers.append(layer)
        self._rows, self._cache, self._mask, self._width, self._capacity = rows, cache, mask, width, capacity

    def _step(self) -> None:
        """One decode step of every running row: feed its pending token, sample the next."""
        if self._mergeable and self._width + 1 > self._capacity:  # out of room: grow the buffers
            self._merge([(self._rows, self._cache, self._mask, self._width)])
        rows, n = self._rows, len(self._rows)
        tokens = torch.tensor([[r.pending] for r in rows], device=self.device)
        positions = torch.tensor([[r.real] for r in rows], device=self.device)
        self._width += 1
        padded = any(r.real + 1 < self._width for r in rows)
        mask = self._mask[:, :self._width]
        step = self._fast_step()
        if step is not None:
            if n > step.packed.rows:  # growing: pack the weights for the next power of two rows at once
                step.packed.prepare(1 << (n - 1).bit_length())
            logits = step(tokens, positions, self._cache, mask if padded else None)
        else:
            logits = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=self._cache,
                                use_cache=True).logits[:, -1, :]
        for r in rows:
            r.real += 1
            r.job.peak_batch = max(r.job.peak_batch, n)
        with self._lock:
            s = self._stats
            s.steps, s.row_steps, s.peak_batch_size = s.steps + 1, s.row_steps + n, max(s.peak_batch_size, n)
            s.batch_steps[n] = s.batch_steps.get(n, 0) + 1
        done = [self._emit(r, t) for r, t in zip(rows, self._sample(logits, rows))]
        if any(done):
            self._keep([i for i, d in enumerate(done) if not d])

    def _fast_step(self) -> LlamaDecodeStep | None:
        if self._step_fn is False:
            self._step_fn = LlamaDecodeStep.build(self.model, self._cache) if self._mergeable else None
        return self._step_fn or None

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._rows = [self._rows[i] for i in keep]

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """One token per row under the row's own temperature/top_p, drawn by inverse CDF from the row's stream."""
        out = logits.argmax(dim=-1)
        sampled = [k for k, r in enumerate(rows) if r.job.sampling.temperature > 0]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            temps = torch.tensor([rows[k].job.sampling.temperature for k in sampled], device=logits.device)
            scores = logits[idx].float() / temps[:, None]
            top_p = torch.tensor([rows[k].job.sampling.top_p for k in sampled], device=logits.device)
            if bool((top_p < 1).any()):
                sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
                probs = sorted_scores.softmax(dim=-1)
                drop = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]  # mass before it already reaches top_p
                drop[:, 0] = False  # the most likely token always stays (top_p 0 = greedy)
                scores = scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
            cdf = scores.softmax(dim=-1).cumsum(dim=-1)
            u = torch.cat([torch.rand(1, generator=rows[k].rng) for k in sampled]).to(cdf.device, cdf.dtype)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
            out[idx] = pick
        return out.tolist()

    def _emit(self, row: _Row, token: int) -> bool:
        """Take `token` for `row`, tell its job what text it adds; True when the row is finished."""
        row.tokens += 1
        finish = None
        if token in self.loaded.stop_ids:
            row.text.flush()
            finish = "stop"
        elif row.text.add(token):
            finish = "stop"
        elif row.tokens >= row.job.sampling.max_tokens or row.real + 1 >= self.loaded.context:
            finish = "stop" if row.text.flush() else "length"
        row.pending = token
        delta = row.text.take(final=finish is not None)
        if finish is None:
            if delta:
                row.job.on_event(Event(index=row.index, delta=delta))
            return False
        row.job.left -= 1
        with self._lock:
            self._stats.completion_tokens += row.tokens
            self._stats.requests += row.job.left == 0
        row.job.on_event(Event(index=row.index, delta=delta, finish=finish, tokens=row.tokens))
        self.log(f"batcher: choice {row.index} done: {row.tokens} tokens ({finish}), batch of up to "
                 f"{row.job.peak_batch} rows")
        return True
