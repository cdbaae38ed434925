"""An actor's timers never starve its loop: a timer that re-arms itself sooner than a
pass over the timers takes runs once per loop turn, so sockets are still read."""

from __future__ import annotations

import time

import pytest

from qntx.bus.actor import Actor

pytestmark = pytest.mark.timeout(30)

LIMIT = 2_000  # re-arms before the timer gives up (the old pass ran them all at once)


class Spinner(Actor):
    name = "spinner"

    def __init__(self) -> None:
        super().__init__()
        self.ticks = 0
        self.ticks_at_turn: list[int] = []

    def spin(self) -> None:
        self.ticks += 1
        until = time.monotonic() + 0.0005  # longer than the delay it re-arms with
        while time.monotonic() < until:
            pass
        if self.ticks < LIMIT:
            self.call_later(0.0, self.spin)

    def after_batch(self) -> None:
        self.ticks_at_turn.append(self.ticks)
        if len(self.ticks_at_turn) >= 5:
            self.stop()


def test_a_timer_rearming_at_once_runs_once_per_loop_turn():
    actor = Spinner()
    try:
        actor.call_later(0.0, actor.spin)
        actor.loop()
    finally:
        actor.context.destroy(linger=0)
    # Each turn ran the spinner once and then went on to read sockets and end the turn.
    assert actor.ticks_at_turn == [1, 2, 3, 4, 5]
