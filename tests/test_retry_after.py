"""Retry-After on a full queue (service/async_engine.py): the seconds until
enough sequences have left for the refused one to fit, at the measured rate."""

from service.async_engine import MAX_RETRY_AFTER_S, RETRY_AFTER_S, DepartureRate, retry_after_s


def test_retry_after_is_excess_over_the_drain_rate_rounded_up_and_bounded():
    assert retry_after_s(1, None) == RETRY_AFTER_S  # nothing has left yet: the least
    assert retry_after_s(10, 4.0) == 3  # 10 must leave at 4/s: 2.5 s -> 3
    assert retry_after_s(1, 100.0) == RETRY_AFTER_S  # never 0
    assert retry_after_s(1000, 0.5) == MAX_RETRY_AFTER_S


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_departure_rate_counts_the_last_window_only():
    clock = Clock()
    rate = DepartureRate(window_s=10.0, clock=clock)
    assert rate.per_s() is None
    for _ in range(5):
        clock.t += 1.0
        rate.record()
    assert rate.per_s() == 1.0  # 5 departures in the 5 s since start
    clock.t = 20.0
    rate.record()
    assert rate.per_s() == 0.1  # the first five left the 10 s window
    clock.t = 40.0
    assert rate.per_s() is None
