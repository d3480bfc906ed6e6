// comfyui-taca frontend extension.
//
// On every "TACA Patch Model" node it draws, below the widgets, when TACA acts in a sampling run:
// one bar per denoising step, height gamma on the steps whose sigma is >= threshold_sigma and 1 on
// the others, for the node's current widget values. The step sigmas are those of a nominal 30-step
// schedule (ComfyUI's `simple` scheduler on an SD3 flow model, shift 3.0) until the server reports
// a run of this node; then they are the sigmas of that run, and a step is a TACA step when its
// position on the threshold's scale (the sigma on flow models, t/1000 on discrete-time models such as
// CogVideoX; the report's sample_positions) is >= threshold_sigma.
//
// After every sampling run the server sends the websocket event "comfyui-taca.report" for each TACA
// Patch Model node (taca/report.py). The node shows what TACA did in that run, and the run's warning
// (for example "TACA never acted: the run started at sigma 0.866 ...") in a warning colour.
//
// The plot is a DOM widget (node.addDOMWidget) holding its own <canvas>, so it looks and updates the
// same in the classic LiteGraph canvas and in the Vue node renderer ("Nodes 2.0"): the frontend only
// places the element; this file paints it, from one function (refresh), whenever what it shows
// changes. The strings the server sends are only ever drawn with fillText, never parsed as HTML.
// What was last drawn is kept in `node.tacaPlot` (bar coordinates in CSS pixels of the plot's
// canvas, `node.tacaCanvas`) and the run feedback in `node.tacaFeedback`, for tests and other
// extensions.
//
// "TACA Patch Model (Advanced)" gets the same plot and feedback: each bar's height is the step's gamma
// under its window (sigma_end <= position <= sigma_start) and ramp (constant, or linear / cosine from
// gamma at sigma_start to 1 at sigma_end), the label names the window and ramp, and after a run the
// feedback also names the blocks acted on of the model's joint calls per model call, any blocks beyond
// them (in the warning colour), and the gammas of each acting step (their range when adaptive).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION_NAME = "comfyui-taca.schedule";
const NODE_TYPE = "TACAPatchModel";
const ADVANCED_TYPE = "TACAPatchModelAdvanced";
const NODE_TYPES = [NODE_TYPE, ADVANCED_TYPE];
// the widgets the plot reads: the simple node's threshold is the Advanced node's sigma_end
const THRESHOLD_WIDGET = { [NODE_TYPE]: "threshold_sigma", [ADVANCED_TYPE]: "sigma_end" };
const PLOT_WIDGETS = { [NODE_TYPE]: ["gamma", "threshold_sigma"],
  [ADVANCED_TYPE]: ["gamma", "sigma_start", "sigma_end", "ramp"] };
const REPORT_EVENT = "comfyui-taca.report";
const WIDGET_NAME = "taca_schedule";
const NOMINAL_STEPS = 30;
const NOMINAL_SHIFT = 3.0;

const COLORS = {
  active: "#f0a73a", // steps where TACA acts (bar height gamma)
  inactive: "#5f7391", // steps left untouched (bar height 1)
  unitLine: "#9aa4b2",
  label: "#d8dde4",
  muted: "#9aa4b2",
  ok: "#8fd694",
  warning: "#ff7a59",
  background: "#222831",
};

const FONT = "11px Arial, sans-serif";
const LINE = 14;
const PAD = 6;
const BARS_HEIGHT = 32;

// ----------------------------------------------------------------------------------- pure helpers

/** sigma of an SD3-style flow model (ModelSamplingDiscreteFlow) at time t in (0, 1]. */
function flowSigma(t, shift = NOMINAL_SHIFT) {
  return (shift * t) / (1 + (shift - 1) * t);
}

/** ComfyUI's `simple` scheduler over a flow model with 1000 timesteps: steps sigmas, then 0. */
function nominalSigmas(steps = NOMINAL_STEPS, shift = NOMINAL_SHIFT) {
  const stride = 1000 / steps; // same float arithmetic as comfy.samplers.simple_scheduler
  const sigmas = [];
  for (let i = 0; i < steps; i++) {
    sigmas.push(flowSigma((1000 - Math.floor(i * stride)) / 1000, shift));
  }
  sigmas.push(0);
  return sigmas;
}

