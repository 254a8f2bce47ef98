// hyperexport dashboard: live progress over server-sent events, and the daemon section of the
// submission form shown only when the daemon phase is asked for. The pages work without it.
(function () {
  "use strict";
  var daemon = document.getElementById("hyper2kvm_daemon");
  var section = document.getElementById("daemon-section");
  if (daemon && section) {
    var sync = function () {
      section.hidden = !daemon.checked;
      var pipe = document.getElementById("enable_pipeline");
      if (daemon.checked && pipe) { pipe.checked = true; }
    };
    daemon.addEventListener("change", sync);
    sync();
  }

  var rows = document.querySelectorAll("[data-job]");
  if (!rows.length || !window.EventSource) { return; }
  var detail = document.querySelector("section.detail");
  // An ended job's page has nothing to follow.
  if (detail && detail.getAttribute("data-final") === "true") { return; }
  // The newest job the list was rendered with: a job newer than it was submitted since (show it);
  // an update of an older job not on the page (beyond the first 200) is ignored.
  var newest = 0;
  for (var r = 0; r < rows.length; r++) {
    newest = Math.max(newest, Number(rows[r].getAttribute("data-created")) || 0);
  }
  var reloading = false;
  function reloadSoon() {
    if (reloading) { return; }
    reloading = true;
    setTimeout(function () { window.location.reload(); }, 1000);
  }
  var finals = { done: 1, failed: 1, cancelled: 1, interrupted: 1 };

  function update(el, job) {
    var state = el.querySelector(".state");
    if (state) { state.textContent = job.state; state.className = "state s-" + job.state; }
    var span = el.querySelector(".bar span");
    var pct = Math.max(0, Math.min(100, job.percent || 0));
    if (span) { span.style.width = pct.toFixed(1) + "%"; }
    var bar = el.querySelector(".bar");
    if (bar) { bar.setAttribute("aria-valuenow", pct.toFixed(0)); }
    var label = el.querySelector(".pct");
    if (label) { label.textContent = pct.toFixed(0) + "%"; }
    var phase = el.querySelector(".phase");
    if (phase) { phase.textContent = job.phase; }
  }

  var url = detail ? "/api/v1/jobs/" + encodeURIComponent(detail.getAttribute("data-job")) + "/events" : "/api/v1/events";
  var es = new EventSource(url);
  function apply(job) {
    var els = document.querySelectorAll('[data-job="' + job.id + '"]');
    if (!els.length && !detail) {
      // A job submitted elsewhere since the page was made: show it (once a second at most).
      if (job.created_ms > newest) { reloadSoon(); }
      return;
    }
    for (var i = 0; i < els.length; i++) { update(els[i], job); }
    if (detail && finals[job.state] && detail.getAttribute("data-final") !== "true") {
      // Ended: the page shows the result paths or the error text.
      es.close();
      window.location.reload();
    }
  }
  es.addEventListener("job", function (ev) {
    try { apply(JSON.parse(ev.data)); } catch (e) { /* not a job */ }
  });
  // What changed between the page's rendering and the stream's start is read once the stream
  // is open (and again after every reconnection): no update is lost.
  es.addEventListener("open", function () {
    var path = detail ? "/api/v1/jobs/" + encodeURIComponent(detail.getAttribute("data-job")) : "/api/v1/jobs?limit=200";
    fetch(path, { credentials: "same-origin" }).then(function (r) { return r.ok ? r.json() : null; }).then(function (body) {
      if (!body) { return; }
      var jobs = detail ? [body] : body.jobs;
      for (var i = 0; i < jobs.length; i++) { apply(jobs[i]); }
    }).catch(function () { /* the next event will do */ });
  });
  es.addEventListener("lagged", function () { reloadSoon(); });
})();
