"""Stateful sessions: a session id -> the pinned model version, the recurrent state, steps so far.

The store is a small interface (`SessionStore`) so that a shared backend (Redis) can replace the
in-memory one later. The in-memory store keeps sessions in least-recently-used order: idle expiry
and overflow eviction both take from the front. A session's state is one flat float32 buffer of all
its layers' states, kept as `bytes` (a few hundred bytes of overhead per session, see the memory
benchmark). Evicted ids are remembered (bounded), so the next chunk learns why its session is gone.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rnnserve.server.errors import AlreadyExists, InvalidInput, NotFound, ResourceExhausted

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Reasons a session ends, as reported in metrics and in NOT_FOUND messages.
EXPIRED, LRU, CLOSED, UNLOADED = "expired", "lru", "closed", "model_unloaded"


@dataclass(slots=True, eq=False)
class Session:
    id: str
    model: str
    version: int
    steps: int
    state: bytes  # float32, all state tensors of all recurrent layers, concatenated
    last_used: float
    busy: bool = False  # a chunk is being computed

    def states(self, sizes: list[int]) -> list[np.ndarray]:
        flat = np.frombuffer(self.state, dtype=np.float32)
        return np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []

    def set_states(self, states: list[np.ndarray]) -> None:
        # A causal model without recurrent layers streams too; it just carries no state.
        self.state = np.concatenate(states).astype(np.float32).tobytes() if states else b""


def new_session_id() -> str:
    return secrets.token_hex(16)


def check_session_id(session_id: str) -> str:
    if not _ID.fullmatch(session_id):
        raise InvalidInput(
            f"session id {session_id[:40]!r} is invalid; expected 1-128 characters of "
            "letters, digits and . _ : -"
        )
    return session_id


class SessionStore(Protocol):
    max_sessions: int

    def add(self, session: Session) -> None: ...
    def now(self) -> float: ...
    def get(self, session_id: str) -> Session: ...
    def peek(self, session_id: str) -> Session | None: ...
    def remove(self, session_id: str, reason: str = CLOSED) -> Session | None: ...
    def expire(self, now: float | None = None) -> int: ...
    def ended_as(self, session_id: str) -> str | None: ...
    def why_missing(self, session_id: str) -> str: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Session]: ...


EvictionListener = Callable[[Session, str], None]


class MemorySessionStore:
    def __init__(
        self,
        *,
        ttl: float,
        max_sessions: int,
        overflow: str = "evict",
        on_end: EvictionListener | None = None,
        remember: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.now = clock
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.overflow = overflow
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> reason, bounded
        self._remember = remember
        self._on_end = on_end

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def add(self, session: Session) -> None:
        self.expire()  # first: an id whose session expired is free again
        if session.id in self._sessions:
            raise AlreadyExists(f"session {session.id} already exists")
        full = len(self._sessions) >= self.max_sessions
        if full and (self.overflow != "evict" or not self._evict_lru()):
            # Hint: when the least recently used session expires, if nobody uses it before.
            oldest = next(iter(self._sessions.values()), None)
            wait = self.ttl - (self.now() - oldest.last_used) if oldest else 1.0
            raise ResourceExhausted(
                f"too many sessions ({self.max_sessions} open); close idle sessions or retry later",
                retry_after=min(max(wait, 0.05), 5.0),
            )
        self._ended.pop(session.id, None)
        self._sessions[session.id] = session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or self._expired(session, self.now()):
            if session is not None:
                self._end(session, EXPIRED)
            raise NotFound(self.why_missing(session_id))
        session.last_used = self.now()
        self._sessions.move_to_end(session_id)
        return session

    def peek(self, session_id: str) -> Session | None:
        """The session if present, without counting as a use."""
        return self._sessions.get(session_id)

    def remove(self, session_id: str, reason: str = CLOSED) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None:
            self._end(session, reason)
        return session

    def expire(self, now: float | None = None) -> int:
        """End every session idle for longer than the TTL; returns how many."""
        now = self.now() if now is None else now
        count = 0
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if not self._expired(oldest, now):
                break
            self._end(oldest, EXPIRED)
            count += 1
        return count

    def _expired(self, session: Session, now: float) -> bool:
        return not session.busy and now - session.last_used > self.ttl

    def _evict_lru(self) -> bool:
        for session in self._sessions.values():
            if not session.busy:
                self._end(session, LRU)
                return True
        return False

    def _end(self, session: Session, reason: str) -> None:
        del self._sessions[session.id]
        self._ended[session.id] = reason
        if len(self._ended) > self._remember:
            self._ended.popitem(last=False)
        if self._on_end is not None:
            self._on_end(session, reason)

    def ended_as(self, session_id: str) -> str | None:
        """How the session of this id ended (a recent one), or None for an id never seen."""
        return self._ended.get(session_id)

    def why_missing(self, session_id: str) -> str:
        """Why there is no session of this id: it expired, was evicted, closed, unloaded."""
        reason = self.ended_as(session_id)
        if reason == EXPIRED:
            return f"session {session_id} expired after {self.ttl:g}s idle; open a new one"
        if reason == LRU:
            return (
                f"session {session_id} was evicted: the server holds at most {self.max_sessions} "
                "sessions and it was the least recently used; open a new one"
            )
        if reason == CLOSED:
            return f"session {session_id} was closed"
        if reason == UNLOADED:
            return f"session {session_id} ended: its model version was unloaded"
        return f"session {session_id} not found"
