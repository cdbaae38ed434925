"""How ``qntx pulse show`` prints a job's runs: one block per run, oldest first."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qntx.values import moment_text

if TYPE_CHECKING:
    from qntx.protocol import Job, Run

LOG_LINES = 10  # the last lines of each run's output shown (pulse show --json has all)


def run_lines(number: int, run: Run) -> list[str]:
    where = run.worker or "-"
    if run.host and run.host not in where:
        where += f" on {run.host}"
    if run.plugin:
        where += f" (plugin {run.plugin})"
    took = f" ({(run.finished_at - run.started_at) / 1000:.1f}s)" if run.finished_at else ""
    lines = [
        f"    #{number} {run.outcome:<10} attempt {run.attempt}  lease {run.lease}  {where}",
        f"       {moment_text(run.started_at)} → {moment_text(run.finished_at) if run.finished_at else 'still running'}{took}",
    ]
    if run.error:
        lines.append(f"       error: {run.error.message}")
        lines += [f"         {line}" for line in run.error.traceback.splitlines()]
    output = run.logs.splitlines()
    if output:
        skipped = len(output) - LOG_LINES
        lines.append(f"       output{f' (last {LOG_LINES} of {len(output)} lines)' if skipped > 0 else ''}:")
        lines += [f"         {line}" for line in output[-LOG_LINES:]]
    return lines


def print_history(job: Job) -> None:
    if not job.history:
        return
    older = f", {job.history_dropped} older not kept" if job.history_dropped else ""
    print(f"  History ({len(job.history)} run{'s' if len(job.history) != 1 else ''}{older}):")
    first = job.history_dropped + 1
    for offset, run in enumerate(job.history):
        for line in run_lines(first + offset, run):
            print(line)
