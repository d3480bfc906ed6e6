"""A compositional world whose truth a program can check: scenes of 1-4 flat shapes on a textured background,
and their prompts in T2I-CompBench's categories (colour binding, shape binding, counting, spatial).

Everything is numpy and deterministic: a scene is drawn from ``(split, category, index)`` alone, so the
training set, the held-out evaluation suite and the benchmark's prompts are the same on every machine.
Combinations kept out of training (``HELD_OUT_PAIRS``, ``HELD_OUT_RELATIONS``) never appear in a training
image or prompt, so following a held-out prompt is composition, not recall.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

# Saturated colours, far apart in hue; the background is desaturated, so objects separate from it by saturation.
COLORS = {
    "red": (215, 35, 35),
    "orange": (240, 135, 15),
    "yellow": (235, 215, 25),
    "green": (35, 165, 55),
    "cyan": (25, 195, 215),
    "blue": (35, 70, 215),
    "purple": (140, 45, 190),
}
SHAPES = ("circle", "square", "triangle", "star")
RELATIONS = ("to the left of", "to the right of", "above", "below")
NUMBERS = ("one", "two", "three", "four")
CATEGORIES = ("color", "shape", "counting", "spatial")

# Colour/shape pairs no training scene contains: one per colour, every shape held out at least once.
HELD_OUT_PAIRS = frozenset({
    ("red", "star"), ("orange", "circle"), ("yellow", "square"), ("green", "triangle"),
    ("cyan", "circle"), ("blue", "star"), ("purple", "square"),
})
# (first shape, relation, second shape) triples no training scene states.
HELD_OUT_RELATIONS = frozenset({
    ("circle", "above", "square"), ("square", "to the left of", "triangle"), ("triangle", "below", "star"),
    ("star", "to the right of", "circle"), ("circle", "to the left of", "star"), ("square", "below", "circle"),
    ("triangle", "to the right of", "square"), ("star", "above", "triangle"),
})


@dataclass(frozen=True)
class WorldObject:
    color: str
    shape: str
    cx: float  # centre, as a fraction of the image width (0 left, 1 right)
    cy: float  # centre, as a fraction of the image height (0 top, 1 bottom)
    size: float  # circumscribed radius (circles: 0.9 of it), as a fraction of the image side


@dataclass(frozen=True)
class Scene:
    category: str
    prompt: str
    objects: Tuple[WorldObject, ...]
    # what the prompt asks for: colour/shape phrases, the count, or the relation between the two phrases
    phrases: Tuple[Tuple[str, str], ...]
    count: int = 0
    relation: str = ""
    background_seed: int = 0


def _rng(*parts) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def phrase(color: str, shape: str) -> str:
    return f"{color} {shape}"


def _article(words: str) -> str:
    return f"an {words}" if words[0] in "aeiou" else f"a {words}"


def prompt_for(category: str, phrases: Sequence[Tuple[str, str]], count: int = 0, relation: str = "") -> str:
    """The prompt text of a label: the one place the world's wording lives."""
    if category == "counting":
        color, shape = phrases[0]
        return f"{NUMBERS[count - 1]} {color} {shape if count == 1 else shape + 's'}"
    texts = [_article(phrase(c, s)) for c, s in phrases]
    if category == "spatial":
        return f"{texts[0]} {relation} {texts[1]}"
    return " and ".join(texts)


def allowed_pair(color: str, shape: str, split: str) -> bool:
    held = (color, shape) in HELD_OUT_PAIRS
    return not held if split == "train" else True


def _pick_pair(rng, split: str, held_out: bool) -> Tuple[str, str]:
    if held_out:
        pairs = sorted(HELD_OUT_PAIRS)
        return pairs[rng.integers(len(pairs))]
    while True:
        c, s = list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
        if (c, s) not in HELD_OUT_PAIRS or split != "train":
            return c, s


