"""SIGTERM as a KeyboardInterrupt, and the exit status of a signal: one way for every long command to stop.

    with sigterm_as_interrupt():      # SIGTERM now raises Terminated (a KeyboardInterrupt) in the main thread
        try:
            work()
        except KeyboardInterrupt as err:
            name, status = signal_exit(err)   # ("SIGINT", 130) or ("SIGTERM", 143)

Library code that cleans up on Ctrl-C (`except KeyboardInterrupt`) thereby cleans up on SIGTERM too (a scheduler's
kill, `timeout`, a container stop). Torch-free and cheap to import.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the same cleanup runs."""

    signum = signal.SIGTERM


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the block, SIGTERM raises `Terminated` (a KeyboardInterrupt) instead of killing the process unwound.

    Outside the main thread (where no handler can be installed) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_status(signum: int) -> int:
    """The shell's exit status of a process stopped by signal `signum`: 128 + signum (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def signal_exit(err: BaseException) -> tuple[str, int]:
    """("SIGINT", 130) or ("SIGTERM", 143): the signal behind a KeyboardInterrupt and the exit status it gets.

    An exception with a `signum` attribute (`Terminated`, the library's *Interrupted errors) names its signal; a
    plain KeyboardInterrupt is SIGINT.
    """
    signum = int(getattr(err, "signum", signal.SIGINT))
    return signal.Signals(signum).name, exit_status(signum)
