"""The in-memory session store's rules, on a clock the test moves."""

from __future__ import annotations

import pytest

from rnnserve.server.errors import AlreadyExists
from rnnserve.server.sessions import EXPIRED, MemorySessionStore, Session


def _session(session_id: str, now: float) -> Session:
    return Session(id=session_id, model="m", version=1, steps=0, state=b"", last_used=now)


def test_the_id_of_an_expired_session_is_free_again() -> None:
    """Between expiry sweeps, a session past its TTL is already gone for a step ("expired");
    reopening its id must work too, not answer ALREADY_EXISTS."""
    clock = [0.0]
    ended: list[tuple[str, str]] = []
    store = MemorySessionStore(
        ttl=10.0,
        max_sessions=5,
        clock=lambda: clock[0],
        on_end=lambda s, why: ended.append((s.id, why)),
    )
    store.add(_session("a", 0.0))
    with pytest.raises(AlreadyExists):
        store.add(_session("a", 0.0))  # alive: the id is taken
    clock[0] = 11.0  # past the TTL, no sweep yet
    store.add(_session("a", 11.0))
    assert ended == [("a", EXPIRED)]
    assert store.get("a").last_used == 11.0
