/* siftlens attention viewer: plain JavaScript and canvas, no network. Reads the JSON in #sl-explore-data
   (written by siftlens.report.viewer) and builds the viewer inside #sl-explore. Per image, "attn" is
   base64 of a zlib stream: M * (1 + N) uint16 row exponents (row max = 2^(-e / exp_scale)), then
   M * (1 + N) * N levels q of meta.bits bits each, 8 / bits per byte, the first in the lowest bits
   (value = q / levels * row max); M = layers * heads (+ 1 for rollout);
   row 0 of each matrix is the CLS token's, row 1 + i patch i's, over the N patch keys. */
(function () {
  "use strict";
  var root = document.getElementById("sl-explore");
  var meta = JSON.parse(document.getElementById("sl-explore-data").textContent);
  var gh = meta.grid[0], gw = meta.grid[1], N = gh * gw, R = N + 1;
  var H = meta.input[0], W = meta.input[1], heads = meta.heads, nl = meta.layers.length;
  var M = nl * heads + (meta.rollout ? 1 : 0);
  var bits = meta.bits, per = 8 / bits, mask = (1 << bits) - 1;
  var scale = 320 / Math.max(H, W), CW = Math.round(W * scale), CH = Math.round(H * scale);
  var STOPS = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
               [250, 193, 39], [252, 255, 164]];
  var state = { img: 0, layer: nl - 1, head: -1, patch: -1, pinned: false, grid: true, kps: true };
  var cache = {}, data = null, el = {};

  function colour(t) {
    var x = Math.max(0, Math.min(1, t)) * (STOPS.length - 1), i = Math.min(STOPS.length - 2, Math.floor(x));
    var f = x - i, a = STOPS[i], b = STOPS[i + 1];
    return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + f * (b[k] - a[k])); }).join(",") + ")";
  }

  function make(tag, attrs, parent, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }

  function bytes(b64) {
    var bin = atob(b64), out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  function inflate(buf) {
    var stream = new Blob([buf]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Response(stream).arrayBuffer().then(function (b) { return new Uint8Array(b); });
  }

  function loadImage(src) {
    return new Promise(function (ok, fail) {
      var im = new Image();
      im.onload = function () { ok(im); };
      im.onerror = function () { fail(new Error("could not decode the embedded image")); };
      im.src = src;
    });
  }

  function load(i) {
    if (!cache[i]) {
      var entry = meta.images[i];
      cache[i] = Promise.all([inflate(bytes(entry.attn)), loadImage(entry.pixels)]).then(function (res) {
        var raw = res[0], n = M * R, view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
        if (raw.length !== 2 * n + Math.ceil(n * N / per)) throw new Error("attention data of " + entry.name + " has the wrong size");
        var top = new Float32Array(n);
        for (var k = 0; k < n; k++) top[k] = Math.pow(2, -view.getUint16(2 * k, true) / meta.exp_scale) / meta.levels;
        return { entry: entry, top: top, q: raw.subarray(2 * n), img: res[1] };
      });
    }
    return cache[i];
  }

  /* attention of query row r (0 = CLS, 1 + i = patch i) of matrix m over the N patch keys */
  function matrixRow(m, r) {
    var out = new Float32Array(N), s = data.top[m * R + r], q = data.q, o = (m * R + r) * N;
    for (var k = 0; k < N; k++) {
      var j = o + k;
      out[k] = ((q[Math.floor(j / per)] >> ((j % per) * bits)) & mask) * s;
    }
    return out;
  }

  function row(r) {
    if (state.head >= 0) return matrixRow(state.layer * heads + state.head, r);
    var out = new Float32Array(N);
    for (var h = 0; h < heads; h++) {
      var one = matrixRow(state.layer * heads + h, r);
      for (var k = 0; k < N; k++) out[k] += one[k] / heads;
    }
    return out;
  }

  function draw(canvas, values) {
    var ctx = canvas.getContext("2d"), pw = CW / gw, ph = CH / gh;
    ctx.imageSmoothingEnabled = scale < 2;
    ctx.clearRect(0, 0, CW, CH);
    ctx.drawImage(data.img, 0, 0, CW, CH);
    if (values) {
      var top = Math.max.apply(null, values) || 1;
      ctx.globalAlpha = 0.65;
      for (var k = 0; k < N; k++) {
        ctx.fillStyle = colour(values[k] / top);
        ctx.fillRect((k % gw) * pw, Math.floor(k / gw) * ph, pw, ph);
      }
      ctx.globalAlpha = 1;
    }
    if (state.grid) {
      ctx.strokeStyle = "rgba(255,255,255,0.35)";
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (var c = 1; c < gw; c++) { ctx.moveTo(c * pw, 0); ctx.lineTo(c * pw, CH); }
      for (var r = 1; r < gh; r++) { ctx.moveTo(0, r * ph); ctx.lineTo(CW, r * ph); }
      ctx.stroke();
    }
    if (state.kps) {
      ctx.strokeStyle = "rgba(0,229,255,0.9)";
      data.entry.keypoints.forEach(function (p) {
        ctx.beginPath();
        ctx.arc(p[0] * CW / W, p[1] * CH / H, Math.max(1.5, p[2] / 2 * scale), 0, 2 * Math.PI);
        ctx.stroke();
      });
    }
    if (state.patch >= 0) {
      ctx.strokeStyle = state.pinned ? "#ff3b30" : "#ffffff";
      ctx.lineWidth = 2;
      ctx.strokeRect((state.patch % gw) * pw + 1, Math.floor(state.patch / gw) * ph + 1, pw - 2, ph - 2);
    }
  }

  function pct(x) { return (100 * x).toFixed(x < 0.001 ? 3 : x < 0.1 ? 2 : 1) + "%"; }

  function describe(values, who) {
    var top = Math.max.apply(null, values), sum = values.reduce(function (a, b) { return a + b; }, 0);
    return who + ": the brightest patch receives " + pct(top) + " of its attention (uniform attention: " +
      pct(1 / N) + "); all patches together " + pct(sum) +
      (sum < 0.995 ? " (the rest goes to the prefix tokens: CLS, registers)" : "") + ".";
  }

  function where() {
    return "layer " + meta.layers[state.layer] + ", " + (state.head < 0 ? "mean over heads" : "head " + state.head);
  }

  function render() {
    var q = state.patch + 1, e = data.entry, main = row(q), cls = row(0);
    draw(el.main, main);
    draw(el.cls, cls);
    if (el.roll) draw(el.roll, matrixRow(M - 1, q));
    var who = state.patch < 0 ? (meta.has_cls ? "the CLS token" : "the mean over patches") :
      "patch (row " + Math.floor(state.patch / gw) + ", column " + (state.patch % gw) + ")";
    el.mainCap.textContent = "Attention from " + who + ", " + where() + ".";
    el.clsCap.textContent = "Attention from " + (meta.has_cls ? "the CLS token" : "the mean over patch queries") +
      ", " + where() + ".";
    if (el.roll) el.rollCap.textContent = "Rollout over all layers, from " + who + ".";
    var lines = ["Image " + e.name + (e.label ? ", label " + e.label : "") + (e.prediction ? ", predicted " + e.prediction : "") + "."];
    if (state.patch >= 0) {
      var lv = e.levels[state.patch], name = meta.level_names[lv] !== undefined ? meta.level_names[lv] : String(lv);
      lines.push("Patch (row " + Math.floor(state.patch / gw) + ", column " + (state.patch % gw) + "): keypoint weight " +
        e.weights[state.patch] + ", semantic level '" + name + "'" + (state.pinned ? " (pinned: click to release)." : "."));
    } else {
      lines.push("Hover over a patch of the left image (click to pin it).");
    }
    lines.push(describe(main, "Left, " + where()));
    lines.push(describe(cls, "Middle, " + where()));
    el.info.textContent = "";
    lines.forEach(function (t) { make("li", {}, el.info, t); });
    root.setAttribute("data-patch", String(state.patch));
  }

  function patchAt(ev) {
    var box = el.main.getBoundingClientRect();
    var c = Math.floor((ev.clientX - box.left) / box.width * gw), r = Math.floor((ev.clientY - box.top) / box.height * gh);
    return (c < 0 || r < 0 || c >= gw || r >= gh) ? -1 : r * gw + c;
  }

  function show(i) {
    state.img = i;
    root.setAttribute("data-ready", "0");
    return load(i).then(function (d) {
      if (state.img !== i) return;
      data = d;
      render();
      root.setAttribute("data-ready", "1");
    });
  }

  function select(parent, label, options, value, onChange) {
    var lab = make("label", {}, parent, label + " ");
    var s = make("select", {}, lab);
    options.forEach(function (o) { make("option", { value: String(o[0]) }, s, o[1]); });
    s.value = String(value);
    s.addEventListener("change", function () { onChange(Number(s.value)); });
    return s;
  }

  function checkbox(parent, label, key) {
    var lab = make("label", {}, parent);
    var c = make("input", { type: "checkbox" }, lab);
    c.checked = state[key];
    lab.appendChild(document.createTextNode(" " + label));
    c.addEventListener("change", function () { state[key] = c.checked; if (data) render(); });
  }

  function panel(parent, cls) {
    var f = make("figure", { "class": "sl-panel" }, parent);
    var c = make("canvas", { width: CW, height: CH, "class": cls }, f);
    return [c, make("figcaption", {}, f)];
  }

  function legend(parent) {
    var box = make("span", { "class": "sl-legend" }, parent, "low");
    var c = make("canvas", { width: 140, height: 10 }, box), ctx = c.getContext("2d");
    for (var x = 0; x < 140; x++) { ctx.fillStyle = colour(x / 139); ctx.fillRect(x, 0, 1, 10); }
    box.appendChild(document.createTextNode("panel's highest"));
  }

  function build() {
    var bar = make("div", { "class": "sl-controls" }, root);
    select(bar, "Image", meta.images.map(function (e, i) { return [i, e.name]; }), 0, function (v) { show(v); });
    select(bar, "Layer", meta.layers.map(function (l, i) { return [i, String(l)]; }), state.layer,
      function (v) { state.layer = v; render(); });
    var hs = [[-1, "mean over heads"]];
    for (var h = 0; h < heads; h++) hs.push([h, String(h)]);
    select(bar, "Head", hs, -1, function (v) { state.head = v; render(); });
    checkbox(bar, "patch grid", "grid");
    checkbox(bar, "keypoints", "kps");
    legend(bar);
    var panels = make("div", { "class": "sl-panels" }, root), p;
    p = panel(panels, "sl-main"); el.main = p[0]; el.mainCap = p[1];
    p = panel(panels, "sl-cls"); el.cls = p[0]; el.clsCap = p[1];
    if (meta.rollout) { p = panel(panels, "sl-rollout"); el.roll = p[0]; el.rollCap = p[1]; }
    el.info = make("ul", { "class": "sl-info" }, root);
    el.main.addEventListener("mousemove", function (ev) {
      var k = patchAt(ev);
      if (!state.pinned && data && k >= 0 && k !== state.patch) { state.patch = k; render(); }
    });
    el.main.addEventListener("click", function (ev) {
      var k = patchAt(ev);
      state.pinned = !(state.pinned && k === state.patch) && k >= 0;
      if (k >= 0) state.patch = k;
      if (data) render();
    });
  }

  function fail(err) {
    root.setAttribute("data-ready", "error");
    make("p", { "class": "sl-error" }, root, "The viewer could not start: " + (err && err.message ? err.message : err));
    console.error(err);
  }

  if (!meta.images.length) return;
  if (typeof DecompressionStream === "undefined") {
    fail(new Error("this browser has no DecompressionStream (Chrome 80+, Firefox 113+ and Safari 16.4+ have it)"));
    return;
  }
  try { build(); show(0).catch(fail); } catch (err) { fail(err); }
})();
