"""The message channel: module loggers under "peftlab" reach stderr (CLI) or one run's route, never both."""

from __future__ import annotations

import logging

from peftlab import messages

log = logging.getLogger("peftlab.inputs.example")  # a module logger, as inputs/ modules make them


def _peftlab_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("peftlab")]


def test_on_stderr_prints_info_and_warnings_with_the_cli_prefix(capsys):
    with messages.on_stderr():
        log.info("3 of 10 records left out")
        log.warning("2 weights missing")
    assert _peftlab_lines(capsys) == ["peftlab: 3 of 10 records left out", "peftlab: warning: 2 weights missing"]


def test_a_route_holds_lines_until_its_log_opens_then_passes_them_on(capsys):
    written = []
    with messages.routed(echo=False) as route:
        log.info("before the log opened")
        assert written == []
        route.connect(written.append)
        log.warning("after")
    assert written == ["before the log opened", "warning: after"]
    assert capsys.readouterr().err == ""  # echo off: silent


def test_a_route_with_echo_prints_at_once_and_only_once(capsys):
    with messages.on_stderr():  # the CLI's handler is set aside for the run, not doubled
        with messages.routed(echo=True) as route:
            log.info("converting once")
            assert _peftlab_lines(capsys) == ["peftlab: converting once"]  # before the log opens
            route.connect(lambda text: None)
        assert _peftlab_lines(capsys) == []  # the replay went to the log only
        log.info("back to the CLI")
    assert _peftlab_lines(capsys) == ["peftlab: back to the CLI"]


def test_a_run_route_is_silent_even_when_the_root_logger_prints(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler()  # binds to capsys's stderr, created inside the test
    root.addHandler(handler)
    try:
        with messages.routed(echo=False) as route:
            route.connect(lambda text: None)
            log.warning("quiet")
    finally:
        root.removeHandler(handler)
    assert capsys.readouterr().err == ""


def test_the_peftlab_logger_is_restored_afterwards():
    logger = logging.getLogger(messages.ROOT)
    before = (logger.handlers[:], logger.level, logger.propagate)
    with messages.routed(echo=False):
        pass
    with messages.on_stderr():
        pass
    assert (logger.handlers, logger.level, logger.propagate) == before


def test_lines_held_when_the_log_never_opens_are_dropped(capsys):
    with messages.routed(echo=False) as route:
        log.info("the run failed before its log opened")
    assert route.held == ["the run failed before its log opened"] and capsys.readouterr().err == ""
