// The QNTX dashboard: one page, four views, kept live by the server's events.
// Every value from the bus is put in the page as text (never as HTML).
"use strict";

const CSRF = document.querySelector('meta[name="qntx-csrf"]').content;
const main = document.getElementById("main");
const STATUSES = document.querySelector('meta[name="qntx-statuses"]').content.split(",");

let view = null;     // the view on screen: {name, onEvent(kind, data), refresh()}
let events = null;   // the EventSource
let eventsFor = "";  // the job id it carries output for
let busDown = null;  // why the bus does not answer, while it does not (null: it answers)
let chartChoice = "auto";  // the throughput chart's count scale: auto, linear or log

// ------------------------------------------------------------------ helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function time(ms) {
  if (!ms) return "-";
  const d = new Date(ms);
  return d.toISOString().replace("T", " ").slice(0, 19);
}

function ago(ms) {
  if (!ms) return "-";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.floor(s / 60) + "m ago";
  return Math.floor(s / 3600) + "h ago";
}

// A relative time that keeps ticking: every element made here is updated each second.
function agoCell(attrs, ms) {
  return h("td", Object.assign({title: time(ms), "data-ago": ms || ""}, attrs || {}), ago(ms));
}

setInterval(() => {
  for (const el of document.querySelectorAll("[data-ago]")) {
    const ms = Number(el.dataset.ago);
    if (ms) el.textContent = ago(ms);
  }
}, 1000);

function status(text) { return h("span", {class: "status " + text}, text); }

function jobLink(id) { return h("a", {href: "#/jobs/" + encodeURIComponent(id), class: "mono"}, id); }

async function api(path, options) {
  const response = await fetch(path, Object.assign({headers: {"X-Qntx-Csrf": CSRF}}, options || {}));
  let body = null;
  try { body = await response.json(); } catch (e) { body = {error: response.statusText}; }
  if (!response.ok) {
    const error = new Error(body.error || response.statusText);
    error.body = body;
    throw error;
  }
  return body;
}

function banner(text) {
  const el = document.getElementById("banner");
  el.hidden = !text;
  el.textContent = text || "";
}

