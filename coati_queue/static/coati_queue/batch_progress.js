/* Live progress of one payroll batch on its admin page.
 *
 * Polls the JSON progress endpoint (data-progress-url) every data-poll-ms
 * milliseconds with fetch and rewrites the panel in place; stops as soon as
 * the batch is no longer pending/running. No library, no CDN.
 */
"use strict";
(function () {
  const ACTIVE = ["pending", "running"];

  function interpolate(format, values) {
    return format.replace(/%\((\w+)\)s/g, function (_, key) {
      return key in values ? String(values[key]) : "";
    }).replace(/%%/g, "%");
  }

  function start(panel) {
    const i18n = JSON.parse(document.getElementById("coati-progress-i18n").textContent);
    const url = panel.dataset.progressUrl;
    const every = parseInt(panel.dataset.pollMs || "1500", 10);
    const lang = document.documentElement.lang || undefined;
    const integer = new Intl.NumberFormat(lang);
    const decimal = new Intl.NumberFormat(lang, {minimumFractionDigits: 1, maximumFractionDigits: 1});
    const el = function (id) { return document.getElementById(id); };
    const shown = {started_at: panel.dataset.startedAt || null, finished_at: panel.dataset.finishedAt || null};
    let timer = null;

    // The read-only rows under the panel show the same facts: keep them in step.
    function setField(name, text) {
      const cell = document.querySelector(".field-" + name + " .readonly");
      if (cell) { cell.textContent = text; }
    }

    function syncFields(data, statusLabel) {
      setField("status", statusLabel);
      setField("total", integer.format(data.total));
      setField("succeeded", integer.format(data.completed));
      setField("failed", integer.format(data.failed));
      ["started_at", "finished_at"].forEach(function (name) {
        if (data[name] && data[name] !== shown[name]) {
          shown[name] = data[name];
          setField(name, new Date(data[name]).toLocaleString(lang));
        }
      });
    }

    function duration(seconds) {
      if (seconds === null || seconds === undefined) { return i18n.empty; }
      const whole = Math.round(seconds);
      const h = Math.floor(whole / 3600), m = Math.floor((whole % 3600) / 60), s = whole % 60;
      if (h) { return interpolate(i18n.hours, {h: h, m: m}); }
      if (m) { return interpolate(i18n.minutes, {m: m, s: s}); }
      if (seconds < 10 && seconds !== whole) { return interpolate(i18n.seconds, {s: decimal.format(seconds)}); }
      return interpolate(i18n.seconds, {s: s});
    }

    function render(data) {
      const processed = data.completed + data.failed;
      const text = interpolate(i18n.progress, {
        processed: integer.format(processed), total: integer.format(data.total),
        percent: decimal.format(data.progress_percentage),
      });
      const bar = el("coati-progress-bar");
      bar.value = data.progress_percentage;
      bar.textContent = text;
      bar.classList.toggle("coati-has-failures", data.failed > 0);
      el("coati-progress-text").textContent = text;
      el("coati-progress-completed").textContent = integer.format(data.completed);
      el("coati-progress-failed").textContent = integer.format(data.failed);
      el("coati-progress-pending").textContent = integer.format(data.pending);
      el("coati-progress-rate").textContent = data.rate_per_second === null
        ? i18n.empty : interpolate(i18n.rate, {rate: decimal.format(data.rate_per_second)});
      el("coati-progress-eta").textContent = duration(data.eta_seconds);
      const status = el("coati-progress-status");
      const label = i18n.statuses[data.status] || data.status;
      status.textContent = label;
      status.className = "coati-status coati-status-" + data.status;
      syncFields(data, label);
      panel.dataset.status = data.status;
    }

    function say(text, isError) {
      const message = el("coati-progress-message");
      message.textContent = text;
      message.classList.toggle("coati-error", Boolean(isError));
    }

    function stop() {
      if (timer !== null) { clearTimeout(timer); timer = null; }
      panel.dataset.polling = "0";
    }

    async function poll() {
      timer = null;
      let response;
      try {
        response = await fetch(url, {
          credentials: "same-origin", cache: "no-store",
          headers: {"Accept": "application/json", "X-Requested-With": "XMLHttpRequest"},
        });
      } catch (error) {
        say(interpolate(i18n.error, {reason: error.message}), true);
        timer = setTimeout(poll, every * 2);
        return;
      }
      // A lapsed session on the admin's own endpoint redirects to the login page (200 HTML).
      const loggedOut = response.redirected ||
        !(response.headers.get("Content-Type") || "").includes("json");
      if (response.status === 401 || response.status === 403 || response.status === 404 ||
          (response.ok && loggedOut)) {
        say(i18n.forbidden, true);
        stop();
        return;
      }
      let data = null;
      if (response.ok) {
        try { data = await response.json(); } catch (error) { data = null; }
      }
      if (data === null) {
        say(interpolate(i18n.error, {reason: "HTTP " + response.status}), true);
        timer = setTimeout(poll, every * 2);
        return;
      }
      render(data);
      panel.dataset.polls = String(parseInt(panel.dataset.polls || "0", 10) + 1);
      if (ACTIVE.indexOf(data.status) === -1) {
        const cancel = el("coati-cancel-link");
        if (cancel) { cancel.closest("li").remove(); }  // nothing left to cancel
        say(i18n.finished, false);
        stop();
        return;
      }
      say("", false);
      timer = setTimeout(poll, every);
    }

    if (panel.dataset.active === "1") {
      panel.dataset.polling = "1";
      timer = setTimeout(poll, every);
    }
  }

  function init() {
    const panel = document.getElementById("coati-batch-progress");
    if (panel && panel.dataset.progressUrl) { start(panel); }
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
