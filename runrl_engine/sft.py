"""SFT warm-start: a supervised pass over `sft_file` before RL, with TRL's `SFTTrainer`, on assistant tokens only.

`run_sft(model, tokenizer, cfg, out_dir, log=..., metrics=..., device=...)` trains the policy the RL trainer is
about to use, in place: the same module object, and under LoRA the same peft adapter, so RL continues from the
warm-started weights. The loss covers exactly each assistant turn's body plus its end-of-turn token (for ChatML
`<|im_end|>`, so the model learns to stop); system, user and tool turns, the template's role headers and what it
writes after the end-of-turn token (ChatML's newline) get label -100. Each logged step goes to `metrics` as
`{"step", "sft/loss", "sft/epoch", "sft/learning_rate"}`; `log` gets a line at the start and the end.

Which tokens are the assistant's, two ways:
- the template has `{% generation %}` markers, or TRL has a training version of it (Qwen2.5/Qwen3, Llama 3,
  Gemma, ...): TRL tokenises the conversations (`assistant_only_loss`). Kept for those because TRL's training
  templates also cover templates whose earlier turns change once a later turn is added (Qwen3's think blocks);
- any other template (SmolLM2's plain ChatML, the `add_tool_prompt`-patched ones): `conversation_ids` tokenises
  each conversation here, from renders of its growing prefixes, and TRL gets the `input_ids` / `assistant_masks`
  columns (its pre-tokenised path builds labels from them). The pieces are split and tokenised where a multi-turn
  rollout splits them (`ChatRenderer`: prompt, sampled turn, inserted turns, ...), so SFT trains on the token
  sequence RL would see; for ChatML the pieces meet at special tokens and equal the whole render's tokenisation.
  It needs the prefix property `ChatRenderer.continuation_ids` checks and an end-of-turn token (`eos_token`) after
  each assistant turn; a template without them is a clear `UserError`.
Either way `tools` are rendered into every example as they are into RL prompts, and rows are truncated at
`max_prompt_length + completion_length` tokens (rows left with no assistant token are dropped).

SFTTrainer leaves marks on the model it trains; `run_sft` undoes them so the RL loop gets the model as it gave it:
TRL replaces `forward` with a fused LM-head forward, `Trainer` switches every module to train mode, sets
`config.use_cache`, tags the model (`model_tags`) and marks it `_is_accelerate_prepared`; under bf16/fp16,
accelerate's `prepare` also wraps `forward` in autocast (`_original_forward`). So every module's plain attributes,
child modules, hooks and train/eval flags are snapshotted before and restored after (parameters keep their trained
values, in the same tensors), as are `use_cache` and the special-token ids of the configs and the global RNG states
that `SFTTrainer` reseeds. Gradient checkpointing is left as the model has it (TRL's default of turning it on is off).
Precision: fp32 on CPU; on a GPU the mixed-precision mode of the process's existing `Accelerator` (the RL
trainer's), since accelerate refuses a second one with another mode.

Batches: on the own-masks path (`padding_free`, the default), each batch's conversations run as one row of real
tokens, truncated here as TRL would truncate them, where that computes less: with flash attention always, with
sdpa/eager (a dense block-causal mask over the packed row) only when the data's padding costs more than the extra
attention (`forward.packed_rows_pay`; measured on SmolLM2 with 8 conversations of 56-183 tokens, packed was ~10 %
slower than padded). Otherwise, and on TRL's masking path (TRL does not enforce `max_length` on padding-free rows
it tokenises itself), one conversation per row, padded to the batch's longest.
Not covered: packing (conversations cut and regrouped into fixed-length rows, which changes what a step sees);
datasets other than the conversational `messages` form (`data.load_sft` turns prompt/completion lines into it);
on the own-masks path, conversations that open with an assistant turn, and messages the template itself cannot
render (SmolLM2's reads only `content`: tool calls there must be `<tool_call>` text, not structured
`tool_calls`); multi-process SFT
beyond what TRL/accelerate give (each process trains on its shard, as `Trainer` does); evaluation, checkpoints
or resume of the SFT phase (`save_strategy="no"`: a resumed run starts from its RL checkpoint, not from SFT).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

from runrl_engine.config import RunConfig
from runrl_engine.data import SFTExample, load_sft
from runrl_engine.errors import ConfigError, DataError, UserError
from runrl_engine.forward import packed_rows_pay
from runrl_engine.rollout.episodes import ChatRenderer

# The RL micro batch is sized for prompt + completion sequences, the same length budget SFT rows get, so it fits
# in memory; the cap keeps a very large value from collapsing SFT into a handful of optimizer steps.
MAX_SFT_BATCH = 32

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
_TOKEN_IDS = ("use_cache", "pad_token_id", "eos_token_id", "bos_token_id")


def run_sft(model: torch.nn.Module, tokenizer: Any, cfg: RunConfig, out_dir: Path, *, log: Callable[[str], None],
            metrics: Callable[[dict], None], device: str | torch.device,
            tools: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Train `model` in place on `cfg.sft_file`; return `{"sft/loss_first", "sft/loss_last", "sft/steps", ...}`.

    `tools` (OpenAI-style function schemas) are rendered into every example, as they are into RL prompts."""
    if not cfg.sft_file:
        raise ConfigError("SFT warm-start needs `sft_file`", where="sft_file", fix="set `sft_file: path/to/sft.jsonl`")
    examples = load_sft(cfg.sft_file)
    state = _ModelState(model)
    rng = _rng_state()
    t0 = time.perf_counter()
    losses: list[float] = []
    try:
        trainer = sft_trainer(model, tokenizer, cfg, examples, Path(out_dir), device=device,
                              callbacks=[_metrics_callback(metrics, losses)], tools=tools)
        kept = len(trainer.train_dataset)  # TRL drops rows whose assistant tokens all fall past max_length
        if not kept:
            raise DataError(f"no example has an assistant token within max_length={trainer.args.max_length} tokens",
                            where=str(cfg.sft_file), fix="raise max_prompt_length / completion_length or shorten "
                                                         "the conversations")
        dropped = f" ({len(examples) - kept} dropped: past max_length)" if kept < len(examples) else ""
        log(f"SFT warm-start: {kept} example(s){dropped} from {cfg.sft_file}, {cfg.sft_epochs} epoch(s), "
            f"lr {cfg.sft_learning_rate:g}, batch {trainer.args.per_device_train_batch_size}, "
            f"max_length {cfg.max_prompt_length + cfg.completion_length}"
            f"{', padding-free' if trainer.args.padding_free else ''}")
        t_train = time.perf_counter()
        result = trainer.train()
        train_s = time.perf_counter() - t_train
        steps = trainer.state.global_step
        del trainer
    finally:
        state.restore()
        _set_rng_state(rng)
    elapsed = time.perf_counter() - t0
    summary = {"sft/loss_first": losses[0] if losses else math.nan, "sft/loss_last": losses[-1] if losses else math.nan,
               "sft/steps": steps, "sft/examples": kept, "sft/train_loss": float(result.training_loss),
               "sft/time_s": elapsed, "sft/train_s": train_s}
    log(f"SFT warm-start done: {steps} step(s) in {elapsed:.1f}s, loss {summary['sft/loss_first']:.4f} -> "
        f"{summary['sft/loss_last']:.4f}")
    return summary


