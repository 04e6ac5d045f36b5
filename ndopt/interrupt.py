"""SIGINT and SIGTERM stop a long command at the next safe point, within seconds, losing nothing.

`handle_signals()` installs handlers for both signals for its duration, also when the process
inherited SIGINT ignored (a non-interactive shell starts background jobs that way, and Python then
never raises KeyboardInterrupt: a run went on for minutes after Ctrl-C). A signal raises
`Interrupted` (a KeyboardInterrupt) at once, so atomic writers remove their temporaries and the
runner writes its report as `interrupted`; inside `safe_points()` (a training loop) the first
signal is only recorded and `check()` raises it between steps, after the loop saved a checkpoint.
A second signal always raises at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("ndopt")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    pending: int | None = None  # a signal recorded inside safe_points, not yet raised
    cooperative = 0  # depth of safe_points blocks


_state = _State()


def _handler(signum: int, frame: Any) -> None:
    if _state.cooperative and _state.pending is None:
        _state.pending = signum
        log.warning("%s: stopping at the next safe point (send it again to stop now)", signal.Signals(signum).name)
        return
    _state.pending = None
    raise Interrupted(signum)


@contextmanager
def handle_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` inside this block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _state.pending = None


@contextmanager
def safe_points() -> Iterator[None]:
    """Inside, a first signal waits for the next `check()` (the caller's safe point) instead of raising."""
    _state.cooperative += 1
    try:
        yield
    finally:
        _state.cooperative -= 1
    check()  # a signal recorded after the last check is not lost


def pending() -> bool:
    """A signal is waiting for the next safe point: save what must be saved, then call `check()`."""
    return _state.pending is not None


def check() -> None:
    """Raise the recorded signal, if any."""
    if _state.pending is not None:
        signum, _state.pending = _state.pending, None
        raise Interrupted(signum)
