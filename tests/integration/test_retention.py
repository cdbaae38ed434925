"""Retention against a real `qntx up`: pruning finished jobs, and logs that rotate."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.timeout(120)


def test_prune_finished_jobs_and_rotate_logs(bus):
    (bus.home / "config.toml").write_text("log_max_bytes = 600\nlog_files = 2\n")
    up = bus.start_up()
    with bus.connect() as client:
        done = [client.submit("builtin.echo", n) for n in range(50)]
        failed = client.submit("builtin.fail", "x", max_attempts=1)
        for handle in done:
            handle.result(timeout=30)
        failed.wait(timeout=30)
        later = client.submit("builtin.echo", "kept", delay_s=60)
        later.accepted(timeout=10)
        time.sleep(1.2)
        pruned = bus.run("pulse", "prune", "--older-than", "1s")
        assert pruned.returncode == 0, pruned.stderr
        assert pruned.stdout.strip() == "✓ Pruned 51 finished job(s) (completed 50, failed 1)"
        assert client.status().queue["completed"] == 0
        assert [j.id for j in client.jobs(limit=100)] == [later.id]
        assert client.prune() == {"completed": 0, "failed": 0, "cancelled": 0}  # nothing past the default retention
    bad = bus.run("pulse", "prune", "--older-than", "soon")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --older-than")
    up.stop()
    logs = sorted(p.name for p in (bus.home / "logs").iterdir())
    assert "server.log.1" in logs and "server.log.3" not in logs
    assert all((bus.home / "logs" / name).stat().st_size <= 600 + 400 for name in logs)  # one line may overshoot