def sft_trainer(model: torch.nn.Module, tokenizer: Any, cfg: RunConfig, examples: list[SFTExample], out_dir: Path, *,
                device: str | torch.device, callbacks: list | None = None,
                tools: list[dict[str, Any]] | None = None) -> Any:
    """The configured `SFTTrainer` (dataset already tokenised and labelled). Building it patches `model`;
    `run_sft` restores it afterwards, so other callers (tests inspecting labels) should use a throwaway model."""
    import datasets
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    own_masks = not _trl_can_mask(tokenizer)
    max_length = cfg.max_prompt_length + cfg.completion_length
    batch = max(1, min(cfg.micro_batch_size, len(examples), MAX_SFT_BATCH))
    padding_free = own_masks and cfg.padding_free and _packs_exactly(model)
    if own_masks:  # before anything touches the model: a template we cannot use fails here
        where = str(cfg.sft_file or "sft_file")
        rows = [dict(zip(("input_ids", "assistant_masks"),
                         conversation_ids(tokenizer, ex.messages, tools, where=f"{where}:{ex.line}")))
                for ex in examples]
        if padding_free and not str(getattr(model.config, "_attn_implementation", "")).startswith("flash"):
            # sdpa/eager attend over every pair of the packed row: worth it only where padding costs more (FLOP
            # count over batches of the data in a seeded order, as the sampler would draw them)
            lengths = [min(len(row["input_ids"]), max_length) for row in rows]
            random.Random(cfg.seed).shuffle(lengths)
            padding_free = packed_rows_pay(model.config, [lengths[i:i + batch] for i in range(0, len(lengths), batch)])
        if padding_free:  # TRL enforces no max_length on padding-free rows: truncate (and drop) them here, as it would
            rows = [{k: v[:max_length] for k, v in row.items()} for row in rows]
            rows = [row for row in rows if any(row["assistant_masks"])]
            if not rows:
                raise DataError(f"no example has an assistant token within max_length={max_length} tokens",
                                where=where, fix="raise max_prompt_length / completion_length or shorten the "
                                                 "conversations")
        dataset = datasets.Dataset.from_list(rows)
    else:
        # One JSON value per message: Arrow's default typing merges the nested structs of all rows, so one row's
        # tool-call `arguments` would gain every other row's argument names as None (and the template would render
        # them).
        rows = [{"messages": ex.messages} for ex in examples]
        features = {"messages": datasets.List(datasets.Json())}
        if tools:  # TRL passes a JSON-string `tools` column to apply_chat_template
            rows = [{**row, "tools": json.dumps(tools)} for row in rows]
            features["tools"] = datasets.Value("string")
        dataset = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    on_cpu = torch.device(device).type == "cpu"
    precision = _mixed_precision(on_cpu)
    args = SFTConfig(
        output_dir=str(out_dir / "sft"),
        num_train_epochs=cfg.sft_epochs,
        learning_rate=cfg.sft_learning_rate,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_length=None if padding_free else max_length,
        # a batch's conversations as one row of real tokens, position ids restarting per conversation (what
        # transformers' sdpa/eager masks turn into a block-causal mask): the padded batch's loss and gradients
        padding_free=padding_free,
        # pre-tokenised rows are not conversational, which TRL's assistant_only_loss refuses; their
        # `assistant_masks` column becomes the labels' -100s all the same
        assistant_only_loss=not own_masks,
        packing=False,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=on_cpu,
        activation_checkpointing=False,  # the model keeps whatever `load_policy` set; TRL's default is True
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=not on_cpu,
    )
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # per-map progress bars would flood the run's stderr
    try:
        # peft_config=None: a PeftModel trains the adapter it has, a full model trains all weights; never a new one
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=callbacks, peft_config=None)
    finally:
        if bars:
            datasets.enable_progress_bars()
    trainer.remove_callback(PrinterCallback)  # steps go to `metrics`, not to stdout
    return trainer


