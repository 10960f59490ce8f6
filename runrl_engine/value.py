"""Value models for PPO: a scalar value head on a causal LM's last hidden state.

Two layouts, chosen by `critic`:

- `head` (`PolicyWithValue`): the head sits on the policy's own backbone, so one forward gives the completion
  tokens' logits and their values, and the value loss also trains the shared backbone (or its LoRA adapter).
- `separate` (`ValueModel`): a second copy of the model with its own head; its LM head is frozen and unused
  (and with tied embeddings the input embeddings with it). Under LoRA it gets its own adapter.

Alignment: the value at completion index `t` is read from the hidden state that predicts completion token `t`
(the state before it is sampled), the same position whose logits give that token's log-probability, so values,
log-probs and the loss mask of a `RolloutBatch` line up index for index. Both forwards take an optional KV
`cache` (the update's shared-prompt forward, `runrl_engine.forward`).

The head starts at zero (every value 0, explained variance 0) and runs in fp32 even under bf16 autocast: value
targets are sums of rewards, and bf16's 8 bits would round the differences the value loss learns from.

Not covered: a critic with a different architecture or initial weights than the policy (no config key names
one), and reward models with value heads loaded from the Hub. A `separate` critic starts from `model`'s weights,
not from the policy after an SFT warm-start (`sft_file`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class ValueHead(nn.Module):
    """hidden [..., H] -> value [...], computed in fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.linear(hidden.float()).squeeze(-1)


def _hidden_size(lm: nn.Module) -> int:
    config = lm.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


def _last_hidden(out: Any, keep: int | Tensor) -> Tensor:
    """The final hidden states at the positions the logits were kept for: the last `keep` (0 = all), or the
    positions listed in a 1-D tensor (transformers' `logits_to_keep` convention)."""
    # `hidden_states[-1]` is the final (normed) hidden state: transformers 5 ties it to `last_hidden_state`
    hidden = out.hidden_states[-1]
    return hidden[:, keep] if isinstance(keep, Tensor) else hidden[:, -keep:]


class PolicyWithValue(nn.Module):
    """The policy and a value head on its backbone; `forward` returns (logits [B, K, V], values [B, K])."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = ValueHead(_hidden_size(policy)).to(next(policy.parameters()).device)

    def forward(self, *, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                logits_to_keep: int | Tensor, cache: Any = None) -> tuple[Tensor, Tensor]:
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=logits_to_keep, output_hidden_states=True, cache=cache,
                          use_cache=cache is not None)
        return out.logits, self.value_head(_last_hidden(out, logits_to_keep))

    def value_parameters(self) -> list[nn.Parameter]:
        return list(self.value_head.parameters())


class ValueModel(nn.Module):
    """A separate critic: a causal LM's backbone and a value head; `forward` returns values [B, K]."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        head = lm.get_output_embeddings()
        if head is not None:
            head.requires_grad_(False)  # unused: DDP must not wait for its gradient
        self.value_head = ValueHead(_hidden_size(lm)).to(next(lm.parameters()).device)

    def forward(self, *, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                logits_to_keep: int | Tensor, cache: Any = None) -> Tensor:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      logits_to_keep=1, output_hidden_states=True, cache=cache, use_cache=cache is not None)
        return self.value_head(_last_hidden(out, logits_to_keep))


def load_critic(cfg: Any, device: str, dtype: torch.dtype) -> ValueModel:
    """`critic: separate`: a fresh copy of `cfg.model` (with its own LoRA adapter under `use_lora`) and a head."""
    from runrl_engine.models import load_policy

    return ValueModel(load_policy(cfg, device, dtype))
