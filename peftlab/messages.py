"""One channel for peftlab's messages: module loggers under the "peftlab" logger, and where they go.

Library code never prints. It logs through ``logging.getLogger(__name__)`` (``info`` for news,
``warning`` for what may be wrong), and whoever runs it decides where the lines go:

* ``on_stderr()``: the command line's default, each message as a "peftlab: <text>" line on stderr.
* ``routed(echo=...)``: one run's messages. For its duration they go to the run alone: echoed to
  stderr at once when ``echo`` is on (so "converting ... (~30 s)" shows before the wait, not after),
  and held for the run's log until ``route.connect(sink)``, which hands them over in order and
  passes every later one straight on. The run's log opens only after its inputs are loaded, and
  those loads are what speak most; holding keeps their lines in train.log all the same.

A warning reads "warning: <text>", the form the run's log and the CLI already use.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

ROOT = "peftlab"  # every module logger (peftlab.inputs.models, ...) is a child of this one

Sink = Callable[[str], None]


def text_of(record: logging.LogRecord) -> str:
    """The message as the run's log and the CLI show it (without their "peftlab: " prefix)."""
    message = record.getMessage()
    return f"warning: {message}" if record.levelno >= logging.WARNING else message


def to_stderr(text: str) -> None:
    # sys.stderr is looked up per line, not kept: pytest's capsys (and any redirect) swaps it.
    print(f"peftlab: {text}", file=sys.stderr, flush=True)


class _ToSink(logging.Handler):
    """Hands each record's text to a plain function."""

    def __init__(self, sink: Sink) -> None:
        super().__init__(logging.INFO)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink(text_of(record))
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler must not fail the caller
            self.handleError(record)


class Route:
    """Where one run's messages go: stderr at once (if echo), and its log once ``connect`` names it."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.held: list[str] = []  # lines for the log that arrived before it opened
        self._sink: Sink | None = None

    def __call__(self, text: str) -> None:
        if self.echo:
            to_stderr(text)
        if self._sink is None:
            self.held.append(text)
        else:
            self._sink(text)

    def connect(self, sink: Sink) -> None:
        """Send the held lines, then every later one, to ``sink`` (the log's file-only writer)."""
        self._sink = sink
        held, self.held = self.held, []
        for text in held:
            sink(text)


@contextmanager
def on_stderr() -> Iterator[None]:
    """For the duration, peftlab's messages print as "peftlab: <text>" lines on stderr (the CLI's default)."""
    with _only_handler(_ToSink(to_stderr), propagate=True):
        yield


@contextmanager
def routed(*, echo: bool) -> Iterator[Route]:
    """For the duration, peftlab's messages go to the returned Route and nowhere else.

    Handlers already on the "peftlab" logger (``on_stderr``'s) are set aside, and nothing
    propagates to the root logger, so ``echo=False`` is silent. Lines still held when the block
    ends (the log never opened) are dropped: the log was their only destination.
    """
    route = Route(echo)
    with _only_handler(_ToSink(route), propagate=False):
        yield route


@contextmanager
def _only_handler(handler: logging.Handler, *, propagate: bool) -> Iterator[None]:
    """Make ``handler`` the "peftlab" logger's only handler, at INFO, and restore the logger afterwards."""
    logger = logging.getLogger(ROOT)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)  # info lines are news for the user, not debug output
    logger.propagate = propagate
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])
