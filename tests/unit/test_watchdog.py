"""The blocking client's shared deadline thread (a stream's `send(timeout=)`)."""

from __future__ import annotations

import gc
import threading
import weakref

from rnnserve.client.watchdog import Watchdog

WAIT = 10.0  # generous: only a broken watchdog takes this long


def test_alarms_fire_in_order_of_their_deadlines_not_of_their_setting() -> None:
    watchdog = Watchdog()
    fired: list[str] = []
    both = threading.Event()

    def later() -> None:
        fired.append("later")
        both.set()

    watchdog.after(0.3, later)
    watchdog.after(0.05, lambda: fired.append("sooner"))  # set second, due first
    assert both.wait(WAIT)
    assert fired == ["sooner", "later"]


def test_a_cancelled_alarm_never_fires_and_lets_go_of_its_action() -> None:
    watchdog = Watchdog()
    fired = threading.Event()

    class Held:  # stands for the gRPC call an alarm would cancel
        pass

    held = Held()
    ref = weakref.ref(held)
    alarm = watchdog.after(0.05, lambda h=held: fired.set())
    alarm.cancel()
    del held
    gc.collect()
    assert ref() is None  # not kept for the whole timeout
    later = threading.Event()
    watchdog.after(0.1, later.set)  # past the cancelled one's deadline
    assert later.wait(WAIT)
    assert not fired.is_set()


def test_a_failing_action_does_not_stop_the_watchdog() -> None:
    watchdog = Watchdog()

    def fail() -> None:
        raise RuntimeError("boom")

    watchdog.after(0.0, fail)
    after = threading.Event()
    watchdog.after(0.05, after.set)
    assert after.wait(WAIT)


def test_cancelled_alarms_do_not_pile_up() -> None:
    watchdog = Watchdog()
    for _ in range(5000):  # a stream of chunks answered well within their 30 s
        watchdog.after(30.0, lambda: None).cancel()
    assert len(watchdog._due) <= 600
    now = threading.Event()
    watchdog.after(0.0, now.set)  # still fires at once
    assert now.wait(WAIT)
