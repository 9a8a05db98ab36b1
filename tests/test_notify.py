"""Rollbacks, failures and emergencies are announced by webhook and Event Grid, without values."""

import json
import os
import ssl
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

import pytest
from azure.keyvault.secrets import SecretClient

from devstack.keyvault.certs import ensure_certs
from devstack.ports import free_port
from devstack.stack import LocalStack, provision_postgres_secret
from tests.conftest import soon
from tests.hosting import deliver_event


class Recorder(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.received.append((dict(self.headers.items()), json.loads(body)))
        status = 503 if self.path == "/health" else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # the consumer probe: always unhealthy
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


def serve(tls_dir: Any = None) -> tuple[ThreadingHTTPServer, list[tuple[dict[str, str], Any]]]:
    received: list[tuple[dict[str, str], Any]] = []
    handler = type("Handler", (Recorder,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    if tls_dir is not None:
        certs = ensure_certs(tls_dir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.cert, certs.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    Thread(target=server.serve_forever, daemon=True).start()
    return server, received


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[tuple[dict[str, str], Any]]]]:
    server, received = serve()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_a_rollback_is_announced_by_webhook(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: Any, webhook: tuple[str, list[Any]]
) -> None:
    url, received = webhook
    port = url.rsplit(":", 1)[1]
    provision_postgres_secret(
        stack, unique, prefix=unique, expires_on=soon(20), extra_tags={"rotation-probes": f"{url}/health"}
    )
    engine_with(
        {
            "ROTATION_ALLOWED_TARGETS": f"{os.environ['ROTATION_ALLOWED_TARGETS']},127.0.0.1:{port}",
            "ROTATION_PROBE_TIMEOUT": "PT1S",
            "ROTATION_NOTIFY_WEBHOOK": url,
        }
    )
    deliver_event([stack.vault.events_for(unique)])
    notices = [body for _, body in received if body.get("secret") == unique]
    assert len(notices) == 1
    notice = notices[0]
    assert notice["status"] == "rolled_back"
    assert "consumer probe failed" in notice["message"]
    assert notice["trigger"] == "event:SecretNearExpiry"
    password = json.loads(vault.get_secret(unique).value or "{}")["password"]
    assert password not in json.dumps(notice)


def test_an_emergency_is_published_to_an_event_grid_topic(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: Any
) -> None:
    server, received = serve(tls_dir=stack.vault.ca_path.parent)
    try:
        provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(60))
        engine = engine_with(
            {
                "ROTATION_NOTIFY_EVENTGRID_ENDPOINT": f"https://127.0.0.1:{server.server_address[1]}/api/events",
                "ROTATION_UPSTREAM_CA_BUNDLE": str(stack.vault.ca_path),
            }
        )
        outcome = engine.rotate(
            stack.vault.vault_url, unique, trigger="manual", reason="leak", emergency=True
        )
        assert outcome.status == "rotated"
    finally:
        server.shutdown()
        server.server_close()
    (headers, events), *_ = received
    assert headers["Authorization"].startswith("Bearer ")
    (event,) = events
    assert event["eventType"] == "SecretRotation.Rotated"
    assert event["subject"] == f"secrets/{unique}"
    assert event["data"]["emergency"] is True
    password = json.loads(vault.get_secret(unique).value or "{}")["password"]
    assert password not in json.dumps(events)
