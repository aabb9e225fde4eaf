// The colour theme: "system" (follow prefers-color-scheme, the default), "light" or "dark",
// remembered in localStorage. A classic script loaded synchronously in <head>, so the theme
// is on <html> before the first paint (no flash of the wrong colours). The CSS does the
// rest: tandem.css keys its custom properties on html[data-theme] and the media query.
(function () {
  "use strict";
  var KEY = "tandem.theme";
  var CHOICES = ["system", "light", "dark"];
  var root = document.documentElement;

  function stored() {
    try {
      var value = localStorage.getItem(KEY);
      return CHOICES.indexOf(value) >= 0 ? value : "system";
    } catch (e) {
      return "system"; // storage blocked: follow the system
    }
  }

  function systemDark() {
    return !!(window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches);
  }

  function apply(choice) {
    // data-theme-choice says what the user picked; data-theme what is shown now.
    root.setAttribute("data-theme-choice", choice);
    var effective = choice === "system" ? (systemDark() ? "dark" : "light") : choice;
    root.setAttribute("data-theme", effective);
  }

  function choose(choice) {
    if (CHOICES.indexOf(choice) < 0) return;
    try {
      if (choice === "system") localStorage.removeItem(KEY);
      else localStorage.setItem(KEY, choice);
    } catch (e) { /* not remembered; still applied */ }
    apply(choice);
    sync();
  }

  function sync() {
    var current = stored();
    var inputs = document.querySelectorAll('input[name="theme"]');
    for (var i = 0; i < inputs.length; i++) inputs[i].checked = inputs[i].value === current;
  }

  apply(stored());

  if (window.matchMedia) {
    var query = window.matchMedia("(prefers-color-scheme: dark)");
    var follow = function () { if (stored() === "system") apply("system"); };
    if (query.addEventListener) query.addEventListener("change", follow);
    else if (query.addListener) query.addListener(follow);
  }
  // Another tab changed the choice: follow it here too.
  window.addEventListener("storage", function (e) {
    if (e.key === KEY || e.key === null) { apply(stored()); sync(); }
  });

  document.addEventListener("DOMContentLoaded", function () {
    sync();
    document.addEventListener("change", function (e) {
      var target = e.target;
      if (target && target.name === "theme" && target.type === "radio") choose(target.value);
    });
  });

  window.tandemTheme = { choose: choose, current: stored };
})();
