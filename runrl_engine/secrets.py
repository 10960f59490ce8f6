"""Secret detection and redaction, shared by the engine, the sandbox and the server (stdlib only).

`redact(text, secrets)` replaces each known secret value (the run's `hf_token`, `reward_secrets`, this process's
secret-looking environment values) and every token-shaped string, whoever's it is: Hugging Face tokens
(`hf_...`), this API's keys (`rl_<8>_<32>`, and the older `rl-` form) and OpenAI-style keys (`sk-...`). The
engine marks a redaction `[REDACTED]` (logs.txt, sandbox error texts, reward info); the server, which
redacts logs again before it serves them, writes `***` as config.yaml does. `is_secret_name` says which
environment variables never reach user code, and `env_secret_values` collects their values; `secret_values`
flattens a run's secrets as the server stores them.

Not covered: config fields marked secret (`RunConfig.to_dict(redact=True)`, runrl_engine/config.py), the
scrubbed environment of a sandbox worker (runrl_engine/sandbox/isolation.py `worker_env`), and secrets
split across two writes, which no text filter can see.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping

MARK = "[REDACTED]"  # the engine's
SERVED_MARK = "***"  # the server's, in logs it serves and rewrites (config.yaml shows a secret field so)
MIN_SECRET_LENGTH = 4  # a shorter value would blank out ordinary text; config.py refuses shorter reward_secrets

_SECRET_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
_KNOWN_SECRET_VARS = ("hf_token", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY")
TOKEN_PATTERNS = tuple(re.compile(p) for p in (
    r"\bhf_[A-Za-z0-9]{8,}",                      # Hugging Face tokens
    r"\brl[_-][A-Za-z0-9]{4,}_[A-Za-z0-9]{8,}",   # RunRL keys: rl_<8>_<32> (and the older rl-)
    r"\bsk-[A-Za-z0-9_\-]{12,}",                  # OpenAI-style keys
))


def is_secret_name(name: str) -> bool:
    """Environment variable names that must never reach user code."""
    return name.upper().startswith("RUNRL_") or name in _KNOWN_SECRET_VARS or bool(_SECRET_NAME.search(name))


def env_secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of this process's secret-looking variables, to redact from anything user code prints."""
    env = os.environ if environ is None else environ
    return [v for k, v in env.items() if is_secret_name(k) and len(v) >= 6]


def secret_values(secrets: Mapping[str, Any]) -> list[str]:
    """The values of a run's secrets as the server holds them (`{"hf_token": "hf_...", "reward_secrets":
    {NAME: value}}`), each `{NAME: value}` mapping flattened to its values."""
    return [v for value in secrets.values() for v in (value.values() if isinstance(value, Mapping) else [value])
            if isinstance(v, str) and v]


def redact(text: str, secrets: Iterable[str] = (), *, mark: str = MARK) -> str:
    """`text` with each of `secrets` (values of at least MIN_SECRET_LENGTH characters) and each token-shaped
    string replaced by `mark`. Longer values go first, so a secret that contains another leaves no tail."""
    for value in sorted({s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LENGTH}, key=len,
                        reverse=True):
        text = text.replace(value, mark)
    for pattern in TOKEN_PATTERNS:
        text = pattern.sub(mark, text)
    return text
