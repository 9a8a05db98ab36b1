"""Bounded retries with jitter for transient failures of Azure calls.

azure-core already retries idempotent requests, but not POST or PATCH on 429,
and Key Vault's real 429 usually carries no Retry-After. This policy covers
every call the engine makes: 408/429/5xx and connection failures, a bounded
number of attempts, exponential backoff with full jitter, and Retry-After
honoured when the service sends it.
"""

import logging
from collections.abc import Callable
from typing import TypeVar

from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

logger = logging.getLogger(__name__)

T = TypeVar("T")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_SECONDS = 30.0


def is_transient(error: BaseException) -> bool:
    if isinstance(error, ServiceRequestError | ServiceResponseError | ConnectionError | TimeoutError):
        return True
    if isinstance(error, HttpResponseError):
        return error.status_code in TRANSIENT_STATUS
    return False


def _retry_after(error: BaseException | None) -> float | None:
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return min(float(value), MAX_RETRY_AFTER_SECONDS) if value is not None else None
    except ValueError:
        return None


class _WaitRetryAfterOrJitter:
    def __init__(self, base: float, cap: float) -> None:
        self._jitter = wait_random_exponential(multiplier=base, max=cap)

    def __call__(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        server_says = _retry_after(error)
        return server_says if server_says is not None else self._jitter(state)


def call_with_retry(
    operation: Callable[[], T],
    *,
    what: str,
    attempts: int = 5,
    base_delay: float = 0.2,
    max_delay: float = 5.0,
) -> T:
    """Run `operation`, retrying transient failures; other errors propagate at once."""

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            "transient failure of %s (attempt %d): %s", what, state.attempt_number, type(error).__name__
        )

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(attempts),
        wait=_WaitRetryAfterOrJitter(base_delay, max_delay),
        before_sleep=log_retry,
        reraise=True,
    )
    return retrying(operation)
