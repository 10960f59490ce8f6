"""Name -> function tables behind config keys (`advantage_estimator`, `loss_type`, `rollout_backend`).

A `Registry` is a dict (so `set(LOSS_TYPES)` and `LOSS_TYPES[name]` work) that fills through a decorator,
refuses a name registered twice, and answers an unknown name with a ConfigError naming the config key and
listing every valid name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from runrl_engine.errors import ConfigError

F = TypeVar("F", bound=Callable[..., object])


class Registry(dict):
    def __init__(self, key: str, what: str):
        super().__init__()
        self.key, self.what = key, what  # the config key; how error messages name an entry

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: make `fn` available as `<key>: <name>`."""

        def decorator(fn: F) -> F:
            if name in self:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self[name] = fn
            return fn

        return decorator

    def lookup(self, name: str) -> Callable[..., object]:
        """The function registered as `name`; ConfigError listing the valid names otherwise."""
        try:
            return self[name]
        except KeyError:
            valid = ", ".join(sorted(self))
            raise ConfigError(f"unknown {self.what} {name!r}; valid: {valid}", where=self.key,
                              fix=f"set {self.key} to one of: {valid}") from None
