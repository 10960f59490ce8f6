"""The egress proxy: the only way out of a bubblewrap sandbox whose network is filtered (`reward_network: filtered`).

Such a sandbox has its own network namespace with nothing but loopback, so user code has no route anywhere.
Its trusted worker (`_worker.py`, before user code loads) listens on 127.0.0.1:`EGRESS_PORT` inside that
namespace and relays each connection to a Unix socket bound into the sandbox (`EGRESS_SOCKET_INSIDE`);
`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` (and the lower-case forms) point there, so requests, httpx, urllib,
the OpenAI client and curl use it. On the trainer's side of that socket, `EgressProxy` is an HTTP proxy:

- `CONNECT host:port` (HTTPS and any other TCP tunnel) and absolute-form plain HTTP (`GET http://host/path`)
  are accepted; anything else (origin-form requests, `https://` absolute URLs, malformed heads) gets 400.
- The host is resolved here and EVERY address it resolves to is checked with the run's
  `netpolicy.DestinationPolicy` (public addresses allowed; loopback, private, link-local/metadata, CGNAT ...
  denied unless allowed). Denied: `403` whose status line and body give the reason, and no connection is
  attempted. Then it connects to a checked address itself (never by name again, so DNS rebinding between the
  check and the connection cannot happen); unresolvable or unreachable: `502`.
- A tunnel answers `200 Connection established` and pumps bytes both ways. A plain HTTP request is forwarded
  in origin form with `Connection: close` (proxy and hop-by-hop headers dropped): the upstream closes after
  answering, so a client's next request, whatever its host, comes on a new connection and is checked anew
  (bytes a client pipelines after the first request still go only to the destination already checked).
- Bounded: at most `max_connections` at once (more get 503 at once), `header_timeout_s` to send a request
  head of at most 16 KiB, `idle_timeout_s` without a byte either way ends a connection; `close()` (called by the
  pool) ends every connection and removes its socket.

Not covered: what travels inside an allowed tunnel (TLS is end to end; nothing is inspected), UDP (DNS
included: user code never resolves names itself, the proxy does), a name's existence (refused by policy vs
failing to resolve can be told apart), and the subprocess fallback (it cannot cut the network, so a filtered
network refuses to start there: `EgressUnavailable`). The pip sandbox that installs `package_requirements` keeps
the host network (it must reach the package index). The socket is owner-only (0600) in a 0700 directory (the
pool's, or a private one in the temp dir when that path is too long for a socket address): the sandbox's
user is the trainer's uid mapped into its user namespace (or root without capabilities), which owner
permissions admit; no other host user can reach the proxy.
"""

from __future__ import annotations

import ipaddress
import os
import re
import selectors
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from runrl_engine.errors import UserError
from runrl_engine.netpolicy import DestinationDenied, DestinationPolicy

EGRESS_SOCKET_INSIDE = "/run/runrl-egress.sock"  # where the proxy's socket appears inside bubblewrap
EGRESS_PORT = 3128  # the worker's forwarder on the sandbox's own loopback (its network namespace is private)
MAX_HEAD = 16 << 10
_MAX_UNIX_PATH = 107  # sun_path holds 108 bytes, NUL included
_LOGGED_REFUSALS = 20  # user code may retry in a loop: the trainer's log gets the first few only
_CHUNK = 1 << 16
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te",
               "trailer", "upgrade"}


class EgressUnavailable(UserError):
    """A filtered network was asked for where it cannot be enforced (no bubblewrap): user code does not run."""

    def __init__(self, reason: str):
        super().__init__(f"reward_network: filtered needs a bubblewrap sandbox, and the user code would run "
                         f"unconfined here ({reason}): the network could not be filtered",
                         where="reward_network",
                         fix="install bubblewrap and allow it user namespaces (`runrl serve` requires it anyway), "
                             "or, on a machine only you use, set reward_network: host or reward_allow_network: false")


