// The console's own script: the live tail of a trigger page, and a confirmation before a
// destructive button's form is sent. Everything else works without it.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const list = document.getElementById("tail-events");
  if (list) {
    tail(list, document.getElementById("tail-status"));
  }
  // A panel htmx refreshes waits while the keyboard is in it, so that focus is not lost; and a
  // refresh that found the session gone reloads the page, which then asks to sign in.
  document.addEventListener("htmx:beforeRequest", (event) => {
    if (event.target.contains(document.activeElement)) {
      event.preventDefault();
    }
  });
  document.addEventListener("htmx:beforeSwap", (event) => {
    if (event.detail.xhr.responseURL.includes("/console/login")) {
      event.preventDefault();
      window.location.reload();
    }
  });
  document.addEventListener("submit", (event) => {
    const button = event.submitter;
    if (button && button.dataset.confirm && !window.confirm(button.dataset.confirm)) {
      event.preventDefault();
    }
  });
});

// Shows each outcome the trigger's tail streams, newest first, keeping the last 200.
function tail(list, status) {
  const source = new EventSource(list.dataset.source);
  source.onopen = () => { status.textContent = "live"; };
  source.onerror = () => {
    status.textContent = source.readyState === EventSource.CLOSED ? "closed (reload to try again)" : "reconnecting";
  };
  source.addEventListener("outcome", (event) => {
    const o = JSON.parse(event.data);
    const item = document.createElement("li");
    item.dataset.delivery = o.delivery_id;
    if (o.outcome !== "ok") {
      item.className = "bad";
    }
    const latency = o.latency_ms == null ? "" : ` ${o.latency_ms.toFixed(1)} ms`;
    const link = document.createElement("a");
    link.href = `/console/apps/${list.dataset.app}/deliveries/${o.delivery_id}`;
    link.textContent = o.delivery_id;
    item.append(`${o.ended_at.slice(11, 23)} #${o.attempt} ${o.outcome}${latency} `, link, ` on ${o.node}`);
    if (o.error) {
      item.append(` — ${o.error}`);
    }
    list.prepend(item);
    while (list.children.length > 200) {
      list.lastChild.remove();
    }
  });
}
