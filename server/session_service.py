"""Session operations shared by the streaming RPC and the unary session calls: open, step, close,
export, import, and the snapshot written on shutdown and read at start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from google.protobuf.message import DecodeError

from rnnserve.client.tensors import from_tensor, to_tensor
from rnnserve.server.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ServeError,
    Unavailable,
)
from rnnserve.server.inputs import decode_sequence
from rnnserve.server.outputs import Selection, encode_row, select
from rnnserve.server.repository import Repository
from rnnserve.server.served_model import ServedModel
from rnnserve.server.sessions import (
    UNLOADED,
    Session,
    SessionStore,
    check_session_id,
    new_session_id,
)
from rnnserve.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

# Timesteps a session may say it has consumed: far beyond any stream (a million years at 100 Hz),
# far from int64's end, which a chunk added to a tampered count would pass.
MAX_STEPS = 2**53


class SessionService:
    def __init__(self, repository: Repository, store: SessionStore, *, saved: bool = False) -> None:
        self.repository = repository
        self.store = store
        self.saved = saved  # sessions are saved at shutdown (--session-snapshot)
        self.in_flight = 0  # chunks being computed
        self.frozen = False  # shutting down, sessions saved: no chunk may change them any more
        self._quiet = asyncio.Event()  # set while in_flight == 0
        self._quiet.set()

    def after_shutdown(self, session_id: str) -> str:
        """What becomes of a session when this server stops, for the refusals of shutdown."""
        if self.saved:
            return f"resume session {session_id} later"
        return f"session {session_id} ends with it (the server keeps no --session-snapshot)"

    def freeze(self) -> None:
        """Apply no chunk from now on: one still computing gets UNAVAILABLE when it comes back."""
        self.frozen = True

    async def quiesce(self, timeout: float) -> bool:
        """Wait until no chunk is being computed (at most `timeout` seconds): once new chunks are
        refused, the states are final and can be saved. True if it got there."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet.wait(), max(timeout, 0.0))
        return not self.in_flight

    def unpin(self, session: Session) -> None:
        """A session ended (closed, expired or evicted): its model version no longer waits for
        it."""
        try:
            model = self.repository.resolve(session.model, session.version, draining_ok=True)
        except NotFound:
            return
        model.sessions.discard(session.id)

    def info(self, session: Session) -> pb.SessionInfo:
        return pb.SessionInfo(
            session_id=session.id,
            model_name=session.model,
            model_version=session.version,
            steps=session.steps,
            idle_ttl_seconds=self.store.ttl,
        )

    def _streamable(self, name: str, version: int, *, draining_ok: bool = False) -> ServedModel:
        model = self.repository.resolve(name, version, draining_ok=draining_ok)
        if not model.plan.can_stream:
            why = "; ".join(model.plan.notes) or "it is not causal"
            raise FailedPrecondition(f"model {name} version {model.version} cannot stream: {why}")
        return model

    def open(self, name: str, version: int = 0, session_id: str = "") -> Session:
        model = self._streamable(name, version)
        session = Session(
            id=check_session_id(session_id) if session_id else new_session_id(),
            model=model.name,
            version=model.version,
            steps=0,
            state=bytes(4 * sum(model.plan.state_sizes)),
            last_used=self.store.now(),
        )
        self.store.add(session)
        model.sessions.add(session.id)
        return session

    def model_of(self, session: Session) -> ServedModel:
        try:
            return self.repository.resolve(session.model, session.version, draining_ok=True)
        except NotFound:
            self.store.remove(session.id, UNLOADED)
            raise

    def selection(self, session: Session, mode: int, top_k: int) -> Selection:
        return select(self.model_of(session), mode, (), top_k)

    async def step(
        self,
        session_id: str,
        chunk: pb.Chunk,
        selection: Selection | None = None,
        *,
        mode: int = pb.OUTPUT_MODE_BOTH,
        top_k: int = 0,
        deadline: float | None = None,
    ) -> pb.StepResponse:
        """Apply one chunk. On any error nothing is applied, so the chunk can be sent again."""
        session = self.store.get(check_session_id(session_id))
        model = self.model_of(session)
        if session.busy:
            raise FailedPrecondition(
                f"session {session.id} is busy with another chunk; send chunks one at a time"
            )
        if chunk.HasField("offset") and chunk.offset != session.steps:
            raise FailedPrecondition(
                f"chunk out of order for session {session.id}: it starts at offset {chunk.offset} "
                f"but the session has consumed {session.steps} timesteps; nothing was applied"
            )
        x = decode_sequence(model.inputs, chunk.data, f"chunk of session {session.id}")
        if selection is None:
            selection = select(model, mode, (), top_k)
        session.busy = True
        self.in_flight += 1
        self._quiet.clear()
        try:
            states = session.states(model.plan.state_sizes)
            row = await model.batcher.submit_nowait(x, states, deadline=deadline, session=session)
            if self.frozen:
                raise Unavailable(
                    "server is shutting down; this chunk was not applied, "
                    + self.after_shutdown(session.id)
                )
            session.set_states(row.states)
            session.steps += len(x)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._quiet.set()
            session.busy = False
            session.last_used = self.store.now()
        response = pb.StepResponse(session_id=session.id, steps=session.steps)
        encode_row(row, len(x), selection, response.result)
        return response

    def close(self, session_id: str) -> pb.SessionInfo:
        session = self.store.get(check_session_id(session_id))
        if session.busy:
            raise FailedPrecondition(f"session {session.id} is busy with a chunk; close it after")
        self.store.remove(session.id)
        return self.info(session)

    def export(self, session_id: str, remove: bool = False) -> pb.SessionState:
        session = self.store.get(check_session_id(session_id))
        model = self.model_of(session)
        state = pb.SessionState(
            session_id=session.id,
            model_name=session.model,
            model_version=session.version,
            steps=session.steps,
            states=[to_tensor(s) for s in session.states(model.plan.state_sizes)],
        )
        if remove:
            self.close(session_id)
        return state

    def import_(self, state: pb.SessionState) -> Session:
        if state.model_version <= 0:
            raise InvalidInput("a session state names its model version; got none")
        model = self._streamable(state.model_name, state.model_version, draining_ok=True)
        sizes = model.plan.state_sizes
        try:
            arrays = [from_tensor(t) for t in state.states]
        except ValueError as exc:
            raise InvalidInput(f"session state: {exc}") from None
        got = [a.shape for a in arrays]
        if got != [(s,) for s in sizes]:
            raise InvalidInput(
                f"session state for {model.name} version {model.version} needs state tensors of "
                f"sizes {sizes}, got shapes {[list(g) for g in got]}"
            )
        with np.errstate(over="ignore"):  # float64 beyond float32's range: Inf, refused below
            arrays = [a.astype(np.float32) for a in arrays]
        if not all(np.isfinite(a).all() for a in arrays):
            raise InvalidInput("session state holds NaN or Inf (as float32)")
        if not 0 <= state.steps <= MAX_STEPS:
            raise InvalidInput(f"session state has steps {state.steps}; expected 0 to {MAX_STEPS}")
        session = Session(
            id=check_session_id(state.session_id) if state.session_id else new_session_id(),
            model=model.name,
            version=model.version,
            steps=state.steps,
            state=b"",
            last_used=self.store.now(),
        )
        if arrays:
            session.set_states(arrays)
        self.store.add(session)
        model.sessions.add(session.id)
        return session

    # ---- snapshots ----

    def save(self, path: Path) -> int:
        """Write every session to `path` (length-prefixed SessionState messages), atomically."""
        tmp = path.with_name(path.name + ".tmp")
        count = 0
        try:
            with tmp.open("wb") as out:
                for session in self.store:
                    try:
                        message = self.export(session.id).SerializeToString()
                    except Exception as exc:  # one session must not cost the others theirs
                        log.warning("session %s not saved: %s", session.id, exc)
                        continue
                    _write_record(out, message)
                    count += 1
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return count

    def restore(self, path: Path) -> int:
        """Import the sessions saved in `path`. A damaged file never stops the server: what can
        be read is restored, and the file is kept aside as `<name>.bad` for a post-mortem."""
        if not path.is_file():
            return 0
        restored = 0
        refused: list[pb.SessionState] = []
        try:
            for state in _read_states(path.read_bytes()):
                if len(self.store) >= self.store.max_sessions:  # (evicting would lose them)
                    refused.append(state)
                    continue
                try:
                    self.import_(state)
                    restored += 1
                except ServeError as exc:
                    log.warning("session %s not restored: %s", state.session_id, exc)
                    refused.append(state)
        except (OSError, ValueError) as exc:
            bad = path.with_name(path.name + ".bad")
            log.error(
                "session snapshot %s is damaged (%s): restored %d sessions from it, moved it to %s",
                path,
                exc,
                restored,
                bad,
            )
            os.replace(path, bad)
        if refused:
            self._keep_aside(path, refused)
        return restored

    @staticmethod
    def _keep_aside(path: Path, refused: list[pb.SessionState]) -> None:
        """Sessions whose model version is not served now (a restart that loaded a newer one,
        or a model that failed to load) go to `<name>.unrestored` instead of being lost with the
        snapshot: served again with that version loaded (`--session-snapshot` naming the file),
        they come back. Appended, so that a second such restart does not lose the first's."""
        aside = path.with_name(path.name + ".unrestored")
        try:
            with aside.open("ab") as out:
                for state in refused:
                    _write_record(out, state.SerializeToString())
        except OSError as exc:
            log.error("could not keep %d unrestored sessions in %s: %s", len(refused), aside, exc)
            return
        log.warning(
            "%d sessions were not restored (their model versions are not served, or the "
            "server holds --max-sessions already); kept in %s",
            len(refused),
            aside,
        )

    def retire_snapshot(self, path: Path) -> None:
        """Delete a snapshot once its sessions are restored and served. Were it kept, a crash
        later would bring back these states, older than what clients have sent since, silently;
        without it, such sessions are plainly unknown."""
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # a read-only mount: serving matters more than the old file
            log.warning(
                "could not delete the restored session snapshot %s (%s): after a crash it "
                "would bring back these older states",
                path,
                exc.strerror,
            )


_LENGTH = struct.Struct("<I")  # snapshot records: 4-byte length, then a SessionState


def _write_record(out: BinaryIO, message: bytes) -> None:
    out.write(_LENGTH.pack(len(message)))
    out.write(message)


def _read_states(data: bytes) -> Iterable[pb.SessionState]:
    pos = 0
    while pos < len(data):
        if pos + _LENGTH.size > len(data):
            raise ValueError(f"truncated record header at byte {pos}")
        (size,) = _LENGTH.unpack_from(data, pos)
        pos += _LENGTH.size
        if pos + size > len(data):
            raise ValueError(f"truncated record at byte {pos}: {size} bytes announced")
        try:
            yield pb.SessionState.FromString(data[pos : pos + size])
        except DecodeError as exc:
            raise ValueError(f"undecodable record at byte {pos}: {exc}") from None
        pos += size
