"""The one deadline helper behind every bounded wait: a wait ends when its predicate holds, when
the predicate raises, or once the deadline passed, and wake-ups never restart the clock."""

from __future__ import annotations

import threading

import pytest

from weightstream.deadline import Deadline, wait_until
from weightstream.protocol.errors import PeerTimeout, VersionAborted
from weightstream.sender.ring import SlotRing

pytestmark = pytest.mark.timeout(30)


def test_a_deadline_counts_down_from_its_start() -> None:
    far = Deadline(60.0)
    assert not far.expired() and 0 < far.left() <= 60.0 and far.timeout == 60.0
    assert Deadline(0).expired() and Deadline(0).left() <= 0
    assert Deadline(-1.0).expired()


def test_wait_until_returns_at_once_when_the_predicate_holds() -> None:
    cond = threading.Condition()
    with cond:
        assert wait_until(cond, lambda: True, Deadline(0))  # checked before the deadline


def test_wait_until_gives_up_at_the_deadline_however_often_it_is_woken() -> None:
    cond, stop = threading.Condition(), threading.Event()

    def nag() -> None:  # wake-ups that change nothing must not restart the clock
        while not stop.is_set():
            with cond:
                cond.notify_all()
            stop.wait(0.005)

    thread = threading.Thread(target=nag)
    thread.start()
    try:
        with cond:
            assert not wait_until(cond, lambda: False, Deadline(0.3))
    finally:
        stop.set()
        thread.join(5)


def test_wait_until_wakes_for_the_change_it_waits_for() -> None:
    cond, state = threading.Condition(), {"done": False}

    def finish() -> None:
        with cond:
            state["done"] = True
            cond.notify_all()

    timer = threading.Timer(0.05, finish)
    timer.start()
    try:
        with cond:
            assert wait_until(cond, lambda: state["done"], Deadline(20.0))
    finally:
        timer.join(5)


def test_a_predicate_that_raises_ends_the_wait() -> None:
    cond = threading.Condition()

    def failed() -> bool:
        raise VersionAborted("the round failed")

    with cond, pytest.raises(VersionAborted, match="the round failed"):
        wait_until(cond, failed, Deadline(20.0))


def test_the_slot_ring_waits_through_the_helper() -> None:
    """A caller of the helper: a slot freed while the packer waits is handed out; none freed is
    a PeerTimeout; a failed round ends the wait with its error."""
    cond = threading.Condition()
    ring = SlotRing(1, cond)
    assert ring.acquire(1.0, lambda: None) == 0
    with pytest.raises(PeerTimeout, match=r"no bucket slot was freed within 0.1s"):
        ring.acquire(0.1, lambda: None)

    def free() -> None:
        with cond:
            ring.release(0)

    timer = threading.Timer(0.05, free)
    timer.start()
    try:
        assert ring.acquire(20.0, lambda: None) == 0
    finally:
        timer.join(5)

    def check() -> None:
        raise VersionAborted("rank 1 failed")

    with pytest.raises(VersionAborted, match="rank 1 failed"):
        ring.acquire(20.0, check)
