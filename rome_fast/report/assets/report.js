/* rome-fast report: builds the page from the JSON in #rf-data with Plotly. Every string from the
   data goes into the DOM as text (textContent), never as HTML; labels handed to Plotly, which reads a
   small HTML subset, are entity-escaped first.
   plotly.js is inlined as inert text (#rf-plotly) and run only once the tables are on screen: its
   start-up is most of a load's CPU time, and the tables need none of it. Drawing waits on plotlyReady. */
(function () {
  "use strict";
  var state = { ready: false, timings: { script: performance.now() }, errors: [] };
  window.rfReport = state;
  window.addEventListener("error", function (e) { reportError(e.message || String(e)); });
  window.addEventListener("unhandledrejection", function (e) { reportError(String(e.reason)); });

  var PLOT_CONFIG = { displaylogo: false, responsive: true };
  var CHUNK = 100;  // rows drawn at a time: more as the table is scrolled, so sorting stays fast
  var DATA = JSON.parse(document.getElementById("rf-data").textContent);
  state.timings.parsed = performance.now();
  var collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
  var pending = [];  // drawings the page is not ready without
  var startPlotly;  // resolves plotlyReady once plotly.js has run: see build()
  var plotlyReady = new Promise(function (resolve) { startPlotly = resolve; });
  var figuresDrawn = plotlyReady;  // and the page's first figures drawn

  function reportError(msg) {
    state.errors.push(msg);
    var box = document.getElementById("rf-errors");
    if (box) { box.style.display = "block"; box.appendChild(el("div", { text: msg })); }
  }

  function el(tag, attrs) {
    var e = document.createElement(tag);
    attrs = attrs || {};
    Object.keys(attrs).forEach(function (k) {
      var v = attrs[k];
      if (v === undefined || v === null) return;
      if (k === "text") e.textContent = String(v);
      else if (k === "class") e.className = v;
      else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, String(v));
    });
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return e;
  }

  function plotlyText(s) {  // Plotly reads <b>, <a href>, &…; in labels: show data as text
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function isNum(v) { return typeof v === "number" && isFinite(v); }

  function fmt(v, col) {
    if (v === null || v === undefined || v === "") return col && col.type !== "str" ? "–" : "";
    if (col && col.type === "num" && isNum(v)) return v.toFixed(col.digits === undefined ? 3 : col.digits);
    if (col && col.type === "ci") return fmtCi(v);
    return String(v);
  }

  function fmtCi(v) {
    if (isNum(v)) return v.toFixed(1);
    if (v && typeof v === "object" && isNum(v.mean)) {
      return v.mean.toFixed(1) + (isNum(v.ci95) ? " ± " + v.ci95.toFixed(1) : "") +
        (isNum(v.n) ? " (n=" + v.n + ")" : "");
    }
    return "–";
  }

  function valueText(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "object") {
      var flat = JSON.stringify(v);
      return flat.length <= 100 ? flat : JSON.stringify(v, null, 1);
    }
    return String(v);
  }

  function settingsTable(obj) {
    var t = el("table", { class: "rf-kv" });
    Object.keys(obj || {}).forEach(function (k) {
      var v = obj[k];
      t.appendChild(el("tr", {}, el("td", { text: k }),
        el("td", {}, typeof v === "object" && v !== null ? el("code", { text: valueText(v) }) : valueText(v))));
    });
    return t;
  }

  function staticTable(spec) {
    var t = el("table", { class: "rf-static" });
    var head = el("tr");
    spec.columns.forEach(function (c) { head.appendChild(el("th", { text: c.label, title: c.title })); });
    t.appendChild(el("thead", {}, head));
    var body = el("tbody");
    spec.rows.forEach(function (r) {
      var tr = el("tr");
      r.forEach(function (v, i) {
        var c = spec.columns[i] || {};
        tr.appendChild(el("td", { class: c.type === "str" ? "rf-str" : "", text: fmt(v, c) }));
      });
      body.appendChild(tr);
    });
    t.appendChild(body);
    return t;
  }

  function plot(div, fig) {
    return plotlyReady.then(function () { return Plotly.newPlot(div, fig.data, fig.layout, PLOT_CONFIG); });
  }

  function figureBox(name, fig) {  // as tall as its figure from the start: drawn later, it moves nothing
    var height = (fig.layout && fig.layout.height) || 450;  // Plotly's default
    return el("div", { class: "rf-figure", "data-figure": name, style: "min-height: " + height + "px" });
  }

  function runPlotly() {  // the inlined library, run now: a script element runs when inserted
    var code = document.getElementById("rf-plotly"), s = document.createElement("script");
    s.textContent = code.textContent;
    document.head.appendChild(s);
    s.remove();
  }

  // ---- sortable, searchable, filterable table --------------------------------------------------

  function DataTable(container, spec, onSelect) {
    var self = this;
    this.spec = spec;
    this.onSelect = onSelect;
    this.sortCol = -1;
    this.sortDir = 1;
    this.query = "";
    this.flag = "";
    this.selected = -1;
    var searchCols = [];
    spec.columns.forEach(function (c, i) { if (c.search) searchCols.push(i); });
    this.haystack = spec.rows.map(function (r) {
      return searchCols.map(function (i) { return r[i] === null ? "" : String(r[i]); }).join("\u0001").toLowerCase();
    });
    this.flagSets = (spec.flags || []).map(function (f) { return new Set(f); });
    var names = searchCols.map(function (i) { return spec.columns[i].label; }).join(", ");
    this.search = el("input", { type: "search", placeholder: "search " + names, "aria-label": "search " + names });
    this.search.addEventListener("input", function () { self.query = self.search.value.trim().toLowerCase(); self.render(); });
    this.filter = el("select", { "aria-label": "filter " + spec.noun });
    this.filter.appendChild(el("option", { value: "", text: "all " + spec.noun }));
    (spec.filters || []).forEach(function (f) { self.filter.appendChild(el("option", { value: f[0], text: f[1] })); });
    this.filter.addEventListener("change", function () { self.flag = self.filter.value; self.render(); });
    this.count = el("span", { class: "rf-count" });
    container.appendChild(el("div", { class: "rf-toolbar" }, this.search, this.filter, this.count));
    this.table = el("table", { class: "rf-data" });
    var head = el("tr");
    this.headers = spec.columns.map(function (c, i) {
      var th = el("th", { text: c.label, title: (c.title ? c.title + " — " : "") + "click to sort",
                          "data-kind": c.kind, scope: "col" });
      th.addEventListener("click", function () { self.sortBy(i); });
      head.appendChild(th);
      return th;
    });
    this.table.appendChild(el("thead", {}, head));
    this.body = el("tbody");
    this.body.addEventListener("click", function (e) {
      var tr = e.target.closest("tr");
      if (tr && tr.dataset.row !== undefined) self.select(Number(tr.dataset.row));
    });
    this.body.addEventListener("keydown", function (e) {
      var tr = e.target.closest("tr");
      if (tr && e.key === "Enter") self.select(Number(tr.dataset.row));
    });
    this.table.appendChild(this.body);
    var box = this.box = el("div", { class: "rf-tablebox" }, this.table);
    this.sentinel = box.appendChild(el("div", { class: "rf-sentinel" }));
    container.appendChild(box);
    this.observer = new IntersectionObserver(function (entries) {
      if (entries.some(function (e) { return e.isIntersecting; }) && self.shown < self.order.length) self.more();
    }, { root: box, rootMargin: "300px" });
    this.render();
  }

  DataTable.prototype.sortBy = function (i) {
    this.sortDir = this.sortCol === i ? -this.sortDir : (this.spec.columns[i].type === "str" ? 1 : -1);
    this.sortCol = i;
    var dir = this.sortDir;
    this.headers.forEach(function (th, j) {
      if (j === i) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    });
    this.render();
  };

  DataTable.prototype.visible = function () {
    var rows = this.spec.rows, out = [], q = this.query, f = this.flag;
    for (var i = 0; i < rows.length; i++) {
      if (q && this.haystack[i].indexOf(q) < 0) continue;
      if (f && !(this.flagSets[i] && this.flagSets[i].has(f))) continue;
      out.push(i);
    }
    if (this.sortCol >= 0) {
      var c = this.sortCol, dir = this.sortDir;
      out.sort(function (a, b) {
        var x = rows[a][c], y = rows[b][c];
        var xn = x === null || x === undefined || x === "", yn = y === null || y === undefined || y === "";
        if (xn || yn) return xn === yn ? a - b : (xn ? 1 : -1);  // blanks last either way
        var r = typeof x === "number" && typeof y === "number" ? x - y : collator.compare(String(x), String(y));
        return r === 0 ? a - b : dir * r;
      });
    }
    return out;
  };

  DataTable.prototype.render = function () {
    this.order = this.visible();
    this.shown = 0;
    this.body.replaceChildren();
    this.box.scrollTop = 0;  // a new order or filter starts at its top
    this.more();
    this.count.textContent = this.order.length + " of " + this.spec.rows.length + " " + this.spec.noun;
  };

  DataTable.prototype.more = function () {  // the next chunk of rows, when scrolled near the end
    var spec = this.spec, frag = document.createDocumentFragment();
    var end = Math.min(this.order.length, this.shown + CHUNK);
    for (var k = this.shown; k < end; k++) {
      var i = this.order[k], r = spec.rows[i];
      var tr = document.createElement("tr");
      tr.dataset.row = i;
      tr.tabIndex = 0;
      if (i === this.selected) tr.className = "rf-selected";
      for (var j = 0; j < r.length; j++) {
        var c = spec.columns[j], td = document.createElement("td");
        td.textContent = fmt(r[j], c);
        if (c.type !== "str") td.className = "rf-num";
        else if (c.key === "failures" && r[j]) td.className = "rf-fail";
        if (c.kind) td.dataset.kind = c.kind;
        if (c.type === "str" && r[j]) td.title = String(r[j]);
        tr.appendChild(td);
      }
      frag.appendChild(tr);
    }
    this.body.appendChild(frag);
    this.shown = end;
    // observed afresh: a sentinel still in view after this chunk must ask for the next one
    this.observer.unobserve(this.sentinel);
    if (end < this.order.length) this.observer.observe(this.sentinel);
  };

  DataTable.prototype.select = function (i) {
    this.selected = i;
    var rows = this.body.querySelectorAll("tr.rf-selected");
    for (var k = 0; k < rows.length; k++) rows[k].className = "";
    var tr = this.body.querySelector('tr[data-row="' + i + '"]');
    if (tr) tr.className = "rf-selected";
    return this.onSelect(i);
  };

  // ---- trace runs --------------------------------------------------------------------------------

  function decodeScores(b64, shape, scale) {
    var bin = atob(b64), view = new DataView(new ArrayBuffer(bin.length));
    for (var i = 0; i < bin.length; i++) view.setUint8(i, bin.charCodeAt(i));
    var z = [], T = shape[0], L = shape[1];
    for (var t = 0; t < T; t++) {
      var row = new Array(L);
      for (var l = 0; l < L; l++) row[l] = view.getUint16(2 * (t * L + l), true) / scale;
      z.push(row);
    }
    return z;
  }

  function tokenLabel(tok, inSubject) {
    var s = String(tok);
    if (s.trim() === "") s = JSON.stringify(s);
    return s + (inSubject ? "*" : "");
  }

  function drawFact(box, run, i) {
    var d = run.details[i];
    box.querySelectorAll(".js-plotly-plot").forEach(function (g) { Plotly.purge(g); });
    box.replaceChildren();
    var head = el("div", {}, el("b", { text: d.subject }), " — ", el("span", { text: d.prompt }));
    box.appendChild(head);
    var clean = null, low = null;
    run.kinds.forEach(function (k) { var x = d.kinds[k.key]; if (x && isNum(x.high)) { clean = x.high; low = x.low; } });
    box.appendChild(el("div", { class: "rf-note", text: "answer " + JSON.stringify(d.answer === null ? "" : d.answer) +
      (clean !== null ? ", clean p = " + clean.toFixed(4) + ", corrupted p = " + low.toFixed(4) +
        "; subject tokens marked *; hover a cell for its value" : "") }));
    var grid = el("div", { class: "rf-heatmaps" });
    box.appendChild(grid);
    var labels = d.tokens.map(function (t, j) {
      return tokenLabel(t, j >= d.subject_range[0] && j < d.subject_range[1]);
    });
    // every panel in place first: a plot takes its width from its panel when drawn
    var divs = run.kinds.map(function (k) {
      return grid.appendChild(el("div", { "data-kind": k.key, class: "rf-fact-heatmap" }));
    });
    var draws = [];
    run.kinds.forEach(function (k, n) {
      var x = d.kinds[k.key], div = divs[n];
      if (!x) { div.appendChild(el("p", { class: "rf-empty", text: k.name + ": not traced" })); return; }
      if (x.mispredicted !== undefined) {
        div.appendChild(el("p", { class: "rf-empty", text: k.name + ": not traced, the model predicted " +
          JSON.stringify(x.mispredicted) + ", not the expected answer" }));
        return;
      }
      var z = decodeScores(x.scores, x.shape, run.score_scale);
      var zmax = Math.max.apply(null, z.map(function (r) { return Math.max.apply(null, r); }));
      var layers = [], ys = [], text = [];
      for (var l = 0; l < x.shape[1]; l++) layers.push(l);
      for (var t = 0; t < x.shape[0]; t++) {
        ys.push(t);
        var safe = plotlyText(labels[t]), row = new Array(x.shape[1]);
        for (var m = 0; m < x.shape[1]; m++) row[m] = safe;
        text.push(row);
      }
      var xlabel = k.key === "hidden" ? "single restored layer" :
        "center of " + x.window + " restored " + k.name + " layers";
      draws.push(Plotly.newPlot(div, [{
        type: "heatmap", z: z, x: layers, y: ys, text: text, colorscale: k.colorscale,
        zmin: x.low, zmax: Math.max(zmax, x.low + 1e-9),
        hovertemplate: "%{text}<br>layer %{x}<br>p = %{z:.4f}<extra></extra>",
        colorbar: { thickness: 10, title: { text: "p(" + plotlyText(String(d.answer).trim()) + ")", side: "right" } }
      }], {
        title: { text: "Restoring " + plotlyText(k.name), x: 0, font: { size: 14 } },
        xaxis: { title: { text: plotlyText(xlabel) } },
        yaxis: { autorange: "reversed", tickvals: ys, ticktext: labels.map(plotlyText), automargin: true },
        height: Math.max(260, 20 * x.shape[0] + 120), margin: { l: 20, r: 10, t: 40, b: 50 }
      }, PLOT_CONFIG));
    });
    box.dataset.fact = String(d.id);
    return Promise.all(draws);
  }

  function kindToggles(section, run, figDivs) {
    var bar = el("div", { class: "rf-toggles" }, el("span", { text: "kinds shown:" }));
    run.kinds.forEach(function (k) {
      var cb = el("input", { type: "checkbox", "data-kind-toggle": k.key });
      cb.checked = true;
      cb.addEventListener("change", function () {
        section.classList.toggle("rf-hide-" + k.key, !cb.checked);
        figuresDrawn.then(function () {  // a box ticked before the figures are drawn counts too
          figDivs.forEach(function (gd) {
            var idx = [];
            (gd.data || []).forEach(function (t, i) { if (t.meta === k.key) idx.push(i); });
            if (idx.length) Plotly.restyle(gd, { visible: cb.checked }, idx);
          });
        });
      });
      bar.appendChild(el("label", {}, cb, " " + k.name));
    });
    return bar;
  }

  function traceSection(section, run, firstFigures) {
    section.appendChild(el("details", { class: "rf-settings", open: "" },
      el("summary", { text: "settings" }), settingsTable(run.settings)));
    var figDivs = [];
    if (run.summary) {
      section.appendChild(el("h3", { text: "Averages over the traced facts" }));
      section.appendChild(staticTable(run.summary));
    }
    ["aie_heatmap", "aie_lines"].forEach(function (name) {
      if (run.figures[name]) {
        var div = figureBox(name, run.figures[name]);
        figDivs.push(div);
        firstFigures.push([div, run.figures[name]]);
      }
    });
    if (figDivs.length) {
      section.appendChild(kindToggles(section, run, figDivs));
      figDivs.forEach(function (d) { section.appendChild(d); });
    }
    section.appendChild(el("h3", { text: "Facts" }));
    section.appendChild(el("p", { class: "rf-note", text: "Click a fact for its heat maps. Effect: the best " +
      "restored p minus the corrupted p; layer and token position of that best cell." }));
    var tableBox = el("div", { class: "rf-table" });
    section.appendChild(tableBox);
    var detail = el("div", { class: "rf-detail" }, el("span", { class: "rf-empty", text: "Click a fact to see its heat maps." }));
    section.appendChild(detail);
    var table = new DataTable(tableBox, run.table, function (i) {
      return plotlyReady.then(function () { return drawFact(detail, run, i); })
        .then(function () { detail.dataset.drawn = String(i); });
    });
    if (run.table.rows.length === 1) pending.push(table.select(0));  // one fact: show it at once
    return table;
  }

  // ---- eval runs ---------------------------------------------------------------------------------

  function drawCase(box, run, i) {
    var d = run.details[i], r = d.request;
    box.replaceChildren();
    box.appendChild(el("div", {}, el("b", { text: "case " + d.id + ": " }), el("span", { text: r.prompt }),
      " ", el("span", { text: "[" + r.target_true + " → " + r.target_new + "]" })));
    if (d.probs.length) {
      box.appendChild(el("h3", { text: "Probabilities per prompt" }));
      box.appendChild(staticTable({
        columns: [{ label: "prompt", type: "str" }, { label: "P(new) pre", type: "num", digits: 4 },
                  { label: "P(new) post", type: "num", digits: 4 }, { label: "P(true) pre", type: "num", digits: 4 },
                  { label: "P(true) post", type: "num", digits: 4 }],
        rows: d.probs.map(function (p) { return [p.group + " #" + p.index, p.new_pre, p.new_post, p.true_pre, p.true_post]; })
      }));
    }
    if (d.metrics.length) {
      box.appendChild(el("h3", { text: "Scores of this case" }));
      box.appendChild(staticTable({
        columns: [{ label: "metric", type: "str" }, { label: "pre", type: "num", digits: 3 }, { label: "post", type: "num", digits: 3 }],
        rows: d.metrics
      }));
    }
    if (d.texts.pre.length || d.texts.post.length) {
      box.appendChild(el("h3", { text: "Generations" }));
      var grid = el("div", { class: "rf-texts" });
      ["pre", "post"].forEach(function (p) {
        var ol = el("ol");
        d.texts[p].forEach(function (t) { ol.appendChild(el("li", { text: t })); });
        grid.appendChild(el("div", {}, el("b", { text: p === "pre" ? "before the edit" : "after the edit" }), ol));
      });
      box.appendChild(grid);
    }
    if (Object.keys(d.extra).length) {
      box.appendChild(el("h3", { text: "Other fields" }));
      box.appendChild(settingsTable(d.extra));
    }
    box.dataset.case = String(d.id);
  }

  function evalSection(section, run, firstFigures) {
    section.appendChild(el("details", { class: "rf-settings" },
      el("summary", { text: "settings" }), settingsTable(run.settings)));
    run.notes.forEach(function (n) { section.appendChild(el("p", { class: "rf-note", text: n })); });
    if (run.summary) {
      section.appendChild(el("h3", { text: "Summary" }));
      section.appendChild(staticTable(run.summary));
      section.appendChild(el("p", { class: "rf-note", text: run.summary.note }));
    }
    ["summary", "monitor"].forEach(function (name) {
      if (run.figures[name]) {
        var div = figureBox(name, run.figures[name]);
        section.appendChild(div);
        firstFigures.push([div, run.figures[name]]);
      }
    });
    section.appendChild(el("h3", { text: "Cases" }));
    var legend = el("div", { class: "rf-legend" });
    run.table.legend.forEach(function (l) { legend.appendChild(el("div", {}, el("b", { text: l[0] }), ": " + l[1])); });
    section.appendChild(legend);
    var tableBox = el("div", { class: "rf-table" });
    section.appendChild(tableBox);
    var detail = el("div", { class: "rf-detail" }, el("span", { class: "rf-empty", text: "Click a case for its prompts and generations." }));
    section.appendChild(detail);
    return new DataTable(tableBox, run.table, function (i) { drawCase(detail, run, i); });
  }

  function editSection(section, run) {
    section.appendChild(settingsTable(run.settings));
    section.appendChild(el("h3", { text: "Probes before and after the edit" }));
    section.appendChild(staticTable(run.probes));
  }

  // ---- page --------------------------------------------------------------------------------------

  function build() {
    var main = document.getElementById("rf-main"), nav = document.getElementById("rf-nav");
    if (DATA.warnings.length) {
      var ul = el("ul");
      DATA.warnings.forEach(function (w) { ul.appendChild(el("li", { text: w })); });
      main.appendChild(el("div", { class: "rf-warnings" }, el("b", { text: DATA.warnings.length + " file(s) skipped" }), ul));
    }
    var figures = [];
    state.tables = [];
    DATA.runs.forEach(function (run, n) {
      var id = "run-" + n;
      var section = el("section", { class: "rf-run", id: id, "data-run-type": run.type });
      section.appendChild(el("h2", {}, run.title, el("small", { text: run.label })));
      nav.appendChild(el("a", { href: "#" + id, text: run.title + " (" + run.label + ")" }));
      main.appendChild(section);
      if (run.type === "trace") state.tables.push(traceSection(section, run, figures));
      else if (run.type === "eval") state.tables.push(evalSection(section, run, figures));
      else if (run.type === "edit") editSection(section, run);
    });
    state.timings.table = performance.now();
    // the next frame shows the tables; plotly.js runs after it
    requestAnimationFrame(function () {
      setTimeout(function () {
        state.timings.painted = performance.now();
        runPlotly();
        state.timings.plotly = performance.now();
        startPlotly();
      }, 0);
    });
    var chain = plotlyReady;
    figures.forEach(function (f, k) {
      chain = chain.then(function () { return plot(f[0], f[1]); }).then(function () {
        if (k === 0) state.timings.firstFigure = performance.now();
      });
    });
    figuresDrawn = chain;
    chain.then(function () { return Promise.all(pending); }).then(function () {
      state.timings.allFigures = performance.now();
      state.ready = true;
      document.body.dataset.ready = "1";
    });
  }

  build();
})();
