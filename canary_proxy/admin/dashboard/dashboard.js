// canary-proxy's dashboard: polls /stats once a second and redraws. No framework, no network
// but the admin port; the charts are uPlot (vendor/, MIT). Values from the server are only ever
// set as text, never as HTML. With several routes a selector picks the one charted; the page's
// own ?route=NAME keeps the choice across a reload (and makes a link to one route).
"use strict";

(function () {
  const POLL_MS = 1000;
  const STABLE = getComputedStyle(document.documentElement).getPropertyValue("--stable").trim() || "#2563eb";
  const CANARY = getComputedStyle(document.documentElement).getPropertyValue("--canary").trim() || "#d97706";

  const $ = (id) => document.getElementById(id);
  const fixed = (digits, scale = 1) => (u, v) => (v == null ? "–" : (v * scale).toFixed(digits));

  function line(label, color, fmt, dash) {
    return { label, stroke: color, width: 2, dash, spanGaps: false, value: fmt, points: { show: false } };
  }

  function makeChart(id, series, scale) {
    const el = $(id);
    const opts = {
      width: Math.max(300, el.clientWidth),
      height: 220,
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max || 0, scale.min)] } },
      axes: [{}, { size: 56, values: (u, vals) => vals.map((v) => (v * scale.factor).toFixed(scale.digits)) }],
      series: [{ value: (u, v) => (v == null ? "–" : new Date(v * 1000).toLocaleTimeString()) }, ...series],
      legend: { live: true },
    };
    const data = [[], ...series.map(() => [])];
    return new uPlot(opts, data, el);
  }

  const charts = {
    requests: makeChart(
      "chart-requests",
      [line("stable", STABLE, fixed(1)), line("canary", CANARY, fixed(1))],
      { factor: 1, digits: 0, min: 1 },
    ),
    errors: makeChart(
      "chart-errors",
      [line("stable", STABLE, fixed(2, 100)), line("canary", CANARY, fixed(2, 100))],
      { factor: 100, digits: 1, min: 0.01 },
    ),
    latency: makeChart(
      "chart-latency",
      [
        line("stable p50", STABLE, fixed(1, 1000), [4, 4]),
        line("stable p99", STABLE, fixed(1, 1000)),
        line("canary p50", CANARY, fixed(1, 1000), [4, 4]),
        line("canary p99", CANARY, fixed(1, 1000)),
      ],
      { factor: 1000, digits: 0, min: 0.01 },
    ),
    weight: makeChart("chart-weight", [line("canary weight", CANARY, fixed(2))], { factor: 1, digits: 0, min: 100 }),
  };

  function draw(stats) {
    const s = stats.series;
    charts.requests.setData([s.time, s.stable.requestRate, s.canary.requestRate]);
    charts.errors.setData([s.time, s.stable.errorRate, s.canary.errorRate]);
    charts.latency.setData([s.time, s.stable.p50, s.stable.p99, s.canary.p50, s.canary.p99]);
    charts.weight.setData([s.time, s.weightPercent]);
    for (const chart of Object.values(charts)) {
      // Away from the cursor, the legend shows the newest values (else it would show dashes).
      if (chart.cursor.left == null || chart.cursor.left < 0) chart.setLegend({ idx: s.time.length - 1 });
    }
  }

  function text(el, value, cls) {
    el.textContent = value;
    if (el.dataset.base === undefined) el.dataset.base = el.className; // its class in the page
    el.className = el.dataset.base + (cls ? " " + cls : "");
  }

  function cell(row, value, cls) {
    const td = row.insertCell();
    td.textContent = value;
    if (cls) td.className = cls;
    return td;
  }

  const pct = (v) => (v == null ? "n/a" : (v * 100).toFixed(2) + "%");
  const ms = (v) => (v == null ? "n/a" : (v * 1000).toFixed(1) + "ms");

  function showRollout(rollout, several) {
    const box = $("analysis");
    const a = rollout && rollout.phase ? rollout.lastAnalysis : null;
    if (!a) {
      // Never another route's (or an earlier rollout's) analysis.
      box.replaceChildren("no analysis yet");
      box.className = "muted";
    }
    if (!rollout && several) {
      // /stats reports the rollout of a lone route only: say so rather than "no rollout".
      text($("phase"), "–");
      text($("step"), "–");
      $("message").textContent = "One route of several: its rollout is not shown here (canary-proxy status shows it).";
      return;
    }
    if (!rollout || !rollout.phase) {
      text($("phase"), rollout && rollout.error ? "unreadable" : "no rollout");
      text($("step"), "–");
      $("message").textContent = rollout && rollout.error ? rollout.error : "";
      return;
    }
    text($("phase"), rollout.phase, rollout.phase);
    text($("step"), rollout.stepDescription || String(rollout.step + 1));
    $("message").textContent = rollout.message || "";
    if (!a) return;
    box.replaceChildren();
    box.className = "";
    const head = document.createElement("p");
    const verdict = document.createElement("span");
    verdict.textContent = a.result;
    verdict.className = a.result;
    head.append(verdict, ` at ${a.time} (canary at ${a.canaryPercent}%)`);
    box.append(head);
    const table = document.createElement("table");
    for (const version of ["canary", "stable"]) {
      const v = a[version];
      if (!v) continue;
      const row = table.insertRow();
      cell(row, version, version);
      cell(row, `${Math.round(v.requests)} req`, "num");
      cell(row, `${Math.round(v.errors)} 5xx (${pct(v.errorRate)})`, "num");
      cell(row, `p99 ${ms(v.p99)}`, "num");
    }
    for (const c of a.checks || []) {
      const row = table.insertRow();
      const show = c.name.startsWith("p99") ? ms : pct;
      cell(row, c.name);
      cell(row, show(c.value), "num");
      cell(row, "limit " + show(c.limit), "num");
      cell(row, c.ok ? "ok" : "FAIL", c.ok ? "pass" : "fail");
    }
    box.append(table);
    for (const note of [...(a.result === "fail" ? [] : a.reasons || []), ...(a.notes || [])]) {
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = note;
      box.append(p);
    }
  }

  function showDecisions(rows) {
    const body = $("decisions").tBodies[0];
    body.replaceChildren();
    for (const r of rows) {
      const row = body.insertRow();
      cell(row, r.version, r.version);
      cell(row, r.rule);
      cell(row, String(Math.round(r.total)), "num");
      cell(row, r.rate == null ? "–" : r.rate.toFixed(1), "num");
    }
  }

  // The route charted: null is the server's default (the lone route, or the first).
  let route = new URLSearchParams(location.search).get("route");

  function showRoutes(stats) {
    const picker = $("route");
    const names = stats.routes || [];
    const known = [...picker.options].map((o) => o.value);
    if (names.join("\n") !== known.join("\n")) {
      picker.replaceChildren(...names.map((name) => new Option(name, name)));
    }
    picker.value = stats.route;
    $("route-picker").hidden = names.length < 2; // one route: nothing to pick
  }

  function pick(name) {
    route = name;
    const url = new URL(location.href);
    url.searchParams.set("route", name);
    history.replaceState(null, "", url);
    refresh();
  }

  function show(stats) {
    showRoutes(stats);
    const w = stats.weight;
    text($("weight"), w ? `${w.percent}%` : "no config");
    $("weight").title = w ? `canary-weight ${w.weight} of ${w.total}` : "";
    showRollout(stats.rollout, (stats.routes || []).length > 1);
    showDecisions(stats.decisions);
    const config = stats.config || {};
    $("config").textContent = Object.entries(config)
      .map(([k, v]) => `${k}: ${v === null ? "" : JSON.stringify(v)}`)
      .join("\n");
    draw(stats);
  }

  async function refresh() {
    const updated = $("updated");
    const asked = route;
    try {
      const query = asked === null ? "" : "?route=" + encodeURIComponent(asked);
      const response = await fetch("/stats" + query, { cache: "no-store", signal: AbortSignal.timeout(5000) });
      if (response.status === 404 && asked !== null) {
        if (route === asked) route = null; // that route is gone: back to the default one
        text(updated, `no route ${asked}; showing the default`, "down");
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const stats = await response.json();
      if (route !== asked) return; // a pick came in meanwhile: its own answer draws
      window.dashboard.stats = stats;
      window.dashboard.updates += 1;
      show(stats);
      text(updated, "updated " + new Date().toLocaleTimeString());
    } catch (err) {
      text(updated, `admin port unreachable (${err.message}); retrying`, "down");
    }
  }

  async function poll() {
    await refresh();
    setTimeout(poll, POLL_MS);
  }

  $("route").addEventListener("change", (event) => pick(event.target.value));

  window.addEventListener("resize", () => {
    for (const chart of Object.values(charts)) {
      chart.setSize({ width: Math.max(300, chart.root.parentElement.clientWidth), height: 220 });
    }
  });

  // For tests and the curious: the charts (their .data) and the last /stats document.
  window.dashboard = { charts, stats: null, updates: 0 };
  poll();
})();
