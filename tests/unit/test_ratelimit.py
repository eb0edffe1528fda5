"""The burst limit on repeated log lines (ratelimit.py)."""

from __future__ import annotations

from nbdquorum.ratelimit import Burst


def test_a_burst_passes_then_the_rest_is_counted_and_reported() -> None:
    now = [0.0]
    b = Burst(limit=3, period=1.0, clock=lambda: now[0])
    assert [b.admit("a") for _ in range(5)] == [0, 0, 0, None, None]
    assert b.admit("b") == 0  # keys are independent
    now[0] = 1.5
    assert b.admit("a") == 2  # the next window's first line says how many were held
    assert b.admit("a") == 0


def test_a_quiet_key_never_reports_anything_held() -> None:
    now = [0.0]
    b = Burst(limit=2, period=1.0, clock=lambda: now[0])
    for t in range(10):
        now[0] = float(t)
        assert b.admit("x") == 0
