"""Outbound destination policy: which addresses the server, or a run's trainer, may connect to for a user.

One policy covers every connection made on a user's behalf to a URL the user chose: MCP tool servers
(`POST /tools/test-mcp`, tool registration, a run's rollouts) and, later, webhook targets. It exists so a
user cannot use the server as a proxy into the operator's own network (SSRF).

The rule:
- A public address (globally routable unicast) is allowed.
- Anything else is denied unless the policy allows it: loopback (127/8, ::1), private (RFC 1918, ULA
  fc00::/7 and the other IANA special-purpose blocks `ipaddress` marks private), link-local (169.254/16,
  which holds cloud metadata services, and fe80::/10), 0.0.0.0/8 and ::, multicast, reserved (240/4, ...),
  shared address space 100.64/10 (CGNAT), and IPv6 forms that carry one of those IPv4 addresses
  (IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d, 6to4 2002::/16, NAT64 64:ff9b::/96).
- `allow_private=True` allows every address. `allowed` lists explicit exceptions, each "host:port",
  "host" (any port), an IP ("127.0.0.1", "::1", "[::1]:8765", "127.0.0.1:8765") or a CIDR ("10.0.0.0/8",
  any port). An IP or CIDR entry matches the resolved address (IPv4-mapped IPv6 matches its IPv4 form).
  A name entry matches the URL's host name as written (case-insensitive, trailing dot ignored) and allows it
  whatever it resolves to: the operator trusts that name, so `localhost:8765` is how to allow a URL written
  with `localhost` (which resolves to 127.0.0.1 and ::1 — an entry `127.0.0.1:8765` alone does not cover ::1).
- A host name is resolved and EVERY address it resolves to must be allowed; one denied address refuses it.

Where it is enforced: at connect time, in the network layer of the HTTP client (`AsyncGuardedTransport`,
`GuardedTransport`, for `httpx` or the `httpx2` fork the `mcp` SDK uses). Each new TCP connection resolves the
host, checks every address, and connects to one of the addresses it checked (never by name again), so a name
that resolves to a public address when a tool is registered and to 127.0.0.1 later (DNS rebinding) is refused
when it is used. No window remains between check and connect: the socket is opened to the checked address
itself. TLS still verifies the certificate against the URL's host name. The transports also refuse every
redirect response (3xx; `RedirectRefused`), so no client-side redirect logic — httpx's, or the `mcp` SDK's
own same-origin following — sends a request (or replays a body) to a second URL. Environment proxies and
.netrc are not used (a proxy would make the connect-time check meaningless). `check_url` is the same check
without connecting, for a clear early refusal when a URL is registered.

Not covered: connections user code makes itself (reward functions, environments — that is the sandbox's
network policy), the timing of failures (a filtered port still times out slower than a closed one refuses), and
DNS answers themselves (a name's existence can be learnt from whether it is refused by policy or fails to
resolve). Unix sockets are refused. Standard library only at import time; `httpx`/`httpx2` are imported when a
transport is built.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?")
DEFAULT_PORTS = {"http": 80, "https": 443}
RESOLVE_TIMEOUT_S = 5.0


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, 6to4, NAT64), else None."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # ::a.b.c.d, the deprecated IPv4-compatible form (not :: or ::1)
        return ipaddress.IPv4Address(int(ip))
    return None


def address_category(ip: IPAddress) -> str | None:
    """None for a public address; else what it is ("loopback", "private", "link-local", ...)."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        return address_category(inner)
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return "unspecified (0.0.0.0/8 or ::)"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (169.254.0.0/16 or fe80::/10, where cloud metadata services live)"
    if ip.is_multicast:
        return "multicast"
    if ip in _CGNAT:
        return "shared (CGNAT 100.64.0.0/10)"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-public"
    return None


@dataclass(frozen=True)
class Destination:
    """One `allowed` entry, parsed: a host name, an address or a network, with an optional port."""

    text: str
    name: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def matches_name(self, host: str, port: int) -> bool:
        return self.name is not None and self.name == _norm_host(host) and self.port in (None, port)

    def matches_address(self, ip: IPAddress, port: int) -> bool:
        if self.network is None or self.port not in (None, port):
            return False
        forms = [ip] + ([ip.ipv4_mapped] if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else [])
        return any(form.version == self.network.version and form in self.network for form in forms)


