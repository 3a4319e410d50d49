// The tenant's jobs, refreshed every 5 s. The API key comes from the link's #key=... fragment
// (never sent to the server in the URL) or the form, and stays in this tab's sessionStorage.
"use strict";
const $ = (id) => document.getElementById(id);

function takeKeyFromFragment() {
  const m = location.hash.match(/key=([^&]+)/);
  if (m) {
    sessionStorage.setItem("cvopt-key", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function seconds(a, b) {
  if (!a || !b) return "";
  const s = (new Date(b) - new Date(a)) / 1000;
  return s < 120 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
}

async function call(path) {
  const key = sessionStorage.getItem("cvopt-key");
  const r = await fetch(path, { headers: { Authorization: "Bearer " + key } });
  const body = await r.json();
  if (!r.ok) throw new Error(body.message || r.statusText);
  return body;
}

async function refresh() {
  try {
    const [tenant, jobs] = await Promise.all([call("/v1/tenant"), call("/v1/jobs?limit=100")]);
    $("tenant").textContent = "tenant " + tenant.name;
    const body = $("jobs").tBodies[0];
    body.replaceChildren();
    for (const job of jobs.data) {
      const row = body.insertRow();
      row.dataset.jobId = job.id;
      cell(row, job.name || job.id.slice(0, 12));
      const status = cell(row, job.status + (job.error ? ": " + job.error.code : ""), "status " + job.status);
      if (job.waiting_for) {
        // A queued job nobody can take (a GPU job, no GPU worker up) must not look merely slow.
        const waiting = document.createElement("span");
        waiting.className = "waiting";
        waiting.textContent = "waiting for a " + job.waiting_for;
        status.append(" ", waiting);
      }
      cell(row, job.preset || job.steps.map((s) => s.name).join(" → "));
      const p = cell(row, "");
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = Math.round(job.progress * 100) + "%";
      bar.appendChild(fill);
      p.append(bar, (job.current_step || "") + " " + Math.round(job.progress * 100) + "%");
      cell(row, job.created_at.replace("T", " ").slice(0, 19));
      cell(row, seconds(job.started_at, job.finished_at));
      const link = cell(row, "");
      if (job.report_url) {
        const a = document.createElement("a");
        a.href = job.report_url;
        a.textContent = "report";
        a.className = "report-link";
        link.appendChild(a);
      }
    }
    $("count").textContent = jobs.count + " jobs";
    $("jobs").hidden = false;
    $("login").hidden = true;
    $("logout").hidden = false;
    $("error").hidden = true;
  } catch (err) {
    $("error").textContent = String(err.message || err);
    $("error").hidden = false;
    if (!sessionStorage.getItem("cvopt-key") || /key/i.test(err.message)) $("login").hidden = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  takeKeyFromFragment();
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("cvopt-key", $("key").value.trim());
    refresh();
  });
  $("logout").addEventListener("click", () => { sessionStorage.removeItem("cvopt-key"); location.reload(); });
  if (sessionStorage.getItem("cvopt-key")) refresh(); else $("login").hidden = false;
  setInterval(() => { if (sessionStorage.getItem("cvopt-key")) refresh(); }, 5000);
});
