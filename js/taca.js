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
// Patch Model node (taca/report.py). The node shows the report's `summary`, the line the server logs,
// as it is: what TACA did in that run, or the run's warning (for example "TACA never acted: the run
// started at sigma 0.866 ...") in a warning colour.
//
// The plot is a DOM widget (node.addDOMWidget) holding its own <canvas>, so it looks and updates the
// same in the classic LiteGraph canvas and in the Vue node renderer ("Nodes 2.0"): the frontend only
// places the element; this file paints it, from one function (refresh), whenever what it shows
// changes. The strings the server sends are only ever drawn with fillText, never parsed as HTML; the
// canvas's text alternative (its aria-label, for screen readers) holds the same lines.
//
// "TACA Patch Model (Advanced)" gets the same plot and report: each bar's height is the step's gamma
// under its window (sigma_end <= position <= sigma_start) and ramp (constant, or linear / cosine from
// gamma at sigma_start to 1 at sigma_end), the label names the window and ramp, and after a run the
// server's summary also names the blocks acted on and the gammas of each step; blocks beyond the
// model are repeated on their own line in the warning colour.
//
// The rules computed here while a widget changes (the window and ramp, the nominal sigmas, the runs of
// step numbers) are in taca_rules.js, tested against the Python they mirror.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { GAMMA_OFF, NOMINAL_STEPS, formatBlocks, gammaAt, nominalSigmas } from "./taca_rules.js";

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

// Each TACA node's plot: its element and canvas, what was last painted, the node's last run report.
const views = new WeakMap();

// ----------------------------------------------------------------------------------- what is shown

/** "1.2", "1.25", "0.97": at most 3 decimals, no trailing zeros. */
function fmt(x) {
  if (typeof x !== "number" || !Number.isFinite(x)) return String(x);
  return String(Number(x.toFixed(3)));
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

/** The node's settings as taca_rules.gammaAt takes them (no upper end and a constant ramp on the simple node). */
function nodeSettings(node) {
  const advanced = node.comfyClass === ADVANCED_TYPE;
  return {
    gamma: widgetValue(node, "gamma"),
    sigmaEnd: widgetValue(node, THRESHOLD_WIDGET[node.comfyClass] ?? THRESHOLD_WIDGET[NODE_TYPE]),
    sigmaStart: advanced ? widgetValue(node, "sigma_start") : null,
    ramp: advanced ? widgetText(node, "ramp") ?? "constant" : "constant",
  };
}

/**
 * What the schedule plot shows for these settings: one bar height per step, and its label.
 * `report` is the last "comfyui-taca.report" for the node, or null.
 */
function computePlot(settings, report) {
  const fromRun = !!(report && Array.isArray(report.sample_sigmas) && report.sample_sigmas.length >= 2);
  const sigmas = fromRun ? report.sample_sigmas.map(Number) : nominalSigmas();
  // What the threshold is compared with: the sigma on flow models, t/1000 on discrete-time ones (the run says).
  const positions = fromRun && Array.isArray(report.sample_positions) && report.sample_positions.length === sigmas.length
    ? report.sample_positions.map(Number) : sigmas;
  const scale = fromRun && report.time_scale ? String(report.time_scale) : "sigma";
  const steps = sigmas.length - 1;
  const heights = positions.slice(0, steps).map((p) => gammaAt(settings, p));
  const active = heights.map((g) => g !== GAMMA_OFF);
  const activeSteps = active.flatMap((a, i) => (a ? [i] : []));
  const { gamma, sigmaEnd, sigmaStart, ramp } = settings;
  const source = fromRun ? "from last run" : `nominal ${NOMINAL_STEPS}-step schedule`;
  const stepsText = formatBlocks(activeSteps);
  let label;
  if (gamma === GAMMA_OFF) {
    label = `gamma 1: TACA off (${source})`;
  } else if (sigmaStart === null) {
    label = activeSteps.length
      ? `gamma ${fmt(gamma)} on steps ${stepsText} of ${steps} (${source})`
      : `gamma ${fmt(gamma)} on no step of ${steps}: no ${scale} >= ${fmt(sigmaEnd)} (${source})`;
  } else {
    const ramped = ramp !== "constant" ? `${fmt(gamma)}→1 (${ramp})` : fmt(gamma);
    const window = `window ${scale} ${fmt(sigmaEnd)}-${fmt(sigmaStart)}`;
    label = activeSteps.length
      ? `gamma ${ramped} on steps ${stepsText} of ${steps}, ${window} (${source})`
      : `gamma ${ramped} on no step of ${steps}: no ${scale} in ${window} (${source})`;
  }
  return { heights, active, steps, gamma, label, anyActive: activeSteps.length > 0 };
}

/** The run report's lines and their colours: the server's summary as it is, the blocks warning on its own. */
function reportLines(report) {
  if (!report) return [];
  const warning = report.warning != null;
  const summary = report.summary ?? report.warning;
  const lines = [];
  if (summary != null) {
    lines.push(warning ? { text: `⚠ ${summary}`, color: COLORS.warning } : { text: String(summary), color: COLORS.ok });
  }
  if (!warning && report.blocks_warning != null) {
    lines.push({ text: `⚠ ${report.blocks_warning}`, color: COLORS.warning });
  }
  return lines;
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
  const report = views.get(node)?.report ?? null;
  const plot = computePlot(nodeSettings(node), report);
  const labelLines = wrapText(ctx, plot.label, inner);
  const texts = reportLines(report);
  const feedbackLines = texts.flatMap(({ text, color }) => wrapText(ctx, text, inner).map((l) => ({ text: l, color })));
  const height = PAD + labelLines.length * LINE + 4 + BARS_HEIGHT + 4 + feedbackLines.length * LINE + PAD;
  return { plot, labelLines, feedbackLines, text: [plot.label, ...texts.map((t) => t.text)].join("\n"), height, width };
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
  ctx.fillStyle = plot.anyActive && plot.gamma !== GAMMA_OFF ? COLORS.label : COLORS.muted;
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
    ctx.fillStyle = plot.active[i] ? COLORS.active : COLORS.inactive;
    ctx.fillRect(barsX + i * slot, base - h, Math.max(1, slot - gap), h);
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
  const warning = views.get(node)?.report?.warning;
  if (warning == null || node.flags?.collapsed) return;
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
  const view = views.get(node);
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
    canvas.setAttribute("aria-label", lay.text);
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
  canvas.setAttribute("role", "img");
  element.appendChild(canvas);
  const view = { element, canvas, key: null, height: 0, reportSeq: 0, report: null, widget: null, observer: null };
  views.set(node, view);
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
    const view = node && NODE_TYPES.includes(node.comfyClass) ? views.get(node) : null;
    if (!view) return;
    view.report = detail;
    view.reportSeq += 1;
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
      views.get(this)?.observer?.disconnect();
      return onRemoved?.apply(this, args);
    };
  },
  nodeCreated(node) {
    if (!NODE_TYPES.includes(node?.comfyClass)) return;
    addScheduleWidget(node);
  },
});
