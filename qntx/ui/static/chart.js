// The throughput chart of the overview: jobs completed and failed per bucket of time,
// as SVG bars over a count axis and a time axis (UTC). The count axis is linear, or
// logarithmic so that one burst does not flatten every other bar; "auto" (the default)
// takes the logarithmic one when the tallest bar is ten times the lowest or more.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = {width: 640, height: 170, left: 46, right: 10, top: 10, bottom: 24};
const CHART_SCALES = ["auto", "linear", "log"];
const BARS = [["completed", "#2e7d32", 0], ["failed", "#c62828", 0.5]];

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, value);
  if (text !== undefined) el.textContent = text;
  return el;
}

function countLabel(n) {
  if (n >= 1e6) return +(n / 1e6).toFixed(1) + "M";
  if (n >= 1e3) return +(n / 1e3).toFixed(1) + "k";
  return String(n);
}

// The step of at most ``ticks`` gridlines up to ``max``: 1, 2 or 5 times a power of ten.
function niceStep(max, ticks) {
  const raw = max / ticks;
  const power = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * power).find((step) => step >= raw);
}

// How counts map to heights (0..1), and the counts the axis labels.
function chartScale(series, choice) {
  const values = [...series.completed, ...series.failed].filter((v) => v > 0);
  const max = Math.max(1, ...values);
  const min = values.length ? Math.min(...values) : 1;
  if (choice === "log" || (choice === "auto" && max >= 10 * min)) {
    const top = Math.max(max, 10);
    const ticks = [0];
    for (let t = 1; t <= top; t *= 10) ticks.push(t);
    return {kind: "log", ticks, y: (v) => Math.log10(1 + v) / Math.log10(1 + top)};
  }
  const step = Math.max(1, niceStep(max, 4));
  const top = Math.ceil(max / step) * step;
  const ticks = [];
  for (let t = 0; t <= top; t += step) ticks.push(t);
  return {kind: "linear", ticks, y: (v) => v / top};
}

function chart(series, choice) {
  const {width: W, height: H, left: L, right: R, top: T, bottom: B} = CHART;
  const n = series.completed.length;
  const plotW = W - L - R, plotH = H - T - B, bw = plotW / n;
  const scale = chartScale(series, choice || "auto");
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", "data-scale": scale.kind});
  const yAxis = svg("g", {class: "axis-y"});
  for (const tick of scale.ticks) {
    const y = T + plotH * (1 - scale.y(tick));
    yAxis.append(svg("line", {x1: L, x2: W - R, y1: y, y2: y, class: "grid"}));
    yAxis.append(svg("text", {x: L - 5, y: y + 4, "text-anchor": "end"}, countLabel(tick)));
  }
  const xAxis = svg("g", {class: "axis-x"});
  xAxis.append(svg("line", {x1: L, x2: W - R, y1: T + plotH, y2: T + plotH, class: "axis"}));
  // a label at each whole two minutes (bucket starts are whole multiples of bucket_s)
  for (let i = 0; i < n; i++) {
    const start = series.end - (n - 1 - i) * series.bucket_s;
    if (start % 120 !== 0) continue;
    const x = L + i * bw;
    xAxis.append(svg("line", {x1: x, x2: x, y1: T + plotH, y2: T + plotH + 4, class: "axis"}));
    xAxis.append(svg("text", {x, y: H - 6, "text-anchor": "middle", "data-at": start},
      new Date(start * 1000).toISOString().slice(11, 16)));
  }
  xAxis.append(svg("text", {x: L - 5, y: H - 6, "text-anchor": "end", class: "unit"}, "UTC"));
  root.append(yAxis, xAxis);
  for (let i = 0; i < n; i++) {
    const start = series.end - (n - 1 - i) * series.bucket_s;
    for (const [key, color, offset] of BARS) {
      const value = series[key][i];
      if (!value) continue;
      const height = Math.max(2, plotH * scale.y(value));  // a single job stays visible
      const bar = svg("rect", {x: L + (i + offset) * bw, width: Math.max(1, bw / 2 - 1), y: T + plotH - height,
        height, fill: color, "data-key": key, "data-value": value, "data-at": start});
      bar.append(svg("title", {}, `${value} ${key}, ${new Date(start * 1000).toISOString().slice(11, 19)} UTC`));
      root.append(bar);
    }
  }
  return root;
}
