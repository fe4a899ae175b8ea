// nnserve's try-it page: plain browser JavaScript, no library, talking only to the server that served it.
"use strict";

const KEY_STORAGE = "nnserve.apiKey";
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------------------
// HTTP: every call carries the API key (kept for this tab only) and turns error bodies into readable text.
// ---------------------------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.set("X-API-Key", key);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new Error(`the server did not answer (${e.message})`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: the status line says enough
  }
  if (!response.ok) {
    const error = body && body.error;
    let message = error ? `${error.message} (HTTP ${response.status}, ${error.code})` : `HTTP ${response.status}`;
    if (response.status === 401) message += ". Enter the API key at the top of the page.";
    throw new Error(message);
  }
  return body;
}

function showError(id, error) {
  const box = $(id);
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

function renderBars(container, scores) {
  container.replaceChildren();
  const best = Math.max(...scores.map((s) => s.probability));
  for (const score of scores) {
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = score.label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(100 * score.probability).toFixed(1)}%`;
    track.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(100 * score.probability).toFixed(1)}%`;
    for (const el of [name, track, pct]) {
      if (score.probability === best) el.classList.add("top");
      el.dataset.label = score.label;
    }
    container.append(name, track, pct);
  }
}

function renderPrediction(prefix, prediction) {
  $(`${prefix}-label`).textContent = prediction.label;
  $(`${prefix}-prob`).textContent = `${(100 * prediction.probability).toFixed(1)}%`;
  renderBars($(`${prefix}-bars`), prediction.top_k);
}

function canvasPng(canvas) {
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

// ---------------------------------------------------------------------------------------------------------
// Digits: people draw dark on light at any size; MNIST digits are light on dark, their ink's bounding box
// scaled to fit 20x20 (aspect kept) and placed in 28x28 with the centre of mass in the middle.
// ---------------------------------------------------------------------------------------------------------

const pad = $("digit-canvas");
const padContext = pad.getContext("2d", { willReadFrequently: true });
const INK_THRESHOLD = 32; // of 255: anti-aliasing fringes fainter than this do not stretch the bounding box
let drawing = false;
let version = 0; // bumped on every change to the drawing; a shown answer names the version it is for
let sending = false;
let resend = false;

function clearPad() {
  padContext.fillStyle = "#fff";
  padContext.fillRect(0, 0, pad.width, pad.height);
  padContext.strokeStyle = "#000";
  padContext.fillStyle = "#000";
  padContext.lineWidth = pad.width / 16; // about MNIST's stroke: 1/16 of the field once scaled
  padContext.lineCap = "round";
  padContext.lineJoin = "round";
}

function padPoint(event) {
  const rect = pad.getBoundingClientRect();
  return [((event.clientX - rect.left) * pad.width) / rect.width, ((event.clientY - rect.top) * pad.height) / rect.height];
}

function changed() {
  version += 1;
  pad.dataset.version = String(version);
  predictDigit();
}

pad.addEventListener("pointerdown", (event) => {
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  const [x, y] = padPoint(event);
  padContext.beginPath();
  padContext.arc(x, y, padContext.lineWidth / 2, 0, 2 * Math.PI);
  padContext.fill();
  padContext.beginPath();
  padContext.moveTo(x, y);
  changed();
});

pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const [x, y] = padPoint(event);
  padContext.lineTo(x, y);
  padContext.stroke();
  padContext.beginPath();
  padContext.moveTo(x, y);
  changed();
});

for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => {
    drawing = false;
  });
}

$("digit-clear").addEventListener("click", () => {
  clearPad();
  version += 1;
  pad.dataset.version = String(version);
  $("digit-seen").getContext("2d").clearRect(0, 0, 28, 28);
  $("digit-label").textContent = "?";
  $("digit-prob").textContent = "";
  $("digit-bars").replaceChildren();
  $("digit-result").dataset.version = String(version);
  showError("digit-error", null);
});

