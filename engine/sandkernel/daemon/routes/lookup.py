"""Sessions by id, as the routes answer them: live, ended, lost in a restart, or unknown."""

from __future__ import annotations

from sandkernel.api import ServedEngine, SessionAPI
from sandkernel.daemon.records import SessionRecords
from sandkernel.errors import SessionLost, SessionNotFound
from sandkernel.session import SessionInfo


class SessionLookup:
    """Finds a session for a route, telling a session lost in a restart (410) from an unknown one.

    Args:
        engine: the engine the daemon serves.
        records: the session records, opened (they remember sessions across restarts).
    """

    def __init__(self, engine: ServedEngine, records: SessionRecords) -> None:
        self.engine = engine
        self.records = records

    def lost(self, session_id: str) -> SessionLost | None:
        """The error for a session lost when the daemon restarted, if it was."""
        return self.records.lost(session_id)

    def lost_or_unknown(self, session_id: str) -> Exception:
        """The error for an id the engine does not know: lost in a restart (410), or 404."""
        lost = self.records.lost(session_id)
        return lost if lost is not None else SessionNotFound(f"no session {session_id!r}")

    async def live(self, session_id: str) -> SessionAPI:
        """The live session with this id."""
        try:
            return await self.engine.get_session(session_id)
        except SessionNotFound:
            raise self.lost_or_unknown(session_id) from None

    async def info(self, session_id: str) -> SessionInfo:
        """A session the engine knows, alive or ended."""
        try:
            return await self.engine.session_info(session_id)
        except SessionNotFound:
            raise self.lost_or_unknown(session_id) from None
