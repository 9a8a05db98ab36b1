"""Reach: names checked against the addresses they resolve to, probes bounded and never redirected,
and a requests transport that connects to the checked address while verifying the name."""

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.keyvault.certs import CertPaths, generate_certs
from shared.errors import RotationError, TargetNotAllowed
from shared.reach import PinnedAdapter, http_probe, resolve_checked
from shared.settings import Settings

LOCAL = Settings.from_env({"ROTATION_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128"})
STRICT = Settings.from_env({})


@contextmanager
def tcp_server(answer: Callable[[socket.socket], None], tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """A server on 127.0.0.1 that calls `answer` with each connection; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with tls.wrap_socket(conn, server_side=True) if tls else conn as sock:
                    answer(sock)
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        with suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        listener.close()
        thread.join(5)


def read_request(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def replying(status_and_headers: str, hits: list[bytes] | None = None) -> Callable[[socket.socket], None]:
    def answer(sock: socket.socket) -> None:
        request = read_request(sock)
        if hits is not None:
            hits.append(request)
        sock.sendall(
            f"HTTP/1.1 {status_and_headers}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".encode()
        )

    return answer


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return generate_certs(tmp_path_factory.mktemp("reach-certs"))


def server_tls(certs: CertPaths) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    return context


# ------------------------------------------------------------------ resolve_checked


@pytest.mark.parametrize(
    "host",
    ["localhost", "127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.0.1", "0.0.0.0"],  # noqa: S104
)
def test_internal_addresses_are_refused_unless_their_network_is_allowed(host: str) -> None:
    with pytest.raises(TargetNotAllowed, match=f"host {host} resolves to .* address") as refused:
        resolve_checked(STRICT, host, 443)
    assert "ROTATION_ALLOWED_NETWORKS" in str(refused.value)
    allowed = Settings.from_env(
        {"ROTATION_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128,10.0.0.0/8,169.254.0.0/16"}
    )
    if host in ("192.168.0.1", "0.0.0.0"):  # noqa: S104
        with pytest.raises(TargetNotAllowed):
            resolve_checked(allowed, host, 443)
    else:
        assert resolve_checked(allowed, host, 443)


def test_a_name_resolving_to_loopback_is_refused_and_names_the_address() -> None:
    with pytest.raises(TargetNotAllowed, match=r"localhost resolves to loopback address (127\.0\.0\.1|::1)"):
        resolve_checked(STRICT, "localhost", 5432)
    assert set(resolve_checked(LOCAL, "localhost", 5432)) <= {"127.0.0.1", "::1"}


def test_a_public_address_passes() -> None:
    assert resolve_checked(STRICT, "8.8.8.8", 443) == ["8.8.8.8"]
    with pytest.raises(TargetNotAllowed, match="multicast"):
        resolve_checked(STRICT, "224.0.0.1", 443)


# ------------------------------------------------------------------ consumer probe


def test_a_healthy_probe_passes_over_tls_for_the_name(certs: CertPaths) -> None:
    hits: list[bytes] = []
    settings = Settings.from_env(
        {"ROTATION_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128", "ROTATION_UPSTREAM_CA_BUNDLE": str(certs.ca)}
    )
    with tcp_server(replying("204 No Content", hits), server_tls(certs)) as port:
        http_probe(settings, f"https://localhost:{port}/health?x=1", 5)
    assert hits[0].startswith(b"GET /health?x=1 HTTP/1.1\r\n")
    assert f"Host: localhost:{port}\r\n".encode() in hits[0]


def test_a_probe_refuses_a_certificate_from_another_ca(certs: CertPaths, tmp_path: Path) -> None:
    other = generate_certs(tmp_path / "other")
    settings = Settings.from_env(
        {"ROTATION_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128", "ROTATION_UPSTREAM_CA_BUNDLE": str(other.ca)}
    )
    with (
        tcp_server(replying("200 OK"), server_tls(certs)) as port,
        pytest.raises(RotationError, match="SSLCertVerificationError"),
    ):
        http_probe(settings, f"https://localhost:{port}/health", 1)


def test_a_probe_to_an_internal_host_is_refused_without_connecting() -> None:
    hits: list[bytes] = []
    with tcp_server(replying("200 OK", hits)) as port, pytest.raises(TargetNotAllowed):
        http_probe(STRICT, f"http://127.0.0.1:{port}/health", 1)
    assert hits == []


def test_a_probe_does_not_follow_a_redirect_nor_report_where_it_pointed() -> None:
    off_list: list[bytes] = []
    with tcp_server(replying("200 OK", off_list)) as token_port:
        location = f"http://127.0.0.2:{token_port}/oauth2/token?secret=abc"
        with tcp_server(replying(f"302 Found\r\nLocation: {location}")) as port:
            began = time.monotonic()
            with pytest.raises(RotationError) as failed:
                http_probe(LOCAL, f"http://127.0.0.1:{port}/health", 1.5)
    assert time.monotonic() - began < 3
    assert off_list == []
    message = str(failed.value)
    assert message == f"consumer probe http://127.0.0.1:{port}/health did not succeed: HTTP 302"
    assert "oauth2" not in message


def test_one_deadline_bounds_a_probe_against_a_server_that_drips_headers() -> None:
    def drip(sock: socket.socket) -> None:
        read_request(sock)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
            sock.sendall(bytes([byte]))
            time.sleep(0.5)

    with tcp_server(drip) as port:
        began = time.monotonic()
        with pytest.raises(RotationError, match="did not succeed"):
            http_probe(LOCAL, f"http://127.0.0.1:{port}/health", 2)
        elapsed = time.monotonic() - began
    assert 1.5 < elapsed < 3.5


def test_a_probe_retries_until_healthy() -> None:
    answers = iter(["503 Service Unavailable", "500 Internal Server Error"])
    hits: list[bytes] = []

    def flaky(sock: socket.socket) -> None:
        replying(next(answers, "200 OK"), hits)(sock)

    with tcp_server(flaky) as port:
        http_probe(LOCAL, f"http://127.0.0.1:{port}/", 10)
    assert len(hits) == 3


def test_the_error_carries_the_last_status_never_the_body() -> None:
    def noisy(sock: socket.socket) -> None:
        read_request(sock)
        body = b"token=sk_live_0123456789abcdef0123456789"
        sock.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    with tcp_server(noisy) as port, pytest.raises(RotationError) as failed:
        http_probe(LOCAL, f"http://127.0.0.1:{port}/", 0.5)
    assert str(failed.value).endswith("did not succeed: HTTP 500")


# ------------------------------------------------------------------ requests transport


def pinned_session(settings: Settings) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.mount("https://", PinnedAdapter(settings))
    return session


def test_the_adapter_connects_to_the_checked_address_and_verifies_the_name(
    certs: CertPaths, tmp_path: Path
) -> None:
    hits: list[bytes] = []
    other = generate_certs(tmp_path / "other")
    with tcp_server(replying("200 OK", hits), server_tls(certs)) as port, pinned_session(LOCAL) as session:
        response = session.get(f"https://localhost:{port}/keys", verify=str(certs.ca), timeout=5)
        assert response.status_code == 200
        assert f"Host: localhost:{port}\r\n".encode() in hits[0]
        with pytest.raises(requests.exceptions.SSLError):
            session.get(f"https://localhost:{port}/keys", verify=str(other.ca), timeout=5)


def test_the_adapter_refuses_an_address_off_the_allowed_networks(certs: CertPaths) -> None:
    hits: list[bytes] = []
    with (
        tcp_server(replying("200 OK", hits), server_tls(certs)) as port,
        pinned_session(STRICT) as session,
        pytest.raises(TargetNotAllowed, match="localhost resolves to loopback"),
    ):
        session.get(f"https://localhost:{port}/keys", verify=str(certs.ca), timeout=5)
    assert hits == []


def test_a_probe_of_a_name_that_does_not_resolve_fails_at_the_deadline() -> None:
    began = time.monotonic()
    with pytest.raises(RotationError, match="did not succeed: name not resolved"):
        http_probe(STRICT, "https://no-such-host.invalid/health", 1)
    assert time.monotonic() - began < 3


def test_the_adapter_tries_the_next_checked_address_when_one_refuses_the_connection(
    certs: CertPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`localhost` answering with a dead address first (nothing listens on 127.0.0.2) and the
    server's second: the request reaches the server, once; the dead address then goes last."""
    hits: list[bytes] = []
    real = socket.getaddrinfo
    asked: list[str] = []

    def two_addresses(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host != "localhost":
            return real(host, port, *args, **kwargs)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    adapter = PinnedAdapter(LOCAL)
    original = adapter._send_to

    def recorded(address: str, *args: Any, **kwargs: Any) -> requests.Response:
        asked.append(address)
        return original(address, *args, **kwargs)

    monkeypatch.setattr(adapter, "_send_to", recorded)
    with tcp_server(replying("200 OK", hits), server_tls(certs)) as port, requests.Session() as session:
        session.trust_env = False
        session.mount("https://", adapter)
        first = session.post(f"https://localhost:{port}/keys", verify=str(certs.ca), timeout=5)
        second = session.post(f"https://localhost:{port}/keys", verify=str(certs.ca), timeout=5)
    assert (first.status_code, second.status_code) == (200, 200)
    assert len(hits) == 2  # each request sent once: the dead address took nothing
    assert asked == ["127.0.0.2", "127.0.0.1", "127.0.0.1"]