// Ink (0..255, light digit) of the pad, and the bounding box of the ink above the threshold.
function padInk() {
  const { width, height } = pad;
  const rgba = padContext.getImageData(0, 0, width, height).data;
  const ink = new Float32Array(width * height);
  let [left, top, right, bottom] = [width, height, -1, -1];
  for (let i = 0; i < ink.length; i++) {
    const value = 255 - (0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2]);
    ink[i] = value;
    if (value > INK_THRESHOLD) {
      const x = i % width;
      const y = (i - x) / width;
      left = Math.min(left, x);
      right = Math.max(right, x);
      top = Math.min(top, y);
      bottom = Math.max(bottom, y);
    }
  }
  return right < 0 ? null : { ink, width, box: { left, top, width: right - left + 1, height: bottom - top + 1 } };
}

// Area-average resampling: each output pixel is the mean of the source area it covers (fractions included).
function resample(ink, stride, box, outWidth, outHeight) {
  const out = new Float32Array(outWidth * outHeight);
  const sx = box.width / outWidth;
  const sy = box.height / outHeight;
  for (let ty = 0; ty < outHeight; ty++) {
    const y0 = box.top + ty * sy;
    const y1 = y0 + sy;
    for (let tx = 0; tx < outWidth; tx++) {
      const x0 = box.left + tx * sx;
      const x1 = x0 + sx;
      let sum = 0;
      for (let y = Math.floor(y0); y < y1; y++) {
        const wy = Math.min(y + 1, y1) - Math.max(y, y0);
        for (let x = Math.floor(x0); x < x1; x++) {
          sum += wy * (Math.min(x + 1, x1) - Math.max(x, x0)) * ink[y * stride + x];
        }
      }
      out[ty * outWidth + tx] = sum / (sx * sy);
    }
  }
  return out;
}

// The drawing as a 28x28 MNIST-style digit (grayscale values), or null for an empty pad.
function mnistDigit() {
  const found = padInk();
  if (!found) return null;
  const { box } = found;
  const scale = 20 / Math.max(box.width, box.height);
  const w = Math.max(1, Math.round(box.width * scale));
  const h = Math.max(1, Math.round(box.height * scale));
  const small = resample(found.ink, found.width, box, w, h);
  let mass = 0;
  let mx = 0;
  let my = 0;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const v = small[y * w + x];
      mass += v;
      mx += v * x;
      my += v * y;
    }
  }
  const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
  const ox = clamp(Math.round(14 - mx / mass), 28 - w); // 14: where MNIST's test digits have their centre of mass, as the server's fit
  const oy = clamp(Math.round(14 - my / mass), 28 - h);
  const digit = new Uint8ClampedArray(28 * 28);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) digit[(y + oy) * 28 + x + ox] = Math.round(small[y * w + x]);
  }
  return digit;
}

