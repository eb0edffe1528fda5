"""QEMU's event rate limit with a virtual clock, in the shape of qemu-iotests 148."""

from __future__ import annotations

from nbdquorum.eventbus import Event
from nbdquorum.qmp.throttle import EventThrottle


def bad(node: str, sector: int, ts: float) -> Event:
    return Event("QUORUM_REPORT_BAD", {"node-name": node, "sectors-count": 1,
                                       "sector-num": sector, "type": "read"}, ts)


def failure(ref: str, ts: float) -> Event:
    return Event("QUORUM_FAILURE", {"reference": ref, "sectors-count": 1, "sector-num": 0}, ts)


def test_first_event_is_immediate_then_the_last_of_the_window_is_delayed() -> None:
    t = EventThrottle()
    e1, e2, e3, e4 = (bad("img0", 10, 100 + i / 1000) for i in range(4))
    assert t.push(e1, 0.0) == [e1]
    assert t.push(e2, 0.01) == []
    assert t.push(e3, 0.02) == []
    assert t.push(e4, 0.03) == []
    assert t.next_deadline() == 1.0
    assert t.due(0.99) == []
    assert t.due(1.0) == [e4]  # the last one, with its own (earlier) timestamp
    assert e4.timestamp == 100.003
    # a new window opened when e4 went out; it closes empty
    assert t.next_deadline() == 2.0
    assert t.due(2.0) == []
    assert t.next_deadline() is None
    assert t.pending() == []


def test_events_spaced_wider_than_the_window_all_pass() -> None:
    t = EventThrottle()
    now = 0.0
    for _ in range(3):
        ev = bad("img0", 10, now)
        assert t.push(ev, now) == [ev]
        now += 2.0
        assert t.due(now) == []


def test_report_bad_is_keyed_by_node_name() -> None:
    t = EventThrottle()
    evs = [bad(f"img{i}", 10 + i, 0) for i in range(3)]
    assert [t.push(e, i * 1e-8) for i, e in enumerate(evs)] == [[e] for e in evs]


def test_failure_is_keyed_by_event_name_alone() -> None:
    t = EventThrottle()
    a, b = failure("q0", 0), failure("q1", 0)
    assert t.push(a, 0) == [a]
    assert t.push(b, 0.1) == []  # another quorum's failure shares the slot, as in QEMU
    assert t.due(1.0) == [b]


def test_other_events_are_never_throttled() -> None:
    t = EventThrottle()
    evs = [Event("JOB_STATUS_CHANGE", {"status": s, "id": "j"}, 0)
           for s in ("created", "running", "concluded")]
    assert [t.push(e, 0) for e in evs] == [[e] for e in evs]
    assert t.next_deadline() is None


def test_steady_stream_gives_one_event_a_period() -> None:
    t = EventThrottle()
    sent: list[Event] = []
    now = 0.0
    while now < 10.0:
        for deadline_hit in t.due(now):
            sent.append(deadline_hit)
        sent += t.push(bad("img0", 0, now), now)
        now = round(now + 0.01, 6)
    sent += t.due(now + 1)
    assert 10 <= len(sent) <= 12


def test_zero_period_disables_throttling() -> None:
    t = EventThrottle({"QUORUM_REPORT_BAD": 0})
    evs = [bad("img0", 0, i) for i in range(5)]
    assert [t.push(e, 0) for e in evs] == [[e] for e in evs]
