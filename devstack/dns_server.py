"""A small authoritative DNS server on 127.0.0.1 (UDP) answering TXT queries from a lookup.

Pebble validates a DNS-01 challenge by asking ``-dnsserver`` for the TXT records of
``_acme-challenge.<domain>``; this answers them from the Azure DNS stand-in's record sets
(``ArmDnsStandIn.txt``), so a challenge passes only if the service really wrote the record through
azure-mgmt-dns. Names outside every zone are REFUSED, names in a zone without records NXDOMAIN,
other record types at a name get an empty answer.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from types import TracebackType

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger("devstack.dns_server")

Lookup = Callable[[str], list[list[str]] | None]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class DnsServer:
    """Answers TXT queries over UDP from ``lookup(fqdn)`` (None: not our zone)."""

    def __init__(self, lookup: Lookup, ttl: int = 0) -> None:
        self._lookup = lookup
        self._ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> DnsServer:
        if self._sock is not None:
            raise RuntimeError("the DNS server is already running")
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._serve, args=(self._sock,), name="dns-server", daemon=True
        )
        self._thread.start()
        log.info("DNS server at %s", self.address)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        self._sock = self._thread = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """host:port, as pebble's ``-dnsserver`` takes it."""
        if self._sock is None:
            raise RuntimeError("the DNS server is not running")
        host, port = self._sock.getsockname()
        return f"{host}:{port}"

    def _serve(self, sock: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self.answer(data)
            if answer is not None:
                try:
                    sock.sendto(answer, peer)
                except OSError:
                    log.debug("could not answer %s", peer)

    def answer(self, data: bytes) -> bytes | None:
        """The wire answer to one query; None for garbage (dropped, as a server would)."""
        try:
            query = dns.message.from_wire(data)
        except Exception:  # dnspython raises many kinds of parse errors: a hostile datagram
            log.debug("dropped a malformed DNS query")
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return bytes(response.to_wire())
        question = query.question[0]
        name = question.name.to_text().lower()
        self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
        records = self._lookup(name)
        if records is None:
            response.set_rcode(dns.rcode.REFUSED)
        elif not records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT:
            # A TXT character-string holds 255 bytes: longer values go out as several strings.
            texts = [
                " ".join(_quote(part[i : i + 255]) for part in record for i in range(0, len(part) or 1, 255))
                for record in records
            ]
            response.answer.append(
                dns.rrset.from_text(question.name, self._ttl, dns.rdataclass.IN, dns.rdatatype.TXT, *texts)
            )
        return bytes(response.to_wire())
