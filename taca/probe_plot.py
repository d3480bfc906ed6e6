"""The TACA Probe Report's picture, drawn with PIL from the probe's JSON (``ProbeRun.as_json``).

Left: the image-to-text share per recorded step, plain (gamma 1) and with TACA's gamma, each as its mean over
the joint attention calls (blocks) and batch entries, with a band from the lowest to the highest block.
Right: the first recorded step's share per image token, plain and with TACA, on one colour scale.
Importing this module does not import ComfyUI.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

WIDTH, HEIGHT = 960, 400
PLAIN = (70, 110, 200)
TACA = (230, 120, 30)
GRID = (225, 225, 225)
TEXT = (30, 30, 30)
# A perceptually ordered scale (dark blue -> teal -> yellow), sampled at 5 points and blended between.
COLOURS = [(48, 18, 90), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def colour(t: float) -> Tuple[int, int, int]:
    """The colour scale at ``t`` in [0, 1]."""
    t = min(max(t, 0.0), 1.0) * (len(COLOURS) - 1)
    i = min(int(t), len(COLOURS) - 2)
    f = t - i
    return tuple(int(round(a + (b - a) * f)) for a, b in zip(COLOURS[i], COLOURS[i + 1]))  # type: ignore[return-value]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def step_series(data: Dict[str, Any], key: str) -> List[Tuple[float, float, float]]:
    """Per step (low, mean, high) over the joint calls of ``key`` ("share_plain" or "share_taca"), each call's
    value the mean over its batch entries."""
    out = []
    for step in data["steps"]:
        per_call = [_mean(call[key]) for call in step["calls"]]
        out.append((min(per_call), _mean(per_call), max(per_call)) if per_call else (0.0, 0.0, 0.0))
    return out


def _label(sigma: float) -> str:
    return f"{sigma:.3g}"


def _share_panel(draw: ImageDraw.ImageDraw, data: Dict[str, Any], box: Tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    plain, taca = step_series(data, "share_plain"), step_series(data, "share_taca")
    draw.text((x0, y0 - 38), "image-to-text attention share per step (band: lowest to highest block)", fill=TEXT)
    if not plain:
        draw.rectangle(box, outline=TEXT)
        draw.text((x0 + 10, (y0 + y1) // 2), "no steps recorded", fill=TEXT)
        return
    # The axis spans the data (with a margin), so a small rise is visible.
    low = min(min(lo for lo, _, _ in plain), min(lo for lo, _, _ in taca))
    top = max(max(h for _, _, h in plain), max(h for _, _, h in taca))
    margin = max(0.1 * (top - low), 1e-3)
    low, top = max(0.0, low - margin), min(1.0, top + margin)
    n = len(plain)

    def px(i: float) -> float:
        return x0 + (x1 - x0) * ((i + 0.5) / n)

    def py(v: float) -> float:
        return y1 - (y1 - y0) * ((v - low) / (top - low))

    for k in range(5):
        v = low + (top - low) * k / 4
        draw.line([(x0, py(v)), (x1, py(v))], fill=GRID)
        draw.text((x0 - 44, py(v) - 6), f"{v:.3f}", fill=TEXT)
    draw.rectangle(box, outline=TEXT)
    every = max(1, n // 10)
    for i, step in enumerate(data["steps"]):
        if i % every == 0:
            draw.text((px(i) - 12, y1 + 6), _label(step["sigma"]), fill=TEXT)
    draw.text(((x0 + x1) // 2 - 20, y1 + 22), "sigma", fill=TEXT)
    for series, rgb in ((plain, PLAIN), (taca, TACA)):
        band = [(px(i), py(h)) for i, (_, _, h) in enumerate(series)]
        band += [(px(i), py(lo)) for i, (lo, _, _) in reversed(list(enumerate(series)))]
        light = tuple(int(c + (255 - c) * 0.7) for c in rgb)
        if n > 1:
            draw.polygon(band, outline=light)
        for i, (lo, _, hi) in enumerate(series):
            draw.line([(px(i), py(lo)), (px(i), py(hi))], fill=light, width=5)
        points = [(px(i), py(m)) for i, (_, m, _) in enumerate(series)]
        if n > 1:
            draw.line(points, fill=rgb, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=rgb)
    draw.rectangle([x0, y0 - 18, x0 + 12, y0 - 6], fill=PLAIN)
    draw.text((x0 + 18, y0 - 18), "plain (gamma 1)", fill=TEXT)
    draw.rectangle([x0 + 150, y0 - 18, x0 + 162, y0 - 6], fill=TACA)
    draw.text((x0 + 168, y0 - 18), "with TACA's gamma (equal where TACA does not act)", fill=TEXT)


def _heatmap(image: Image.Image, values: Sequence[float], height: int, width: int, box: Tuple[int, int, int, int],
             lo: float, hi: float) -> int:
    """Paste the map into ``box``, each token a square of the largest whole size that fits; returns that size."""
    x0, y0, x1, y1 = box
    cells = Image.new("RGB", (width, height))
    span = hi - lo if hi > lo else 1.0
    cells.putdata([colour((v - lo) / span) for v in values])
    scale = max(1, min((x1 - x0) // width, (y1 - y0) // height))
    image.paste(cells.resize((width * scale, height * scale), Image.NEAREST), (x0, y0))
    return scale


def draw(data: Dict[str, Any]) -> Image.Image:
    """The report picture of the probe's JSON."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(image)
    _share_panel(d, data, (60, 50, 520, 340))
    heat = data.get("heatmap") or {}
    h, w = int(heat.get("height", 0)), int(heat.get("width", 0))
    values, plain = heat.get("values") or [], heat.get("values_plain") or heat.get("values") or []
    if not (h and w and len(values) == h * w):
        d.text((580, 180), "no heatmap (no step recorded)", fill=TEXT)
        return image
    sigma = heat.get("sigma")
    where = f" (sigma {sigma:.3g})" if isinstance(sigma, (int, float)) else ""
    d.text((560, 16), f"share per image token, first recorded step{where}", fill=TEXT)
    lo, hi = min(min(values), min(plain)), max(max(values), max(plain))
    side = 160
    for i, (title, vals) in enumerate((("plain", plain), ("with TACA", values))):
        x = 560 + i * (side + 20)
        d.text((x, 40), title, fill=TEXT)
        scale = _heatmap(image, vals, h, w, (x, 60, x + side, 60 + side), lo, hi)
        d.rectangle([x - 1, 59, x + w * scale, 60 + h * scale], outline=TEXT)
    # The colour scale, shared by both maps.
    bar_y, bar_x0, bar_x1 = 60 + side + 40, 560, 560 + 2 * side + 20
    for x in range(bar_x0, bar_x1):
        d.line([(x, bar_y), (x, bar_y + 14)], fill=colour((x - bar_x0) / (bar_x1 - bar_x0 - 1)))
    d.rectangle([bar_x0, bar_y, bar_x1, bar_y + 14], outline=TEXT)
    for k in range(5):
        x = bar_x0 + (bar_x1 - bar_x0) * k / 4
        d.line([(x, bar_y + 14), (x, bar_y + 18)], fill=TEXT)
        d.text((x - 16, bar_y + 22), f"{lo + (hi - lo) * k / 4:.3f}", fill=TEXT)
    d.text((bar_x0, bar_y + 40), f"{h} x {w} token grid; mean over heads, joint calls and batch entries", fill=TEXT)
    return image
