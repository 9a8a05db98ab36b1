"""Client-side pacing to each vault's Key Vault budget.

Key Vault allows each vault 300 secret creates and 4,000 other transactions
per 10 s and answers 429 beyond, with no Retry-After. A fleet of secrets due at
once would otherwise hit that wall, retry blind and spend the budget that the
applications reading their secrets need too. So every request this worker sends
to a vault first waits its turn in a sliding window per vault and per kind
(secret creates, everything else); the retry policy still covers the 429s other
workers cause.
"""

import threading
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.core.rest import HttpRequest, HttpResponse

# Our clock and Key Vault's disagree by the network's jitter: keep a little under the limit
# (a quarter of a second on Key Vault's 10-second window).
WINDOW_MARGIN = 0.025


class SlidingWindow:
    """At most `limit` admissions in any `window` seconds; callers wait their turn, in order."""

    def __init__(
        self,
        limit: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit and window must be positive")
        self.limit, self.window = limit, window
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._starts: deque[float] = deque()  # the last `limit` admissions, oldest first

    def wait_turn(self) -> float:
        """Block until this call may start; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            start = now
            if len(self._starts) >= self.limit:
                start = max(now, self._starts.popleft() + self.window)
            self._starts.append(start)
        delay = start - now
        if delay > 0:
            self._sleep(delay)
        return delay


def is_secret_create(method: str, url: str) -> bool:
    """`PUT /secrets/{name}`: what Key Vault counts against its secret-create limit."""
    segments = [part for part in urlsplit(url).path.split("/") if part]
    return method.upper() == "PUT" and len(segments) == 2 and segments[0].lower() == "secrets"


class VaultBudget:
    """The two windows of one vault."""

    def __init__(self, creates: int, others: int, window: float) -> None:
        self.creates = SlidingWindow(creates, window * (1 + WINDOW_MARGIN))
        self.others = SlidingWindow(others, window * (1 + WINDOW_MARGIN))


class PacingPolicy(SansIOHTTPPolicy[HttpRequest, HttpResponse]):
    """Waits for the vault's budget before each attempt (it sits after the retry policy)."""

    def __init__(self, budget: VaultBudget) -> None:
        self._budget = budget

    def on_request(self, request: PipelineRequest[HttpRequest]) -> None:
        http_request = request.http_request
        if is_secret_create(http_request.method, http_request.url):
            self._budget.creates.wait_turn()
        else:
            self._budget.others.wait_turn()


_budgets: dict[str, VaultBudget] = {}
_budgets_lock = threading.Lock()


def budget_for(vault_url: str, creates: int, others: int, window: float) -> VaultBudget:
    """One budget per vault per worker process, shared by its secret and key clients."""
    host = urlsplit(vault_url).netloc.lower()
    with _budgets_lock:
        budget = _budgets.get(host)
        wanted = (creates, others, window * (1 + WINDOW_MARGIN))
        if budget is None or (budget.creates.limit, budget.others.limit, budget.creates.window) != wanted:
            budget = _budgets[host] = VaultBudget(creates, others, window)
        return budget
