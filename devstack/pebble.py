"""pebble, Let's Encrypt's ACME test server, on random loopback ports for the local stack.

pebble is a Debian package (``apt-get install pebble``; ``scripts/setup`` installs it). It serves
the ACME directory over HTTPS; the Debian package ships no test certificates, so it serves the
stack's server certificate (``devstack/keyvault/certs.py``, ``localhost``/``127.0.0.1``) and an
ACME client verifies it with the stack's CA. Certificates it issues chain to a root it makes at
start, fetched from its management endpoint (``/roots/0``). Its validation authority resolves
names through ``-dnsserver``: the stack's ``DnsServer``, which answers from the Azure DNS
stand-in. Challenges are really checked (``PEBBLE_VA_ALWAYS_VALID`` is never set); authorizations
are never reused (``PEBBLE_AUTHZREUSE=0``), so every order must pass its own challenge.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from types import TracebackType

from devstack.keyvault.certs import CertPaths, ensure_certs
from devstack.ports import free_port, port_is_open, wait_for_port

log = logging.getLogger("devstack.pebble")

_START_TIMEOUT = 30.0


def find_pebble() -> Path | None:
    """$PEBBLE, then pebble on PATH, then /usr/bin/pebble (the Debian package's); None if absent."""
    for candidate in (os.environ.get("PEBBLE"), shutil.which("pebble"), "/usr/bin/pebble"):
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return Path(candidate)
    return None


class PebbleNotFound(RuntimeError):
    pass


class Pebble:
    """One pebble process; ``directory_url`` is what an ACME client starts from."""

    def __init__(self, state_dir: Path, dns_server: str, *, binary: Path | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.dns_server = dns_server
        self.binary = binary or find_pebble()
        self._certs: CertPaths | None = None
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._port = 0
        self._management_port = 0

    def start(self) -> Pebble:
        if self._process is not None:
            raise RuntimeError("pebble is already running")
        if self.binary is None:
            raise PebbleNotFound("pebble is not installed: run scripts/setup (apt-get install pebble)")
        self._certs = ensure_certs(self.state_dir)
        self._workdir = Path(tempfile.mkdtemp(prefix="pebble-"))
        self._port, self._management_port = free_port(), free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self._port}",
                "managementListenAddress": f"127.0.0.1:{self._management_port}",
                "certificate": str(self._certs.cert),
                "privateKey": str(self._certs.key),
                # HTTP-01 / TLS-ALPN-01 validation ports: nothing listens there, DNS-01 is the challenge.
                "httpPort": free_port(),
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        config_path = self._workdir / "pebble-config.json"
        config_path.write_text(json.dumps(config, indent=2))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
        }
        log_file = (self._workdir / "pebble.log").open("wb")
        self._process = subprocess.Popen(
            [str(self.binary), "-config", str(config_path), "-dnsserver", self.dns_server],
            cwd=self._workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()
        try:
            for port in (self._port, self._management_port):
                wait_for_port("127.0.0.1", port, _START_TIMEOUT)
        except TimeoutError:
            output = self.output()
            self.stop()
            raise RuntimeError(f"pebble did not start: {output[-2000:]}") from None
        log.info("pebble at %s (DNS %s)", self.directory_url, self.dns_server)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Pebble:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return (
            self._process is not None
            and self._process.poll() is None
            and port_is_open("127.0.0.1", self._port)
        )

    @property
    def directory_url(self) -> str:
        if self._process is None:
            raise RuntimeError("pebble is not running")
        return f"https://127.0.0.1:{self._port}/dir"

    @property
    def ca_path(self) -> Path:
        """The CA that pebble's HTTPS certificate chains to (the stack's)."""
        if self._certs is None:
            raise RuntimeError("pebble is not running")
        return self._certs.ca

    def root_pem(self) -> bytes:
        """The root that the certificates pebble issues chain to (made at start, fetched each time)."""
        context = ssl.create_default_context(cafile=str(self.ca_path))
        url = f"https://127.0.0.1:{self._management_port}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return bytes(response.read())

    def output(self) -> str:
        """pebble's log so far (for failure messages)."""
        if self._workdir is None:
            return ""
        path = self._workdir / "pebble.log"
        return path.read_text(errors="replace") if path.is_file() else ""