function paintGray(canvas, gray) {
  const image = new ImageData(canvas.width, canvas.height);
  for (let i = 0; i < gray.length; i++) {
    image.data.set([gray[i], gray[i], gray[i], 255], 4 * i);
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

// At most one request in flight: strokes made meanwhile are sent together when it returns.
async function predictDigit() {
  if (sending) {
    resend = true;
    return;
  }
  sending = true;
  try {
    do {
      resend = false;
      const current = version;
      const digit = mnistDigit();
      if (!digit) continue;
      const seen = $("digit-seen");
      paintGray(seen, digit);
      try {
        const answer = await api("/v1/digits/predict?top_k=10", {
          method: "POST",
          headers: { "Content-Type": "image/png" },
          body: await canvasPng(seen),
        });
        if (current !== version && resend) continue; // already stale, and a newer drawing is queued
        renderPrediction("digit", answer.predictions[0]);
        showError("digit-error", null);
      } catch (error) {
        showError("digit-error", error);
      }
      $("digit-result").dataset.version = String(current);
    } while (resend);
  } finally {
    sending = false;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Photo: shrunk in the page to the model's 32x32 so that what is shown is exactly what is classified.
// ---------------------------------------------------------------------------------------------------------

function shrink(bitmap, size) {
  // Halving steps first: one big jump with bilinear filtering would sample only a few source pixels.
  let source = bitmap;
  let [w, h] = [bitmap.width, bitmap.height];
  while (w > 2 * size || h > 2 * size) {
    [w, h] = [Math.max(size, Math.ceil(w / 2)), Math.max(size, Math.ceil(h / 2))];
    const step = new OffscreenCanvas(w, h);
    step.getContext("2d").drawImage(source, 0, 0, w, h);
    source = step;
  }
  const target = $("photo-seen");
  const context = target.getContext("2d");
  context.imageSmoothingQuality = "high";
  context.clearRect(0, 0, size, size);
  context.drawImage(source, 0, 0, size, size);
  return target;
}

async function classifyPhoto(file) {
  showError("photo-error", null);
  $("photo-result").dataset.state = "pending";
  try {
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch {
      throw new Error(`${file.name} is not an image this browser can read`);
    }
    $("photo-name").textContent = `${file.name}, sent as 32x32`;
    const seen = shrink(bitmap, 32);
    const answer = await api("/v1/cifar/predict?top_k=5", {
      method: "POST",
      headers: { "Content-Type": "image/png" },
      body: await canvasPng(seen),
    });
    renderPrediction("photo", answer.predictions[0]);
  } catch (error) {
    showError("photo-error", error);
  } finally {
    $("photo-result").dataset.state = "done";
  }
}

$("photo-input").addEventListener("change", (event) => {
  if (event.target.files.length) classifyPhoto(event.target.files[0]);
});

const drop = $("photo-drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) classifyPhoto(event.dataTransfer.files[0]);
});

// ---------------------------------------------------------------------------------------------------------
// Forecast: history and forecast drawn as one inline SVG line chart.
// ---------------------------------------------------------------------------------------------------------

function parseSeries(text) {
  const tokens = text.split(/[\s,;]+/).filter(Boolean);
  const values = tokens.map(Number);
  const bad = tokens.find((token, i) => !Number.isFinite(values[i]));
  if (bad !== undefined) throw new Error(`"${bad}" is not a number`);
  if (!values.length) throw new Error("paste some numbers first, or load the Seattle 2015 sample");
  return values;
}

function svgElement(name, attributes) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [key, value] of Object.entries(attributes)) el.setAttribute(key, value);
  return el;
}

const CHART_HISTORY = 60; // days of history drawn: enough context, yet the forecast stays readable

function drawForecast(series, forecast) {
  const [width, height, left, right, top, bottom] = [720, 240, 34, 10, 10, 22];
  const history = series.slice(-CHART_HISTORY);
  const all = history.concat(forecast);
  const lo = Math.floor(Math.min(...all));
  const hi = Math.ceil(Math.max(...all));
  const x = (i) => left + (i * (width - left - right)) / Math.max(1, all.length - 1);
  const y = (v) => top + ((hi - v) * (height - top - bottom)) / Math.max(1, hi - lo);
  const points = (values, start) => values.map((v, i) => `${x(start + i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  svg.setAttribute("aria-label", `history of ${series.length} values and a ${forecast.length}-value forecast`);
  for (const v of [lo, Math.round((lo + hi) / 2), hi]) {
    svg.append(svgElement("line", { class: "axis", x1: left, x2: width - right, y1: y(v), y2: y(v) }));
    const label = svgElement("text", { x: 2, y: y(v) + 4 });
    label.textContent = `${v.toFixed(0)}°`;
    svg.append(label);
  }
  const cut = x(history.length - 1);
  svg.append(svgElement("line", { class: "axis", x1: cut, x2: cut, y1: top, y2: height - bottom }));
  const caption = svgElement("text", { x: left, y: height - 6 });
  const shown = history.length < series.length ? `last ${history.length} of ${series.length}` : `${history.length}`;
  caption.textContent = `${shown} values of history, then ${forecast.length} forecast`;
  svg.append(caption);
  svg.append(svgElement("polyline", { id: "history-line", class: "history", points: points(history, 0) }));
  // The forecast line starts at the last known value so the two read as one curve.
  const joined = [history[history.length - 1], ...forecast];
  svg.append(svgElement("polyline", { id: "forecast-line", class: "forecast", points: points(joined, history.length - 1) }));
  $("forecast-chart").replaceChildren(svg);
}

async function runForecast() {
  showError("forecast-error", null);
  $("forecast-values").replaceChildren();
  try {
    const history = parseSeries($("series-input").value);
    const answer = await api("/v1/sequence/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ series: history }),
    });
    const forecast = answer.predictions[0].forecast;
    drawForecast(history, forecast);
    for (const [i, v] of forecast.entries()) {
      const item = document.createElement("li");
      const value = document.createElement("span");
      value.textContent = v.toFixed(1);
      item.append(`day +${i + 1}: `, value, " °C");
      $("forecast-values").append(item);
    }
  } catch (error) {
    $("forecast-chart").replaceChildren();
    showError("forecast-error", error);
  }
}

async function loadSample() {
  showError("forecast-error", null);
  try {
    const response = await fetch("/ui/seattle-2015.json");
    if (!response.ok) throw new Error(`the sample did not load (HTTP ${response.status})`);
    const sample = await response.json();
    $("series-input").value = sample.values.join(", ");
    const source = $("series-source");
    source.textContent = `${sample.name}: ${sample.values.length} daily values from ${sample.start}. Source: ${sample.source}.`;
    source.hidden = false;
  } catch (error) {
    showError("forecast-error", error);
  }
}

$("series-sample").addEventListener("click", loadSample);
$("series-run").addEventListener("click", runForecast);

// ---------------------------------------------------------------------------------------------------------
// Models and the API key.
// ---------------------------------------------------------------------------------------------------------

function metricText(metric) {
  const baseline = metric.baseline == null ? "" : ` (baseline ${+metric.baseline.toFixed(4)})`;
  return `${metric.name} ${+metric.value.toFixed(4)}${baseline}`;
}

async function loadModels() {
  const body = $("models-body");
  try {
    const { models } = await api("/v1/models");
    body.replaceChildren();
    for (const model of models) {
      const row = document.createElement("tr");
      row.dataset.model = model.name;
      const metrics = model.manifest.metrics.filter((m) => !/validation/i.test(m.split));
      const cells = [model.name, model.version, model.backend, model.device, model.ready ? "yes" : "loading"];
      for (const text of cells) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      const cell = document.createElement("td");
      for (const metric of metrics) {
        const line = document.createElement("div");
        line.textContent = metricText(metric);
        line.title = `${metric.dataset}, ${metric.split}, ${metric.n_items} items`;
        cell.append(line);
      }
      if (metrics.length) {
        const where = document.createElement("div");
        where.className = "muted";
        where.textContent = `${metrics[0].dataset}; ${metrics[0].split}`;
        cell.append(where);
      }
      row.append(cell);
      body.append(row);
      if (model.manifest.series) {
        const { min_history: lo, max_history: hi } = model.manifest.series;
        $("series-limits").textContent = `${lo} to ${hi} values`;
      }
    }
    showError("models-error", null);
  } catch (error) {
    body.replaceChildren();
    showError("models-error", error);
  }
}

const keyInput = $("api-key");
keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
function saveKey(event) {
  if (event) event.preventDefault();
  const key = keyInput.value.trim();
  if (key === (sessionStorage.getItem(KEY_STORAGE) || "")) return;
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  loadModels();
}

keyInput.addEventListener("change", () => saveKey());
$("key-form").addEventListener("submit", saveKey);

clearPad();
loadModels();
