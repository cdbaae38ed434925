"""Plain counts for the hot paths: ints in dicts and fixed-bucket histograms.

An actor increments these inline (a dict update, a bisect); nothing is allocated
per message beyond a small key tuple and no library is called. ``qntx.obs.metrics``
turns them into Prometheus families when a snapshot is taken, on the actor's loop.
"""

from __future__ import annotations

from bisect import bisect_left

# Seconds: from a millisecond to ten minutes (queue waits and runs).
DURATION_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
# Seconds: a commit's sync, from 100 µs to 2.5 s.
COMMIT_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Rows (jobs) or attestations in one commit.
BATCH_BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Buckets:
    """A histogram: counts per upper bound (``le``, inclusive), the sum and the count."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, observations at or below it), +Inf last, as Prometheus wants them."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class ByLabel(dict):
    """Histograms by one label value (a handler): made on first use."""

    def __init__(self, bounds: tuple[float, ...]):
        super().__init__()
        self.bounds = bounds

    def __missing__(self, key: str) -> Buckets:
        made = self[key] = Buckets(self.bounds)
        return made


def bump(counts: dict, key: object, by: int = 1) -> None:
    counts[key] = counts.get(key, 0) + by
