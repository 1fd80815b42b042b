"""Sessions by id, as the routes answer them: live, ended, lost in a restart, or unknown."""

from __future__ import annotations

from sandkernel.api import EngineAPI, SessionAPI
from sandkernel.daemon.records import SessionRecords
from sandkernel.errors import SessionClosed, SessionExpired, SessionLost, SessionNotFound
from sandkernel.session import SessionInfo


class SessionLookup:
    """Finds a session for a route, telling a session lost in a restart (410) from an unknown one.

    Args:
        engine: the engine the daemon serves.
        records: the session records, opened (they remember sessions across restarts).
    """

    def __init__(self, engine: EngineAPI, records: SessionRecords) -> None:
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
            # A live session is found by its id; listing every session (thousands
            # remembered) for it would cost each lookup time on the event loop.
            return await (await self.engine.get_session(session_id)).info()
        except (SessionExpired, SessionClosed):
            pass  # ended: the engine lists it, with when and why
        except SessionNotFound:
            pass  # not live here: perhaps listed (a cluster's other engine's)
        for info in await self.engine.sessions():
            if info.id == session_id:
                return info
        # Not listed: the engine says why (a cluster's session lost with its node is
        # SessionLost), or the records do (lost in a restart), or it is unknown.
        return await (await self.live(session_id)).info()