def proxy_env(port: int = EGRESS_PORT) -> dict[str, str]:
    """The environment that sends a sandbox's HTTP clients to its forwarder (nothing bypasses it)."""
    url = f"http://127.0.0.1:{port}"
    names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
    return {**dict.fromkeys(names, url), "NO_PROXY": "", "no_proxy": ""}


@dataclass
class EgressStats:
    """Counters since the proxy started."""

    requests: int = 0          # request heads received (CONNECT or absolute-form)
    refused: int = 0           # 403: the policy denied the destination (no connection attempted)
    failed: int = 0            # 502: did not resolve, or no checked address accepted the connection
    bad_requests: int = 0      # 400/405: not a request this proxy serves
    busy: int = 0              # 503: max_connections were already open
    connect_attempts: int = 0  # TCP connections tried to checked addresses
    connected: int = 0         # of which succeeded (tunnels and forwarded requests)


class _Reject(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


_STATUS = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 502: "Bad Gateway",
           503: "Service Unavailable"}


def _response(status: int, reason: str) -> bytes:
    # The reason goes into the status line too: urllib, requests and http.client's tunnels show only that.
    line = re.sub(r"[^\x20-\x7e]", "?", reason)[:1000]
    body = (line + "\n").encode()
    return (f"HTTP/1.1 {status} {_STATUS[status]}: {line}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nX-RunRL-Egress: {status}\r\n\r\n").encode() + body