/** "1.2", "1.25", "0.97": at most 3 decimals, no trailing zeros. */
function fmt(x) {
  if (typeof x !== "number" || !Number.isFinite(x)) return String(x);
  return String(Number(x.toFixed(3)));
}

/** Runs of consecutive integers; runs at least `minRun` long are written "a-b". */
function formatSteps(steps, minRun = 2) {
  const sorted = [...steps].sort((a, b) => a - b);
  const parts = [];
  let i = 0;
  while (i < sorted.length) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j] + 1) j++;
    if (j - i + 1 >= minRun && j > i) parts.push(`${sorted[i]}-${sorted[j]}`);
    else for (let k = i; k <= j; k++) parts.push(String(sorted[k]));
    i = j + 1;
  }
  return parts.join(", ");
}

// The node's input defaults, from its definition (the server's object_info), for a widget without a number yet.
const inputDefaults = {};

function widgetValue(node, name) {
  const w = node.widgets?.find((x) => x.name === name);
  const v = w ? Number(w.value) : NaN;
  return Number.isFinite(v) ? v : inputDefaults[name];
}

function widgetText(node, name) {
  const w = node.widgets?.find((x) => x.name === name);
  return w && typeof w.value === "string" ? w.value : inputDefaults[name];
}

/** The Advanced node's window and ramp ({start, ramp}), or null for the simple node. */
function nodeSchedule(node) {
  if (node.comfyClass !== ADVANCED_TYPE) return null;
  return { start: widgetValue(node, "sigma_start"), ramp: widgetText(node, "ramp") ?? "constant" };
}

/** The step's gamma at `position` (taca/settings.py TacaSettings.gamma_at): 1 outside the window. */
function gammaAt(position, gamma, threshold, schedule) {
  if (gamma === 1 || position < threshold) return 1;
  if (!schedule) return gamma;
  if (position > schedule.start) return 1;
  if (schedule.ramp === "constant" || schedule.start <= threshold) return gamma;
  let weight = (position - threshold) / (schedule.start - threshold);
  if (schedule.ramp === "cosine") weight = 0.5 - 0.5 * Math.cos(Math.PI * weight);
  return 1 + (gamma - 1) * weight;
}

/**
 * What the schedule plot shows for these settings: one entry per step.
 * `report` is the last "comfyui-taca.report" for the node, or null.
 */
function computePlot(gamma, threshold, report, schedule = null) {
  const fromRun = !!(report && Array.isArray(report.sample_sigmas) && report.sample_sigmas.length >= 2);
  const sigmas = fromRun ? report.sample_sigmas.map(Number) : nominalSigmas();
  // What the threshold is compared with: the sigma on flow models, t/1000 on discrete-time ones (the run says).
  const positions = fromRun && Array.isArray(report.sample_positions) && report.sample_positions.length === sigmas.length
    ? report.sample_positions.map(Number) : sigmas;
  const scale = fromRun && report.time_scale ? String(report.time_scale) : "sigma";
  const steps = sigmas.length - 1;
  const active = [];
  // gamma 1 is the unpatched model: TACA acts on no step
  const heights = [];
  for (let i = 0; i < steps; i++) {
    const g = gammaAt(positions[i], gamma, threshold, schedule);
    heights.push(g);
    active.push(g !== 1);
  }
  const activeSteps = active.flatMap((a, i) => (a ? [i] : []));
  const source = fromRun ? "last run" : "nominal";
  const sourceText = fromRun ? "from last run" : `nominal ${NOMINAL_STEPS}-step schedule`;
  let label;
  if (gamma === 1) label = `gamma 1: TACA off (${sourceText})`;
  else if (activeSteps.length === 0) label = `gamma ${fmt(gamma)} on no step of ${steps}: no ${scale} >= ${fmt(threshold)} (${sourceText})`;
  else label = `gamma ${fmt(gamma)} on steps ${formatSteps(activeSteps)} of ${steps} (${sourceText})`;
  if (schedule && gamma !== 1) {
    const ramped = schedule.ramp !== "constant" ? `${fmt(gamma)}→1 (${schedule.ramp})` : fmt(gamma);
    const window = `window ${scale} ${fmt(threshold)}-${fmt(schedule.start)}`;
    label = activeSteps.length
      ? `gamma ${ramped} on steps ${formatSteps(activeSteps)} of ${steps}, ${window} (${sourceText})`
      : `gamma ${ramped} on no step of ${steps}: no ${scale} in ${window} (${sourceText})`;
  }
  return { sigmas, active, heights, activeSteps, steps, gamma, threshold, source, label, bars: [],
           sigmaStart: schedule ? schedule.start : null, ramp: schedule ? schedule.ramp : null };
}