def conversation_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
                     where: str = "sft_file") -> tuple[list[int], list[int]]:
    """`(input_ids, assistant_masks)` of one conversation under `tokenizer`'s chat template (with `tools`).

    Mask 1 exactly on each assistant turn's tokens up to and including the last end-of-turn token
    (`tokenizer.eos_token`) the template writes in that turn; 0 on everything else. Turn boundaries come from
    renders of growing prefixes: assistant turn i starts where the render of `messages[:i]` with the generation
    prompt ends, and ends at that end-of-turn token in the render of `messages[:i + 1]`; each render must be a
    prefix of the whole conversation's render (else `UserError`). The text between boundaries is tokenised piece
    by piece, as `ChatRenderer` tokenises a multi-turn rollout (prompt ids, then each inserted stretch on its own).
    """
    renderer = ChatRenderer(tokenizer, tools)
    eot = tokenizer.eos_token

    def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        try:
            return renderer.render(msgs, add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - a Jinja error on the user's data: say which example
            raise DataError(f"the model's chat template cannot render this conversation ({type(exc).__name__}: "
                            f"{exc})", where=where, fix="write messages the template reads (e.g. tool calls as "
                            "<tool_call> blocks in the assistant `content`)") from exc

    full = render(messages, False)
    bounds = [0]  # character offsets in `full`: piece k is full[bounds[k]:bounds[k + 1]], assistant pieces odd
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i == 0:
            raise DataError("the conversation opens with an assistant turn, which has no prompt to follow",
                            where=where, fix="start it with a system or user message")
        head = render(messages[:i], True)
        turn = render(messages[: i + 1], False)
        if not (turn.startswith(head) and full.startswith(turn)) or len(head) < bounds[-1]:
            raise UserError("the model's chat template renders earlier turns differently once a later turn is "
                            "added, so the assistant tokens of an SFT conversation cannot be located",
                            where="model", fix="use a model whose chat template keeps earlier turns unchanged, or "
                            "one with {% generation %} markers (or that TRL knows: Qwen2.5/Qwen3, Llama 3, ...)")
        cut = turn.rfind(eot, len(head)) if eot else -1
        if cut == -1:
            raise UserError(f"the model's chat template writes no end-of-turn token ({eot!r}) after an assistant "
                            "turn and has no {% generation %} markers TRL could use instead, so SFT cannot teach "
                            "the model where its turns end", where="model",
                            fix="use a chat (instruct) model whose template closes turns with its end-of-turn "
                                "token, or drop `sft_file`")
        bounds += [len(head), cut + len(eot)]
    bounds.append(len(full))
    ids: list[int] = []
    mask: list[int] = []
    for k in range(len(bounds) - 1):
        piece = renderer.encode(full[bounds[k]:bounds[k + 1]]) if bounds[k + 1] > bounds[k] else []
        ids += piece
        mask += [k % 2] * len(piece)
    return ids, mask


# ---- helpers --------------------------------------------------------------------------------------------------

def _trl_can_mask(tokenizer: Any) -> bool:
    """True when TRL's `assistant_only_loss` works with this template: it has `{% generation %}` markers, or TRL
    ships a training version of it."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if not template or has_generation_markers(template):
        return True  # no template at all: TRL's own error says so
    try:
        get_training_chat_template(tokenizer)
    except ValueError:  # "not training-compatible and patching is not supported"
        return False
    return True


def _packs_exactly(model: torch.nn.Module) -> bool:
    """Whether a padding-free batch (conversations end to end in one row, no attention mask) gives this model the
    padded batch's results: transformers turns restarting position ids into a block-causal mask for sdpa and
    eager attention (flash attention takes the sequence boundaries TRL passes); other kernels would let one
    conversation attend to the one before it."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def _mixed_precision(on_cpu: bool) -> str:
    """The accelerate mixed-precision mode for SFT. accelerate's state is per process and refuses a second
    `Accelerator` with a different mode, so an existing one (the RL trainer's) decides; else fp32 on CPU, bf16 on
    GPUs that have it."""
    from accelerate.state import AcceleratorState

    existing = AcceleratorState._shared_state.get("_mixed_precision")
    if existing is not None:
        return str(existing)
    if on_cpu:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "no"


def _metrics_callback(metrics: Callable[[dict], None], losses: list[float]) -> Any:
    """A `TrainerCallback` forwarding each logged training step (`logging_steps=1`: every step) to `metrics`."""
    from transformers import TrainerCallback

    class SFTMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return  # the end-of-training summary has `train_loss`, not `loss`
            losses.append(float(logs["loss"]))
            metrics({"step": state.global_step, "sft/loss": float(logs["loss"]),
                     "sft/epoch": float(logs.get("epoch", state.epoch or 0.0)),
                     "sft/learning_rate": float(logs.get("learning_rate", 0.0))})

    return SFTMetrics()


class _ModelState:
    """A snapshot of everything about a module tree except parameter and buffer values: per module its plain
    attributes (train/eval flag, `forward` overrides, checkpointing flags, ...), child modules and hooks; plus the
    config keys `Trainer` touches. `restore()` puts all of it back and drops attributes and hooks added since."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = [(m, self._attrs(m), dict(m._modules), {h: dict(getattr(m, h, {})) for h in _HOOK_DICTS})
                        for m in model.modules()]
        self.configs = [(c, {k: getattr(c, k) for k in _TOKEN_IDS if hasattr(c, k)}) for c in self._configs(model)]

    @staticmethod
    def _attrs(m: torch.nn.Module) -> dict[str, Any]:
        return {k: v for k, v in m.__dict__.items() if not isinstance(v, dict)}  # dicts: params, buffers, hooks

    @staticmethod
    def _configs(model: torch.nn.Module) -> list[Any]:
        seen, out = set(), []
        for m in model.modules():
            for c in (getattr(m, "config", None), getattr(m, "generation_config", None)):
                if c is not None and not isinstance(c, dict) and id(c) not in seen:
                    seen.add(id(c))
                    out.append(c)
        return out

    def restore(self) -> None:
        for m, attrs, children, hooks in self.modules:
            for key in [k for k, v in m.__dict__.items() if not isinstance(v, dict) and k not in attrs]:
                delattr(m, key)
            m.__dict__.update(attrs)
            m._modules.clear()
            m._modules.update(children)
            for name, before in hooks.items():
                current = getattr(m, name, None)
                if current is not None:
                    for key in [k for k in current if k not in before]:
                        del current[key]
        for c, values in self.configs:
            for k, v in values.items():
                setattr(c, k, v)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
