"""Pulse's commits: the job store written in groups, on the loop or on its writer thread.

Part of ``Pulse`` (``qntx.pulse.shell``). What a commit writes comes from the
core (``PulseCore.changes``), never from its tables. Replies that promise durability
(a Submit's, a cancel's) and dispatches of handlers with side effects wait for the
commit that holds their change; commits run one at a time, and whatever changes
while one syncs goes into the next (group commit). Retention prunes run a small
transaction at a time on the writer thread; the core picks what they delete
(``PulseCore.prune_plan``) and counts out what they deleted (``PulseCore.pruned``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loguru import logger

from qntx.errors import Unconfirmed
from qntx.protocol import FINAL_STATUSES
from qntx.pulse.commands import Changes
from qntx.pulse.core import PrunePlan
from qntx.pulse.events import Saved
from qntx.pulse.jobstore import PRUNE_BATCH
from qntx.values import now_ms

if TYPE_CHECKING:
    from qntx.pulse.shell import Pulse as _Pulse
else:
    _Pulse = object

# Changes nobody waits for (a dispatch, a completion already published) are committed
# within this long, sharing one fsync with whatever else comes; a reply that promises
# durability starts a commit at once.
LAZY_COMMIT_S = 0.02
# Commits up to this size run on the loop; bigger ones on the writer thread, so the
# loop keeps answering while a big one syncs.
INLINE_COMMIT_ROWS = 2_000
INLINE_COMMIT_BYTES = 1 << 20
# After a commit failed (a full disk), the next try waits this long: not one per loop
# turn, nor one straight from the failure's own handling (on the loop, that recursed).
COMMIT_RETRY_S = 0.25


class Commits(_Pulse):
    def _commit_now(self) -> None:
        changes = self.core.changes()
        if changes is not None:
            self._commits += 1
            self.store.save(changes)
            self.apply(Saved(changes.versions, changes.lease_ceiling))
        self._tell_big_ended(self._commits)

    def _tell_big_ended(self, committed: int) -> None:
        """Announce the big final jobs whose commit (number ``committed`` or earlier) is
        on disk, unless they changed again meanwhile (the newer state is told then)."""
        if not self._big_ended:
            return
        later = []
        for before, job in self._big_ended:
            if before >= committed:
                later.append((before, job))
                continue
            current = self.core.get(job.id)
            if current is None or (current.status, current.attempts) == (job.status, job.attempts):
                self.watch.changed(job)
        self._big_ended = later

    def _start_commit(self, *, lazy_ok: bool = True) -> None:
        if self._committing or self._closing or self._retry_timer is not None:
            return
        if lazy_ok and not self._durable and not self._held and not self.core.urgent:
            # (big ended jobs are told after a commit: one comes even if nothing else
            # changes, e.g. when their end was announced by the commit that saved it)
            if self._lazy_timer is None and (self.core.has_changes() or self._big_ended):
                self._lazy_timer = self.actor.call_later(LAZY_COMMIT_S, self._lazy_commit)
            return
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        changes = self.core.changes()
        if changes is None:
            # Nothing new to write: what they wait for is on disk.
            replies, self._durable, held, self._held = self._durable, [], self._held, []
            for reply in replies:
                reply.reply_to.reply(reply.message)
            self._release_held(held)
            self._tell_big_ended(self._commits + 1)
            return
        replies, self._durable, held, self._held = self._durable, [], self._held, []
        self._committing = True
        self._commits += 1
        number = self._commits
        save = self.store.save
        took = [0.0]

        def work() -> None:
            began = time.perf_counter()
            save(changes)
            took[0] = time.perf_counter() - began

        def done(outcome: Any) -> None:
            self._committing = False
            if isinstance(outcome, BaseException):
                logger.opt(exception=outcome).error("pulse commit of {} jobs failed", len(changes.rows))
                self.core.commit_failed()
                for reply in replies:
                    # The change may already be under way (a job dispatched before its
                    # commit) and goes with the next commit that succeeds: not known yet.
                    reply.reply_to.fail(Unconfirmed(f"{outcome}; the change is not confirmed yet: ask again"))
                self._held = held + self._held  # they go with the next commit that succeeds
                self._retry_timer = self.actor.call_later(COMMIT_RETRY_S, self._retry_commit)
                return
            self.commit_seconds.observe(took[0])
            self.commit_rows.observe(len(changes.rows))
            self.apply(Saved(changes.versions, changes.lease_ceiling))
            for reply in replies:
                reply.reply_to.reply(reply.message)
            self._release_held(held)
            self._tell_big_ended(number)
            self._start_commit()  # what changed meanwhile goes next

        if self.store.commits_inline and self._small(changes):
            # On the loop: handing a small commit to the writer thread and back costs
            # more than it saves (on LMDB; a database's commits always go to the
            # writer thread). Messages that arrive meanwhile wait in their sockets
            # and go into the next commit together.
            try:
                work()
            except Exception as exc:  # handed to done(), which decides
                done(exc)
            else:
                done(None)
        else:
            self.writer.submit(work, done)

    @staticmethod
    def _small(changes: Changes) -> bool:
        if len(changes.rows) > INLINE_COMMIT_ROWS:
            return False
        carried = sum(len(job.payload) + len(job.result) for _, job, _ in changes.rows)
        return carried <= INLINE_COMMIT_BYTES

    def _lazy_commit(self) -> None:
        self._lazy_timer = None
        self._start_commit(lazy_ok=False)

    def _retry_commit(self) -> None:
        self._retry_timer = None
        self._start_commit(lazy_ok=False)

    def prune(self, older_than_ms: int | None = None, done: Callable[[dict[str, int]], None] | None = None) -> None:
        """Delete finished jobs past their retention (or older than ``older_than_ms``),
        a small transaction at a time on the writer thread, until none is left;
        ``done`` gets the counts deleted per status."""
        total = dict.fromkeys(FINAL_STATUSES, 0)

        def batch(plan: PrunePlan) -> dict[str, list[str]]:
            return self.store.prune(plan.cutoffs, max_completed=plan.max_completed, keep=plan.keep)

        def after(outcome: Any) -> None:
            if isinstance(outcome, BaseException):
                logger.warning("pruning finished jobs failed: {}", outcome)
                self.core.pruned({})
                deleted = {}
            else:
                self.core.pruned(outcome)  # counts out only what no retry took back meanwhile
                deleted = {status: len(ids) for status, ids in outcome.items()}
                for status, count in deleted.items():
                    total[status] += count
            if sum(deleted.values()) >= PRUNE_BATCH and not self._closing:
                plan = self.core.prune_plan(now_ms(), older_than_ms)  # more to go: the next small transaction
                self.writer.submit(lambda: batch(plan), after)
                return
            if any(total.values()):
                logger.info("pruned {} finished job(s): {}", sum(total.values()), ", ".join(f"{k} {v}" for k, v in total.items() if v))
            if done is not None:
                done(total)

        plan = self.core.prune_plan(now_ms(), older_than_ms)
        self.writer.submit(lambda: batch(plan), after)

