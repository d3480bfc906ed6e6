"""Helpers for tests/test_browser.py: the page-side snippets and pixel reading.

Browser launch and page set-up are shared with devtools/thumbnails.py (which makes the template
thumbnails with the same frontend).
"""

from __future__ import annotations

import io
from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image

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

# The TACA node of the loaded graph, centred at zoom 1 and drawn; returns what the page knows of it.
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

# What was last drawn for the node, with each bar's centre and top/bottom in page (CSS) pixels.
DRAWN_JS = """(id) => {
    const node = app.graph.getNodeById(id);
    const plot = node.tacaPlot;
    if (!plot) return null;
    const rect = app.canvas.canvas.getBoundingClientRect();
    const toPage = (x, y) => {
        const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + x, node.pos[1] + y]);
        return [rect.left + cx, rect.top + cy];
    };
    const bars = plot.bars.map((b) => ({ ...b, centre: toPage(b.x + b.w / 2, b.y + b.h / 2),
        top: toPage(b.x + b.w / 2, b.y), bottom: toPage(b.x + b.w / 2, b.y + b.h) }));
    const widgetTop = toPage(0, plot.widgetY), widgetBottom = toPage(node.size[0], plot.widgetY + plot.height);
    const titleTop = toPage(node.size[0] / 2, -LiteGraph.NODE_TITLE_HEIGHT), titleBottom = toPage(node.size[0], 0);
    return { plot: { ...plot, bars }, feedback: node.tacaFeedback ?? null, report: node.tacaReport ?? null,
             widgetBox: [widgetTop[0], widgetTop[1], widgetBottom[0], widgetBottom[1]], scale: app.canvas.ds.scale,
             titleBox: [titleTop[0], titleTop[1], titleBottom[0], titleBottom[1]],
             titleWarning: node.tacaTitleWarning ?? null,
             drawCount: plot.drawCount };
}"""


def hex_rgb(color: str) -> Tuple[int, int, int]:
    color = color.lstrip("#")
    return tuple(int(color[i:i + 2], 16) for i in (0, 2, 4))


def screenshot(page) -> Image.Image:
    return Image.open(io.BytesIO(page.screenshot(type="png"))).convert("RGB")


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

# Other nodes (title bar included) whose box intersects the TACA node's plot, in graph coordinates.
OVERLAPS_JS = """(id) => {
    const node = app.graph.getNodeById(id);
    const plot = node.tacaPlot;
    const box = [node.pos[0], node.pos[1] + plot.widgetY, node.pos[0] + node.size[0], node.pos[1] + plot.widgetY + plot.height];
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    return app.graph.nodes.filter((n) => n !== node).filter((n) => {
        const b = [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
        return b[0] < box[2] && box[0] < b[2] && b[1] < box[3] && box[1] < b[3];
    }).map((n) => `${n.id} ${n.title}`);
}"""