function replace(el, ...children) {
  el.replaceChildren(...children.flat(2).filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

function progressBar(progress) {
  if (!progress || !progress.total) return h("span", {class: "muted"}, "-");
  const pct = Math.min(100, Math.round(100 * progress.current / progress.total));
  return h("span", {class: "progress", "data-current": progress.current, "data-total": progress.total},
    h("div", {class: "bar", title: pct + "%"}, h("div", {style: "width:" + pct + "%"})),
    h("span", {class: "muted"}, " " + progress.current + "/" + progress.total));
}

// ------------------------------------------------------------------ live events

// The badge: "live" while both the page's event stream and the bus answer.
function badge() {
  const live = document.getElementById("live");
  if (!events || events.readyState !== EventSource.OPEN) {
    live.className = "live off"; live.textContent = "reconnecting";
  } else if (busDown) {
    live.className = "live down"; live.textContent = "bus down"; live.title = busDown;
  } else {
    live.className = "live on"; live.textContent = "live"; live.title = "live updates";
  }
}

function busState(error) {
  const was = busDown;
  busDown = error || null;
  badge();
  if (busDown) banner("The bus does not answer: " + busDown);
  else if (was) banner("");
}

function connect(jobId) {
  if (events && eventsFor === (jobId || "")) return;
  if (events) events.close();
  eventsFor = jobId || "";
  events = new EventSource("/api/events" + (jobId ? "?job=" + encodeURIComponent(jobId) : ""));
  events.onopen = () => {
    badge();
    if (view && view.refresh) view.refresh();  // whatever was missed while away
  };
  events.onerror = () => badge();
  for (const kind of ["overview", "jobs", "progress", "output", "handlers", "resync", "bus"]) {
    events.addEventListener(kind, (message) => {
      const data = JSON.parse(message.data);
      if (kind === "resync") { if (view && view.refresh) view.refresh(); return; }
      if (kind === "bus") busState(data.up ? null : data.error);
      if (view && view.onEvent) view.onEvent(kind, data);
    });
  }
}

// ------------------------------------------------------------------ overview

function overviewView() {
  const root = h("div", {id: "overview"});
  let last = null;  // the last overview the bus gave: shown greyed while it does not answer
  const paint = (data) => {
    if (data.error) busState(data.error);
    else { last = data; busState(null); }
    if (last) show(last, Boolean(busDown));
  };
  const scaleChoice = () => h("select", {id: "chart-scale", title: "count scale",
    onchange: (e) => { chartChoice = e.target.value; if (last) show(last, Boolean(busDown)); }},
    CHART_SCALES.map((s) => h("option", {value: s, selected: s === chartChoice}, s === "auto" ? "scale: auto" : s)));
  const show = (data, down) => {
    root.classList.toggle("down", down);
    const total = (key) => data.throughput[key].reduce((a, b) => a + b, 0);
    const minutes = Math.round(data.throughput.completed.length * data.throughput.bucket_s / 60);
    replace(root,
      h("h1", {}, "Overview"),
      h("h2", {}, "Queue"),
      h("div", {class: "queue", id: "queue"}, STATUSES.map((s) =>
        h("div", {"data-status": s}, h("b", {}, data.queue[s] || 0), h("span", {}, s)))),
      h("div", {class: "grid"},
        h("div", {class: "card"},
          h("h2", {}, `Throughput, last ${minutes} minutes `, scaleChoice()),
          chart(data.throughput, chartChoice),
          h("div", {class: "legend"}, h("i", {style: "background:#2e7d32"}), h("span", {}, `completed ${total("completed")}`),
            h("i", {style: "background:#c62828"}), h("span", {}, `failed ${total("failed")}`),
            ` (jobs per ${data.throughput.bucket_s}s)`)),
        h("div", {class: "card"},
          h("h2", {}, "Handlers"),
          h("div", {class: "mono", id: "registered"}, data.handlers.join(", ") || "(none)"))),
      h("h2", {}, "Actors"),
      h("table", {id: "actors"},
        h("tr", {}, ["actor", "health", "pid", "host", "endpoint"].map((c) => h("th", {}, c))),
        data.actors.map((a) => h("tr", {"data-actor": a.name},
          h("td", {class: "mono"}, a.name),
          h("td", {}, status(down ? "unknown" : a.healthy ? "healthy" : "unhealthy")),
          h("td", {class: "mono"}, a.pid || "-"),
          h("td", {}, a.host || "-"),
          h("td", {class: "mono muted"}, a.endpoint)))),
      h("h2", {}, "Workers"),
      h("table", {id: "workers"},
        h("tr", {}, ["worker", "pid", "slots", "free", "running jobs"].map((c) => h("th", {}, c))),
        data.workers.map((w) => h("tr", {"data-worker": w.name},
          h("td", {class: "mono"}, w.name), h("td", {class: "mono"}, w.pid || "-"),
          h("td", {}, w.slots), h("td", {}, w.free),
          h("td", {}, w.running.length ? w.running.map((j) => h("div", {}, jobLink(j.id), " ", j.handler))
            : h("span", {class: "muted"}, "idle"))))),
      data.running.some((j) => !data.workers.some((w) => w.name === j.worker)) ? [
        h("h2", {}, "Running in plugins"),
        h("table", {},
          data.running.filter((j) => !data.workers.some((w) => w.name === j.worker)).map((j) =>
            h("tr", {}, h("td", {}, jobLink(j.id)), h("td", {}, j.handler), h("td", {class: "mono"}, j.worker || "-"),
              h("td", {}, progressBar(j.progress)))))] : null);
  };
  const refresh = async () => {
    try { paint(await api("/api/overview")); } catch (e) { paint({error: e.message}); }
  };
  const onEvent = (kind, data) => {
    if (kind === "overview") paint(data);
    else if (kind === "bus" && last) show(last, !data.up);
  };
  return {name: "overview", root, refresh, onEvent};
}

// ------------------------------------------------------------------ jobs

function jobRow(job) {
  return h("tr", {"data-job": job.id, "data-status": job.status, "data-created": job.created_at},
    h("td", {}, jobLink(job.id)),
    h("td", {class: "mono"}, job.handler),
    h("td", {}, status(job.status)),
    h("td", {}, `${job.attempts}/${job.max_attempts}`),
    h("td", {}, progressBar(job.progress)),
    agoCell({}, job.created_at),
    h("td", {class: "error-text"}, job.error || ""));
}

function jobsView(params) {
  const filters = {status: params.get("status") || "", handler: params.get("handler") || "",
    since_min: params.get("since_min") || ""};
  // The pager is a keyset one: each page's cursor names the last job the server gave
  // for the page before, so rows arriving live never shift what "Older" shows. On the
  // first page new jobs extend the list (nothing is pushed off, so "Older" still starts
  // right after the last row shown) until LIVE_ROWS, when it fetches the newest page.
  const LIVE_ROWS = 100;
  const pages = [""];  // cursors of the pages seen, to go back
  let page = 0;
  let bottom = null;   // created_at of the last row the server gave for this page
  let more = false;    // whether an older page exists
  let loading = null;  // rows that came live while a page was being fetched
  const tbody = h("tbody");
  const info = h("span", {class: "muted"});
  const prev = h("button", {class: "secondary", id: "prev", onclick: () => { page--; load(); }}, "Newer");
  const next = h("button", {class: "secondary", id: "next", onclick: () => { page++; load(); }}, "Older");
  const statusSelect = h("select", {id: "filter-status"}, h("option", {value: ""}, "any status"),
    STATUSES.map((s) => h("option", {value: s, selected: s === filters.status}, s)));
  const handlerInput = h("input", {id: "filter-handler", placeholder: "handler", value: filters.handler});
  const sinceSelect = h("select", {id: "filter-since"},
    [["", "any time"], ["5", "last 5 min"], ["60", "last hour"], ["1440", "last day"]].map(([v, t]) =>
      h("option", {value: v, selected: v === filters.since_min}, t)));
  const apply = () => {
    const q = new URLSearchParams();
    filters.status = statusSelect.value; filters.handler = handlerInput.value.trim(); filters.since_min = sinceSelect.value;
    for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
    history.replaceState(null, "", "#/jobs" + (q.toString() ? "?" + q : ""));
    pages.length = 1; page = 0; load();
  };
  statusSelect.onchange = apply; sinceSelect.onchange = apply;
  handlerInput.onkeydown = (e) => { if (e.key === "Enter") apply(); };
  const load = async () => {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
    if (pages[page]) q.set("cursor", pages[page]);
    const arrived = loading = [];
    try {
      const data = await api("/api/jobs?" + q);
      banner("");
      pages[page + 1] = data.cursor || null;
      pages.length = page + 2;  // pages past this one are found again from its cursor
      bottom = data.jobs.length ? data.jobs[data.jobs.length - 1].created_at : null;
      more = Boolean(data.cursor);
      replace(tbody, data.jobs.map(jobRow));
      if (!data.jobs.length) tbody.append(h("tr", {}, h("td", {colspan: 7, class: "muted"}, "(no jobs)")));
      info.textContent = `page ${page + 1}`;
      prev.disabled = page === 0;
      next.disabled = !data.cursor;
    } catch (e) { banner(e.message); }
    finally { if (loading === arrived) loading = null; }
    // what came while the page was on its way, in order: notices follow the store's
    // order, so the last one of a job is at least as new as the page
    live(arrived);
  };
  const matches = (job) => (!filters.status || job.status === filters.status) &&
    (!filters.handler || job.handler.toLowerCase().includes(filters.handler.toLowerCase()));
  // Where a job that is not shown goes on the first page: newest first, and only if
  // it is newer than the last row (an older one belongs to a later page).
  const insert = (job) => {
    if (more && !(job.created_at > bottom)) return;
    const empty = tbody.querySelector("td[colspan]");
    if (empty) empty.parentElement.remove();
    const after = [...tbody.querySelectorAll("tr[data-job]")].find((r) => Number(r.dataset.created) <= job.created_at);
    tbody.insertBefore(jobRow(job), after || null);
  };
  const live = (jobs) => {
    for (const job of jobs) {
      const old = tbody.querySelector(`tr[data-job="${CSS.escape(job.id)}"]`);
      if (old && matches(job)) old.replaceWith(jobRow(job));
      else if (old) old.remove();
      else if (page === 0 && matches(job)) insert(job);
    }
    if (page === 0 && tbody.children.length > LIVE_ROWS && !loading) load();
  };
  const onEvent = (kind, data) => {
    if (kind !== "jobs") return;
    if (loading) loading.push(...data);
    else live(data);
  };
  // Retry or cancel every job these filters choose (every page), after a confirmation.
  const bulk = async (action) => {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
    if (!q.toString()) { banner("choose the jobs first: a status, a handler or a time"); return; }
    const chosen = [filters.status || "any status", filters.handler && "handler " + filters.handler,
      filters.since_min && "last " + filters.since_min + " min"].filter(Boolean).join(", ");
    if (!window.confirm(`${action === "retry" ? "Retry" : "Cancel"} every job that matches (${chosen})?`)) return;
    try {
      const done = await api(`/api/bulk/${action}?` + q, {method: "POST"});
      banner("");
      bulkInfo.textContent = `${action === "retry" ? "retried" : "cancelled"} ${done.steered} job(s)` +
        (done.skipped ? `, ${done.skipped} skipped (they changed meanwhile)` : "");
      load();
    } catch (e) { banner(e.message); }
  };
  const bulkInfo = h("span", {id: "bulk-info", class: "muted"});
  const root = h("div", {id: "jobs"}, h("h1", {}, "Jobs"),
    h("div", {class: "filters"}, statusSelect, handlerInput, sinceSelect, h("button", {onclick: apply}, "Filter"),
      h("button", {class: "secondary", id: "bulk-retry", onclick: () => bulk("retry")}, "Retry all"),
      h("button", {class: "secondary", id: "bulk-cancel", onclick: () => bulk("cancel")}, "Cancel all"), bulkInfo),
    h("table", {id: "job-table"}, h("thead", {}, h("tr", {},
      ["id", "handler", "status", "attempts", "progress", "created", "error"].map((c) => h("th", {}, c)))), tbody),
    h("div", {class: "pager"}, prev, next, info));
  return {name: "jobs", root, refresh: load, onEvent};
}

function jobView(id) {
  const root = h("div", {id: "job"});
  const output = h("pre", {id: "output", class: "mono"});
  let job = null;
  const act = (action) => async () => {
    try { paint((await api(`/api/jobs/${encodeURIComponent(id)}/${action}`, {method: "POST"})).job); banner(""); }
    catch (e) { banner(`${action}: ${e.message}`); }
  };
  const paint = (data) => {
    job = data;
    const can = {cancel: ["queued", "running", "paused", "waiting"], retry: ["failed", "cancelled"],
      pause: ["queued"], resume: ["paused"]};
    const logs = job.logs || "";
    if (job.status !== "running") output.textContent = logs || "(no output)";
    replace(root,
      h("h1", {}, "Job ", h("span", {class: "mono"}, job.id), " ", h("span", {id: "job-status"}, status(job.status))),
      h("div", {class: "actions"}, Object.entries(can).map(([action, when]) =>
        h("button", {id: "action-" + action, disabled: !when.includes(job.status), onclick: act(action)}, action))),
      h("div", {class: "grid"},
        h("div", {class: "card"}, h("dl", {},
          h("dt", {}, "handler"), h("dd", {class: "mono"}, job.handler),
          h("dt", {}, "attempts"), h("dd", {}, `${job.attempts} of ${job.max_attempts} (runs ${job.runs}, lost ${job.lost})`),
          h("dt", {}, "lease"), h("dd", {class: "mono"}, job.lease || "-"),
          h("dt", {}, "worker"), h("dd", {class: "mono"}, job.worker || "-"),
          h("dt", {}, "priority"), h("dd", {}, job.priority),
          h("dt", {}, "timeout"), h("dd", {}, job.timeout_s + "s"),
          h("dt", {}, "created"), h("dd", {}, time(job.created_at)),
          h("dt", {}, "started"), h("dd", {}, time(job.started_at)),
          h("dt", {}, "finished"), h("dd", {}, time(job.finished_at)),
          job.run_after > Date.now() ? [h("dt", {}, "retry after"), h("dd", {}, time(job.run_after))] : null,
          job.version ? [h("dt", {}, "version"), h("dd", {class: "mono"},
            job.handler.startsWith("python.") ? h("a", {href: "#/handlers/" + encodeURIComponent(job.handler.slice(7))}, job.version)
              : job.version)] : null,
          job.after && job.after.length ? [h("dt", {}, "after"), h("dd", {}, job.after.map((a) => h("div", {}, jobLink(a))))] : null,
          job.schedule ? [h("dt", {}, "schedule"), h("dd", {class: "mono"}, job.schedule)] : null,
          job.idempotency_key ? [h("dt", {}, "idempotency key"), h("dd", {class: "mono"}, job.idempotency_key)] : null,
          job.parent_id ? [h("dt", {}, "parent"), h("dd", {}, jobLink(job.parent_id))] : null,
          h("dt", {}, "progress"), h("dd", {id: "job-progress"}, progressBar(job.progress)))),
        h("div", {class: "card"}, h("h2", {}, "Payload"), h("pre", {class: "mono"}, JSON.stringify(job.payload, null, 2)),
          job.status === "completed" ? [h("h2", {}, "Result"),
            h("pre", {class: "mono", id: "job-result"}, JSON.stringify(job.result, null, 2))] : null)),
      job.error ? [h("h2", {}, "Error"), h("pre", {class: "error mono", id: "job-error"},
        job.error.message + (job.error.traceback ? "\n\n" + job.error.traceback : ""))] : null,
      h("h2", {}, "Output"),
      job.status === "running" ? h("p", {class: "muted"}, "live: what the run wrote so far, then as it comes") : null,
      output);
  };
  const refresh = async () => {
    try { paint((await api("/api/jobs/" + encodeURIComponent(id))).job); banner(""); }
    catch (e) { replace(root, h("h1", {}, "Job ", id), h("p", {class: "error-text"}, e.message)); }
  };
  const onEvent = (kind, data) => {
    if (kind === "output" && data.job_id === id) output.append(data.text);
    else if (kind === "progress" && data.job_id === id) {
      const cell = root.querySelector("#job-progress");
      if (cell) replace(cell, progressBar(data));
    } else if (kind === "jobs") {
      const mine = data.find((j) => j.id === id);
      if (mine && job && (mine.status !== job.status || mine.attempts !== job.attempts)) refresh();
    }
  };
  return {name: "jobs", root, refresh, onEvent, jobId: id};
}

// ------------------------------------------------------------------ handlers

function handlersView() {
  const root = h("div", {id: "handlers"});
  const refresh = async () => {
    try {
      const data = await api("/api/handlers");
      banner("");
      replace(root, h("h1", {}, "Handlers"),
        h("table", {id: "handler-table"},
          h("tr", {}, ["handler", "registered", "lines", "updated", "asid"].map((c) => h("th", {}, c))),
          data.handlers.map((x) => h("tr", {"data-handler": x.name},
            h("td", {}, h("a", {href: "#/handlers/" + encodeURIComponent(x.name), class: "mono"}, x.handler)),
            h("td", {}, x.registered ? status("healthy") : h("span", {class: "muted"}, "not yet")),
            h("td", {}, x.lines), agoCell({}, x.updated),
            h("td", {class: "mono muted"}, x.asid)))),
        data.handlers.length ? null : h("p", {class: "muted"}, "(no handlers: qntx handler create NAME --code ...)"),
        data.skipped.length ? h("p", {class: "muted"}, "without code: " + data.skipped.join(", ")) : null);
    } catch (e) { banner(e.message); }
  };
  return {name: "handlers", root, refresh, onEvent: (kind) => { if (kind === "handlers") refresh(); }};
}

function handlerView(name) {
  const root = h("div", {id: "handler"});
  const refresh = async () => {
    try {
      const data = await api("/api/handlers/" + encodeURIComponent(name));
      const current = data.versions[0];
      replace(root,
        h("h1", {}, h("span", {class: "mono"}, data.handler), data.deleted ? " (deleted)" : ""),
        current.code !== null ? [h("h2", {}, "Current code"), h("pre", {class: "mono", id: "handler-code"}, current.code)] : null,
        h("h2", {}, `Versions (${data.versions.length}, newest first)`),
        h("table", {id: "versions"},
          h("tr", {}, ["stored", "asid", "version", "jobs (by status)"].map((c) => h("th", {}, c))),
          data.versions.map((v) => h("tr", {},
            h("td", {title: time(v.timestamp)}, time(v.timestamp)), h("td", {class: "mono"}, v.asid),
            h("td", {}, v.deleted ? "deleted" : (v.code || "").length + " bytes"),
            h("td", {}, Object.entries(v.jobs).map(([s, n]) => `${s} ${n}`).join(", ") || "-")))));
    } catch (e) { replace(root, h("h1", {}, name), h("p", {class: "error-text"}, e.message)); }
  };
  return {name: "handlers", root, refresh, onEvent: (kind) => { if (kind === "handlers") refresh(); }};
}

// ------------------------------------------------------------------ attestations

function attestationsView(params) {
  const input = h("input", {id: "ax", class: "query", placeholder: "e.g. alice is knows of work since '3 days ago'",
    value: params.get("q") || ""});
  const caret = h("div", {id: "ax-error"});
  const tbody = h("tbody");
  const pages = [""];
  let page = 0;
  const info = h("span", {class: "muted"});
  const prev = h("button", {class: "secondary", onclick: () => { page--; load(); }}, "Newer");
  const next = h("button", {class: "secondary", id: "ax-next", onclick: () => { page++; load(); }}, "Older");
  const run = () => {
    history.replaceState(null, "", "#/attestations" + (input.value ? "?q=" + encodeURIComponent(input.value) : ""));
    pages.length = 1; page = 0; load();
  };
  input.onkeydown = (e) => { if (e.key === "Enter") run(); };
  const load = async () => {
    const q = new URLSearchParams({q: input.value});
    if (pages[page]) q.set("cursor", pages[page]);
    try {
      const data = await api("/api/attestations?" + q);
      replace(caret);
      pages[page + 1] = data.cursor || null;
      replace(tbody, data.records.map((r) => h("tr", {"data-asid": r.id},
        h("td", {class: "mono"}, r.id), h("td", {}, r.subjects.join(", ")), h("td", {}, r.predicates.join(", ")),
        h("td", {}, r.contexts.join(", ")), h("td", {}, r.actors.join(", ")), h("td", {}, time(r.timestamp)),
        h("td", {class: "mono muted"}, Object.keys(r.attributes).length ? JSON.stringify(r.attributes).slice(0, 120) : ""))));
      if (!data.records.length) tbody.append(h("tr", {}, h("td", {colspan: 7, class: "muted"}, "(no attestations)")));
      info.textContent = `page ${page + 1}`;
      prev.disabled = page === 0;
      next.disabled = !data.cursor;
    } catch (e) {
      replace(tbody);
      const where = e.body && typeof e.body.position === "number" ? e.body.position : null;
      replace(caret,
        where === null ? null : h("div", {class: "caret", id: "ax-caret"}, input.value + "\n" + " ".repeat(where) + "^"),
        h("div", {class: "error-text", id: "ax-message"}, e.message));
      if (where !== null) { input.focus(); input.setSelectionRange(where, where + 1); }
    }
  };
  const root = h("div", {id: "attestations"}, h("h1", {}, "Attestations"),
    h("div", {class: "filters"}, input, h("button", {id: "ax-run", onclick: run}, "Query")), caret,
    h("table", {id: "ax-table"}, h("thead", {}, h("tr", {},
      ["asid", "subjects", "predicates", "contexts", "actors", "time (UTC)", "attributes"].map((c) => h("th", {}, c)))), tbody),
    h("div", {class: "pager"}, prev, next, info));
  return {name: "attestations", root, refresh: load};
}

// ------------------------------------------------------------------ routing

function route() {
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "jobs" && parts[1]) view = jobView(parts[1]);
  else if (parts[0] === "jobs") view = jobsView(params);
  else if (parts[0] === "handlers" && parts[1]) view = handlerView(parts[1]);
  else if (parts[0] === "handlers") view = handlersView();
  else if (parts[0] === "attestations") view = attestationsView(params);
  else view = overviewView();
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.nav === view.name);
  replace(main, view.root);
  view.refresh();
  connect(view.jobId);
}

window.addEventListener("hashchange", route);
route();