/** The text lines for the last run report, or null before any run. */
function computeFeedback(report, advanced = false) {
  if (!report) return null;
  const steps = Array.isArray(report.acted_steps) ? report.acted_steps.map(Number) : [];
  const total = Number(report.steps_total);
  const calls = Number(report.attention_calls) || 0;
  const warning = report.warning == null ? null : String(report.warning);
  // with a warning, the warning alone says what happened (it starts "TACA never acted: ...")
  let text = null;
  if (steps.length) text = `TACA acted on steps ${formatSteps(steps, 4)} of ${total} · ${calls} attention call${calls === 1 ? "" : "s"}`;
  else if (!warning) text = `TACA did not act in the last run (${total} steps)`;
  const feedback = { text, warning, acted_steps: steps, steps_total: total, attention_calls: calls, details: [],
                     blocksWarning: null };
  if (advanced) addAdvancedFeedback(feedback, report);
  return feedback;
}

/** What the Advanced settings did (taca/report.py): blocks, blocks beyond the model, the gammas per step. */
function addAdvancedFeedback(feedback, report) {
  const perCall = report.joint_calls_per_model_call;
  const acted = Array.isArray(report.acted_blocks) ? report.acted_blocks.map(Number) : [];
  if (report.blocks && perCall != null) {
    feedback.details.push(`blocks ${report.blocks}: acted on ${formatSteps(acted) || "none"} of ${perCall} joint calls per model call`);
  } else if (perCall != null) {
    feedback.details.push(`all ${perCall} joint calls per model call`);
  }
  if (report.blocks_warning != null && report.warning == null) feedback.blocksWarning = String(report.blocks_warning);
  const entries = Array.isArray(report.step_gammas) ? report.step_gammas : [];
  const perStep = entries.filter((e) => e.min != null).map((e) => {
    const where = e.step == null ? `sigma ${fmt(Number(e.sigma))}` : String(e.step);
    const range = e.min === e.max ? fmt(Number(e.min)) : `${fmt(Number(e.min))}-${fmt(Number(e.max))}`;
    return `${where}: ${range}`;
  });
  const adaptive = Number(report.target_share) > 0;
  if (perStep.length) {
    feedback.details.push(`gamma per step${adaptive ? ` (adaptive, share ${fmt(Number(report.target_share))})` : ""}: ${perStep.join(", ")}`);
  }
  feedback.stepGammas = entries.map((e) => ({ step: e.step, min: e.min, max: e.max, mean: e.mean }));
}

// ----------------------------------------------------------------------------------- drawing

let measureCtx = null;
function measurer() {
  if (!measureCtx) measureCtx = document.createElement("canvas").getContext("2d");
  measureCtx.font = FONT;
  return measureCtx;
}

/** Greedy word wrap of `text` into lines at most `maxWidth` wide (long words are cut). */
function wrapText(ctx, text, maxWidth) {
  const lines = [];
  for (const paragraph of String(text).split("\n")) {
    let line = "";
    for (const word of paragraph.split(/\s+/).filter(Boolean)) {
      const candidate = line ? `${line} ${word}` : word;
      if (ctx.measureText(candidate).width <= maxWidth || !line) {
        line = candidate;
      } else {
        lines.push(line);
        line = word;
      }
      while (ctx.measureText(line).width > maxWidth && line.length > 1) {
        let cut = line.length - 1;
        while (cut > 1 && ctx.measureText(line.slice(0, cut)).width > maxWidth) cut--;
        lines.push(line.slice(0, cut));
        line = line.slice(cut);
      }
    }
    lines.push(line);
  }
  return lines;
}

