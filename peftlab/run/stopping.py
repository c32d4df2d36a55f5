"""Graceful stop on Ctrl-C / SIGTERM: finish the work under way, then stop at a safe boundary.

The first SIGINT or SIGTERM only *requests* a stop; a second one raises KeyboardInterrupt at once.
Training checks the request between optimizer steps (so its checkpoint is consistent) and a sweep
checks it between runs (so a signal that lands while a model loads or a run evaluates still stops
the sweep, instead of being lost when training's own handler is removed). The request is one
process-wide flag shared by nested scopes, and cleared when the outermost scope exits.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopState:
    requested = False
    depth = 0


_STATE = _StopState()


class GracefulStop:
    """Context manager: while inside, SIGINT/SIGTERM set ``requested`` instead of killing the process."""

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return _STATE.requested

    def __enter__(self) -> "GracefulStop":
        _STATE.depth += 1
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, _handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        _STATE.depth -= 1
        if _STATE.depth == 0:
            _STATE.requested = False


def _handle(signum: int, frame: FrameType | None) -> None:
    if _STATE.requested:
        raise KeyboardInterrupt
    _STATE.requested = True
