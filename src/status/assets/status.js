// The node status page: polls /status/api once a second and renders it. Every string goes in
// with textContent (or setAttribute): repository names and references come from clients and
// are shown as the characters they are, never parsed as HTML.
"use strict";
(function () {
  const API = "/status/api";
  const PERIOD_MS = 1000;
  const TIMEOUT_MS = 5000;
  let inFlight = false;
  let lastOk = 0;

  function $(id) { return document.getElementById(id); }
  function text(id, value) { const el = $(id); if (el) { el.textContent = String(value); } }

  function bytes(n) {
    if (typeof n !== "number" || !isFinite(n)) { return "–"; }
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = n, u = 0;
    while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
    return (u === 0 ? String(v) : v.toFixed(1)) + " " + units[u];
  }

  // Peer ids are 52 characters: the cell shows the ends, the tooltip the whole id.
  function short(id) {
    const s = String(id);
    return s.length > 20 ? s.slice(0, 8) + "…" + s.slice(-6) : s;
  }

  function cell(tr, value, cls) {
    const td = document.createElement("td");
    td.textContent = value === null || value === undefined ? "" : String(value);
    if (cls) { td.className = cls; }
    tr.appendChild(td);
    return td;
  }

  function shortTime(t) {
    // "2026-12-03T18:40:01.123Z" → "18:40:01.123"
    const m = /T([0-9:.]+)/.exec(String(t));
    return m ? m[1] : String(t);
  }

  function renderRequests(recent) {
    const body = $("requests-body");
    const rows = document.createDocumentFragment();
    for (const r of recent.requests) {
      const tr = document.createElement("tr");
      tr.className = "request";
      tr.setAttribute("data-source", r.source);
      tr.setAttribute("data-decision", r.decision);
      tr.setAttribute("data-served-from", r.served_from);
      tr.setAttribute("data-kind", r.kind);
      tr.setAttribute("data-bytes", String(r.bytes));
      cell(tr, shortTime(r.time), "mono time");
      cell(tr, r.source + (r.requester ? " (" + short(r.requester) + ")" : ""), "source");
      cell(tr, r.registry + "/" + r.repository, "mono image");
      cell(tr, r.reference, "mono reference");
      cell(tr, r.method + " " + r.kind, "kind");
      const d = cell(tr, r.decision, "decision " + (r.decision === "allow" ? "allow" : "deny"));
      if (r.reason) { d.title = r.reason; }
      const from = cell(tr, r.served_from + (r.peer ? " (" + short(r.peer) + ")" : ""), "served-from");
      if (r.peer) { from.title = r.peer; }
      cell(tr, r.status, "num status");
      const b = cell(tr, bytes(r.bytes), "num bytes");
      b.title = String(r.bytes) + " bytes";
      cell(tr, typeof r.duration_ms === "number" ? r.duration_ms.toFixed(1) : "", "num");
      rows.appendChild(tr);
    }
    if (recent.requests.length === 0) {
      const tr = document.createElement("tr");
      const td = cell(tr, "no requests yet", "muted");
      td.colSpan = 10;
      rows.appendChild(tr);
    }
    body.replaceChildren(rows);
    let count = recent.requests.length + " of the last " + recent.capacity + " · " +
      recent.seen + " since start";
    if (recent.skipped > 0) { count += " · " + recent.skipped + " not kept"; }
    text("recent-count", "(" + count + ")");
  }

  function render(s) {
    text("node", s.node);
    const ready = $("ready");
    ready.textContent = s.ready ? "ready" : "not ready";
    ready.className = "badge " + (s.ready ? "ok" : "bad");
    text("peers-connected", s.peers.connected);
    text("peer-id", s.peers.peer_id);
    text("listen-addrs", s.peers.listen_addrs.join(" "));
    text("handshake-failures", s.peers.handshake_failures);
    text("unreachable", s.peers.unreachable);
    text("peers-seen", s.peers.seen_recently.length ? s.peers.seen_recently.join(" ") : "none");
    text("advertised-keys", s.advertised_keys);
    text("hits-local", s.served.mirror_hits_local);
    text("hits-peer", s.served.mirror_hits_peer);
    text("misses", s.served.mirror_misses);
    text("bytes-local", bytes(s.served.mirror_local_bytes));
    text("bytes-peer", bytes(s.served.mirror_peer_bytes));
    text("bytes-to-peers", bytes(s.served.peer_endpoint_bytes));
    if (s.cache.enabled) {
      text("cache-bytes", bytes(s.cache.bytes));
      text("cache-of", "of " + bytes(s.cache.max_bytes));
      const pct = s.cache.max_bytes > 0 ? Math.min(100, 100 * s.cache.bytes / s.cache.max_bytes) : 0;
      $("cache-fill").style.width = pct.toFixed(1) + "%";
    } else {
      text("cache-bytes", "off");
      text("cache-of", "cache.enabled is false: nothing is kept beyond containerd's store");
    }
    text("policy", s.policy);
    text("readiness", s.readiness);
    text("audit-dropped", s.audit_dropped);
    renderRequests(s.recent);
    document.body.removeAttribute("data-stale");
    document.body.setAttribute("data-updated", s.time);
    text("updated", "updated " + shortTime(s.time));
  }

  function poll() {
    if (inFlight) { return; } // one request at a time: a slow daemon is never piled onto
    inFlight = true;
    const ctl = new AbortController();
    const timer = setTimeout(function () { ctl.abort(); }, TIMEOUT_MS);
    fetch(API, { cache: "no-store", signal: ctl.signal, credentials: "same-origin" })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(function (s) { lastOk = Date.now(); render(s); })
      .catch(function (e) {
        document.body.setAttribute("data-stale", "true");
        text("updated", "update failed (" + e.message + ")" +
          (lastOk ? ", showing data from " + Math.round((Date.now() - lastOk) / 1000) + " s ago" : ""));
      })
      .finally(function () { clearTimeout(timer); inFlight = false; });
  }

  poll();
  setInterval(poll, PERIOD_MS);
})();
