"""Reaching upstream hosts: a name is checked against the addresses it resolves to, and the
connection goes to an address that was checked.

An allow-list of names alone is not enough: a name on it may resolve (or be made to
resolve) to the metadata endpoint, loopback or a private network. `resolve_checked`
refuses those unless ROTATION_ALLOWED_NETWORKS lists them; `http_probe` and
`PinnedAdapter` then connect to the checked address while verifying TLS for the name.
"""

import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import requests
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from shared.errors import RotationError, TargetNotAllowed, UpstreamError
from shared.settings import Settings

_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: |\r?$)")
_MAX_STATUS_LINE = 1024
_REQUEST_TARGET = re.compile(r"^/[\x21-\x7e]*$")


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    for kind, flagged in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    ):
        if flagged:
            return kind
    return ""


def check_address(settings: Settings, host: str, text: str) -> str:
    """`text` (an address `host` resolved to), or TargetNotAllowed when it may not be reached."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if any(address in network for network in settings.allowed_networks):
        return str(address)
    kind = _refusal(address)
    if kind:
        raise TargetNotAllowed(
            f"host {host} resolves to {kind} address {address}, which is not in ROTATION_ALLOWED_NETWORKS"
        )
    return str(address)


def resolve_checked(settings: Settings, host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, all of them checked; TargetNotAllowed if any is refused.

    One refused address refuses the name: an answer mixing a public and an internal address
    is not one to pick from."""
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise UpstreamError(f"cannot resolve host {host}: {type(error).__name__}") from None
    addresses: list[str] = []
    for *_, sockaddr in answers:
        checked = check_address(settings, host, str(sockaddr[0]))
        if checked not in addresses:
            addresses.append(checked)
    if not addresses:
        raise UpstreamError(f"host {host} resolves to no address")
    return addresses


def http_probe(settings: Settings, url: str, deadline_seconds: float) -> None:
    """Succeed once `url` answers 2xx; raise after the deadline, which bounds the whole probe.

    Redirects are not followed (a 3xx is a failure; where it pointed is not reported) and only
    the status line is read. The error names the URL and the last status, never a body."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise RotationError(f"consumer probe {url} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not _REQUEST_TARGET.match(target):
        raise RotationError(f"consumer probe {url} has a path that cannot be sent")
    host_header = f"[{host}]" if ":" in host else host
    if parts.port:
        host_header += f":{port}"
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: secret-rotation-probe\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    tls = ssl.create_default_context(cafile=settings.upstream_ca_bundle) if parts.scheme == "https" else None
    deadline = time.monotonic() + deadline_seconds
    last = "no answer"
    while True:
        try:
            # Resolved (and checked) on every attempt: a refused address ends the probe at once.
            addresses = resolve_checked(settings, host, port)
            status = _status_once(addresses, port, host, tls, request=request, deadline=deadline)
            if 200 <= status < 300:
                return
            last = f"HTTP {status}"
        except UpstreamError:
            last = "name not resolved"
        except (OSError, ValueError) as error:
            last = type(error).__name__
        time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
        if time.monotonic() >= deadline:
            raise RotationError(f"consumer probe {url} did not succeed: {last}")


def _status_once(
    addresses: list[str], port: int, host: str, tls: ssl.SSLContext | None, *, request: bytes, deadline: float
) -> int:
    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("probe deadline")
        return left

    with _connect(addresses, port, remaining) as raw:
        sock = tls.wrap_socket(raw, server_hostname=host) if tls else raw
        with sock:
            sock.settimeout(remaining())
            sock.sendall(request)
            line = b""
            while b"\n" not in line:
                sock.settimeout(remaining())
                chunk = sock.recv(_MAX_STATUS_LINE - len(line))
                if not chunk:
                    break
                line += chunk
                if len(line) >= _MAX_STATUS_LINE:
                    break
            remaining()
    match = _STATUS_LINE.match(line.split(b"\n", 1)[0])
    if not match:
        raise ValueError("not an HTTP status line")
    return int(match.group(1))


def _connect(addresses: list[str], port: int, remaining: Callable[[], float]) -> socket.socket:
    """A connection to the first of the checked addresses that accepts one."""
    failure: OSError = ConnectionError("no address")
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout=remaining())
        except OSError as error:
            failure = error
    raise failure


def _not_connected(error: requests.exceptions.ConnectionError) -> bool:
    """The connection itself failed (refused, unreachable, timed out): nothing was sent."""
    reason = getattr(error.args[0] if error.args else None, "reason", None)
    return isinstance(error, requests.exceptions.ConnectTimeout) or isinstance(
        reason, NewConnectionError | ConnectTimeoutError
    )


class PinnedAdapter(HTTPAdapter):
    """A requests transport that connects to an address `resolve_checked` approved for the
    URL's host, and verifies the server's certificate for the host name (SNI and hostname check).
    When a name has several addresses and one does not take the connection, the next is tried
    (nothing was sent), and an address that failed goes last for a minute.

    Mount it for https:// only: a plain-http request would still carry the name in Host alone."""

    DOWN_FOR = 60.0

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self._settings = settings
        self._chosen = threading.local()
        self._down: dict[str, float] = {}
        super().__init__(**kwargs)

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        parts = urlsplit(request.url or "")
        # The connection goes to an address; the request still names the host.
        request.headers["Host"] = parts.netloc.rpartition("@")[2]
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = resolve_checked(self._settings, parts.hostname or "", port)
        now = time.monotonic()
        addresses.sort(key=lambda address: self._down.get(address, 0.0) > now - self.DOWN_FOR)
        for address in addresses[:-1]:
            try:
                return self._send_to(address, request, *args, **kwargs)
            except requests.exceptions.ConnectionError as error:
                if not _not_connected(error):
                    raise
                self._down[address] = time.monotonic()
        return self._send_to(addresses[-1], request, *args, **kwargs)

    def _send_to(self, address: str, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        self._chosen.address = address
        try:
            return super().send(request, *args, **kwargs)
        finally:
            self._chosen.address = None

    def build_connection_pool_key_attributes(
        self, request: PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        name = str(host_params["host"])
        port = int(host_params["port"] or (443 if host_params["scheme"] == "https" else 80))
        chosen = getattr(self._chosen, "address", None)
        host_params["host"] = chosen or resolve_checked(self._settings, name, port)[0]
        pool_kwargs["server_hostname"] = name
        return host_params, pool_kwargs
