"""runrl-engine: self-hosted RunRL.

`from runrl_engine import RunConfig, train`. This module stays light: importing it does not import torch;
`train` is resolved on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runrl_engine.config import RunConfig, load_config

__all__ = ["RunConfig", "load_config", "train", "__version__"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from runrl_engine.trainer import train


def __getattr__(name: str) -> Any:
    if name == "train":
        from runrl_engine.trainer import train

        return train
    raise AttributeError(f"module 'runrl_engine' has no attribute {name!r}")
