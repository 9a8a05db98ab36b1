"""Session fixtures: one local stack (Key Vault emulator, Azurite, PostgreSQL) for the whole run.

The registered functions build their engine from app settings, exactly as on
the Functions host; the `app_settings` fixture points those settings at the
local stack. Every log record of the session is kept, so the last test can
check that no secret value the suite generated ever reached a log; every HTTP
response the function app gave (through the local host or `call_http`) is kept
too, so another last test can check that none was a 500.
"""

import logging
import os
import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from azure.keyvault.secrets import SecretClient
from psycopg import sql

from devstack.postgres import session_user
from devstack.runner import RESPONSE_HOOKS
from devstack.stack import APP_DATABASE, LocalStack, app_environment
from shared import service
from shared.engine import RotationEngine
from shared.settings import Settings
from tests.hosting import CURRENT_TEST, record_runner_response


class SessionLogRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted can leak nothing
            self.lines.append(f"unformattable record from {record.name}")


SESSION_LOGS = SessionLogRecorder()


def pytest_configure(config: pytest.Config) -> None:
    root = logging.getLogger()
    root.addHandler(SESSION_LOGS)
    root.setLevel(logging.DEBUG)
    if record_runner_response not in RESPONSE_HOOKS:
        RESPONSE_HOOKS.append(record_runner_response)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Responses are attributed to the test running (fixtures included) when they were sent."""
    CURRENT_TEST[0] = item.nodeid


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The log scan must run after every other test."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("devstack")) as local:
        yield local


@pytest.fixture(scope="session")
def app_settings(stack: LocalStack) -> Iterator[dict[str, str]]:
    """Point the Function App's settings (environment) at the local stack. Tests list what they
    have just provisioned: the list reads the vault every time unless a test asks otherwise."""
    settings = {**stack.app_settings(), "ROTATION_INVENTORY_MAX_AGE": "PT0S"}
    with app_environment(settings):
        service.use_engine(None)
        yield settings
        service.use_engine(None)


@pytest.fixture
def engine_with(app_settings: dict[str, str]) -> Iterator[object]:
    """Install an engine built from the same settings, with a test clock, probe or checkpoint."""

    def install(env: dict[str, str] | None = None, **options: object) -> RotationEngine:
        engine = service.build_engine(Settings.from_env({**os.environ, **(env or {})}), **options)
        service.use_engine(engine)
        return engine

    yield install
    service.use_engine(None)


@pytest.fixture
def vault(stack: LocalStack) -> SecretClient:
    return stack.secret_client()


@pytest.fixture
def unique() -> str:
    """A short unique name part, valid in secret names and PostgreSQL role names."""
    return f"t{uuid.uuid4().hex[:8]}"


def soon(days: int = 20) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


def login(stack: LocalStack, credential: dict[str, object]) -> str:
    """Log in with a credential as stored in the secret; return the session user."""
    user = session_user(credential, stack.postgres.ca_path)
    assert user
    return user


def can_login(stack: LocalStack, credential: dict[str, object]) -> bool:
    try:
        return login(stack, credential) == credential["username"]
    except psycopg.OperationalError:
        return False


def login_role(stack: LocalStack, group: str, role: str) -> dict[str, Any]:
    """A group and a login role in it, made by hand as a DBA would; the role's credential."""
    password = secrets.token_urlsafe(24)
    with stack.postgres.admin_connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(group)))
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(role), sql.Literal(password), sql.Identifier(group)
            )
        )
    pg = stack.postgres
    return {
        "engine": "postgres",
        "host": pg.host,
        "port": pg.port,
        "dbname": APP_DATABASE,
        "username": role,
        "password": password,
    }