def _host_port(text: str, default: int | None) -> tuple[str, int]:
    """host:port or [v6]:port (the port optional when `default` is given); _Reject(400) otherwise."""
    host, port_text = text, ""
    if text.startswith("["):
        close = text.find("]")
        host, rest = text[1:close], text[close + 1:]
        if close < 0 or (rest and not rest.startswith(":")):
            raise _Reject(400, f"bad host {text[:100]!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise _Reject(400, f"write an IPv6 address in brackets: {text[:100]!r}")
    if not port_text and default is None:
        raise _Reject(400, "CONNECT needs host:port")
    if port_text and (not port_text.isdigit() or not 1 <= int(port_text) <= 65535):
        raise _Reject(400, f"bad port in {text[:100]!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST.fullmatch(host) or ".." in host:
            raise _Reject(400, f"bad host {text[:100]!r}") from None
    return host, int(port_text) if port_text else int(default)  # type: ignore[arg-type]


class EgressProxy:
    """An HTTP proxy on a Unix socket that connects only where `policy` allows; see the module docstring."""

    def __init__(self, policy: DestinationPolicy, socket_path: Path | None = None, *, max_connections: int = 64,
                 header_timeout_s: float = 10.0, idle_timeout_s: float = 300.0, connect_timeout_s: float = 10.0,
                 log: Callable[[str], None] | None = None):
        """`socket_path` (in a directory only we can enter): where to listen. None, or a path longer than a Unix
        socket address allows, means a fresh private directory in the system's temp dir, removed by close()."""
        self._own_dir: Path | None = None
        if socket_path is None or len(os.fsencode(str(socket_path))) > _MAX_UNIX_PATH:
            self._own_dir = Path(tempfile.mkdtemp(prefix="runrl-egress-"))
            socket_path = self._own_dir / "egress.sock"
        self.policy, self.path = policy, Path(socket_path)
        self.max_connections = max_connections
        self.header_timeout_s, self.idle_timeout_s, self.connect_timeout_s = header_timeout_s, idle_timeout_s, \
            connect_timeout_s
        self.stats = EgressStats()
        self._log = log or (lambda message: None)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()  # every socket of a live connection, to end them on close()
        self._threads: set[threading.Thread] = set()
        self._closing = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # the socket is created owner-only: no window with wider permissions
            try:
                self._listener.bind(str(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            self._listener.listen(max_connections)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            self._remove_socket()
            raise
        self._accepter = threading.Thread(target=self._accept_loop, name="runrl-egress-accept", daemon=True)
        self._accepter.start()

    def __enter__(self) -> EgressProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, end every open connection, wait briefly for the handlers, remove the socket."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            live = list(self._open)
        for s in live:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv, connect or select
            except OSError:
                pass
        self._accepter.join(timeout=5)
        self._listener.close()
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + 5
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._remove_socket()

    def _remove_socket(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    # ---- accepting ------------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        try:
            while not self._closing:
                if not sel.select(timeout=0.25):
                    continue
                try:
                    client, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return
                with self._lock:
                    full = len(self._threads) >= self.max_connections
                    if not full and not self._closing:
                        thread = threading.Thread(target=self._serve, args=(client,), name="runrl-egress", daemon=True)
                        self._threads.add(thread)
                        self._open.add(client)
                if full:
                    self._count("busy")
                    self._reply_and_close(client, 503, f"the sandbox already has {self.max_connections} connections "
                                                       "open through its proxy")
                elif self._closing:
                    client.close()
                else:
                    thread.start()
        finally:
            sel.close()

    def _reply_and_close(self, client: socket.socket, status: int, reason: str) -> None:
        try:
            client.settimeout(2)
            client.sendall(_response(status, reason))
        except OSError:
            pass
        finally:
            client.close()

    # ---- one connection -------------------------------------------------------------------------------------

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            try:
                head, rest = self._read_head(client)
                self._count("requests")
                method, host, port, forward = self._parse(head)
                upstream = self._connect(host, port)
            except _Reject as exc:
                self._count({403: "refused", 502: "failed"}.get(exc.status, "bad_requests"))
                if exc.status == 403 and self.stats.refused <= _LOGGED_REFUSALS:
                    more = " (further refusals are counted, not logged)" if self.stats.refused == _LOGGED_REFUSALS else ""
                    self._log(f"sandbox egress refused: {exc.reason}{more}")
                client.settimeout(2)
                client.sendall(_response(exc.status, exc.reason))
                return
            if method == "CONNECT":
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self._relay(client, upstream, rest)
            else:
                self._relay(client, upstream, forward + rest)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(client)
                if upstream is not None:
                    self._open.discard(upstream)
                self._threads.discard(threading.current_thread())
            for s in (client, upstream):
                if s is not None:
                    s.close()

    def _read_head(self, client: socket.socket) -> tuple[bytes, bytes]:
        """The request head (up to the blank line) and whatever followed it; _Reject(400) if too long or slow."""
        deadline = time.monotonic() + self.header_timeout_s
        data = bytearray()
        while True:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                return bytes(data[:end]), bytes(data[end + 4:])
            if len(data) > MAX_HEAD:
                raise _Reject(400, f"the request head is longer than {MAX_HEAD} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Reject(400, f"no complete request head within {self.header_timeout_s:g} s")
            client.settimeout(left)
            try:
                chunk = client.recv(_CHUNK)
            except socket.timeout:
                continue
            if not chunk:
                raise OSError("the client closed the connection")
            data += chunk

    def _parse(self, head: bytes) -> tuple[str, str, int, bytes]:
        """(method, host, port, the head to send upstream: empty for CONNECT)."""
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise _Reject(400, "not an HTTP request line") from None
        if not version.startswith("HTTP/1."):
            raise _Reject(400, f"unsupported protocol {version[:20]!r}")
        if method == "CONNECT":
            host, port = _host_port(target, None)
            return method, host, port, b""
        if not re.fullmatch(r"[A-Z]{1,20}", method):
            raise _Reject(400, "bad method")
        if target.startswith("/"):
            raise _Reject(400, "this is a proxy: send absolute URLs (http://host/path) or CONNECT host:port")
        parts = urlsplit(target)
        if parts.scheme.lower() != "http" or not parts.netloc:
            raise _Reject(400, f"only http:// URLs are forwarded (use CONNECT for https), not {target[:100]!r}")
        host, port = _host_port(parts.netloc.rsplit("@", 1)[-1], 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = []
        dropped = set(_HOP_BY_HOP)
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _Reject(400, "malformed header line")
            if name.lower() == "connection":
                dropped.update(v.strip().lower() for v in value.split(","))
        for line in lines[1:]:
            if line.partition(":")[0].lower() not in dropped:
                headers.append(line)
        if not any(h.partition(":")[0].lower() == "host" for h in headers):
            headers.append(f"Host: {parts.netloc.rsplit('@', 1)[-1]}")
        forward = "\r\n".join([f"{method} {path} {version}", *headers, "Connection: close", "", ""])
        return method, host, port, forward.encode("latin-1")

    def _connect(self, host: str, port: int) -> socket.socket:
        """Resolve, check every address (_Reject 403), connect to a checked one (_Reject 502)."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise _Reject(502, f"could not resolve {host}: {exc}") from None
        addresses = list(dict.fromkeys((info[0], info[4][0]) for info in infos
                                       if info[0] in (socket.AF_INET, socket.AF_INET6)))
        if not addresses:
            raise _Reject(502, f"{host} has no IPv4 or IPv6 address")
        try:
            self.policy.check_addresses(host, port, [address for _, address in addresses])
        except DestinationDenied as exc:
            raise _Reject(403, str(exc)) from None
        last: OSError | None = None
        for family, address in addresses:
            s = socket.socket(family, socket.SOCK_STREAM)
            with self._lock:
                if self._closing:
                    s.close()
                    raise OSError("the proxy is closing")
                self._open.add(s)
            self._count("connect_attempts")
            try:
                s.settimeout(self.connect_timeout_s)
                s.connect((address, port))
            except OSError as exc:
                last = exc
                with self._lock:
                    self._open.discard(s)
                s.close()
                continue
            self._count("connected")
            return s
        raise _Reject(502, f"could not connect to {host} port {port}: {last}")

    def _relay(self, a: socket.socket, b: socket.socket, to_b: bytes) -> None:
        """Pump bytes both ways until both sides are done, one fails, `idle_timeout_s` passes or we close.
        Each side's end of stream is passed on (half-close), so request/response protocols finish cleanly."""
        peer = {a: b, b: a}
        out = {a: bytearray(), b: bytearray(to_b)}  # bytes waiting to be written to the key
        reading = {a: True, b: True}
        shut = {a: False, b: False}
        for s in (a, b):
            s.setblocking(False)
        sel = selectors.DefaultSelector()
        registered: dict[socket.socket, int] = {}
        last = time.monotonic()
        try:
            while not self._closing:
                for s in (a, b):
                    if not reading[peer[s]] and not out[s] and not shut[s]:
                        shut[s] = True  # the other side finished and everything it sent is delivered
                        try:
                            s.shutdown(socket.SHUT_WR)
                        except OSError:
                            return
                    events = (selectors.EVENT_READ if reading[s] and len(out[peer[s]]) < 4 * _CHUNK else 0) | \
                             (selectors.EVENT_WRITE if out[s] else 0)
                    if events != registered.get(s, 0):
                        if not events:
                            sel.unregister(s)
                            registered.pop(s)
                        elif s in registered:
                            sel.modify(s, events)
                            registered[s] = events
                        else:
                            sel.register(s, events)
                            registered[s] = events
                if not registered:
                    return
                ready = sel.select(timeout=min(1.0, self.idle_timeout_s))
                now = time.monotonic()
                if not ready:
                    if now - last >= self.idle_timeout_s:
                        return
                    continue
                last = now
                for key, events in ready:
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    if events & selectors.EVENT_WRITE:
                        try:
                            del out[s][:s.send(out[s])]
                        except (BlockingIOError, InterruptedError):
                            pass
                    if events & selectors.EVENT_READ:
                        try:
                            data = s.recv(_CHUNK)
                        except (BlockingIOError, InterruptedError):
                            continue
                        if data:
                            out[peer[s]] += data
                        else:
                            reading[s] = False
        finally:
            sel.close()
