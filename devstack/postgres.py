"""A real PostgreSQL server for tests and the local demo.

Each ``PostgresServer`` runs ``initdb`` into a fresh directory and starts its
own postmaster on a random loopback port, with SCRAM password login over TLS
only (a login without TLS is refused by pg_hba.conf) and durability switched off
for speed. The server certificate (SAN localhost, 127.0.0.1, ::1) comes from
``devstack.keyvault.certs.ensure_certs(tls_dir)``: given the Key Vault emulator's
directory, it is issued by the emulator's CA, which clients pass as sslrootcert::

    with PostgresServer(tmp_path) as pg:
        with pg.admin_connect() as conn:
            conn.execute("SELECT 1")

``initdb`` and ``pg_ctl`` refuse to run as root; as root they are run as the
``postgres`` system user (``runuser``), which then owns the cluster directory.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from devstack.keyvault.certs import CertPaths, ensure_certs
from devstack.ports import free_port, port_is_open

PG_LIB_DIR = Path("/usr/lib/postgresql")  # Debian/Ubuntu: one <version>/bin per installed server
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
SETUP_HINT = "run scripts/setup (or install the server: apt-get install postgresql)"
# TLS only, SCRAM only: a plain-TCP or password-in-the-clear login finds no matching line.
PG_HBA = """\
local all all trust
hostssl all all 127.0.0.1/32 scram-sha-256
hostssl all all ::1/128 scram-sha-256
"""


def connect_as(
    credential: Mapping[str, Any], sslrootcert: str | Path, connect_timeout: int = 5
) -> psycopg.Connection[Any]:
    """A session logged in with a credential as the PostgreSQL rotator stores it, over TLS
    verified with the CA in `sslrootcert`. Raises psycopg.OperationalError when refused."""
    return psycopg.connect(
        host=str(credential["host"]),
        port=int(str(credential["port"])),
        dbname=str(credential["dbname"]),
        user=str(credential["username"]),
        password=str(credential["password"]),
        connect_timeout=connect_timeout,
        sslmode="verify-full",
        sslrootcert=str(sslrootcert),
        require_auth="scram-sha-256",
    )


def session_user(credential: Mapping[str, Any], sslrootcert: str | Path, connect_timeout: int = 5) -> str:
    """Log in with a credential (see connect_as) and return the session user."""
    with connect_as(credential, sslrootcert, connect_timeout) as conn:
        row = conn.execute("SELECT session_user").fetchone()
    return str(row[0]) if row else ""


class PostgresNotFoundError(RuntimeError):
    """The PostgreSQL server binaries (initdb, pg_ctl, postgres) are not installed."""


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in SERVER_BINARIES)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin -> (15,) or (9, 6)
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def find_bindir() -> Path:
    """Directory holding initdb, pg_ctl and postgres.

    Looks in ``pg_config --bindir``, then the highest /usr/lib/postgresql/*/bin,
    then the directory of ``pg_ctl`` on PATH (same order as scripts/setup).
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    versioned = PG_LIB_DIR.glob("*/bin")
    candidates.extend(sorted(versioned, key=_version_key, reverse=True))
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.append(Path(pg_ctl).resolve().parent)
    for bindir in candidates:
        if _has_server_binaries(bindir):
            return bindir
    looked = ", ".join(str(c) for c in candidates) or "pg_config, /usr/lib/postgresql/*/bin, PATH"
    raise PostgresNotFoundError(
        f"PostgreSQL server binaries ({', '.join(SERVER_BINARIES)}) not found "
        f"(looked in: {looked}); {SETUP_HINT}"
    )


