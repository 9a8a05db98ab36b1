"""Admin sessions kept open between rotations, per server and login.

A rotation's admin work is a few statements; opening its connection (a server fork and a SCRAM
exchange) costs more than all of them. A sweep rotating many roles on one server borrows an
idle session instead. A session is kept for at most `max_age` after it opened (the admin-secret
cache's lifetime: a rotated admin password stops being used within it) and `IDLE_SECONDS`
unused; a background thread closes the idle ones, so a quiet worker holds no connections. A
borrowed session is checked with an empty query first: one that a server restart or a network
cut has broken is closed, never handed out.
"""

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg

IDLE_SECONDS = 30.0
MAX_IDLE_PER_LOGIN = 8

SessionKey = tuple[str, int, str, str, str]


def session_key(host: str, port: int, dbname: str, user: str, password: str) -> SessionKey:
    """Sessions are shared only by the same login; the password is kept as a digest."""
    return host, port, dbname, user, hashlib.sha256(password.encode()).hexdigest()


@dataclass
class Session:
    conn: psycopg.Connection[Any]
    closes_at: float  # time.monotonic(): opened + max_age
    idle_since: float = 0.0


class AdminSessions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[SessionKey, list[Session]] = {}  # most recently returned last
        self._reaper: threading.Thread | None = None

    def borrow(self, key: SessionKey) -> Session | None:
        """An idle session of this login that still answers, or None."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                session = idle.pop()
            if session.closes_at <= time.monotonic():
                session.conn.close()
                continue
            try:
                session.conn.execute("")
                return session
            except psycopg.Error:
                session.conn.close()

    def give_back(self, key: SessionKey, session: Session) -> None:
        """Keep the session for the next rotation if it is healthy, idle and young enough."""
        now = time.monotonic()
        conn = session.conn
        healthy = not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if healthy and session.closes_at > now:
            with self._lock:
                idle = self._idle.setdefault(key, [])
                if len(idle) < MAX_IDLE_PER_LOGIN:
                    session.idle_since = now
                    idle.append(session)
                    if self._reaper is None:
                        self._reaper = threading.Thread(
                            target=self._reap, name="pg-admin-reaper", daemon=True
                        )
                        self._reaper.start()
                    return
        conn.close()

    def _reap(self) -> None:
        while True:
            time.sleep(IDLE_SECONDS / 3)
            now = time.monotonic()
            expired: list[Session] = []
            with self._lock:
                for key in list(self._idle):
                    keep: list[Session] = []
                    for session in self._idle[key]:
                        fresh = session.closes_at > now and now - session.idle_since < IDLE_SECONDS
                        (keep if fresh else expired).append(session)
                    if keep:
                        self._idle[key] = keep
                    else:
                        del self._idle[key]
                done = not self._idle
                if done:
                    self._reaper = None
            for session in expired:
                session.conn.close()
            if done:
                return
