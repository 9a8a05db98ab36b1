"""PostgreSQL: two login roles per secret, alternated on each rotation.

The slots are two login roles (say `app_blue`, `app_green`) that are both
members of one group role (`rotation-pg-group`). All grants go to the group,
so the two never drift apart, and each login role runs `SET ROLE group` at
login, so objects either one creates are owned by the group and stay usable
by the other. A rotation gives the inactive role a new password; retiring a
role sets its password to an unknown random value and ends its sessions.

Passwords never travel in SQL: they are hashed into a SCRAM-SHA-256 verifier on
this side (scramp, with the server's `scram_iterations`, at least 4096), and
`ALTER ROLE ... PASSWORD` (which takes no bind parameters) is composed with
`psycopg.sql` from that verifier. scramp hashes with hashlib, which lets the
other rotations of a sweep run meanwhile; libpq's hashing holds the GIL.

Tags read here: `rotation-target` (`host:port/dbname`), `rotation-slots`,
`rotation-pg-group`, and either `rotation-admin-secret` (a Key Vault secret
holding `{"username": ..., "password": ...}` of an admin with CREATEROLE) or
`rotation-admin-user` (an Entra ID principal; the app's managed identity
signs in with a token, as Azure Database for PostgreSQL supports).

Every login goes to the address the target's name resolved to and was checked
against (shared.reach), over TLS verified for the name (`ROTATION_POSTGRES_SSLMODE`,
verify-full by default, with `ROTATION_POSTGRES_CA_BUNDLE`), and password logins
require SCRAM (`require_auth`), so no server can ask for a password in the clear.
"""

import base64
import json
import logging
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from scramp import ScramMechanism
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from rotators.base import NewCredential, RotationContext
from rotators.postgres_sessions import AdminSessions, Session, SessionKey, session_key
from shared.config import RotationConfig
from shared.errors import (
    ConfigError,
    PossessionNotProven,
    Refused,
    UnsafeOperation,
    UpstreamError,
    VerificationFailed,
)
from shared.reach import resolve_checked

logger = logging.getLogger(__name__)

TAG_GROUP = "rotation-pg-group"
TAG_ADMIN_USER = "rotation-admin-user"
ENTRA_SCOPE = "https://ossrdbms-aad.database.windows.net/.default"
SCRAM = ScramMechanism("SCRAM-SHA-256")
# PostgreSQL's default, and scramp's floor; a server (16 and later) that reports more gets more.
MIN_SCRAM_ITERATIONS = 4096
_ROLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_PRIVILEGED = "rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls"


def _describe(error: psycopg.Error) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{error.sqlstate or type(error).__name__}: {first_line[:200]}"


def _login_refused(error: psycopg.Error) -> bool:
    """The server refused the login (wrong password, no such role, not allowed to log in), as
    opposed to not being reachable."""
    if error.sqlstate in ("28000", "28P01"):
        return True
    text = str(error)
    return "authentication failed" in text or "is not permitted to log in" in text