/** What the plot shows at this width (CSS pixels of the plot's own canvas), and how tall it is. */
function layout(node, width) {
  const ctx = measurer();
  const inner = Math.max(40, width - 2 * PAD);
  const plot = computePlot(widgetValue(node, "gamma"), widgetValue(node, THRESHOLD_WIDGET[node.comfyClass] ?? "threshold_sigma"),
    node.tacaReport ?? null, nodeSchedule(node));
  const labelLines = wrapText(ctx, plot.label, inner);
  const feedback = computeFeedback(node.tacaReport ?? null, node.comfyClass === ADVANCED_TYPE);
  const feedbackLines = [];
  if (feedback) {
    if (feedback.text) {
      for (const l of wrapText(ctx, feedback.text, inner)) feedbackLines.push({ text: l, color: COLORS.ok });
    }
    for (const detail of feedback.details ?? []) {
      for (const l of wrapText(ctx, detail, inner)) feedbackLines.push({ text: l, color: COLORS.label });
    }
    for (const warning of [feedback.warning, feedback.blocksWarning]) {
      if (warning == null) continue;
      for (const l of wrapText(ctx, `⚠ ${warning}`, inner)) feedbackLines.push({ text: l, color: COLORS.warning });
    }
  }
  const height = PAD + labelLines.length * LINE + 4 + BARS_HEIGHT + 4 + feedbackLines.length * LINE + PAD;
  return { plot, labelLines, feedback, feedbackLines, height, width };
}

function drawSchedule(ctx, lay) {
  const { plot, width: w } = lay;
  ctx.save();
  ctx.clearRect(0, 0, w, lay.height);
  ctx.fillStyle = COLORS.background;
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(0, 0, w, lay.height, 6);
  else ctx.rect(0, 0, w, lay.height);
  ctx.fill();

  ctx.font = FONT;
  ctx.textAlign = "left";
  ctx.textBaseline = "alphabetic";
  let ty = PAD;
  ctx.fillStyle = plot.activeSteps.length && plot.gamma !== 1 ? COLORS.label : COLORS.muted;
  for (const line of lay.labelLines) {
    ctx.fillText(line, PAD, ty + LINE - 4);
    ty += LINE;
  }
  ty += 4;

  // bars: one per step, height proportional to gamma (active) or 1 (inactive)
  const top = Math.max(plot.gamma, 1);
  const barsX = PAD;
  const barsW = w - 2 * PAD;
  const base = ty + BARS_HEIGHT;
  const slot = barsW / Math.max(plot.steps, 1);
  const gap = slot > 4 ? 1 : 0;
  for (let i = 0; i < plot.steps; i++) {
    const h = Math.max(1, (plot.heights[i] / top) * (BARS_HEIGHT - 2));
    const bx = barsX + i * slot;
    const bar = { x: bx, y: base - h, w: Math.max(1, slot - gap), h, active: plot.active[i], height: plot.heights[i] };
    ctx.fillStyle = bar.active ? COLORS.active : COLORS.inactive;
    ctx.fillRect(bar.x, bar.y, bar.w, bar.h);
    plot.bars.push(bar);
  }
  // the untouched level (gamma = 1), for reference
  const unitY = base - (1 / top) * (BARS_HEIGHT - 2);
  ctx.strokeStyle = COLORS.unitLine;
  ctx.lineWidth = 1;
  ctx.setLineDash?.([3, 3]);
  ctx.beginPath();
  ctx.moveTo(barsX, unitY - 0.5);
  ctx.lineTo(barsX + barsW, unitY - 0.5);
  ctx.stroke();
  ctx.setLineDash?.([]);
  ty = base + 4;

  for (const line of lay.feedbackLines) {
    ctx.fillStyle = line.color;
    ctx.fillText(line.text, PAD, ty + LINE - 4);
    ty += LINE;
  }
  ctx.restore();
}

