// Refreshes the resource page from its JSON endpoint; the server already
// rendered every number, so without this script the page still shows them.
"use strict";
(function () {
  const body = document.body;
  const source = body.dataset.source;
  const every = Math.max(0.5, parseFloat(body.dataset.refresh || "2")) * 1000;
  const token = new URLSearchParams(window.location.search).get("token");
  const headers = token ? { Authorization: "Bearer " + token } : {};

  function text(value) {
    if (value === null || value === undefined) return "-";
    return String(value);
  }

  function row(cells, className) {
    const tr = document.createElement("tr");
    if (className) tr.className = className;
    for (const cell of cells) {
      const td = document.createElement("td");
      td.textContent = text(cell);
      tr.appendChild(td);
    }
    return tr;
  }

  function fill(tbody, rows, width) {
    tbody.replaceChildren();
    if (rows.length === 0) {
      const tr = row(["none"]);
      tr.firstChild.colSpan = width;
      tbody.appendChild(tr);
      return;
    }
    for (const r of rows) tbody.appendChild(r);
  }

  function render(data) {
    document.getElementById("status").textContent = data.status;
    const ready = document.getElementById("ready");
    ready.textContent = data.ready ? "ready" : "not ready";
    ready.className = "badge " + (data.ready ? "ok" : "bad");
    document.getElementById("open-scopes").textContent = data.open_scopes;
    document.getElementById("leases-total").textContent = data.leases_total;
    document.getElementById("generated-at").textContent = data.generated_at;
    const table = document.querySelector("#resources tbody");
    const keys = Array.from(table.querySelectorAll("tr:first-child td")).map(
      (td) => td.dataset.key
    );
    fill(
      table,
      data.resources.map((r) => {
        const tr = row(keys.map((k) => r[k]));
        tr.querySelectorAll("td").forEach((td, i) => (td.dataset.key = keys[i]));
        return tr;
      }),
      keys.length
    );
    fill(
      document.querySelector("#leases tbody"),
      data.leases.map((l) =>
        row([l.resource, l.route, l.age_s.toFixed(3), l.slow ? "slow" : ""], l.slow ? "slow" : "")
      ),
      4
    );
    fill(
      document.querySelector("#gates tbody"),
      data.gates.map((g) =>
        row([g.name, g.capacity, g.in_use, g.waiting, g.hold_estimate_ms, g.shed, g.timed_out])
      ),
      7
    );
    fill(
      document.querySelector("#failures tbody"),
      data.release_failures.map((f) => row([f.at, f.resource, f.outcome, f.route, f.seconds])),
      5
    );
    body.dataset.refreshed = String(parseInt(body.dataset.refreshed || "0", 10) + 1);
    body.classList.remove("stale");
  }

  async function refresh() {
    try {
      const answer = await fetch(source, { headers: headers, cache: "no-store" });
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      render(await answer.json());
    } catch (err) {
      body.classList.add("stale");
    } finally {
      window.setTimeout(refresh, every);
    }
  }

  window.setTimeout(refresh, every);
})();
