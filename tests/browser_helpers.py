"""Helpers for tests/test_browser.py: the page-side snippets and pixel reading.

Browser launch, page set-up and workflow loading are in devtools/browser.py, shared with the template
thumbnails (devtools/thumbnails.py).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image

from devtools.browser import screenshot  # noqa: F401  (the page as the tests read its pixels)

# Records the websocket events the tests wait on (the server's messages as the frontend's api object hands them
# to listeners), and every api.queuePrompt response (the frontend's own "Run" path goes through it), on
# window.__taca: the test's own listeners, added to the page.
RECORDER_JS = """async () => {
    const { api } = await import('/scripts/api.js');
    if (window.__taca) return;
    window.__taca = { events: [], queued: [] };
    for (const type of ['execution_start', 'execution_success', 'execution_error', 'execution_interrupted',
                        'comfyui-taca.report']) {
        api.addEventListener(type, (e) => window.__taca.events.push({ type, detail: e.detail }));
    }
    const queuePrompt = api.queuePrompt.bind(api);
    api.queuePrompt = async (...args) => {
        const response = await queuePrompt(...args);
        window.__taca.queued.push(JSON.parse(JSON.stringify(response)));
        return response;
    };
}"""

# The TACA node of the loaded graph, centred at zoom 1 and drawn; returns its id.
FOCUS_TACA_JS = """(id) => {
    const node = id == null ? app.graph.nodes.find((n) => n.comfyClass === 'TACAPatchModel') : app.graph.getNodeById(id);
    const ds = app.canvas.ds;
    const canvas = app.canvas.canvas;
    ds.scale = 1;
    ds.offset[0] = canvas.clientWidth / 2 - (node.pos[0] + node.size[0] / 2);
    ds.offset[1] = canvas.clientHeight / 2 - (node.pos[1] + node.size[1] / 2);
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    return node.id;
}"""

# Resolves after a few animation frames: the DOM the frontend positions from the canvas transform (DOM
# widgets, Vue nodes) follows the canvas one frame later.
SETTLE_JS = """async () => {
    for (let i = 0; i < 3; i++) {
        app.canvas.setDirty(true, true);
        await new Promise((resolve) => requestAnimationFrame(() => resolve()));
    }
}"""

# The TACA node's schedule plot as the page shows it, found through the frontend's own widget list (the DOM
# widget's element): the canvas's pixels (its backing store, as a PNG), its text alternative (aria-label), where
# it is on the page, and where the node's title bar is.
PLOT_JS = """(id) => {
    const node = app.graph.getNodeById(id);
    const widget = node?.widgets?.find((w) => w.name === 'taca_schedule');
    const canvas = widget?.element?.querySelector('canvas');
    if (!canvas) return null;
    const r = canvas.getBoundingClientRect();
    const rect = app.canvas.canvas.getBoundingClientRect();
    const graphToPage = (x, y) => {
        const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + x, node.pos[1] + y]);
        return [rect.left + cx, rect.top + cy];
    };
    const titleTop = graphToPage(node.size[0] / 2, -LiteGraph.NODE_TITLE_HEIGHT), titleBottom = graphToPage(node.size[0], 0);
    return { png: canvas.toDataURL('image/png'), text: canvas.getAttribute('aria-label'),
             box: [r.left, r.top, r.right, r.bottom], titleBox: [titleTop[0], titleTop[1], titleBottom[0], titleBottom[1]] };
}"""

# Whether the plot's canvas is what the page shows at these page points (not something covering it).
ON_TOP_JS = """([id, points]) => {
    const canvas = app.graph.getNodeById(id).widgets.find((w) => w.name === 'taca_schedule').element.querySelector('canvas');
    return points.map(([x, y]) => document.elementFromPoint(x, y) === canvas);
}"""

# The plot's text alternative, once it satisfies CONDITION (a JS expression over `text`, the aria-label, and
# `lines`, its lines); nudges the classic canvas to draw meanwhile (it repaints the plot from onDrawForeground).
WAIT_TEXT_JS = """(id) => {
    const node = app.graph.getNodeById(id);
    const canvas = node?.widgets?.find((w) => w.name === 'taca_schedule')?.element?.querySelector('canvas');
    const text = canvas?.getAttribute('aria-label');
    const lines = text == null ? [] : text.split('\\n');
    const ok = text != null && (CONDITION);
    if (!ok) app.canvas.setDirty(true, true);
    return ok;
}"""

# extension colours (js/taca.js COLORS)
ACTIVE, INACTIVE, UNIT_LINE, OK, WARNING = "#f0a73a", "#5f7391", "#9aa4b2", "#8fd694", "#ff7a59"


def _mask(pixels: np.ndarray, color: str, tol: int) -> np.ndarray:
    return (np.abs(pixels - np.array(hex_rgb(color), dtype=np.int16)).max(axis=-1) <= tol)


def read_bars(canvas: Image.Image, tol: int = 8) -> Dict[str, Any]:
    """The bars drawn on the plot's canvas, read from its pixels alone.

    The baseline is the lowest row mostly of those colours (the bars span the plot's width; text does not). A
    bar is a run of columns of the active or inactive colour along the row just above it; its height is the longest run of its colour up from the baseline in any of its columns (the
    dashed gamma-1 line crosses some of them). Heights are in gamma units: over the height of that dashed line
    above the baseline. Coordinates are canvas pixels (x0, x1 inclusive; top, base exclusive rows)."""
    px = np.asarray(canvas.convert("RGB"), dtype=np.int16)
    active, inactive = _mask(px, ACTIVE, tol), _mask(px, INACTIVE, tol)
    rows = np.nonzero((active | inactive).sum(axis=1) >= 0.5 * px.shape[1])[0]
    if not len(rows):
        return {"bars": [], "unit": None}
    base = int(rows.max()) + 1
    scan = base - 1
    bars, x, width = [], 0, px.shape[1]
    while x < width:
        kind = "active" if active[scan, x] else "inactive" if inactive[scan, x] else None
        if kind is None:
            x += 1
            continue
        mask = active if kind == "active" else inactive
        x1 = x
        while x1 + 1 < width and mask[scan, x1 + 1]:
            x1 += 1
        runs = []
        for c in range(x, x1 + 1):
            run = 0
            while base - 1 - run >= 0 and mask[base - 1 - run, c]:
                run += 1
            runs.append(run)
        bars.append({"x0": x, "x1": x1, "active": kind == "active", "run": max(runs), "top": base - max(runs)})
        x = x1 + 1
    # the dashed line at gamma 1: the lowest row, at or above the bars, with dashes along the bars' width
    span = bars[-1]["x1"] - bars[0]["x0"] + 1 if bars else width
    top = min(b["top"] for b in bars) if bars else 0
    dash = _mask(px, UNIT_LINE, tol)
    dash_rows = [r for r in range(max(0, top - 6), base) if dash[r].sum() >= 0.2 * span]
    unit = base - (max(dash_rows) + 1) if dash_rows else None
    for b in bars:
        b["height"] = b["run"] / unit if unit else None
    return {"bars": bars, "unit": unit, "base": base}


def text_rows(canvas: Image.Image, below: int, color: str, tol: int = 40) -> int:
    """How many lines of text in ``color`` the canvas has below row ``below``: runs of rows with such pixels."""
    px = np.asarray(canvas.convert("RGB"), dtype=np.int16)[below:]
    rows = _mask(px, color, tol).sum(axis=1) > 0
    return int(np.sum(rows[1:] & ~rows[:-1]) + rows[0]) if len(rows) else 0


def read_plot(page, node_id) -> Dict[str, Any]:
    """The node's plot as the page shows it: the bars read from its canvas's pixels (with their centre, top and
    bottom in page pixels), its text alternative (``label``, then the run ``report`` lines), the canvas itself
    (``base``: the bars' baseline row in it), whether it is on top at three bars, and where its title bar is."""
    import base64
    import io

    shown = page.evaluate(PLOT_JS, node_id)
    if shown is None:
        return None
    canvas = Image.open(io.BytesIO(base64.b64decode(shown["png"].split(",", 1)[1])))
    found = read_bars(canvas)
    left, top, right, bottom = shown["box"]
    scale = (right - left) / canvas.width  # page pixels per canvas pixel
    to_page = lambda x, y: [left + x * scale, top + y * scale]  # noqa: E731
    bars = []
    for b in found["bars"]:
        cx = (b["x0"] + b["x1"] + 1) / 2
        bars.append({**b, "centre": to_page(cx, (b["top"] + found["base"]) / 2), "top": to_page(cx, b["top"]),
                     "bottom": to_page(cx, found["base"]), "h": b["run"] * scale})
    lines = shown["text"].split("\n") if shown["text"] is not None else []
    probes = [bars[i]["centre"] for i in sorted({0, len(bars) // 2, len(bars) - 1}) if bars]
    return {"bars": bars, "heights": [b["height"] for b in bars], "active": [b["active"] for b in bars],
            "activeSteps": [i for i, b in enumerate(bars) if b["active"]], "label": lines[0] if lines else None,
            "report": lines[1:], "text": shown["text"], "widgetBox": shown["box"], "titleBox": shown["titleBox"],
            "canvas": canvas, "base": found.get("base"), "scale": scale,
            "onTop": page.evaluate(ON_TOP_JS, [node_id, probes]) if probes else []}


# Marks a widget's input in a Vue node (data-taca-target), the input nearest to the widget's label.
VUE_WIDGET_INPUT_JS = """([id, name]) => {
    const root = document.querySelector(`[data-node-id="${id}"]`);
    if (!root) return null;
    const labels = [...root.querySelectorAll('*')].filter((e) => e.children.length === 0 && e.textContent.trim() === name);
    for (const label of labels) {
        for (let up = label.parentElement; up && up !== root.parentElement; up = up.parentElement) {
            const input = up.querySelector('input');
            if (input) {
                for (const old of document.querySelectorAll('[data-taca-target]')) old.removeAttribute('data-taca-target');
                input.setAttribute('data-taca-target', '1');
                return true;
            }
        }
    }
    return null;
}"""

def hex_rgb(color: str) -> Tuple[int, int, int]:
    color = color.lstrip("#")
    return tuple(int(color[i:i + 2], 16) for i in (0, 2, 4))


def pixel(image: Image.Image, xy) -> Tuple[int, int, int]:
    return image.getpixel((int(round(xy[0])), int(round(xy[1]))))


def close(a, b, tol: int = 6) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def column_run(image: Image.Image, x: float, y_from: float, y_to: float, color, tol: int = 6) -> int:
    """How many pixels of ``color`` there are in column x between y_from and y_to (page pixels)."""
    x = int(round(x))
    return sum(1 for y in range(int(y_from), int(y_to) + 1) if close(image.getpixel((x, y)), color, tol))


def count_color(image: Image.Image, box, color, tol: int = 40) -> int:
    """Pixels within ``tol`` of ``color`` in ``box`` (left, top, right, bottom), e.g. anti-aliased text."""
    crop = np.asarray(image.crop(tuple(int(v) for v in box)), dtype=np.int16)
    return int((np.abs(crop - np.array(color, dtype=np.int16)).max(axis=-1) <= tol).sum())


def events(page, kind: str) -> List[Dict[str, Any]]:
    return page.evaluate("(kind) => window.__taca.events.filter((e) => e.type === kind).map((e) => e.detail)", kind)

# Other nodes (title bar included) whose box on the page intersects the TACA node's plot: from the graph
# in the classic renderer, from the node elements in the Vue renderer.
OVERLAPS_JS = """(id) => {
    const node = app.graph.getNodeById(id);
    const p = node.widgets.find((w) => w.name === 'taca_schedule').element.querySelector('canvas').getBoundingClientRect();
    const rect = app.canvas.canvas.getBoundingClientRect();
    const toPage = (x, y) => { const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([x, y]); return [rect.left + cx, rect.top + cy]; };
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    const vue = !!LiteGraph.vueNodesMode;
    return app.graph.nodes.filter((n) => String(n.id) !== String(node.id)).filter((n) => {
        let b;
        if (vue) {
            const el = document.querySelector(`[data-node-id="${n.id}"]`);
            if (!el) return false;
            const r = el.getBoundingClientRect();
            b = [r.left, r.top, r.right, r.bottom];
        } else {
            b = [...toPage(n.pos[0], n.pos[1] - title), ...toPage(n.pos[0] + n.size[0], n.pos[1] + n.size[1])];
        }
        return b[0] < p.right && p.left < b[2] && b[1] < p.bottom && p.top < b[3];
    }).map((n) => `${n.id} ${n.title}`);
}"""