def _place(rng, sizes: Sequence[float], constraint=None, tries: int = 200) -> Optional[List[Tuple[float, float]]]:
    """Centres for objects of these radii, apart from each other and inside the frame (None if none found)."""
    for _ in range(tries):
        centres = []
        for r in sizes:
            margin = r + 0.03
            centres.append((rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)))
        ok = all(np.hypot(a[0] - b[0], a[1] - b[1]) > ra + rb + 0.04
                 for i, (a, ra) in enumerate(zip(centres, sizes)) for b, rb in zip(centres[i + 1:], sizes[i + 1:]))
        if ok and (constraint is None or constraint(centres)):
            return centres
    return None


def relation_holds(relation: str, a: Tuple[float, float], b: Tuple[float, float]) -> bool:
    """T2I-CompBench's rule for "A <relation> B" on centres: the relation's axis must dominate the offset."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if relation == "to the left of":
        return dx < 0 and abs(dx) > abs(dy)
    if relation == "to the right of":
        return dx > 0 and abs(dx) > abs(dy)
    if relation == "above":
        return dy < 0 and abs(dy) > abs(dx)
    if relation == "below":
        return dy > 0 and abs(dy) > abs(dx)
    raise ValueError(f"unknown relation {relation!r}; use one of {RELATIONS}")


def make_scene(category: str, index: int, split: str = "train") -> Scene:
    """The scene ``index`` of a category in a split ("train": no held-out combination anywhere; "heldout": the
    prompt's key combination is held out; prompts and layouts are drawn from different streams per split)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; use one of {CATEGORIES}")
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")
    rng = _rng("scene", split, category, index)
    held = split == "heldout"
    for _ in range(100):
        scene = _draw(category, rng, split, held)
        if scene is not None:
            return scene
    raise RuntimeError(f"could not place scene {category}/{index}")


def _draw(category: str, rng, split: str, held: bool) -> Optional[Scene]:
    bg = int(rng.integers(1 << 31))
    if category in ("color", "shape"):
        n = 1 + int(rng.integers(2))
        pairs = [_pick_pair(rng, split, held)]
        while len(pairs) < n:
            c, s = _pick_pair(rng, split, False)
            if c != pairs[0][0] and s != pairs[0][1]:
                pairs.append((c, s))
        order = rng.permutation(n)
        pairs = [pairs[i] for i in order]
        sizes = [rng.uniform(0.14, 0.22) for _ in pairs]
        centres = _place(rng, sizes)
        if centres is None:
            return None
        objects = tuple(WorldObject(c, s, x, y, r) for (c, s), (x, y), r in zip(pairs, centres, sizes))
        return Scene(category, prompt_for(category, pairs), objects, tuple(pairs), background_seed=bg)
    if category == "counting":
        count = 1 + int(rng.integers(4))
        c, s = _pick_pair(rng, split, held)
        sizes = [rng.uniform(0.10, 0.15)] * count
        centres = _place(rng, sizes)
        if centres is None:
            return None
        objects = tuple(WorldObject(c, s, x, y, r) for (x, y), r in zip(centres, sizes))
        return Scene(category, prompt_for(category, [(c, s)], count), objects, ((c, s),), count=count, background_seed=bg)
    # spatial: two objects of different shapes; the triple (shape, relation, shape) is held out or not
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    s1, s2 = rng.choice(len(SHAPES), 2, replace=False)
    s1, s2 = SHAPES[s1], SHAPES[s2]
    triple_held = (s1, relation, s2) in HELD_OUT_RELATIONS
    if triple_held != held:
        return None
    colors = list(COLORS)
    c1, c2 = (colors[i] for i in rng.choice(len(colors), 2, replace=False))
    if split == "train" and ((c1, s1) in HELD_OUT_PAIRS or (c2, s2) in HELD_OUT_PAIRS):
        return None
    sizes = [rng.uniform(0.13, 0.19), rng.uniform(0.13, 0.19)]
    # a clear relation: the relation's axis dominates the offset by a margin
    centres = _place(rng, sizes, lambda cs: relation_holds(relation, cs[0], cs[1])
                     and _dominance(relation, cs[0], cs[1]) > 1.5)
    if centres is None:
        return None
    objects = (WorldObject(c1, s1, *centres[0], sizes[0]), WorldObject(c2, s2, *centres[1], sizes[1]))
    return Scene(category, prompt_for(category, [(c1, s1), (c2, s2)], relation=relation), objects, ((c1, s1), (c2, s2)), relation=relation, background_seed=bg)


def _dominance(relation: str, a, b) -> float:
    dx, dy = abs(a[0] - b[0]), abs(a[1] - b[1])
    return dx / max(dy, 1e-6) if relation in ("to the left of", "to the right of") else dy / max(dx, 1e-6)


def suite(split: str = "heldout", per_category: int = 50, categories: Sequence[str] = CATEGORIES) -> List[Scene]:
    """The first ``per_category`` scenes of each category: the evaluation suite (held out) or training prompts."""
    return [make_scene(c, i, split) for c in categories for i in range(per_category)]


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _background(size: int, seed: int) -> np.ndarray:
    """A desaturated textured background: a soft tone, a gentle gradient, faint stripes and grain."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(120, 200)
    tint = rng.uniform(-8, 8, 3)
    y, x = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, np.pi)
    gradient = 18 * ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle))
    freq = rng.uniform(4, 9)
    stripes = 5 * np.sin(2 * np.pi * freq * (x * np.sin(angle) - y * np.cos(angle)) + rng.uniform(0, 6.3))
    grain = rng.normal(0, 3, (size, size))
    lum = base + gradient + stripes + grain
    img = lum[..., None] + tint[None, None, :]
    return img


def _polygon_mask(px, py, vertices) -> np.ndarray:
    """Inside test for a convex or star polygon by the even-odd rule."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        x1, y1 = vertices[i]
        x2, y2 = vertices[(i + 1) % n]
        crosses = ((y1 > py) != (y2 > py)) & (px < (x2 - x1) * (py - y1) / (y2 - y1 + 1e-12) + x1)
        inside ^= crosses
    return inside


def shape_vertices(shape: str, cx: float, cy: float, r: float) -> Optional[List[Tuple[float, float]]]:
    if shape == "square":
        h = r / np.sqrt(2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # pointing up
        return [(cx + r * np.cos(a), cy - r * np.sin(a)) for a in np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    if shape == "star":  # five points, inner radius 0.45
        pts = []
        for k in range(10):
            a = np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * np.cos(a), cy - rr * np.sin(a)))
        return pts
    return None


def object_mask(obj: WorldObject, size: int, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one object on a size x size grid (sampled only inside its box)."""
    x0, x1 = (max(0, int((obj.cx - obj.size) * size) - 1), min(size, int((obj.cx + obj.size) * size) + 2))
    y0, y1 = (max(0, int((obj.cy - obj.size) * size) - 1), min(size, int((obj.cy + obj.size) * size) + 2))
    sub_y, sub_x = np.mgrid[0:(y1 - y0) * supersample, 0:(x1 - x0) * supersample] + 0.5
    py, px = sub_y / (size * supersample) + y0 / size, sub_x / (size * supersample) + x0 / size
    r = obj.size
    if obj.shape == "circle":
        inside = (px - obj.cx) ** 2 + (py - obj.cy) ** 2 <= (r * 0.9) ** 2
    else:
        inside = _polygon_mask(px, py, shape_vertices(obj.shape, obj.cx, obj.cy, r))
    cover = np.zeros((size, size))
    cover[y0:y1, x0:x1] = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))
    return cover


def render(scene: Scene, size: int = 128) -> np.ndarray:
    """The scene as an RGB uint8 array of shape (size, size, 3)."""
    img = _background(size, scene.background_seed)
    rng = np.random.default_rng(scene.background_seed + 1)
    for obj in scene.objects:
        cover = object_mask(obj, size)[..., None]
        shade = np.array(COLORS[obj.color], dtype=np.float64) * rng.uniform(0.93, 1.05)
        img = img * (1 - cover) + shade[None, None, :] * cover
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
