"""report.html's stylesheet and script, inlined into the page (no file to package, no
URL to load)."""

CSS = """
:root { --fg:#1d1d1f; --muted:#6b6b70; --line:#e2e2e6; --bg:#ffffff; --soft:#f5f5f7;
  --win:#2e7d32; --tie:#9e9e9e; --loss:#c62828; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: var(--bg); line-height: 1.5;
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", "Hiragino Sans", "Noto Sans CJK JP",
  "Yu Gothic", Meiryo, "IPAGothic", sans-serif; }
header, main { max-width: 1400px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 20px; }
h1 { font-size: 22px; margin: 0 0 8px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid var(--line);
  padding-bottom: 4px; }
h3 { font-size: 15px; margin: 20px 0 6px; }
p { margin: 6px 0 10px; color: var(--muted); max-width: 110ch; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0;
  font-size: 13px; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 9px; text-align: left;
  vertical-align: top; }
thead th { background: var(--soft); font-weight: 600; position: sticky; top: 0; }
tr.group-start > * { border-top: 2px solid #c8c8cc; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.up { color: var(--win); font-weight: 600; }
td.down { color: var(--loss); font-weight: 600; }
td.cal { color: var(--win); white-space: nowrap; }
td.uncal { color: #a15c00; white-space: nowrap; }
.muted { color: var(--muted); }
.warn { color: #a15c00; }
.sub { color: var(--muted); font-size: 12px; font-weight: normal; }
.tag { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 8px;
  background: var(--soft); border: 1px solid var(--line); margin-right: 4px;
  font-weight: normal; }
.tag.ref { background: #eceff1; }
.tag.lab { background: #fff3cd; border-color: #f0d58a; }
.qid { font-family: ui-monospace, monospace; font-size: 11px; color: var(--muted);
  margin-right: 4px; }
.wtl { display: flex; width: 220px; height: 10px; border-radius: 3px; overflow: hidden;
  background: var(--soft); margin: 3px 0; }
.seg.win { background: var(--win); } .seg.tie { background: var(--tie); }
.seg.loss { background: var(--loss); }
.win-text { color: var(--win); } .loss-text { color: var(--loss); }
.win-text, .tie-text, .loss-text { white-space: nowrap; }
figure { margin: 16px 0 24px; }
figure svg { display: block; height: auto; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
.controls { display: flex; flex-wrap: wrap; gap: 8px 20px; align-items: center;
  margin: 8px 0; }
.controls .group { display: inline-flex; gap: 4px; align-items: center;
  color: var(--muted); font-size: 13px; }
.controls button { font: inherit; font-size: 13px; padding: 2px 10px; border-radius: 12px;
  border: 1px solid var(--line); background: var(--bg); color: var(--fg); cursor: pointer; }
.controls button[aria-pressed="true"] { background: var(--fg); color: var(--bg);
  border-color: var(--fg); }
table.replies th.question { min-width: 220px; max-width: 300px; }
table.replies td.reply { min-width: 240px; max-width: 380px; }
.qtext { font-weight: 600; margin: 4px 0; }
.qtext ol { margin: 0; padding-left: 18px; font-weight: normal; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
.text.partial { color: var(--muted); }
.broken, .missing { color: #a15c00; }
.chips { display: flex; flex-wrap: wrap; gap: 3px; margin-top: 5px; align-items: center; }
.chips .sub { margin-right: 2px; }
.chip { font-size: 11px; padding: 0 5px; border-radius: 4px; background: var(--soft);
  border: 1px solid var(--line); white-space: nowrap; }
.chip.s1, .chip.s2 { background: #fdecea; } .chip.s3 { background: #fff4e5; }
.chip.s5 { background: #eef7ee; } .chip.s6, .chip.s7 { background: #dcefdc; }
.chip.win { color: var(--win); border-color: #a5d6a7; }
.chip.loss { color: var(--loss); border-color: #ef9a9a; }
.chip.missing { color: #a15c00; border-style: dashed; }
tr[hidden] { display: none; }
"""

# The per-question table's filter and sort, no library. State lives in the address's
# fragment (#set=probes&sort=disagreement), so a view can be linked to and reloaded.
SCRIPT = """
(function () {
  "use strict";
  var body = document.getElementById("q-rows");
  if (!body) { return; }
  var rows = Array.prototype.slice.call(body.querySelectorAll("tr[data-set]"));
  var sets = rows.map(function (r) { return r.getAttribute("data-set"); });
  var state = { set: "all", sort: "order" };
  function num(row, name) { return parseFloat(row.getAttribute(name)) || 0; }
  function apply() {
    var ordered = rows.slice().sort(function (a, b) {
      if (state.sort === "disagreement") {
        var d = num(b, "data-disagreement") - num(a, "data-disagreement");
        if (d !== 0) { return d; }
      }
      return num(a, "data-index") - num(b, "data-index");
    });
    var shown = 0;
    ordered.forEach(function (row) {
      var visible = state.set === "all" || row.getAttribute("data-set") === state.set;
      row.hidden = !visible;
      if (visible) { shown += 1; }
      body.appendChild(row);
    });
    document.querySelectorAll("[data-filter]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-filter") === state.set));
    });
    document.querySelectorAll("[data-sort]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-sort") === state.sort));
    });
    var count = document.getElementById("q-count");
    if (count) { count.textContent = shown + " of " + rows.length + " questions"; }
  }
  function readHash() {
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var kv = part.split("=");
      var value = decodeURIComponent(kv[1] || "");
      if (kv[0] === "set" && (value === "all" || sets.indexOf(value) >= 0)) { state.set = value; }
      if (kv[0] === "sort" && (value === "order" || value === "disagreement")) {
        state.sort = value;
      }
    });
  }
  function writeHash() {
    try {
      history.replaceState(null, "", "#set=" + encodeURIComponent(state.set) +
                           "&sort=" + state.sort);
    } catch (e) { /* a page opened from a file may refuse; the view still changes */ }
  }
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-filter], [data-sort]");
    if (!button) { return; }
    if (button.hasAttribute("data-filter")) { state.set = button.getAttribute("data-filter"); }
    if (button.hasAttribute("data-sort")) { state.sort = button.getAttribute("data-sort"); }
    writeHash();
    apply();
  });
  window.addEventListener("hashchange", function () { readHash(); apply(); });
  readHash();
  apply();
})();
"""
