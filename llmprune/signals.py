"""SIGINT and SIGTERM during a CLI run: the block in flight is dropped (the journal only ever lists finished
blocks, and the few writes that must go together finish first), and the CLI says where the run stopped.

The handlers raise ``Interrupted`` in the main thread wherever it is; ``deferred()`` holds a signal back until
the end of a section that writes a block's files and its journal entry, or renames the finished output.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_STATE: dict = {"defer": 0, "pending": None, "progress": None}


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: not an error of the run (a BaseException, as KeyboardInterrupt is)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended: 130, 143


def note_progress(done: int, total: int | None) -> None:
    """Where the run's journal stood when its OUT.partial/ closed: blocks finished, of how many."""
    _STATE["progress"] = (done, total)


def interrupted_line() -> str:
    """What an interrupted run prints: the blocks its journal holds (every torchrun rank reads the same)."""
    if _STATE["progress"] is None:
        return "interrupted before any block was journaled; re-run the same command to start again"
    done, total = _STATE["progress"]
    return f"interrupted after block {done}{f' of {total}' if total is not None else ''}; re-run the same command" \
           " to resume"


def _handler(signum: int, frame) -> None:
    if _STATE["defer"]:
        _STATE["pending"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Our handlers for SIGINT and SIGTERM for the duration, the previous ones after (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STATE["progress"] = None
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _STATE["pending"] = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A signal that arrives inside is raised at the end (unless the section raised anything itself)."""
    _STATE["defer"] += 1
    try:
        yield
    finally:
        _STATE["defer"] -= 1
    if not _STATE["defer"] and _STATE["pending"] is not None:
        signum, _STATE["pending"] = _STATE["pending"], None
        raise Interrupted(signum)
