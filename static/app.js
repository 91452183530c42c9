// Progressive enhancement only: the page is complete without this script. While the tab is
// visible it polls /stats (which records no visit; nginx caches it for a second) and copies
// the figures and the chart's bar geometry into the page; the server computes both.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const POLL_MS = 2000;
  const byId = (id) => document.getElementById(id);
  const note = byId("age");
  let updated = Date.now();
  let failure = null;
  let timer = 0;
  let inFlight = false;

  const show = (figures) => {
    for (const name of ["recorded", "processed", "pending"]) byId(name).textContent = figures[name];
    const chart = figures.chart;
    for (const name of ["summary", "peak", "from", "to"]) {
      const element = byId(`chart-${name}`);
      if (element) element.textContent = chart[name];
    }
    byId("chart-desc").textContent = chart.summary;
    const rects = byId("chart-bars").querySelectorAll("rect");
    chart.bars.forEach((bar, i) => {
      const rect = rects[i];
      if (!rect) return;
      rect.setAttribute("x", bar.x);
      rect.setAttribute("y", bar.y);
      rect.setAttribute("height", bar.height);
      rect.querySelector("title").textContent = bar.label;
    });
    const rows = chart.bars.filter((bar) => bar.views > 0).reverse().map((bar) => {
      const row = document.createElement("tr");
      for (const text of [bar.minute, bar.views]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      return row;
    });
    byId("chart-rows").replaceChildren(...rows);
  };

  const schedule = (delay) => {
    clearTimeout(timer);
    timer = 0;
    if (document.visibilityState === "visible") timer = setTimeout(poll, delay);
  };

  const poll = async () => {
    timer = 0;
    if (inFlight) return;
    inFlight = true;
    try {
      const response = await fetch("/stats", { headers: { accept: "application/json" } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      show(await response.json());
      updated = Date.now();
      failure = null;
    } catch (error) {
      failure = error.message;
    } finally {
      inFlight = false;
      schedule(POLL_MS);
    }
  };

  const age = () => {
    if (!note) return;
    const seconds = Math.round((Date.now() - updated) / 1000);
    note.textContent = failure
      ? `Could not refresh the figures (${failure}); trying again. Last update ${seconds} s ago.`
      : `Figures updated ${seconds} s ago; they refresh while this tab is visible. Reload to record another visit.`;
  };

  document.addEventListener("visibilitychange", () => schedule(0));
  schedule(POLL_MS);
  age();
  setInterval(age, 1000);
});
