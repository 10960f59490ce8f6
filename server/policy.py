"""The operator's policy for user code, applied to every run config the server hands to `runrl train`.

One function, `forced_config(settings, config)`, used twice: when a run is created (so the stored config and
its validation see what will run) and again when the worker starts it (so a server restarted with a stricter
policy applies it to runs already queued). A request can never set these keys itself:

- `sandbox_isolation`: `bwrap` while `Settings.require_isolation` holds (the default): without a working
  bubblewrap the run fails at once with a clear error and no user code (not even a pip build) runs.
- `reward_allow_network`: forced false unless `Settings.allow_user_network`.
- `reward_network`: always `filtered`, with `reward_allow_private_destinations` / `reward_allowed_destinations`
  from `Settings.allow_private_destinations` / `allowed_destinations` (the same outbound policy as MCP tools).
  So when the operator allows network, user code never shares the host's network namespace: it reaches out
  only through the sandbox's egress proxy (runrl_engine/sandbox/egress.py), to public addresses and the
  listed exceptions; loopback, private ranges and cloud metadata are refused. That needs bubblewrap: with
  `--allow-unisolated` on a host without it, a run that asks for network fails to start (EgressUnavailable).
  Every server this service starts (the API, deployments) requires a credential all the same.

`check_run_request(settings, body)` gives the field errors for what a request asked but the policy refuses.
Not covered here: destinations of MCP tools (runrl_engine/netpolicy.py), the sandbox itself (runrl_engine/sandbox).
"""

from __future__ import annotations

from typing import Any

from runrl_engine.errors import UserError
from runrl_engine.sandbox.requirements import check_requirements
from server.settings import Settings

POLICY_KEYS = frozenset({"sandbox_isolation", "reward_network", "reward_allow_private_destinations",
                         "reward_allowed_destinations"})  # never from a request body


def forced_config(settings: Settings, config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the operator's policy applied."""
    out = dict(config)
    out["sandbox_isolation"] = "bwrap" if settings.require_isolation else "auto"
    if not settings.allow_user_network:
        out["reward_allow_network"] = False
    out.update(reward_network="filtered", reward_allow_private_destinations=settings.allow_private_destinations,
               reward_allowed_destinations=list(settings.allowed_destinations))
    return out


def check_run_request(settings: Settings, body: dict[str, Any]) -> dict[str, str]:
    """Field -> why the policy refuses it (empty when the request is acceptable)."""
    errors: dict[str, str] = {}
    if body.get("reward_allow_network") is True and not settings.allow_user_network:
        errors["reward_allow_network"] = ("this server does not give user code network access (the operator can "
                                          "allow it with `runrl serve --allow-user-network`)")
    reqs = body.get("package_requirements")
    if isinstance(reqs, list):
        try:
            check_requirements(reqs, allow_urls=settings.allow_url_requirements)
        except UserError as exc:
            errors["package_requirements"] = exc.message + (f" ({exc.fix})" if exc.fix else "")
    return errors