class PostgresServer:
    """A throw-away PostgreSQL cluster listening on 127.0.0.1:<random port>."""

    host = "127.0.0.1"
    dbname = "postgres"
    admin_user = "devstack_admin"

    def __init__(
        self,
        base_dir: Path,
        *,
        keep: bool = False,
        start_timeout: float = 30.0,
        tls_dir: Path | None = None,
    ) -> None:
        self.base_dir = Path(base_dir)
        # Where the CA and server certificate are (created there if missing).
        self.tls_dir = Path(tls_dir) if tls_dir else self.base_dir / "tls"
        self._certs: CertPaths | None = None
        self.keep = keep
        self.start_timeout = start_timeout
        self.admin_password = secrets.token_urlsafe(24)
        self.log_path = self.base_dir / "postgres.log"
        self.start_seconds: float | None = None  # initdb + first start, measured
        self.initdb_seconds: float | None = None
        self.last_start_seconds: float | None = None  # latest pg_ctl start (also after restart)
        self._port: int | None = None
        self._bindir: Path | None = None
        self._cluster_dir: Path | None = None  # holds data/
        self._socket_dir: Path | None = None
        self._running = False
        self._as_postgres = os.geteuid() == 0

    # ----------------------------------------------------------------- public

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("PostgresServer has not been started")
        return self._port

    @property
    def data_dir(self) -> Path:
        if self._cluster_dir is None:
            raise RuntimeError("PostgresServer has not been started")
        return self._cluster_dir / "data"

    @property
    def ca_path(self) -> Path:
        """The CA that issued the server's certificate: clients' sslrootcert."""
        if self._certs is None:
            self._certs = ensure_certs(self.tls_dir)
        return self._certs.ca

    @property
    def running(self) -> bool:
        return self._running

    def conninfo(
        self, user: str | None = None, password: str | None = None, dbname: str | None = None
    ) -> str:
        """libpq connection string for TCP login; defaults to the admin account."""
        if user is None:
            user = self.admin_user
            password = self.admin_password if password is None else password
        params: dict[str, str | int] = {
            "host": self.host,
            "port": self.port,
            "user": user,
            "dbname": dbname or self.dbname,
            "connect_timeout": 5,
            "sslmode": "verify-full",
            "sslrootcert": str(self.ca_path),
        }
        if password is not None:
            params["password"] = password
        return make_conninfo("", **params)

    def admin_connect(self) -> psycopg.Connection[TupleRow]:
        """A new autocommit connection as the admin user (password over verified TLS)."""
        return psycopg.connect(self.conninfo(), autocommit=True)

    def start(self) -> None:
        """initdb a fresh cluster on first call, then start the server."""
        if self._running:
            return
        began = time.perf_counter()
        try:
            if self._cluster_dir is None:
                self._bindir = find_bindir()
                self._initdb(self._create_dirs())
                self._port = free_port(self.host)
            self._pg_ctl_start()
        except BaseException:
            self.stop()
            raise
        if self.start_seconds is None:
            self.start_seconds = time.perf_counter() - began

    def stop(self, keep: bool | None = None) -> None:
        """Stop the server (fast shutdown) and delete its files unless kept."""
        self._pg_ctl_stop()
        if not (self.keep if keep is None else keep):
            self._remove_dirs()

    def restart(self) -> None:
        """Stop and start again on the same data directory and port."""
        self._pg_ctl_stop()
        self._pg_ctl_start()

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- private

    def _bin(self, name: str) -> str:
        if self._bindir is None:
            self._bindir = find_bindir()
        return str(self._bindir / name)

    def _run(self, args: list[str], log: IO[str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL tool, as the postgres user when we are root.

        Output goes to ``log`` when given, else it is captured.
        """
        if self._as_postgres:
            args = ["runuser", "-u", "postgres", "--", *args]
        return subprocess.run(
            args,
            cwd=self._cluster_dir,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=log if log is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def _create_dirs(self) -> Path:
        """Make the cluster and socket directories; return the cluster directory."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._cluster_dir = Path(tempfile.mkdtemp(prefix="postgres-", dir=self.base_dir))
        # Unix socket paths are limited to ~107 bytes, so keep this one short.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="devstack-pgsock-"))
        if self._as_postgres:
            owner = self._postgres_user()
            if not self._postgres_can_reach(self._cluster_dir):
                # base_dir sits under a root-only directory (pytest's tmp dirs
                # do): use a private directory under the system temp dir.
                self._cluster_dir.rmdir()
                self._cluster_dir = Path(tempfile.mkdtemp(prefix="devstack-postgres-"))
            for path in (self._cluster_dir, self._socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        return self._cluster_dir

    def _postgres_user(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresNotFoundError(
                "running as root needs the 'postgres' system user to run initdb/pg_ctl; " + SETUP_HINT
            ) from None

    def _postgres_can_reach(self, path: Path) -> bool:
        result = subprocess.run(
            ["runuser", "-u", "postgres", "--", "test", "-x", str(path.parent)],
            capture_output=True,
            check=False,
            cwd="/",
        )
        return result.returncode == 0

    def _initdb(self, cluster_dir: Path) -> None:
        began = time.perf_counter()
        pwfile = cluster_dir / "pwfile"
        pwfile.write_text(self.admin_password + "\n")
        pwfile.chmod(0o600)
        if self._as_postgres:
            owner = self._postgres_user()
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        try:
            result = self._run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.admin_user,
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {result.returncode}):\n{result.stdout}")
        self._configure_tls()
        self.initdb_seconds = time.perf_counter() - began

    def _configure_tls(self) -> None:
        """The server's certificate and key in the data directory (the key readable by the server
        only, as it requires), and a pg_hba.conf that accepts TLS logins only."""
        certs = self._certs = ensure_certs(self.tls_dir)
        files = {
            "server.crt": certs.cert.read_bytes(),
            "server.key": certs.key.read_bytes(),
            "pg_hba.conf": PG_HBA.encode(),
        }
        for name, content in files.items():
            path = self.data_dir / name
            path.write_bytes(content)
            path.chmod(0o600)
            if self._as_postgres:
                owner = self._postgres_user()
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def _pg_ctl_start(self) -> None:
        began = time.perf_counter()
        server_options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self._socket_dir}",
                f"-c listen_addresses={self.host}",
                "-c ssl=on",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c log_statement=none",
            ]
        )
        # The log file is opened here (by us, not by the postgres user), and the
        # postmaster inherits it as stdout/stderr.
        with open(self.log_path, "a") as log:
            result = self._run(
                [
                    self._bin("pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    str(int(self.start_timeout)),
                    "-D",
                    str(self.data_dir),
                    "-o",
                    server_options,
                ],
                log,
            )
        if result.returncode != 0:
            raise RuntimeError(
                f"pg_ctl start failed (exit {result.returncode}); "
                f"server log {self.log_path}:\n{self._log_tail()}"
            )
        self._running = True
        self.last_start_seconds = time.perf_counter() - began

    def _pg_ctl_stop(self) -> None:
        if self._cluster_dir is None or not (self.data_dir / "postmaster.pid").exists():
            self._running = False
            return
        with open(self.log_path, "a") as log:
            self._run(
                [
                    self._bin("pg_ctl"),
                    "stop",
                    "-w",
                    "-m",
                    "fast",
                    "-t",
                    "30",
                    "-D",
                    str(self.data_dir),
                ],
                log,
            )
        self._kill_leftover_postmaster()
        self._running = False

    def _kill_leftover_postmaster(self) -> None:
        """If pg_ctl could not stop it, kill the postmaster named in postmaster.pid."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        try:
            if b"postgres" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return  # stale pid file; that pid now belongs to something else
        except OSError:
            pass  # no /proc: trust the pid file
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and port_is_open(self.host, self.port):
            time.sleep(0.05)
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)

    def _remove_dirs(self) -> None:
        for path in (self._cluster_dir, self._socket_dir):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        self._cluster_dir = None
        self._socket_dir = None

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
