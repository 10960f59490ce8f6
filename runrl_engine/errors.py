"""User-facing errors: mistakes in a config, a data file or user code.

The CLI prints these as one clear message (no traceback) and exits non-zero; the API turns them into a
422 envelope. Anything that is *not* a `UserError` is a bug in the engine and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. `where` names the file/line/key; `fix` says what to do."""

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class ConfigError(UserError):
    """A bad run configuration (unknown key, value out of range, missing required key)."""


class DataError(UserError):
    """A bad prompt / SFT JSONL file."""


class UserCodeError(UserError):
    """Reward-function or environment code that cannot be used (syntax error, missing `reward_fn`, ...)."""


class TrainingAborted(UserError):
    """Training stopped on purpose because continuing would be meaningless (e.g. every reward failing)."""
