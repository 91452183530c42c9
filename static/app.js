// Progressive enhancement only: the page is complete without this script.
// It says how long ago the figures were rendered.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const note = document.getElementById("age");
  if (!note) return;
  const rendered = Date.now();
  const update = () => {
    const seconds = Math.round((Date.now() - rendered) / 1000);
    note.textContent = `Figures rendered ${seconds} s ago; reload to record another visit.`;
  };
  update();
  setInterval(update, 1000);
});
