"""The devstack launchers start real servers: PostgreSQL and Azurite.

No skips: if a server is not installed the launcher raises an error that
says to run scripts/setup, and the test fails with it.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError
from azure.data.tables import TableServiceClient, UpdateMode
from psycopg import sql
from psycopg.rows import TupleRow

from devstack import azurite as azurite_module
from devstack import postgres as postgres_module
from devstack.azurite import Azurite, AzuriteNotFoundError
from devstack.ports import port_is_open
from devstack.postgres import PostgresNotFoundError, PostgresServer


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path) as server:
        print(f"\nPostgreSQL started in {server.start_seconds:.2f} s")
        print(f"(initdb {server.initdb_seconds:.2f} s, start {server.last_start_seconds:.2f} s)")
        yield server


def set_password_sql(conn: psycopg.Connection[TupleRow], role: str, password: str) -> sql.Composed:
    """ALTER ROLE ... PASSWORD with a SCRAM verifier hashed here, not on the server."""
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()
    return sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier))


def test_postgres_scram_login_role_and_restart(pg: PostgresServer) -> None:
    with pg.admin_connect() as admin:
        row = admin.execute(
            "SELECT current_user, current_setting('log_statement'), inet_server_port()"
        ).fetchone()
        assert row == (pg.admin_user, "none", pg.port)
        rules = admin.execute(
            "SELECT DISTINCT type, auth_method FROM pg_hba_file_rules WHERE type <> 'local'"
        )
        assert rules.fetchall() == [("hostssl", "scram-sha-256")]
        assert admin.pgconn.ssl_in_use

        role, password = "app-user", secrets.token_urlsafe(18)
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(set_password_sql(admin, role, password))
        stored = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", [role]).fetchone()
        assert stored is not None and str(stored[0]).startswith("SCRAM-SHA-256$")

    with psycopg.connect(pg.conninfo(user=role, password=password)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.conninfo(user=role, password="wrong-" + password))

    port = pg.port
    pg.restart()
    assert pg.port == port
    print(f"PostgreSQL restarted in {pg.last_start_seconds:.2f} s")
    with psycopg.connect(pg.conninfo(user=role, password=password)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_postgres_refuses_a_login_without_tls(pg: PostgresServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(
            host=pg.host, port=pg.port, user=pg.admin_user, password=pg.admin_password, sslmode="disable"
        )
    # The admin's own login, over TLS, works.
    with pg.admin_connect() as admin:
        assert admin.execute("SELECT 1").fetchone() == (1,)


def test_postgres_stop_closes_port_and_removes_files(tmp_path: Path) -> None:
    server = PostgresServer(tmp_path)
    server.start()
    port, data_dir = server.port, server.data_dir
    assert port_is_open(server.host, port)
    server.stop()
    assert not port_is_open(server.host, port)
    assert not data_dir.exists()
    server.stop()  # stopping twice is harmless


def test_postgres_missing_binaries_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(postgres_module, "PG_LIB_DIR", tmp_path)
    with pytest.raises(PostgresNotFoundError, match="scripts/setup"):
        PostgresServer(tmp_path).start()


@pytest.fixture
def azurite(tmp_path: Path) -> Iterator[Azurite]:
    with Azurite(tmp_path) as server:
        print(f"\nAzurite (table) started in {server.start_seconds:.2f} s")
        yield server


def test_azurite_etag_conditional_update(azurite: Azurite) -> None:
    assert azurite.table_endpoint == f"http://127.0.0.1:{azurite.ports['table']}/devstoreaccount1"
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    table = service.create_table("claims")

    table.upsert_entity({"PartitionKey": "vault1", "RowKey": "secret1", "owner": "nobody"})
    entity = table.get_entity("vault1", "secret1")
    stale_etag = entity.metadata["etag"]

    entity["owner"] = "worker-a"
    table.update_entity(
        entity,
        mode=UpdateMode.MERGE,
        etag=stale_etag,
        match_condition=MatchConditions.IfNotModified,
    )

    entity["owner"] = "worker-b"
    with pytest.raises(ResourceModifiedError):
        table.update_entity(
            entity,
            mode=UpdateMode.MERGE,
            etag=stale_etag,
            match_condition=MatchConditions.IfNotModified,
        )
    assert table.get_entity("vault1", "secret1")["owner"] == "worker-a"


def test_azurite_stop_closes_port(tmp_path: Path) -> None:
    server = Azurite(tmp_path)
    server.start()
    port = server.ports["table"]
    assert port_is_open(server.host, port)
    server.stop()
    assert not port_is_open(server.host, port)
    assert not server.running


def test_azurite_missing_install_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(azurite_module, "BIN_DIR", tmp_path / "node_modules" / ".bin")
    with pytest.raises(AzuriteNotFoundError, match="run scripts/setup"):
        Azurite(tmp_path).start()


KEEPS_A_SERVER = """
import sys, time
from pathlib import Path
from devstack.postgres import PostgresServer
from devstack.sigterm import stop_on_sigterm
if sys.argv[2] == "handled":
    stop_on_sigterm()
with PostgresServer(Path(sys.argv[1])) as pg:
    print(pg.data_dir, flush=True)
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.parametrize("handled", [True, False], ids=["stop_on_sigterm", "default SIGTERM"])
def test_a_terminated_tool_stops_the_servers_it_started(tmp_path: Path, handled: bool) -> None:
    """scripts/chaos, bench and demo install stop_on_sigterm: a `kill` of them runs their
    clean-up, so no PostgreSQL is left behind. Without it (the control) one is."""
    mode = "handled" if handled else "default"
    tool = subprocess.Popen(
        [sys.executable, "-c", KEEPS_A_SERVER, str(tmp_path), mode], stdout=subprocess.PIPE, text=True
    )
    assert tool.stdout is not None
    data_dir = Path(tool.stdout.readline().strip())
    pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    assert _alive(pid)
    tool.send_signal(signal.SIGTERM)
    code = tool.wait(timeout=60)
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left_behind = _alive(pid)
    if left_behind:
        os.kill(pid, signal.SIGKILL)
    if handled:
        assert (code, left_behind) == (128 + signal.SIGTERM, False)
    else:
        assert (code, left_behind) == (-signal.SIGTERM, True)
