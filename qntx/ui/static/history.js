// A job's runs as a timeline on its page (loaded before app.js; uses its h() and time()).
// One row per run, oldest first: its outcome, attempt, lease, worker and host, a bar
// placed on a shared time axis (from the first run's start to the last one's end),
// its error, and its output behind a toggle.
"use strict";

function historyTimeline(job) {
  const runs = job.history || [];
  if (!runs.length) return null;
  const now = Date.now();
  const start = runs[0].started_at;
  const end = Math.max(...runs.map((r) => r.finished_at || now));
  const span = Math.max(end - start, 1);
  const seconds = (ms) => (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + "s";
  const first = (job.history_dropped || 0) + 1;
  const rows = runs.map((run, i) => {
    const until = run.finished_at || now;
    const left = ((run.started_at - start) / span) * 100;
    const width = Math.max(((until - run.started_at) / span) * 100, 0.8);
    const where = (run.worker || "-") + (run.host && !(run.worker || "").includes(run.host) ? " on " + run.host : "");
    const outcome = run.outcome.replace(" ", "-");
    return h("li", {class: "run " + outcome, "data-run": run.lease, "data-outcome": run.outcome},
      h("div", {class: "run-head"},
        h("span", {class: "run-number"}, "#" + (first + i)),
        h("span", {class: "status " + outcome}, run.outcome),
        h("span", {class: "muted"}, ` attempt ${run.attempt} · lease ${run.lease} · ${where}`),
        h("span", {class: "muted run-when", title: time(run.started_at) + " → " + (run.finished_at ? time(run.finished_at) : "running")},
          ` ${time(run.started_at)} · ${run.finished_at ? seconds(run.finished_at - run.started_at) : "running"}`)),
      h("div", {class: "run-track"}, h("div", {class: "run-bar " + outcome, style: `left:${left}%;width:${width}%`})),
      run.error ? h("pre", {class: "error mono run-error"}, run.error.message + (run.error.traceback ? "\n\n" + run.error.traceback : "")) : null,
      run.logs ? h("details", {}, h("summary", {}, "output"), h("pre", {class: "mono run-logs"}, run.logs)) : null);
  });
  return [h("h2", {}, `History (${runs.length} run${runs.length === 1 ? "" : "s"}` +
      (job.history_dropped ? `, ${job.history_dropped} older not kept` : "") + ")"),
    h("ol", {id: "job-history", class: "timeline"}, rows)];
}
