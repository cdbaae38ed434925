"""What a subscriber of an events socket missed: gaps in the notices' numbers.

Each notice carries its number in its topic family (``seq``: qntx.protocol.events),
given by the actor that sent it. A subscriber of a whole family hands each notice it
reads to ``Gaps.saw``, which tells whether the subscriber must read the store again:

* a number past the last one + 1: the notices in between were lost (a slow reader's
  queue was full, or it reconnected); they are counted in ``missed``;
* a number not above the last one: the actor started anew, and what it sent before
  this notice may be lost too (counted: the numbers below this one);
* the first notice seen, or one numbered 0 (an older actor): nothing to tell.

Lost notices are logged at WARNING once per burst (the first gap, then at most once
every BURST_S with what was missed since), so a reader that is slow for a while
logs a line, not one per notice.
"""

from __future__ import annotations

import collections
import math
import time

from loguru import logger

from qntx.protocol.events import AttestationsStored, HandlersRegistered, JobNotice

BURST_S = 10.0
FAMILIES = {AttestationsStored: "att.", JobNotice: "job.", HandlersRegistered: "handlers"}


class Gaps:
    """The numbers last seen per topic family, and what was missed (``missed``)."""

    def __init__(self, who: str):
        self.who = who
        self.missed: collections.Counter[str] = collections.Counter()
        self._last: dict[str, int] = {}
        self._logged_at = -math.inf
        self._unlogged = 0

    def saw(self, family: str, seq: int) -> bool:
        """Notice number ``seq`` of ``family`` arrived: whether something before it was lost."""
        if not isinstance(seq, int) or seq <= 0:
            return False
        last = self._last.get(family)
        self._last[family] = seq
        if last is None or seq == last + 1:
            return False
        self._lost(family, seq - last - 1 if seq > last else seq - 1)
        return True

    def saw_event(self, event: object) -> bool:
        """``saw`` for a decoded notice (its family from its type); False for anything else."""
        family = FAMILIES.get(type(event))
        return family is not None and self.saw(family, event.seq)

    def counts(self) -> dict[str, int]:
        """What was missed, by family: every family seen so far (0 if nothing was)."""
        return {family: self.missed.get(family, 0) for family in list(self._last)}

    @property
    def total(self) -> int:
        return sum(self.missed.values())

    def _lost(self, family: str, count: int) -> None:
        if count <= 0:  # (a restart right after the last one seen)
            return
        self.missed[family] += count
        self._unlogged += count
        now = time.monotonic()
        if now - self._logged_at >= BURST_S:
            logger.warning(
                "{} missed {} {} notice(s) (a slow reader, or the actor restarted; {} in all): reading the store again",
                self.who, self._unlogged, family, self.total,
            )  # fmt: skip
            self._logged_at, self._unlogged = now, 0
