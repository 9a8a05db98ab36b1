"""The lifecycle every HTTPS stand-in of the stack shares (vendor API, Graph, Azure DNS)."""

import logging
import ssl
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

from devstack.keyvault.certs import CertPaths, ensure_certs
from devstack.tls_server import TlsHTTPServer

log = logging.getLogger("devstack.served")


class ServedStandIn:
    """Start, stop and `with` for a stand-in that one TlsHTTPServer serves from a background
    thread, with a certificate from the CA in `state_dir` (the Key Vault emulator's, so that one
    CA file trusts every stand-in). Subclasses build the server in `_serve`."""

    label = "stand-in"  # the thread's name, and the stand-in's in messages

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self._certs: CertPaths | None = None
        self._server: TlsHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _serve(self, context: ssl.SSLContext) -> TlsHTTPServer:
        raise NotImplementedError

    def _started(self) -> None:
        log.info("%s at https://127.0.0.1:%d", self.label, self.port)

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError(f"the {self.label} is already running")
        self._certs = ensure_certs(self.state_dir)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._certs.cert, self._certs.key)
        self._server = self._serve(context)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=self.label, daemon=True
        )
        self._thread.start()
        self._started()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server, self._thread = None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"the {self.label} is not running")
        return int(self._server.server_address[1])

    @property
    def ca_path(self) -> Path:
        if self._certs is None:
            raise RuntimeError(f"the {self.label} is not running")
        return self._certs.ca
