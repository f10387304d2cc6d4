// The dashboard's live status: GET /api/v1/status every few seconds (pool numbers, engine and storage
// health, uptime). Everything is put in with textContent; nothing from the response is parsed as HTML.
"use strict";

(function () {
  const POLL_MS = 5000;
  const values = document.getElementById("pool-values");
  const health = document.getElementById("pool-health");
  const note = document.getElementById("pool-note");
  const dot = document.getElementById("pool-dot");
  if (!values) return;

  const POOL_FIELDS = [
    ["warm", "warm"],
    ["active", "active"],
    ["preserved", "preserved"],
    ["creating", "creating"],
    ["start_failures", "start failures"],
  ];

  function uptime(seconds) {
    if (typeof seconds !== "number") return "";
    const d = Math.floor(seconds / 86400);
    const h = Math.floor((seconds % 86400) / 3600);
    const m = Math.floor((seconds % 3600) / 60);
    return d ? d + " d " + h + " h" : h ? h + " h " + m + " min" : m + " min";
  }

  function healthItem(label, state) {
    const li = document.createElement("li");
    const d = document.createElement("span");
    d.className = "dot " + (state === null ? "" : state.ok ? "ok" : "fail");
    li.append(d, document.createTextNode(label));
    if (state && !state.ok && state.error) li.title = String(state.error);
    return li;
  }

  function render(status) {
    const pool = status && status.pool;
    const items = [];
    if (pool && typeof pool === "object") {
      for (const [key, label] of POOL_FIELDS) {
        if (!(key in pool)) continue;
        const dt = document.createElement("dt");
        dt.textContent = label;
        const dd = document.createElement("dd");
        dd.textContent = String(pool[key]);
        items.push(dt, dd);
      }
    } else if (status && status.mode === "console") {
      const dd = document.createElement("dd");
      dd.textContent = "no honeypot in this process (console mode)";
      items.push(dd);
    }
    values.replaceChildren(...items);
    if (health && status) {
      const rows = [];
      if (status.engine !== undefined) rows.push(healthItem("engine", status.engine || null));
      if (status.storage !== undefined) rows.push(healthItem("storage", status.storage || null));
      if (typeof status.uptime_s === "number") {
        const li = document.createElement("li");
        li.textContent = "up " + uptime(status.uptime_s);
        rows.push(li);
      }
      health.replaceChildren(...rows);
    }
  }

  function setState(ok, text) {
    if (dot) dot.className = "dot " + (ok ? "ok" : "fail");
    if (note) note.textContent = text;
  }

  async function poll() {
    try {
      const response = await fetch("/api/v1/status", {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (!response.ok) {
        setState(false, "status: HTTP " + response.status);
        return;
      }
      const status = await response.json();
      render(status);
      const pool = status.pool;
      const ok = !pool || (pool.warm > 0 || pool.creating > 0);
      setState(ok, (ok ? "" : "no warm sandbox · ") + "updated " + new Date().toLocaleTimeString());
    } catch (e) {
      setState(false, "status unavailable");
    }
  }

  const initial = document.getElementById("status-data");
  if (initial) {
    const data = JSON.parse(initial.textContent);
    if (data && Object.keys(data).length) render(data);
  }
  poll();
  setInterval(poll, POLL_MS);
})();
