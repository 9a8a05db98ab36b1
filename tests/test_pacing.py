"""Client-side pacing to a vault's budget (pure logic, on a fake clock)."""

import pytest

from shared.pacing import SlidingWindow, is_secret_create


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_burst_up_to_the_limit_passes_then_each_call_waits_for_the_window_to_slide() -> None:
    clock = FakeClock()
    window = SlidingWindow(3, 10.0, clock=clock, sleep=clock.sleep)
    starts = []
    for _ in range(7):
        window.wait_turn()
        starts.append(clock.now)
    assert starts == [0.0, 0.0, 0.0, 10.0, 10.0, 10.0, 20.0]
    # Whatever four consecutive calls you pick, they span at least the window.
    assert all(starts[i + 3] - starts[i] >= 10.0 for i in range(len(starts) - 3))


def test_a_quiet_period_refills_the_budget() -> None:
    clock = FakeClock()
    window = SlidingWindow(2, 1.0, clock=clock, sleep=clock.sleep)
    window.wait_turn()
    window.wait_turn()
    clock.now += 5
    assert window.wait_turn() == 0
    assert window.wait_turn() == 0
    assert window.wait_turn() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("method", "url", "create"),
    [
        ("PUT", "https://v.vault.azure.net/secrets/db-password?api-version=7.6", True),
        ("put", "https://v.vault.azure.net/Secrets/x", True),
        ("GET", "https://v.vault.azure.net/secrets/db-password", False),
        ("PATCH", "https://v.vault.azure.net/secrets/db-password/0123", False),
        ("PUT", "https://v.vault.azure.net/secrets/db-password/0123", False),
        ("POST", "https://v.vault.azure.net/keys/k/rotate", False),
    ],
)
def test_what_counts_as_a_secret_create(method: str, url: str, create: bool) -> None:
    assert is_secret_create(method, url) is create


def test_nonsense_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        SlidingWindow(0, 10.0)
