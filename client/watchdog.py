"""Deadlines for blocking waits that have none of their own (the next answer of a stream), fired by
one shared thread: a `threading.Timer` per chunk cost a thread start, ~140 µs, on every send."""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Cancelled entries stay in the heap until they come up; past this many, the heap is rebuilt.
_COMPACT_AT = 256


class Alarm:
    """One deadline; `cancel()` it once the wait is over."""

    __slots__ = ("action", "due", "watchdog")

    def __init__(self, due: float, action: Callable[[], None], watchdog: Watchdog) -> None:
        self.due = due
        self.action: Callable[[], None] | None = action
        self.watchdog = watchdog

    def __lt__(self, other: Alarm) -> bool:
        return self.due < other.due

    def cancel(self) -> None:
        self.watchdog._cancel(self)


class Watchdog:
    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._due: list[Alarm] = []
        self._cancelled = 0
        self._thread: threading.Thread | None = None

    def after(self, seconds: float, action: Callable[[], None]) -> Alarm:
        """Call `action` (on the watchdog's thread) in `seconds`, unless cancelled before."""
        alarm = Alarm(time.monotonic() + seconds, action, self)
        with self._wake:
            heapq.heappush(self._due, alarm)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="rnnserve-client-watchdog", daemon=True
                )
                self._thread.start()
            if self._due[0] is alarm:  # sooner than what the thread waits for
                self._wake.notify()
        return alarm

    def _cancel(self, alarm: Alarm) -> None:
        with self._wake:
            if alarm.action is None:
                return  # fired or cancelled already
            alarm.action = None  # drops what it holds (a call) now, not when it comes up
            self._cancelled += 1
            if self._cancelled > _COMPACT_AT and self._cancelled * 2 > len(self._due):
                self._due = [a for a in self._due if a.action is not None]
                heapq.heapify(self._due)
                self._cancelled = 0

    def _run(self) -> None:
        with self._wake:
            while True:
                if not self._due:
                    self._wake.wait()
                    continue
                first = self._due[0]
                if first.action is None:
                    heapq.heappop(self._due)
                    self._cancelled -= 1
                    continue
                delay = first.due - time.monotonic()
                if delay > 0:
                    self._wake.wait(delay)
                    continue
                heapq.heappop(self._due)
                action, first.action = first.action, None
                self._wake.release()  # the action may take time, and others may set alarms
                try:
                    action()
                except Exception:
                    log.exception("a client deadline action failed")
                finally:
                    self._wake.acquire()


WATCHDOG = Watchdog()
