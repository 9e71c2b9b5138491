// Live figures: poll the page's JSON twin every 5 s while the tab is visible (document.visibilityState), and put
// each value into the elements marked data-live="<key>" (textContent only: nothing from the server becomes HTML).
// Bulk actions ask first: a form with data-confirm is submitted only after confirm().
(function () {
  "use strict";
  var body = document.body;
  var url = body.getAttribute("data-live-url");
  var timer = null;
  function apply(values) {
    Object.keys(values).forEach(function (key) {
      document.querySelectorAll('[data-live="' + CSS.escape(key) + '"]').forEach(function (el) {
        el.textContent = String(values[key]);
      });
    });
  }
  function poll() {
    if (document.visibilityState !== "visible") { return; }
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (values) { if (values) { apply(values); body.setAttribute("data-polled", String(Date.now())); } })
      .catch(function () {});
  }
  function start() { if (url && timer === null) { timer = setInterval(poll, 5000); } }
  function stop() { if (timer !== null) { clearInterval(timer); timer = null; } }
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") { poll(); start(); } else { stop(); }
  });
  if (document.visibilityState === "visible") { start(); }
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      if (!window.confirm(form.getAttribute("data-confirm"))) { ev.preventDefault(); }
    });
  });
  document.querySelectorAll("button[data-confirm]").forEach(function (button) {
    button.addEventListener("click", function (ev) {
      if (!window.confirm(button.getAttribute("data-confirm"))) { ev.preventDefault(); }
    });
  });
  document.querySelectorAll("input[data-select-all]").forEach(function (box) {
    box.addEventListener("change", function () {
      document.querySelectorAll('input[type="checkbox"][name="id"]').forEach(function (b) { b.checked = box.checked; });
    });
  });
})();
