"""The database sink's backlog: stretches of the JSON log it left events to during an outage, to replay.

A :class:`Backlog` runs from a start mark to an end mark (None while the sink still spills). Reading
goes a batch at a time; the position moves only when the caller says the batch is stored
(:meth:`Backlog.advance`), so a batch the database did not take is read again. Pure bookkeeping over
:func:`~sandtrap.storage.replay.read_from`; the sink's thread owns it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sandtrap.storage.replay import (
    LOST_MARGIN_S,
    LogMark,
    LogPosition,
    ReadResult,
    first_position_since,
    read_from,
)


@dataclass
class Backlog:
    start: LogMark
    end: LogMark | None = None
    position: LogPosition | None = None
    replayed: int = 0  # events of this stretch the database did not have
    read: int = 0  # events read back (stored or already there)
    began_monotonic: float = field(default_factory=time.monotonic)

    @property
    def is_open(self) -> bool:
        """The sink still spills into this stretch (no end mark yet)."""
        return self.end is None

    def read_batch(self, path: Path, max_events: int) -> ReadResult | None:
        """The next batch (not consumed until :meth:`advance`); None when it cannot start yet (its mark is not
        placed, or the log has no file)."""
        if self.position is None:
            if not self.start.ready.is_set():
                return None
            # A mark the log could not place: from the files written since a little before it.
            self.position = self.start.position or first_position_since(path, self.start.at - LOST_MARGIN_S)
            if self.position is None:
                return None
        placed = self.end is not None and self.end.ready.is_set()
        end = self.end.position if self.end is not None and placed else None
        result = read_from(path, self.position, max_events, end)
        if placed and end is None:  # an end mark the log could not place: to the log's end
            result.reached = result.at_end
        return result

    def advance(self, result: ReadResult, new: int) -> None:
        """The batch of ``result`` is stored (``new`` of its events were not there before)."""
        if result.position is not None:
            self.position = result.position
        self.read += len(result.events)
        self.replayed += new

    def is_done(self, result: ReadResult) -> bool:
        """The stretch is closed and read to its end mark."""
        return self.end is not None and self.end.ready.is_set() and result.reached
