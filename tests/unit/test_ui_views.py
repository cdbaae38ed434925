"""The dashboard's throughput counting (no I/O)."""

from __future__ import annotations

from qntx.ui.views import BUCKET_S, BUCKETS, Throughput


def test_throughput_counts_per_bucket_and_ends_with_the_current_one():
    throughput = Throughput()
    now = 1_700_000_000_000
    throughput.count("completed", now)
    throughput.count("completed", now - 1)
    throughput.count("failed", now - BUCKET_S * 1000)
    throughput.count("queued", now)  # not a finish: not counted
    series = throughput.series(now)
    assert len(series["completed"]) == len(series["failed"]) == BUCKETS
    assert series["completed"][-1] + series["completed"][-2] == 2
    assert sum(series["failed"]) == 1 and sum(series["completed"]) == 2


def test_throughput_forgets_what_the_chart_no_longer_shows():
    throughput = Throughput()
    start = 1_700_000_000_000
    for bucket in range(3 * BUCKETS):
        throughput.count("completed", start + bucket * BUCKET_S * 1000)
    end = start + (3 * BUCKETS - 1) * BUCKET_S * 1000
    assert throughput.series(end)["completed"] == [1] * BUCKETS
    assert len(throughput._counts) <= 2 * BUCKETS
    assert sum(throughput.series(end + BUCKETS * BUCKET_S * 1000)["completed"]) == 0
