"""A deadline that is set and cleared once per request for the price of a timer now and then.

A connection sets a deadline for every request on it (its head, its body, the
node's answer) and nearly always clears it soon after. A timer per deadline
means a timer made and cancelled per request. ``LazyDeadline`` keeps one timer
per owner instead: clearing only forgets the due time; when the timer fires
early it sets itself again for the due time in force then; it is moved earlier
only when a new deadline is earlier than the timer. Pure: the clock is given.
"""

from __future__ import annotations

from typing import Callable, Protocol


class Timer(Protocol):
    """The part of a ``DelayedCall`` used here."""

    def getTime(self) -> float:
        """When it is due (the clock's seconds)."""

    def reset(self, secondsFromNow: float) -> None:
        """Be due ``secondsFromNow`` from now."""

    def cancel(self) -> None:
        """Never run."""


class DeadlineClock(Protocol):
    """The part of a reactor used here (``IReactorTime``)."""

    def seconds(self) -> float:
        """Now."""

    def callLater(self, delay: float, callable: Callable[[], object]) -> Timer:
        """Call ``callable`` ``delay`` seconds from now."""


class LazyDeadline:
    """At most one deadline at a time: ``action`` runs once ``seconds`` have passed since
    ``arm(seconds, action)`` unless ``disarm`` came first. ``stop`` when the owner goes away."""

    def __init__(self, clock: DeadlineClock) -> None:
        self._clock = clock
        self._due: float | None = None
        self._action: Callable[[], object] | None = None
        self._timer: Timer | None = None

    @property
    def armed(self) -> bool:
        """Whether a deadline is set."""
        return self._due is not None

    def arm(self, seconds: float, action: Callable[[], object]) -> None:
        """Run ``action`` in ``seconds`` (replacing any deadline set before)."""
        due = self._clock.seconds() + seconds
        self._due, self._action = due, action
        timer = self._timer
        if timer is None:
            self._timer = self._clock.callLater(seconds, self._fire)
        elif timer.getTime() > due:
            timer.reset(seconds)

    def disarm(self) -> None:
        """No deadline now (the timer, if any, is left to lapse)."""
        self._due = self._action = None

    def stop(self) -> None:
        """No deadline, and no timer left behind."""
        self.disarm()
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _fire(self) -> None:
        self._timer = None
        due, action = self._due, self._action
        if due is None or action is None:
            return
        now = self._clock.seconds()
        if now < due:
            self._timer = self._clock.callLater(due - now, self._fire)
            return
        self._due = self._action = None
        action()