// The warning is also flagged in the title bar, which stays visible when a node below overlaps the body.
// The classic renderer draws node titles on the graph canvas (onDrawForeground); Vue nodes draw their own
// header, without it, and show the warning in the plot only.
const TITLE_WARNING = "⚠ TACA never acted";

function drawTitleWarning(ctx, node) {
  const warning = node.tacaReport?.warning;
  if (warning == null || node.flags?.collapsed) {
    node.tacaTitleWarning = null;
    return;
  }
  const titleHeight = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.font = "bold 12px Arial, sans-serif";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  const titleWidth = ctx.measureText(node.getTitle?.() ?? node.title ?? "").width;
  const room = node.size[0] - titleWidth - 50;
  const text = ctx.measureText(TITLE_WARNING).width <= room ? TITLE_WARNING : "⚠";
  ctx.fillStyle = COLORS.warning;
  ctx.fillText(text, node.size[0] - 10, -titleHeight / 2);
  ctx.restore();
  node.tacaTitleWarning = { text, right: node.size[0] - 10, y: -titleHeight / 2 };
}

/** Grows the node when the plot needs more room than it has (never shrinks what the user sized). */
function fitNode(node) {
  try {
    const min = node.computeSize?.();
    if (!min) return;
    if (node.size[0] < min[0] || node.size[1] < min[1]) {
      node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
    }
  } catch (err) {
    console.warn("[comfyui-taca] could not resize node", err);
  }
}

/**
 * The one redraw path: paints the node's plot when what it shows (widget values, last report, width)
 * changed since the last paint. Cheap when nothing changed, so any event may call it.
 */
function refresh(node) {
  const view = node.tacaView;
  if (!view) return;
  try {
    const measured = view.element.clientWidth;
    // not laid out yet (hidden, off screen, collapsed): the width the classic renderer will give it
    const width = measured > 0 ? measured : Math.max(60, (node.size?.[0] ?? 320) - 2 * margin(view));
    const values = (PLOT_WIDGETS[node.comfyClass] ?? PLOT_WIDGETS[NODE_TYPE]).map((name) => String(
      name === "ramp" ? widgetText(node, name) : widgetValue(node, name)));
    const key = `${values.join("|")}|${view.reportSeq}|${width}`;
    if (key === view.key) return;
    view.key = key;
    const lay = layout(node, width);
    const ratio = 2 * Math.max(1, globalThis.devicePixelRatio || 1); // sharp when the canvas is zoomed in
    const canvas = view.canvas;
    canvas.style.height = `${lay.height}px`;
    canvas.width = Math.max(1, Math.round(width * ratio));
    canvas.height = Math.max(1, Math.round(lay.height * ratio));
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    drawSchedule(ctx, lay);
    const plot = lay.plot;
    plot.width = width;
    plot.height = lay.height;
    plot.drawCount = (node.tacaPlot?.drawCount ?? 0) + 1;
    node.tacaPlot = plot;
    node.tacaFeedback = lay.feedback
      ? { ...lay.feedback, lines: lay.feedbackLines.map((l) => l.text), warningShown: !!lay.feedback.warning }
      : null;
    if (lay.height !== view.height) {
      view.height = lay.height;
      fitNode(node);
    }
    node.setDirtyCanvas?.(true, true); // the title warning, and the classic renderer's widget layout
  } catch (err) {
    console.error("[comfyui-taca] schedule drawing failed", err);
  }
}

function margin(view) {
  return view.widget?.margin ?? 10;
}

function plotHeight(node, view) {
  const height = view.height || layout(node, Math.max(60, (node.size?.[0] ?? 320) - 2 * margin(view))).height;
  return height + 2 * margin(view);
}

