"""Schemathesis hooks for tests/server/test_openapi.py (loaded by the CLI through SCHEMATHESIS_HOOKS).

The fixture objects the test made are in the environment variable RUNRL_FUZZ_FIXTURES (JSON):
`{"path": {param: [ids]}, "body": {field: [ids]}, "protected_key_id": N}`.

- Ids: each generated path parameter and body field that has fixtures is kept or replaced by one, independently,
  so the operations on a resource reach a real one (a random UUID only ever finds a 404) and a create-run body
  can name a real prompt file and a real reward file at once. No case deletes a fixture (Schemathesis also
  reuses ids it saw in responses), so they stay for the other operations.
- The fuzzing key: no case updates or deletes the key the run authenticates with (a generated `active: false`
  would leave every later request a 401).
- No outbound traffic: every URL the server might connect to (`mcp_url` of tools and test-mcp, `url` of
  webhooks) has its host replaced by `fuzz.invalid` (RFC 6761: never resolves), so a generated
  `http://1.1/` (1.0.0.1) is never contacted. The rewrite uses `urlsplit`, as the server does, on the value and
  on its stripped form, so whatever the server would read as an http(s) URL is rewritten.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import schemathesis
from hypothesis import strategies as st

FIXTURES: dict[str, Any] = json.loads(os.environ.get("RUNRL_FUZZ_FIXTURES") or "{}")
URL_FIELDS = ("mcp_url", "url")
SAFE_HOST = "fuzz.invalid"


def _with_fixtures(values: dict[str, Any] | None, pool: dict[str, list[Any]]) -> Any:
    """`values` with each field that has fixtures kept or replaced by one of them, independently."""
    if not values or not any(name in pool for name in values):
        return st.just(values)
    return st.fixed_dictionaries({name: st.one_of(st.just(value), st.sampled_from(pool[name])) if name in pool
                                  else st.just(value) for name, value in values.items()})


@schemathesis.hook
def flatmap_path_parameters(ctx: Any, path_parameters: dict[str, Any]) -> Any:
    return _with_fixtures(path_parameters, FIXTURES.get("path", {}))


@schemathesis.hook
def flatmap_body(ctx: Any, body: Any) -> Any:
    if not isinstance(body, dict):
        return st.just(body)
    return _with_fixtures(body, FIXTURES.get("body", {}))


def _is_protected_key(value: Any) -> bool:
    text = str(value)
    return text.isascii() and text.isdigit() and int(text) == FIXTURES.get("protected_key_id")


def _is_fixture(name: str, value: Any) -> bool:
    return str(value) in {str(v) for v in FIXTURES.get("path", {}).get(name, [])}


@schemathesis.hook
def filter_case(ctx: Any, case: Any) -> bool:
    params = case.path_parameters or {}
    if case.operation.path.startswith("/keys/{key_id}") and case.method.upper() in ("PUT", "DELETE"):
        return not _is_protected_key(params.get("key_id"))
    if case.method.upper() == "DELETE":  # the fixtures stay for the other operations (ids from responses, too)
        return not any(_is_fixture(name, value) for name, value in params.items())
    return True


def _safe_url(value: str) -> str:
    for candidate in (value, value.strip()):
        try:
            parts = urlsplit(candidate)
        except ValueError:
            continue
        if parts.scheme.lower() in ("http", "https"):
            return urlunsplit((parts.scheme, SAFE_HOST, parts.path, parts.query, parts.fragment))
    return value


@schemathesis.hook
def map_case(ctx: Any, case: Any) -> Any:
    if isinstance(case.body, dict):
        for name in URL_FIELDS:
            if isinstance(case.body.get(name), str):
                case.body[name] = _safe_url(case.body[name])
    return case