class PostgresRotator:
    name = "postgres"

    def __init__(self) -> None:
        self._sessions = AdminSessions()

    def validate(self, context: RotationContext) -> None:
        config = context.config
        if not config.target.database:
            raise ConfigError("rotation-target must name a database: host:port/dbname")
        group = config.tags.get(TAG_GROUP, "").strip()
        for role in (*config.slots, group):
            if not _ROLE.match(role):
                raise ConfigError(
                    f"invalid PostgreSQL role name {role[:64]!r} in tags: lower-case letters, digits, '_'"
                )
        if group.startswith("pg_") or group in config.slots:
            raise ConfigError(f"{TAG_GROUP} must be a group role of its own, not a built-in or a slot")
        if not config.admin_secret and not config.tags.get(TAG_ADMIN_USER, "").strip():
            raise ConfigError("set rotation-admin-secret or rotation-admin-user to reach PostgreSQL")

    def prepare_slots(self, context: RotationContext) -> list[str]:
        self.validate(context)
        config = context.config
        done: list[str] = []
        with self._admin(context) as conn:
            if self._role(conn, config.current_slot) is None:
                raise ConfigError(f"the current slot's role {config.current_slot} does not exist")
            for slot in config.slots:
                existed = self._role(conn, slot) is not None
                self._ensure_slot_role(conn, context, slot)
                if existed:
                    done.append(f"role {slot} exists, is unprivileged and a member of the group")
                else:
                    # A fresh role gets an unknown password: nothing can log in as it until a rotation.
                    self._set_password(conn, slot, secrets.token_urlsafe(48))
                    done.append(f"created login role {slot} in the group")
        return done

    def create(self, context: RotationContext, slot: str) -> NewCredential:
        self.validate(context)
        password = secrets.token_urlsafe(32)
        with self._admin(context) as conn:
            self._ensure_slot_role(conn, context, slot)
            self._set_password(conn, slot, password)
        target = context.config.target
        value = json.dumps(
            {
                "engine": "postgres",
                "host": target.host,
                "port": target.port,
                "dbname": target.database,
                "username": slot,
                "password": password,
            }
        )
        return NewCredential(value=value, credential_id=slot)

    def verify(self, context: RotationContext, value: str) -> None:
        try:
            credential = json.loads(value)
            username, password = credential["username"], credential["password"]
        except (ValueError, KeyError, TypeError):
            raise VerificationFailed("the credential is not the JSON this rotator writes") from None
        self._login_as(context, username, password)

    @staticmethod
    def slot_namespace(config: RotationConfig) -> str:
        """Roles belong to the server, not to one database."""
        return f"{config.target.host}:{config.target.port}"

    def prove_possession(self, context: RotationContext, value: str) -> None:
        """The value logs in as the current slot, and both slots are login roles of the group
        (the inactive one may not exist yet): only a database admin can make such a pair."""
        self.validate(context)
        config = context.config
        try:
            credential = json.loads(value)
            username, password = str(credential["username"]), str(credential["password"])
        except (ValueError, KeyError, TypeError):
            raise PossessionNotProven("the secret's value is not the JSON this rotator writes") from None
        if username != config.current_slot:
            raise PossessionNotProven(
                f"the secret's value is for role {username[:64]}, not the current slot {config.current_slot}"
            )
        try:
            with self._connect(context, username, password) as conn:
                row = conn.execute("SELECT session_user").fetchone()
        except psycopg.Error as error:
            if _login_refused(error):
                raise PossessionNotProven(
                    f"the secret's value does not log in as {username}: {_describe(error)}"
                ) from None
            raise UpstreamError(f"cannot reach PostgreSQL {config.target}: {_describe(error)}") from None
        if not row or row[0] != username:
            raise PossessionNotProven(f"the secret's value does not log in as {username}")
        group = config.tags[TAG_GROUP].strip()
        with self._admin(context) as conn:
            self._check_group(conn, group)
            for slot in config.slots:
                if slot == config.current_slot or self._role(conn, slot) is not None:
                    self._check_slot(conn, group, slot)

    def in_use(self, context: RotationContext, slot: str) -> str:
        """Sessions of the slot's role still open (pg_stat_activity): someone holds the old password."""
        self.validate(context)
        with self._admin(context) as conn:
            row = conn.execute(
                "SELECT count(*), min(backend_start) FROM pg_stat_activity WHERE usename = %s", (slot,)
            ).fetchone()
        count = int(row[0]) if row else 0
        if not count:
            return ""
        since = row[1].isoformat(timespec="seconds") if row and row[1] else "?"
        return f"{count} session(s) of role {slot} still open (the oldest since {since})"

    def retire(self, context: RotationContext, slot: str) -> None:
        self.validate(context)
        with self._admin(context) as conn:
            if self._role(conn, slot) is None:
                logger.info("role %s does not exist: nothing to retire", slot)
                return
            self._ensure_slot_role(conn, context, slot)
            self._set_password(conn, slot, secrets.token_urlsafe(48))
            try:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE usename = %s AND pid <> pg_backend_pid()",
                    (slot,),
                )
            except psycopg.errors.InsufficientPrivilege:
                logger.warning("cannot end the open sessions of retired role %s: no privilege", slot)

    @retry(
        retry=retry_if_exception_type(VerificationFailed),
        stop=stop_after_attempt(3),
        wait=wait_random_exponential(multiplier=0.2, max=2),
        reraise=True,
    )
    def _login_as(self, context: RotationContext, username: str, password: str) -> None:
        try:
            with self._connect(context, username, password) as conn:
                row = conn.execute("SELECT session_user").fetchone()
        except psycopg.Error as error:
            raise VerificationFailed(f"login as {username} failed: {_describe(error)}") from None
        if not row or row[0] != username:
            raise VerificationFailed(f"login as {username} reached the wrong role")

    def _connect(self, context: RotationContext, user: str, password: str) -> psycopg.Connection[Any]:
        config, settings = context.config, context.settings
        target = config.target
        # The Entra token is sent as a password (only over verified TLS); every other login is SCRAM,
        # so a server that asks for a cleartext password never gets one.
        token_login = not config.admin_secret and user == config.tags.get(TAG_ADMIN_USER, "").strip()
        # Every checked address, in turn (libpq's host and hostaddr lists): nothing else is tried.
        addresses = resolve_checked(settings, target.host, target.port)
        return psycopg.connect(
            host=",".join([target.host] * len(addresses)),  # what the certificate is checked against
            hostaddr=",".join(addresses),
            port=target.port,
            dbname=target.database,
            user=user,
            password=password,
            sslmode=settings.postgres_sslmode,
            sslrootcert=settings.postgres_ca_bundle,
            require_auth="password" if token_login else "scram-sha-256",
            channel_binding="prefer",
            connect_timeout=10,
            application_name="secret-rotation",
            autocommit=True,
        )

    @contextmanager
    def _admin(self, context: RotationContext) -> Iterator[psycopg.Connection[Any]]:
        """An admin session: an idle one of the same login if the worker has one, else a new one."""
        config = context.config
        try:
            try:
                key, session = self._admin_session(context)
            except psycopg.OperationalError:
                if not config.admin_secret:
                    raise
                # The cached admin password may have been rotated since: read it again, once.
                key, session = self._admin_session(context, fresh=True)
        except psycopg.Error as error:
            raise UpstreamError(
                f"cannot reach PostgreSQL {config.target} as admin: {_describe(error)}"
            ) from None
        try:
            yield session.conn
        except psycopg.Error as error:
            session.conn.close()
            raise UpstreamError(f"PostgreSQL {config.target}: {_describe(error)}") from None
        finally:
            self._sessions.give_back(key, session)

    def _admin_session(self, context: RotationContext, *, fresh: bool = False) -> tuple[SessionKey, Session]:
        user, password = self._admin_login(context, fresh=fresh)
        target = context.config.target
        key = session_key(target.host, target.port, target.database, user, password)
        session = self._sessions.borrow(key)
        if session is None:
            max_age = context.settings.admin_secret_cache.total_seconds()
            session = Session(self._connect(context, user, password), time.monotonic() + max_age)
        return key, session

    def _admin_login(self, context: RotationContext, *, fresh: bool = False) -> tuple[str, str]:
        config = context.config
        if not config.admin_secret:
            return config.tags[TAG_ADMIN_USER].strip(), context.credential.get_token(ENTRA_SCOPE).token
        try:
            admin = json.loads(context.read_admin_secret(config.admin_secret, fresh=fresh))
            return str(admin["username"]), str(admin["password"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"admin secret {config.admin_secret} must hold JSON with username and password"
            ) from None

    def _role(self, conn: psycopg.Connection[Any], role: str) -> tuple[Any, ...] | None:
        return conn.execute(
            f"SELECT rolcanlogin, ({_PRIVILEGED}) FROM pg_roles WHERE rolname = %s",  # noqa: S608 - constant
            (role,),
        ).fetchone()

    def _check_group(self, conn: psycopg.Connection[Any], group: str) -> None:
        group_row = self._role(conn, group)
        if group_row is None:
            raise ConfigError(
                f"group role {group} does not exist: create it and grant it the app's privileges"
            )
        if group_row[0] or group_row[1]:
            raise UnsafeOperation(f"group role {group} can log in or is privileged: refusing to use it")

    def _check_slot(self, conn: psycopg.Connection[Any], group: str, slot: str) -> None:
        """An existing slot must be an unprivileged login role, a member of the group, and not
        the admin: the service never makes a role a login role, nor touches another kind."""
        admin_user = conn.execute("SELECT current_user").fetchone()
        if admin_user and admin_user[0] == slot:
            raise UnsafeOperation(f"slot {slot} is the admin role itself: refusing to rotate it")
        row = self._role(conn, slot)
        if row is None:
            raise ConfigError(f"role {slot} does not exist")
        if row[1]:
            raise UnsafeOperation(
                f"role {slot} is privileged (superuser, createrole, ...): refusing to rotate it"
            )
        if not row[0]:
            raise UnsafeOperation(f"role {slot} cannot log in: refusing to make it a login role")
        member = conn.execute(
            "SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
            "JOIN pg_roles r ON r.oid = m.member WHERE g.rolname = %s AND r.rolname = %s",
            (group, slot),
        ).fetchone()
        if member is None:
            raise Refused(f"role {slot} is not a member of group {group}: refusing to rotate it")

    def _ensure_slot_role(self, conn: psycopg.Connection[Any], context: RotationContext, slot: str) -> None:
        """Refuse to touch any role but an unprivileged login member of the group; create it if missing."""
        group = context.config.tags[TAG_GROUP].strip()
        self._check_group(conn, group)
        row = self._role(conn, slot)
        if row is None:
            conn.execute(
                sql.SQL("CREATE ROLE {} WITH LOGIN INHERIT IN ROLE {}").format(
                    sql.Identifier(slot), sql.Identifier(group)
                )
            )
            conn.execute(
                sql.SQL("ALTER ROLE {} SET role = {}").format(sql.Identifier(slot), sql.Literal(group))
            )
            logger.info("created login role %s in group %s", slot, group)
            return
        self._check_slot(conn, group, slot)

    def _set_password(self, conn: psycopg.Connection[Any], role: str, password: str) -> None:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(scram_verifier(conn, password))
            )
        )


def scram_verifier(conn: psycopg.Connection[Any], password: str) -> str:
    """The `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` form PostgreSQL stores."""
    reported = conn.info.parameter_status("scram_iterations") or ""
    iterations = max(int(reported) if reported.isdigit() else 0, MIN_SCRAM_ITERATIONS)
    salt, stored_key, server_key, iterations = SCRAM.make_auth_info(password, iteration_count=iterations)
    encode = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{encode(salt).decode()}"
        f"${encode(stored_key).decode()}:{encode(server_key).decode()}"
    )
