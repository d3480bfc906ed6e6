"""Helpers for tests/test_browser.py: the page-side snippets and pixel reading.

Browser launch, page set-up and workflow loading are in devtools/browser.py, shared with the template
thumbnails (devtools/thumbnails.py).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image

from devtools.browser import screenshot  # noqa: F401  (the page as the tests read its pixels)

# Records the websocket events the tests wait on, and every api.queuePrompt response (the frontend's
# own "Run" path goes through it), on window.__taca.
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

# What was last drawn for the node, with each bar's centre and top/bottom in page (CSS) pixels, read
# from where the plot's own canvas is on the page (the same in both node renderers).
DRAWN_JS = """(id) => {
    const node = app.graph.getNodeById(id);
    const plot = node.tacaPlot;
    if (!plot) return null;
    const el = node.tacaCanvas;
    const r = el.getBoundingClientRect();
    const s = r.width / plot.width;
    const toPage = (x, y) => [r.left + x * s, r.top + y * s];
    const bars = plot.bars.map((b) => ({ ...b, centre: toPage(b.x + b.w / 2, b.y + b.h / 2),
        top: toPage(b.x + b.w / 2, b.y), bottom: toPage(b.x + b.w / 2, b.y + b.h) }));
    const rect = app.canvas.canvas.getBoundingClientRect();
    const graphToPage = (x, y) => {
        const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + x, node.pos[1] + y]);
        return [rect.left + cx, rect.top + cy];
    };
    const titleTop = graphToPage(node.size[0] / 2, -LiteGraph.NODE_TITLE_HEIGHT), titleBottom = graphToPage(node.size[0], 0);
    // what the page shows at a few bar centres: the plot itself, not something covering it
    const onTop = [0, Math.floor(bars.length / 2), bars.length - 1].filter((i) => bars[i]).map((i) => {
        const hit = document.elementFromPoint(bars[i].centre[0], bars[i].centre[1]);
        return hit === el;
    });
    return { plot: { ...plot, bars }, feedback: node.tacaFeedback ?? null, report: node.tacaReport ?? null,
             widgetBox: [r.left, r.top, r.right, r.bottom], scale: s, onTop,
             titleBox: [titleTop[0], titleTop[1], titleBottom[0], titleBottom[1]],
             titleWarning: node.tacaTitleWarning ?? null,
             drawCount: plot.drawCount };
}"""

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
    const p = node.tacaCanvas.getBoundingClientRect();
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
