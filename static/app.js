// Progressive enhancement only: the page is complete without this script. While the tab is
// visible it polls /stats (which records no visit; nginx caches it for a second) and copies
// the figures and the chart's bar geometry into the page; the server computes both.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const POLL_MS = 2000;
  const byId = (id) => document.getElementById(id);
  const note = byId("age");
  // "HH:MM:SS UTC" of the server's RFC 3339 time (the visitor's clock may be off).
  const clock = (asOf) => `${asOf.slice(11, 19)} UTC`;
  let updated = Date.now();
  let failure = null;
  // While the server serves figures it could not refresh: when they were read. The page may
  // have been rendered so already.
  let stale = note && note.dataset.staleAsOf ? clock(note.dataset.staleAsOf) : null;
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
      const figures = await response.json();
      show(figures);
      failure = null;
      stale = figures.stale ? clock(figures.as_of) : null;
      if (!stale) updated = Date.now();
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
    if (failure) {
      note.textContent = `Could not refresh the figures (${failure}); trying again. Last update ${seconds} s ago.`;
    } else if (stale) {
      note.textContent = `The figures could not be refreshed; these are the last ones read, at ${stale}. Trying again.`;
    } else {
      note.textContent = `Figures updated ${seconds} s ago; they refresh while this tab is visible. Reload to record another visit.`;
    }
  };

  document.addEventListener("visibilitychange", () => schedule(0));
  schedule(POLL_MS);
  age();
  setInterval(age, 1000);
});
