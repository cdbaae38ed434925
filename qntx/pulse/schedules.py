"""Pulse's schedules: which firings fell due, and what each schedule fired. No I/O.

A schedule's state is [last due handled (wall ms), [[due, job id], ...], paused as
Pulse last saw it, [due times fired while the clock was ahead]]. It is saved in the
same commit as the jobs it fired: a firing is enqueued once, whatever restarts or
clock steps. The core creates the job of each firing ``due`` returns.
"""

from __future__ import annotations

from collections.abc import Callable

from qntx.pulse.directives import MISSED_AFTER_MS, Schedule


def schedule_state(state: list) -> list:
    """A schedule's saved state, completed with what older versions did not save."""
    last, firings, *rest = state
    paused, ahead = (list(rest) + [False, []][len(rest) :])[:2]
    return [last, [list(f) for f in firings], bool(paused), list(ahead)]


class Schedules:
    def __init__(self) -> None:
        self._schedules: dict[str, Schedule] = {}
        self._fired: dict[str, list] = {}  # name -> its state (see the module doc)
        self._due_cache: dict[str, tuple[int, int]] = {}  # name -> (last handled, next due)
        self.dirty = False

    def restore(self, saved: dict[str, list]) -> None:
        self._fired = {name: schedule_state(state) for name, state in saved.items()}

    def set(self, schedules: dict[str, Schedule], wall: int) -> None:
        """The schedules now in ATS (all of them)."""
        for name in [n for n in self._fired if n not in schedules]:
            del self._fired[name]  # deleted: a schedule made again under its name starts afresh
            self.dirty = True
        for name, schedule in schedules.items():
            state = self._fired.get(name)
            if state is None:  # new: its first firing is its first due time from now on
                self._fired[name] = [wall, [], schedule.paused, []]
            elif state[2] and not schedule.paused:  # resumed: what fell due while paused is skipped
                state[0], state[2] = max(state[0], wall), False
            elif schedule.paused and not state[2]:
                state[2] = True  # saved: a resume seen only after a restart still skips
            else:
                continue
            self.dirty = True
        self._schedules = dict(schedules)
        self._due_cache.clear()

    def snapshot(self) -> dict[str, list] | None:
        if not self.dirty:
            return None
        self.dirty = False
        return {name: schedule_state(state) for name, state in self._fired.items()}

    def _due(self, name: str) -> int:
        """The schedule's next due time after the last one handled (cached: cron
        arithmetic is too slow for every turn)."""
        last = self._fired[name][0]
        cached = self._due_cache.get(name)
        if cached is None or cached[0] != last:
            cached = self._due_cache[name] = (last, self._schedules[name].next_due(last))
        return cached[1]

    def fire_due(self, wall: int, fire: Callable[[Schedule, int], None], log: Callable[[str, str], None]) -> None:
        """Call ``fire(schedule, due)`` for each firing that fell due by ``wall``."""
        for name, schedule in self._schedules.items():
            if schedule.paused:
                continue
            state = self._fired[name]
            if state[0] > wall + MISSED_AFTER_MS:
                # The wall clock went back (it had jumped ahead): go on from now, but
                # never fire again a due time fired while it was ahead.
                state[3] = sorted({*state[3], *(due for due, _ in state[1] if due > wall)})
                log("WARNING", f"schedule {name}: the clock went back; firing from now on")
                state[0] = wall
                self.dirty = True
            due = self._due(name)
            if due > wall:
                continue
            if wall - due > MISSED_AFTER_MS:  # missed (the bus was down): by its policy
                latest = schedule.latest_due(due, wall)
                if schedule.missed == "skip":
                    log("INFO", f"schedule {name}: skipped the firings missed since {state[0]}")
                else:
                    fire(schedule, latest)
                state[0] = wall  # whatever fell due up to now is handled
            else:
                fire(schedule, due)
                state[0] = due
            state[3] = [ahead for ahead in state[3] if ahead > state[0]]
            self.dirty = True

    def fired_already(self, name: str, due: int) -> bool:
        return due in self._fired[name][3]

    def record(self, name: str, due: int, job_id: str, kept: int) -> None:
        firings = self._fired[name][1]
        firings.append([due, job_id])
        del firings[:-kept]

    def wakeups(self, wall: int, mono: int) -> list[int]:
        return [mono + max(0, self._due(name) - wall) for name, s in self._schedules.items() if not s.paused]

    def states(self) -> dict[str, tuple[Schedule, int | None, int | None, list]]:
        """name -> (schedule, last due fired, next due, [[due, job id], ...] newest last)."""
        out = {}
        for name, schedule in self._schedules.items():
            last, firings = self._fired.get(name, [None, []])[:2]
            out[name] = (schedule, last, None if schedule.paused else self._due(name), [list(f) for f in firings])
        return out
