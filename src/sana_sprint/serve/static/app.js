// Live scribble-to-image client: one request in flight, the latest state queued behind it.
"use strict";

const $ = (id) => document.getElementById(id);
const pad = $("pad");
const ctx = pad.getContext("2d");
const result = $("result");
const PEN = 6;

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
}
clearPad();
let hasInk = false;

function payload() {
  const body = {
    prompt: $("prompt").value,
    steps: parseInt($("steps").value, 10),
    seed: parseInt($("seed").value, 10) || 0,
  };
  if ($("use-scribble").checked && hasInk) body.scribble = pad.toDataURL("image/png");
  return body;
}

let inFlight = false;
let pending = false;

function generate() {
  if (inFlight) { pending = true; return; }
  inFlight = true;
  pending = false;
  const body = payload();
  fetch("/generate", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
    .then((r) => r.json().then((j) => ({ ok: r.ok, j })))
    .then(({ ok, j }) => {
      if (!ok) { $("status").textContent = "error: " + j.error; return; }
      result.src = j.image;
      result.dataset.count = String(parseInt(result.dataset.count, 10) + 1);
      result.dataset.controlled = String(j.controlled);
      $("latency").textContent = j.latency_ms.toFixed(1) + " ms";
      $("queue").textContent = j.queue_ms > 1 ? "(+" + j.queue_ms.toFixed(0) + " ms queued)" : "";
      $("status").textContent = (j.controlled ? "scribble + text" : "text only") + ", " + j.steps +
        " step" + (j.steps > 1 ? "s" : "") + ", seed " + j.seed;
    })
    .catch((e) => { $("status").textContent = "error: " + e; })
    .finally(() => { inFlight = false; if (pending) generate(); });
}

// Drawing (pointer events cover mouse, pen and touch).
let drawing = false;
function pos(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}
pad.addEventListener("pointerdown", (e) => {
  drawing = true;
  pad.setPointerCapture(e.pointerId);
  const [x, y] = pos(e);
  ctx.strokeStyle = "#000"; ctx.lineWidth = PEN; ctx.lineCap = "round"; ctx.lineJoin = "round";
  ctx.beginPath(); ctx.moveTo(x, y); ctx.lineTo(x, y); ctx.stroke();
  hasInk = true;
});
pad.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const [x, y] = pos(e);
  ctx.lineTo(x, y); ctx.stroke();
  generate(); // live: coalesced to one request in flight
});
function endStroke() {
  if (!drawing) return;
  drawing = false;
  generate();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

$("clear").addEventListener("click", () => { clearPad(); hasInk = false; generate(); });
$("use-scribble").addEventListener("change", generate);
$("steps").addEventListener("change", generate);
$("seed").addEventListener("change", generate);
$("generate").addEventListener("click", generate);
$("random-seed").addEventListener("click", () => {
  $("seed").value = String(Math.floor(Math.random() * 2147483647));
  generate();
});
let typing = null;
$("prompt").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(generate, 250); });

fetch("/health").then((r) => r.json()).then((h) => {
  $("model-info").textContent = "model: " + h.model + " (" + h.kind + ", " + h.resolution + " px)" +
    (h.controlnet ? " + ControlNet" : "");
  const notes = [];
  if (h.random_model) notes.push("the model is RANDOM and UNTRAINED: images are noise-like");
  if (h.random_controlnet) notes.push("the ControlNet is RANDOM and UNTRAINED: scribbles change the image but are not followed");
  if (notes.length) { $("warning").textContent = "Note: " + notes.join("; ") + "."; $("warning").hidden = false; }
}).catch(() => { $("model-info").textContent = "model info unavailable"; });

generate();
