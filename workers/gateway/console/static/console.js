// execq console: copy buttons, the list's polling and a running command's live output.
"use strict";

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button.copy");
  if (!button) return;
  const text = button.dataset.copy;
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    // No clipboard API (plain http): select the id so Ctrl+C copies it.
    const code = button.parentElement.querySelector(".id");
    const range = document.createRange();
    range.selectNodeContents(code);
    window.getSelection().removeAllRanges();
    window.getSelection().addRange(range);
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
});

function pollRows(tbody) {
  const status = document.getElementById("live-status");
  const tick = async () => {
    if (document.hidden) return;
    try {
      const answer = await fetch(tbody.dataset.poll, { headers: { "X-Console-Fragment": "1" } });
      if (answer.status === 401) { window.location.reload(); return; }
      if (!answer.ok) throw new Error(String(answer.status));
      const html = await answer.text();
      // Keep focus on a row's button across updates when the same rows are shown.
      if (!tbody.contains(document.activeElement)) tbody.innerHTML = html;
      if (status) status.textContent = "Updated " + new Date().toLocaleTimeString() + ", every 5 s.";
    } catch (err) {
      if (status) status.textContent = "Could not update (" + err.message + "); retrying.";
    }
  };
  setInterval(tick, 5000);
}

function follow(stdout) {
  const stderr = document.getElementById("stderr");
  const live = document.getElementById("live");
  const state = document.getElementById("state");
  const source = new EventSource(stdout.dataset.follow);
  const append = (pre, text) => {
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(document.createTextNode(text));
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  };
  source.addEventListener("stdout", (e) => append(stdout, JSON.parse(e.data).text));
  source.addEventListener("stderr", (e) => append(stderr, JSON.parse(e.data).text));
  source.addEventListener("state", (e) => {
    const s = JSON.parse(e.data).state;
    state.dataset.state = s;
    const badge = state.querySelector(".state");
    badge.textContent = s;
    badge.className = "state s-" + s;
    live.textContent = "State: " + s + ".";
  });
  source.addEventListener("end", () => {
    source.close();
    live.textContent = "Finished; loading the final record…";
    // The record is now final: show it whole (exit code, limits, timeline).
    setTimeout(() => window.location.reload(), 300);
  });
  source.onerror = () => { live.textContent = "Connection lost; reconnecting…"; };
}

document.addEventListener("DOMContentLoaded", () => {
  const tbody = document.querySelector("tbody[data-poll]");
  if (tbody) pollRows(tbody);
  const stdout = document.querySelector("pre[data-follow]");
  if (stdout) follow(stdout);
});
