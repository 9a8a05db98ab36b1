"""PostgreSQL logins go over verified TLS with SCRAM only: a server with a certificate from another
CA is refused, and a rogue server that asks for a cleartext password never gets one."""

import json
import os
import secrets
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from azure.keyvault.secrets import SecretClient

from devstack.keyvault.certs import ensure_certs
from devstack.postgres import PostgresServer
from devstack.stack import ADMIN_SECRET, LocalStack
from shared.engine import RotationEngine
from tests.conftest import soon

pytestmark = pytest.mark.usefixtures("app_settings")

SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104
AUTH_CLEARTEXT = 3


def tags_for(host_port: str, unique: str, admin_secret: str) -> dict[str, str]:
    return {
        "rotation-rotator": "postgres",
        "rotation-target": f"{host_port}/postgres",
        "rotation-slots": f"{unique}_blue,{unique}_green",
        "rotation-current-slot": f"{unique}_blue",
        "rotation-pg-group": unique,
        "rotation-admin-secret": admin_secret,
        "rotation-validity": "P30D",
    }


def bind_against(
    engine_with: object, vault: SecretClient, stack: LocalStack, unique: str, port: int, admin_secret: str
) -> tuple[str, str]:
    """Point a secret at 127.0.0.1:`port` (allow-listed) and have an operator bind it: the proof
    of possession logs in there with the secret's own credential first. Returns the outcome's
    message and the password the secret holds."""
    allowed = f"{os.environ['ROTATION_ALLOWED_TARGETS']},127.0.0.1:{port}"
    engine: RotationEngine = engine_with({"ROTATION_ALLOWED_TARGETS": allowed})  # type: ignore[operator]
    password = secrets.token_urlsafe(24)
    value = {"username": f"{unique}_blue", "password": password}
    tags = tags_for(f"127.0.0.1:{port}", unique, admin_secret)
    vault.set_secret(unique, json.dumps(value), tags=tags, expires_on=soon(5))
    outcome = engine.bind(stack.vault.vault_url, unique, requested_by="sre")
    assert outcome.status == "failed", outcome.message
    return outcome.message, password


def test_a_server_with_a_certificate_from_another_ca_is_refused(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: object, tmp_path: Path
) -> None:
    with PostgresServer(tmp_path, tls_dir=tmp_path / "another-ca") as other:
        admin = {"username": other.admin_user, "password": other.admin_password}
        vault.set_secret(f"{unique}-admin", json.dumps(admin), content_type="application/json")
        message, _ = bind_against(engine_with, vault, stack, unique, other.port, f"{unique}-admin")
        log = other.log_path.read_text(errors="replace")
    assert "certificate verify failed" in message
    assert f"cannot reach PostgreSQL 127.0.0.1:{other.port}/postgres" in message
    assert f'user "{unique}_blue"' not in log  # the server saw no login at all


@dataclass
class RogueServer:
    """Speaks just enough of the PostgreSQL protocol to ask for a cleartext password, over TLS
    with a certificate the client trusts (the worst case: a name it may reach, a valid certificate)."""

    tls: ssl.SSLContext
    listener: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    startups: list[bytes] = field(default_factory=list)
    after_auth_request: list[bytes] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with suppress(OSError), conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        while True:  # GSSENCRequest -> 'N', SSLRequest -> 'S' and TLS
            length, code = struct.unpack("!ii", read_exactly(conn, 8))
            if code == GSSENC_REQUEST:
                conn.sendall(b"N")
                continue
            if code != SSL_REQUEST:
                return  # a client without TLS: not the case under test
            conn.sendall(b"S")
            break
        with self.tls.wrap_socket(conn, server_side=True) as tls:
            (length,) = struct.unpack("!i", read_exactly(tls, 4))
            self.startups.append(read_exactly(tls, length - 4))
            tls.sendall(b"R" + struct.pack("!ii", 8, AUTH_CLEARTEXT))
            received = b""
            with suppress(OSError):
                while chunk := tls.recv(4096):
                    received += chunk
            self.after_auth_request.append(received)


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


@pytest.fixture
def rogue(stack: LocalStack) -> Iterator[RogueServer]:
    certs = ensure_certs(stack.vault.ca_path.parent)  # the stack's own, trusted, certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    server = RogueServer(context)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server
    with suppress(OSError):
        server.listener.shutdown(socket.SHUT_RDWR)
    server.listener.close()
    thread.join(5)


def test_a_rogue_server_asking_for_a_cleartext_password_never_gets_it(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: object, rogue: RogueServer
) -> None:
    # The attacker's secret names the real admin secret and a target the rogue server answers.
    message, own_password = bind_against(engine_with, vault, stack, unique, rogue.port, ADMIN_SECRET)
    assert "server requested a cleartext password" in message
    assert rogue.startups, "libpq never reached the rogue server"
    # Only the proof of possession reached it, as the secret's own slot, never as the admin.
    assert all(f"{unique}_blue".encode() in startup for startup in rogue.startups)
    assert all(stack.postgres.admin_user.encode() not in startup for startup in rogue.startups)
    # No PasswordMessage ('p'), and neither password in any form, on any connection (libpq
    # hangs up at the request: without require_auth it would answer with the password).
    assert all(not received.startswith(b"p") for received in rogue.after_auth_request)
    for password in (stack.postgres.admin_password.encode(), own_password.encode()):
        assert all(password not in received for received in rogue.after_auth_request)


def test_a_name_with_a_dead_address_first_is_reached_at_its_next_checked_one(
    stack: LocalStack, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's name resolving to an address where nothing listens, then to the server's:
    libpq is given both (checked) and the rotation goes through on the second."""
    from devstack.stack import provision_postgres_secret  # noqa: PLC0415
    from shared import service  # noqa: PLC0415

    pg = stack.postgres
    real = socket.getaddrinfo

    def dead_first(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        answers = real(host, port, *args, **kwargs)
        if host == pg.host and int(port or 0) == pg.port:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", pg.port)), *answers]
        return answers

    secret = provision_postgres_secret(stack, f"{unique}-db", prefix=unique, expires_on=soon(20))
    monkeypatch.setattr(socket, "getaddrinfo", dead_first)
    outcome = service.engine().rotate(stack.vault.vault_url, secret.name, trigger="manual")
    assert outcome.status == "rotated", outcome.message
