"""Azurite (Azure Storage emulator) for tests and the local demo.

Runs the ``azurite`` npm package installed in devstack/node_modules by
scripts/setup, one process per service, on random loopback ports, in memory
by default (``in_memory=False`` persists to a temp directory)::

    with Azurite(tmp_path) as azurite:
        service = TableServiceClient.from_connection_string(azurite.connection_string)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from devstack.ports import free_port, port_is_open

DEVSTACK_DIR = Path(__file__).resolve().parent
BIN_DIR = DEVSTACK_DIR / "node_modules" / ".bin"

# The well-known development account every Azurite and Azure Storage Emulator accepts.
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

SERVICES = ("table", "blob")


class AzuriteNotFoundError(RuntimeError):
    """Azurite (or Node.js) is not installed."""


class Azurite:
    """Azurite Table (and optionally Blob) service on 127.0.0.1:<random port>."""

    host = "127.0.0.1"
    account_name = ACCOUNT_NAME
    account_key = ACCOUNT_KEY

    def __init__(
        self,
        base_dir: Path,
        services: Sequence[str] = ("table",),
        *,
        in_memory: bool = True,
        keep: bool = False,
        start_timeout: float = 30.0,
    ) -> None:
        unknown = set(services) - set(SERVICES)
        if unknown or not services:
            raise ValueError(f"services must be a non-empty subset of {SERVICES}, got {tuple(services)}")
        self.base_dir = Path(base_dir)
        self.services = tuple(services)
        self.in_memory = in_memory
        self.keep = keep
        self.start_timeout = start_timeout
        self.start_seconds: float | None = None
        self.ports: dict[str, int] = {}
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._location: Path | None = None

    # ----------------------------------------------------------------- public

    @property
    def table_endpoint(self) -> str:
        return self._endpoint("table")

    @property
    def blob_endpoint(self) -> str:
        return self._endpoint("blob")

    @property
    def connection_string(self) -> str:
        parts = [
            "DefaultEndpointsProtocol=http",
            f"AccountName={self.account_name}",
            f"AccountKey={self.account_key}",
        ]
        if "blob" in self.services:
            parts.append(f"BlobEndpoint={self.blob_endpoint}")
        if "table" in self.services:
            parts.append(f"TableEndpoint={self.table_endpoint}")
        return ";".join(parts) + ";"

    @property
    def running(self) -> bool:
        return bool(self._processes) and all(p.poll() is None for p in self._processes.values())

    def start(self) -> None:
        """Start one Azurite process per service and wait until each port answers."""
        if self._processes:
            return
        node = shutil.which("node")
        if node is None:
            raise AzuriteNotFoundError(
                "Node.js ('node') is not on PATH; install Node.js 20+, then run scripts/setup"
            )
        for service in self.services:
            if not (BIN_DIR / f"azurite-{service}").exists():
                raise AzuriteNotFoundError(
                    f"{BIN_DIR / f'azurite-{service}'} is missing: "
                    "Azurite is not installed; run scripts/setup"
                )
        began = time.perf_counter()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._location = Path(tempfile.mkdtemp(prefix="azurite-", dir=self.base_dir))
        try:
            for service in self.services:
                self._spawn(service, self._location / service)
            for service in self.services:
                self._wait_until_ready(service)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - began

    def stop(self) -> None:
        """Terminate each process group (SIGTERM, then SIGKILL) and wait for it."""
        for process in self._processes.values():
            _terminate_group(process)
        self._processes.clear()
        if self._location is not None and not self.keep:
            shutil.rmtree(self._location, ignore_errors=True)
            self._location = None

    def __enter__(self) -> Azurite:
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

    def _endpoint(self, service: str) -> str:
        if service not in self.ports:
            raise RuntimeError(f"Azurite {service} service is not started (services={self.services})")
        return f"http://{self.host}:{self.ports[service]}/{self.account_name}"

    def _log_path(self, service: str) -> Path:
        return self.base_dir / f"azurite-{service}.log"

    def _spawn(self, service: str, location: Path) -> None:
        port = free_port(self.host)
        location.mkdir()
        args = [
            str(BIN_DIR / f"azurite-{service}"),
            f"--{service}Host",
            self.host,
            f"--{service}Port",
            str(port),
            # Azurite refuses --location together with --inMemoryPersistence.
            *(["--inMemoryPersistence"] if self.in_memory else ["--location", str(location)]),
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
            "--disableTelemetry",
        ]
        with open(self._log_path(service), "ab") as log:
            self._processes[service] = subprocess.Popen(
                args,
                cwd=location,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stop() reaches node's children
            )
        self.ports[service] = port

    def _wait_until_ready(self, service: str) -> None:
        process = self._processes[service]
        port = self.ports[service]
        deadline = time.monotonic() + self.start_timeout
        while not port_is_open(self.host, port):
            if process.poll() is not None:
                raise RuntimeError(
                    f"azurite-{service} exited with code {process.returncode} "
                    f"before listening on port {port}; "
                    f"log {self._log_path(service)}:\n{self._log_tail(service)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"azurite-{service} did not listen on port {port} "
                    f"within {self.start_timeout:.0f} s; "
                    f"log {self._log_path(service)}:\n{self._log_tail(service)}"
                )
            time.sleep(0.02)

    def _log_tail(self, service: str, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_path(service).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _terminate_group(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
