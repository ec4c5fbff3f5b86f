"""Graceful stops: a request that meta-training honours at its next epoch boundary, and the signal handlers that make one.

An epoch boundary is the one point from which a resumed run continues bit for bit, so a
stopped run writes its checkpoints there (whatever ``checkpoint_every`` says) and loses
nothing. A cluster scheduler's SIGTERM before preemption, or a first Ctrl-C, asks for such a
stop; a second Ctrl-C stops at once, as Python does by default.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator, Sequence


class StopRequest:
    """Asks a running :class:`~l2l.meta.MetaTrainer` to stop at the end of its current epoch.

    Pass one to ``meta_train(..., stop=request)`` or ``MetaTrainer.run(stop=request)``, and call
    :meth:`request` from anywhere (a signal handler, another thread, an ``on_epoch`` callback).
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        """Whether a stop has been asked for."""
        return self.reason is not None

    def request(self, reason: str = "a stop was requested", signal_number: int | None = None) -> None:
        """Asks for the stop; the first reason given is kept."""
        if self.reason is None:
            self.reason, self.signal_number = reason, signal_number


class TrainingInterrupted(KeyboardInterrupt):
    """Meta-training stopped at an epoch boundary on request, after writing its checkpoints.

    A KeyboardInterrupt, so that code which stops on Ctrl-C stops on a graceful stop too.

    Attributes:
        epoch: the epochs completed; ``resume_checkpoint`` holds them (None: nothing was written,
            because the run has no output directory or had not finished an epoch).
        reason: what asked for the stop (``"SIGTERM"``, ...).
        signal_number: the signal that asked for it, or None.
        resume_checkpoint: the checkpoint to continue from, or None.
    """

    def __init__(self, epoch: int, reason: str, signal_number: int | None, resume_checkpoint: os.PathLike | None):
        where = f"; continue with: l2l train --resume {resume_checkpoint}" if resume_checkpoint is not None else ""
        super().__init__(f"meta-training stopped after epoch {epoch} ({reason}){where}")
        self.epoch = epoch
        self.reason = reason
        self.signal_number = signal_number
        self.resume_checkpoint = resume_checkpoint


@contextlib.contextmanager
def stop_on_signals(
    signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
    *,
    announce: bool = True,
    repeat_after_s: float = 1.0,
) -> Iterator[StopRequest]:
    """Within the block, the first of ``signals`` asks for a graceful stop; the handlers before it come back after.

    A SIGINT more than ``repeat_after_s`` after the first stops at once (KeyboardInterrupt);
    closer ones count as the same request, because torchrun passes the terminal's Ctrl-C on to
    its workers, which the terminal has already sent it to. Other repeated signals are ignored:
    the stop is under way. Outside the main thread (where Python cannot install handlers) the
    request is only made by calling it.

    Args:
        signals: the signal numbers to handle.
        announce: write a line to stderr when a stop is asked for (rank 0 of a group only, say).
        repeat_after_s: seconds after which a second SIGINT stops at once.

    Yields:
        The StopRequest the handlers fill in.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    first_at: list[float] = []

    def handle(number: int, frame: object) -> None:
        del frame  # Unused.
        name = signal.Signals(number).name
        if stop.requested and not first_at and number == signal.SIGINT:
            # Asked for otherwise (another process of the group, a call): this is the first Ctrl-C,
            # and the stop is under way already; the next one, later, stops at once.
            first_at.append(time.monotonic())
            return
        if stop.requested:
            if number == signal.SIGINT and time.monotonic() - first_at[0] > repeat_after_s:
                raise KeyboardInterrupt
            return
        first_at.append(time.monotonic())
        stop.request(name, number)
        if announce:
            again = "; press Ctrl-C again to stop now, losing the epochs since the last checkpoint" if number == signal.SIGINT else ""
            # os.write, not print: a handler that prints can interrupt a print of the main thread to the same stream.
            with contextlib.suppress(OSError):
                os.write(2, f"\n{name}: stopping at the end of this epoch, after writing the checkpoints{again}\n".encode())

    previous = {number: signal.signal(number, handle) for number in signals}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default is the nearest.
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