def _norm_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"destination {entry!r}: the port must be a number from 1 to 65535")
    return int(text)


def parse_destination(entry: str) -> Destination:
    """Parse one allow-list entry; ValueError saying what is wrong with it."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError("a destination must be a non-empty string: host, host:port, an IP or a CIDR")
    text = entry.strip()
    if "://" in text:
        raise ValueError(f"destination {entry!r}: write host, host:port, an IP or a CIDR, not a URL")
    if "/" in text:
        try:
            return Destination(text, network=ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"destination {entry!r} is not a valid CIDR (e.g. 10.0.0.0/8 or fd00::/8)") from None
    host, port = text, None
    if text.startswith("["):  # [v6] or [v6]:port
        close = text.find("]")
        if close < 0 or (text[close + 1:] and not text[close + 1:].startswith(":")):
            raise ValueError(f"destination {entry!r}: write an IPv6 address with a port as [::1]:8765")
        host = text[1:close]
        if text[close + 1:]:
            port = _port(text[close + 2:], entry)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text, entry)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if ":" in host or not _HOST_NAME.fullmatch(host):
            raise ValueError(f"destination {entry!r} is not a host, host:port, IP address or CIDR") from None
        return Destination(text, name=_norm_host(host), port=port)
    return Destination(text, network=ipaddress.ip_network(ip), port=port)


class DestinationDenied(Exception):
    """A connection the policy refuses. `str()` is a complete message: what was refused, why, what allows it."""

    def __init__(self, host: str, port: int, category: str, address: str | None, hint: str) -> None:
        self.host, self.port, self.category, self.address = host, port, category, address
        where = f"{host} is" if address is None else f"{host} resolves to"
        text = f"{where} {'an' if category[0] in 'aeiou' else 'a'} {category} address, not a public one"
        super().__init__(f"destination {_hostport(host, port)} refused: {text}" + (f"; {hint}" if hint else ""))


class RedirectRefused(Exception):
    """A 3xx answer, which the guarded transports never follow."""

    def __init__(self, url: str, status: int, location: str | None) -> None:
        self.url, self.status, self.location = url, status, location
        to = f" to {location}" if location else ""
        super().__init__(f"{url} answered with a redirect (HTTP {status}{to}); redirects are not followed")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class DestinationPolicy:
    """Which destinations may be connected to. `hint` ends every refusal: what setting would allow it."""

    allow_private: bool = False
    allowed: tuple[str, ...] = ()
    hint: str = field(default="", compare=False)
    _parsed: tuple[Destination, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed", tuple(self.allowed))
        object.__setattr__(self, "_parsed", tuple(parse_destination(e) for e in self.allowed))

    def allows_name(self, host: str, port: int) -> bool:
        """Whether the host name itself is allowed (then its addresses are not checked)."""
        return self.allow_private or any(d.matches_name(host, port) for d in self._parsed)

    def refusal(self, host: str, port: int, ip: IPAddress | str) -> DestinationDenied | None:
        """None when `ip` (an address `host` resolved to, or `host` itself) may be connected to on `port`."""
        if self.allow_private:
            return None
        ip = ipaddress.ip_address(ip.split("%", 1)[0]) if isinstance(ip, str) else ip
        category = address_category(ip)
        if category is None or any(d.matches_address(ip, port) for d in self._parsed):
            return None
        literal = _is_ip(host)
        return DestinationDenied(_norm_host(host), port, category, None if literal else str(ip), self.hint)

    def check_addresses(self, host: str, port: int, addresses: Iterable[IPAddress | str]) -> None:
        """Raise `DestinationDenied` unless every address may be connected to (or the name is allowed)."""
        if self.allows_name(host, port):
            return
        for ip in addresses:
            if (denied := self.refusal(host, port, ip)) is not None:
                raise denied

    async def check_url(self, url: str, timeout_s: float = RESOLVE_TIMEOUT_S) -> bool:
        """Resolve the URL's host and raise `DestinationDenied` if the policy refuses it.

        Returns False when the name does not resolve (within `timeout_s`): that is not a refusal — the
        connect-time check still applies whenever the URL is used — and True when it was checked.
        """
        host, port = url_host_port(url)
        if self.allows_name(host, port):
            return True
        try:
            addresses = await asyncio.wait_for(_resolve_async(host, port), timeout_s)
        except (OSError, asyncio.TimeoutError, UnicodeError):
            return False
        self.check_addresses(host, port, addresses)
        return True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(_norm_host(host).split("%", 1)[0])
        return True
    except ValueError:
        return False


def url_host_port(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL, the port defaulted by scheme; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {url!r}")
    return parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme]


def _addresses(infos: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)))


async def _resolve_async(host: str, port: int) -> list[str]:
    import anyio  # an httpx dependency; works under asyncio and trio alike

    addresses = _addresses(await anyio.getaddrinfo(_norm_host(host), port, type=socket.SOCK_STREAM))
    if not addresses:
        raise OSError(f"{host} has no IPv4 or IPv6 address")
    return addresses


def _resolve(host: str, port: int) -> list[str]:
    addresses = _addresses(socket.getaddrinfo(_norm_host(host), port, type=socket.SOCK_STREAM))
    if not addresses:
        raise OSError(f"{host} has no IPv4 or IPv6 address")
    return addresses


# ---- the network layer of httpx / httpx2 ----------------------------------------------------------------------

def _modules(flavor: str) -> tuple[Any, Any]:
    if flavor == "httpx":
        import httpcore
        import httpx

        return httpx, httpcore
    if flavor == "httpx2":
        import httpcore2
        import httpx2

        return httpx2, httpcore2
    raise ValueError(f"flavor must be 'httpx' or 'httpx2', got {flavor!r}")


class _AsyncGuardedBackend:
    """An httpcore network backend: resolve, check every address, connect to a checked address."""

    def __init__(self, policy: DestinationPolicy, httpcore: Any, on_refusal: Callable[[Exception], None]) -> None:
        self.policy, self._core, self._on_refusal = policy, httpcore, on_refusal
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None) -> Any:
        import anyio

        if self.policy.allows_name(host, port):
            addresses = [host]
        else:
            try:
                with anyio.fail_after(timeout):
                    addresses = await _resolve_async(host, port)
            except TimeoutError:
                raise self._core.ConnectTimeout(f"resolving {host} timed out") from None
            except (OSError, UnicodeError) as e:
                raise self._core.ConnectError(f"could not resolve {host}: {e}") from None
            try:
                self.policy.check_addresses(host, port, addresses)
            except DestinationDenied as e:
                self._on_refusal(e)
                raise
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (self._core.ConnectError, self._core.ConnectTimeout) as e:
                last = e
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise self._core.ConnectError("unix sockets are not an allowed destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _SyncGuardedBackend:
    """The synchronous `_AsyncGuardedBackend`."""

    def __init__(self, policy: DestinationPolicy, httpcore: Any, on_refusal: Callable[[Exception], None]) -> None:
        self.policy, self._core, self._on_refusal = policy, httpcore, on_refusal
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> Any:
        if self.policy.allows_name(host, port):
            addresses = [host]
        else:
            try:  # getaddrinfo has no timeout of its own: the system resolver's applies
                addresses = _resolve(host, port)
            except (OSError, UnicodeError) as e:
                raise self._core.ConnectError(f"could not resolve {host}: {e}") from None
            try:
                self.policy.check_addresses(host, port, addresses)
            except DestinationDenied as e:
                self._on_refusal(e)
                raise
        last: Exception | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                               socket_options=socket_options)
            except (self._core.ConnectError, self._core.ConnectTimeout) as e:
                last = e
        assert last is not None
        raise last

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise self._core.ConnectError("unix sockets are not an allowed destination")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _redirect(request: Any, response: Any) -> RedirectRefused:
    location = response.headers.get("location")
    if location:  # no query, fragment or userinfo: they can carry state that does not belong in a message
        parts = urlsplit(str(request.url.join(location)))
        location = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
    safe = request.url.copy_with(query=None, fragment=None, userinfo=b"")
    return RedirectRefused(str(safe), response.status_code, location)


def _pool_kwargs(httpx: Any, limits: Any) -> dict[str, Any]:
    limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
    return {"max_connections": limits.max_connections,
            "max_keepalive_connections": limits.max_keepalive_connections,
            "keepalive_expiry": limits.keepalive_expiry}


class AsyncGuardedTransport:
    """An async httpx (or httpx2) transport that connects only where `policy` allows and never follows a 3xx.

    Use as `httpx.AsyncClient(transport=AsyncGuardedTransport(policy), trust_env=False)`. A refused
    connection raises `DestinationDenied`, a redirect answer `RedirectRefused` (the response is closed
    unread); both are also recorded in `refusals` (and passed to `on_refusal`), because a library above the
    transport may wrap or replace the exception. `ssl_context` None means `ssl.create_default_context()`.
    """

    def __init__(self, policy: DestinationPolicy, *, flavor: str = "httpx", ssl_context: Any = None,
                 http2: bool = False, limits: Any = None,
                 on_refusal: Callable[[Exception], None] | None = None) -> None:
        import ssl

        httpx, httpcore = _modules(flavor)
        self.policy = policy
        self.refusals: list[Exception] = []
        self._on_refusal = on_refusal
        context = ssl_context if ssl_context is not None else ssl.create_default_context()
        self._transport = httpx.AsyncHTTPTransport(verify=context, trust_env=False, http2=http2)
        if not hasattr(self._transport, "_pool"):  # the one private attribute this relies on
            raise RuntimeError(f"{flavor}.AsyncHTTPTransport has no _pool; the guarded transport needs updating")
        self._transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=context, http1=True, http2=http2, **_pool_kwargs(httpx, limits),
            network_backend=_AsyncGuardedBackend(policy, httpcore, self._refused))

    def _refused(self, exc: Exception) -> None:
        self.refusals.append(exc)
        if self._on_refusal is not None:
            self._on_refusal(exc)

    async def handle_async_request(self, request: Any) -> Any:
        response = await self._transport.handle_async_request(request)
        if 300 <= response.status_code < 400:
            await response.aclose()
            refused = _redirect(request, response)
            self._refused(refused)
            raise refused
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def __aenter__(self) -> AsyncGuardedTransport:
        await self._transport.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._transport.__aexit__(*exc)


class GuardedTransport:
    """The synchronous `AsyncGuardedTransport`, for `httpx.Client(transport=...)` (e.g. a webhook sender).

    Resolution uses the system resolver's timeout, not the request's connect timeout.
    """

    def __init__(self, policy: DestinationPolicy, *, flavor: str = "httpx", ssl_context: Any = None,
                 limits: Any = None, on_refusal: Callable[[Exception], None] | None = None) -> None:
        import ssl

        httpx, httpcore = _modules(flavor)
        self.policy = policy
        self.refusals: list[Exception] = []
        self._on_refusal = on_refusal
        context = ssl_context if ssl_context is not None else ssl.create_default_context()
        self._transport = httpx.HTTPTransport(verify=context, trust_env=False)
        if not hasattr(self._transport, "_pool"):
            raise RuntimeError(f"{flavor}.HTTPTransport has no _pool; the guarded transport needs updating")
        self._transport._pool = httpcore.ConnectionPool(
            ssl_context=context, **_pool_kwargs(httpx, limits),
            network_backend=_SyncGuardedBackend(policy, httpcore, self._refused))

    def _refused(self, exc: Exception) -> None:
        self.refusals.append(exc)
        if self._on_refusal is not None:
            self._on_refusal(exc)

    def handle_request(self, request: Any) -> Any:
        response = self._transport.handle_request(request)
        if 300 <= response.status_code < 400:
            response.close()
            refused = _redirect(request, response)
            self._refused(refused)
            raise refused
        return response

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> GuardedTransport:
        self._transport.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._transport.__exit__(*exc)