function addScheduleWidget(node) {
  if (node.widgets?.some((w) => w.name === WIDGET_NAME)) return;
  if (typeof node.addDOMWidget !== "function") {
    console.warn("[comfyui-taca] this frontend has no DOM widgets: no schedule plot");
    return;
  }
  const element = document.createElement("div");
  element.className = "comfyui-taca-schedule";
  element.style.cssText = "position: relative; width: 100%; min-width: 0; overflow: hidden;";
  const canvas = document.createElement("canvas");
  canvas.style.cssText = "display: block; width: 100%;";
  element.appendChild(canvas);
  const view = { element, canvas, key: null, height: 0, reportSeq: 0, widget: null };
  const widget = node.addDOMWidget(WIDGET_NAME, "taca_schedule", element, {
    serialize: false, // not part of the prompt
    hideOnZoom: false, // the classic renderer would otherwise hide it when zoomed out
    getValue: () => "",
    setValue: () => {},
    // the classic renderer sizes the element from these (plus its margin on each side)
    getMinHeight: () => plotHeight(node, view),
    getMaxHeight: () => plotHeight(node, view),
  });
  widget.serialize = false; // not part of widgets_values
  view.widget = widget;
  node.tacaView = view;
  node.tacaCanvas = canvas;

  // A value typed, dragged or picked in either renderer reaches the widget's callback (Vue nodes call it
  // too; onWidgetChanged is the classic canvas's only). The chain keeps whatever callback was there.
  for (const name of PLOT_WIDGETS[node.comfyClass] ?? PLOT_WIDGETS[NODE_TYPE]) {
    const w = node.widgets?.find((x) => x.name === name);
    if (!w) continue;
    const callback = w.callback;
    w.callback = function (...args) {
      const r = callback?.apply(this, args);
      refresh(node);
      return r;
    };
  }
  // repaint at the width the renderer gives the element (first layout, node resized, renderer switched)
  if (typeof ResizeObserver === "function") {
    view.observer = new ResizeObserver(() => refresh(node));
    view.observer.observe(element);
  }
  refresh(node);
}

// ----------------------------------------------------------------------------------- run reports

function findNode(executionId) {
  const root = app.rootGraph ?? app.graph;
  if (!root || executionId == null) return null;
  const path = String(executionId).split(":");
  let graph = root;
  let node = null;
  for (let i = 0; i < path.length; i++) {
    node = graph?.getNodeById?.(path[i]) ?? graph?.getNodeById?.(Number(path[i])) ?? null;
    if (!node) return null;
    if (i < path.length - 1) graph = node.subgraph;
  }
  return node;
}

function onReport(event) {
  try {
    const detail = event?.detail;
    if (!detail || typeof detail !== "object") return;
    const node = findNode(detail.node_id);
    if (!node || !NODE_TYPES.includes(node.comfyClass) || !node.tacaView) return;
    node.tacaReport = detail;
    node.tacaView.reportSeq += 1;
    refresh(node);
  } catch (err) {
    console.error("[comfyui-taca] bad report", err);
  }
}

app.registerExtension({
  name: EXTENSION_NAME,
  setup() {
    api.addEventListener(REPORT_EVENT, onReport);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.includes(nodeData?.name)) return;
    for (const name of PLOT_WIDGETS[nodeData.name]) {
      const value = nodeData.input?.required?.[name]?.[1]?.default;
      inputDefaults[name] = name === "ramp" ? String(value ?? "constant") : Number(value);
    }
    const proto = nodeType.prototype;
    const onDrawForeground = proto.onDrawForeground;
    proto.onDrawForeground = function (ctx, ...rest) {
      const r = onDrawForeground?.apply(this, [ctx, ...rest]);
      try {
        refresh(this); // catches values set without a callback (another extension, undo)
        drawTitleWarning(ctx, this);
      } catch (err) {
        console.error("[comfyui-taca] title warning drawing failed", err);
      }
      return r;
    };
    // loading, pasting or cloning sets widget values without calling their callbacks
    const onConfigure = proto.onConfigure;
    proto.onConfigure = function (...args) {
      const r = onConfigure?.apply(this, args);
      refresh(this);
      return r;
    };
    const onRemoved = proto.onRemoved;
    proto.onRemoved = function (...args) {
      this.tacaView?.observer?.disconnect();
      return onRemoved?.apply(this, args);
    };
  },
  nodeCreated(node) {
    if (!NODE_TYPES.includes(node?.comfyClass)) return;
    addScheduleWidget(node);
  },
});
