"""Loading the policy, its tokenizer and (when needed) a frozen reference model.

`model` may be a Hugging Face id, a local model directory, or `builtin:NAME` (an offline tiny model built by
`tiny.py`). LoRA adapters come from peft. This module does not decide *whether* a reference model is
needed (the trainer does: only when `beta > 0`, and under LoRA the adapter-disabled policy serves instead).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from runrl_engine.config import RunConfig
from runrl_engine.errors import ConfigError, UserError
from runrl_engine.tiny import resolve_model_path

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def resolve_device(cfg: RunConfig) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is visible", where="device",
                          fix="use `device: cpu` or `device: auto`, or check CUDA_VISIBLE_DEVICES")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def resolve_dtype(cfg: RunConfig, device: str) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def _model_path(cfg: RunConfig) -> str:
    """A local directory if one exists at that path, else a Hugging Face id (`org/name`)."""
    path = resolve_model_path(cfg.model)
    local = Path(path).expanduser()
    if local.exists():
        return str(local)
    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
        raise ConfigError(f"model directory {path!r} does not exist", where="model",
                          fix="give an existing local model directory, a Hugging Face id (org/name), or builtin:tiny")
    return path


def _hub_kwargs(cfg: RunConfig) -> dict[str, Any]:
    token = cfg.hf_token or os.environ.get("HF_TOKEN")
    return {"token": token} if token else {}


def load_tokenizer(cfg: RunConfig) -> Any:
    from transformers import AutoTokenizer

    path = _model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, **_hub_kwargs(cfg))
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load the tokenizer of {cfg.model!r}: {exc}", where="model",
                        fix="check the model id or path; gated models need `hf_token`; offline machines need a "
                            "local directory or builtin:tiny") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_CHAT_TEMPLATE  # base models: plain `role: content` turns
    return tok


def load_causal_lm(cfg: RunConfig, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = _model_path(cfg)
    attn = "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, **_hub_kwargs(cfg))
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load model {cfg.model!r}: {exc}", where="model",
                        fix="check the model id or path; gated models need `hf_token`; offline machines need a "
                            "local directory or builtin:tiny") from None
    return model.to(device)


def load_policy(cfg: RunConfig, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The trainable policy: the full model, or the model with a fresh LoRA adapter."""
    model = load_causal_lm(cfg, device, dtype)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_enabled:
        from peft import LoraConfig, get_peft_model

        targets: Any = cfg.lora_target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def load_reference(cfg: RunConfig, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of the base model (full fine-tuning with `beta > 0`)."""
    ref = load_causal_lm(cfg, device, dtype)
    ref.eval()
    ref.requires_grad_(False)
    return ref
