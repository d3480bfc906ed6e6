"""A checker for images of the world (``taca_eval.world``) that uses no model: it finds the shapes by colour
and reads each one's colour and shape, then scores a scene's prompt as T2I-CompBench scores its categories.

Detection. Objects are saturated and the background is not, so a pixel is object when its chroma
(max - min channel) stands 45 levels above the image's lower-quartile chroma; connected parts (holes filled) under
0.4 % of the image are dropped as stray blobs. Each part gets a soft coverage map (0 at the background's
chroma, 1 at the part's own), which puts its outline at the half-coverage contour whether the image is sharp
or blurred. From it:

- colour: the palette colour nearest in hue to the median colour of the part's fully covered pixels;
- shape: the outline's radius as a function of angle around the coverage centroid (coverage summed along
  90 rays, so it is sub-pixel), whose Fourier harmonics 3, 4 and 5 measure triangle, square and star
  symmetry. Each is divided by its value on a sharp render (the "strength"); the strongest names the shape
  if it reaches ``POLYGON_MIN``, else the part is a circle. This is scale- and rotation-invariant, and blur
  only weakens the harmonics (a 2 px blur at 128 px keeps over half of each);
- centre and area: coverage-weighted centroid and coverage sum, as fractions of the image.

Scoring, per prompt, in [0, 1]:

- color: each (colour, shape) phrase takes a distinct detection of its shape (one of its colour first, as a
  VQA question "a red star?" would find it), else the unmatched detection most like that shape, else none;
  it scores 1 if that detection has the phrase's colour. The prompt's score is the product over phrases
  (BLIP-VQA's per-phrase answers multiplied).
- shape: the same with colour and shape swapped: matched by colour (else nearest hue), scored on shape.
- counting: 1 if the number of detections of the prompt's shape equals the count (GenEval counts the class).
- spatial: each phrase's object is the largest detection of its shape (UniDet finds the noun); 0 if either is
  missing, else 1 if ``world.relation_holds`` holds for their centres.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from . import world

CHROMA_ABOVE_BACKGROUND = 45.0  # objects' chroma is 135+, the background's mostly under 20
MIN_AREA = 0.004  # the smallest object (a counting star or triangle) covers about 1.3 % of the image
POLYGON_MIN = 0.3  # strength at which a polygon's symmetry is seen; circles stay under 0.03
RAYS = 90
# Harmonic of the radius-vs-angle profile for each polygon, and its amplitude (relative to the mean radius)
# on a sharp render.
HARMONICS = {"triangle": (3, 0.271), "square": (4, 0.138), "star": (5, 0.311)}

Image = np.ndarray
Transform = Callable[[Image], Image]


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    cx: float  # coverage centroid, as a fraction of the image width (0 left, 1 right)
    cy: float  # as a fraction of the image height (0 top, 1 bottom)
    area: float  # coverage, as a fraction of the image
    hue: float  # degrees, of the median fully covered pixel
    # how strongly the outline shows each polygon's symmetry (1 = as on a sharp render)
    strength: Dict[str, float] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def centre(self) -> Tuple[float, float]:
        return self.cx, self.cy


def _hue(rgb: Sequence[float]) -> float:
    return 360.0 * colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=np.float64) / 255.0))[0]


PALETTE_HUES = {name: _hue(rgb) for name, rgb in world.COLORS.items()}


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def nearest_color(hue: float) -> str:
    return min(PALETTE_HUES, key=lambda name: _hue_distance(hue, PALETTE_HUES[name]))


# ---------------------------------------------------------------------------------------------------------------
# Detection


def _chroma(rgb: np.ndarray) -> np.ndarray:
    return rgb.max(axis=-1) - rgb.min(axis=-1)


def _margin(height: int, width: int) -> int:
    """How far past a part's threshold its blurred edge may reach, in pixels."""
    return max(2, round(0.015 * max(height, width)))


def _coverage(chroma: np.ndarray, part: np.ndarray, others: np.ndarray, background: float,
              margin: int) -> np.ndarray:
    """Soft coverage of one part: 0 at the background's chroma, 1 at the part's own, kept to the part and a
    margin around it (blurred edges), away from other parts."""
    full = np.percentile(chroma[part], 75)
    region = ndimage.binary_dilation(part, iterations=margin) & ~others
    return np.clip((chroma - background) / max(full - background, 1.0), 0.0, 1.0) * region


def _radial_profile(coverage: np.ndarray, cy: float, cx: float) -> np.ndarray:
    """Radius per angle: coverage summed along rays from the centroid."""
    yy, xx = np.nonzero(coverage)
    reach = np.hypot(yy - cy, xx - cx).max() + 1.0
    angles = np.linspace(0.0, 2 * np.pi, RAYS, endpoint=False)
    steps = np.arange(0.0, reach, 0.5)
    ys = cy + np.sin(angles)[:, None] * steps
    xs = cx + np.cos(angles)[:, None] * steps
    return ndimage.map_coordinates(coverage, [ys, xs], order=1, mode="constant").sum(axis=1) * 0.5


def _strengths(profile: np.ndarray) -> Dict[str, float]:
    spectrum = np.abs(np.fft.rfft(profile))
    amplitude = 2.0 * spectrum / max(spectrum[0], 1e-9)  # a cosine's amplitude relative to the mean radius
    return {shape: float(amplitude[k] / sharp) for shape, (k, sharp) in HARMONICS.items()}


def _shape(strength: Dict[str, float]) -> str:
    best = max(strength, key=strength.get)
    return best if strength[best] >= POLYGON_MIN else "circle"


def _core_color(rgb: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Median colour of the fully covered pixels (the edges mix with the background)."""
    core = coverage >= 0.9
    if core.sum() < 5:
        core = coverage >= 0.5
    return np.median(rgb[core], axis=0)


def _measure(rgb: np.ndarray, chroma: np.ndarray, labels: np.ndarray, index: int, box, background: float
             ) -> Detection:
    height, width = chroma.shape
    margin = _margin(height, width)
    pad = margin + 2  # the crop holds the margin and a ring of zero coverage for the rays' interpolation
    ys = slice(max(box[0].start - pad, 0), min(box[0].stop + pad, height))
    xs = slice(max(box[1].start - pad, 0), min(box[1].stop + pad, width))
    part = labels[ys, xs] == index
    others = (labels[ys, xs] != 0) & ~part
    coverage = _coverage(chroma[ys, xs], part, others, background, margin)
    yy, xx = np.mgrid[ys, xs]
    total = coverage.sum()
    cy, cx = (coverage * yy).sum() / total, (coverage * xx).sum() / total
    strength = _strengths(_radial_profile(coverage, cy - ys.start, cx - xs.start))
    hue = _hue(_core_color(rgb[ys, xs], coverage))
    return Detection(color=nearest_color(hue), shape=_shape(strength), cx=(cx + 0.5) / width,
                     cy=(cy + 0.5) / height, area=total / (height * width), hue=hue, strength=strength)


def detect(image: Image) -> List[Detection]:
    """The objects in an RGB image (uint8, any size), largest first."""
    rgb = np.asarray(image)[..., :3].astype(np.float64)
    chroma = _chroma(rgb)
    # the background's chroma from the lower quartile: objects may cover up to three quarters of the image
    mask = ndimage.binary_fill_holes(chroma > np.percentile(chroma, 25) + CHROMA_ABOVE_BACKGROUND)
    labels, _ = ndimage.label(mask)
    # the background's level: a high percentile of the unmasked chroma, so its grain reads as zero coverage
    background = float(np.percentile(chroma[~mask], 90)) if (~mask).any() else 0.0
    min_pixels = MIN_AREA * mask.size
    found = [_measure(rgb, chroma, labels, i + 1, box, background)
             for i, box in enumerate(ndimage.find_objects(labels))
             if box is not None and (labels[box] == i + 1).sum() >= min_pixels]
    return sorted(found, key=lambda d: -d.area)


def _where(d: Detection) -> str:
    vertical = "top" if d.cy < 0.4 else "bottom" if d.cy > 0.6 else ""
    horizontal = "left" if d.cx < 0.4 else "right" if d.cx > 0.6 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


def describe(detections: Sequence[Detection]) -> str:
    """What the checker saw, left to right: "red circle (top left), blue star (right)"."""
    if not detections:
        return "nothing"
    return ", ".join(f"{d.color} {d.shape} ({_where(d)})" for d in sorted(detections, key=lambda d: d.cx))


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def _likeness(d: Detection, key: str, value: str) -> float:
    """How close a detection is to a colour or shape (higher is closer), for the fallback match."""
    if key == "color":
        return -_hue_distance(d.hue, PALETTE_HUES[value])
    if value == "circle":
        return -max(d.strength.values())
    return d.strength[value]


def _match(phrases: Sequence[Tuple[str, str]], detections: Sequence[Detection], key: str
           ) -> List[Optional[Detection]]:
    """A distinct detection per (colour, shape) phrase, found by ``key`` ("color" or "shape"): one that has
    both attributes, else one with the key's, else the unmatched one most like it, else None."""
    wanted = [{"color": c, "shape": s} for c, s in phrases]
    matched: List[Optional[Detection]] = [None] * len(wanted)
    free = list(detections)  # largest first, so ties go to the largest

    def take(i: int, d: Detection) -> None:
        matched[i] = d
        free.remove(d)

    for attributes in (("color", "shape"), (key,)):
        for i, w in enumerate(wanted):
            if matched[i] is None:
                d = next((d for d in free if all(getattr(d, a) == w[a] for a in attributes)), None)
                if d is not None:
                    take(i, d)
    for i, w in enumerate(wanted):
        if matched[i] is None and free:
            take(i, max(free, key=lambda d: _likeness(d, key, w[key])))
    return matched


def _binding(scene: world.Scene, detections: Sequence[Detection], key: str) -> float:
    """1 if every phrase's matched detection has the phrase's other attribute (a product of 0/1 answers)."""
    checked = "shape" if key == "color" else "color"
    matches = _match(scene.phrases, detections, key)
    return float(all(d is not None and getattr(d, checked) == {"color": c, "shape": s}[checked]
                     for (c, s), d in zip(scene.phrases, matches)))


def _counting(scene: world.Scene, detections: Sequence[Detection]) -> float:
    shape = scene.phrases[0][1]
    return float(sum(d.shape == shape for d in detections) == scene.count)


def _spatial(scene: world.Scene, detections: Sequence[Detection]) -> float:
    free = list(detections)
    found = []
    for _, shape in scene.phrases:
        d = next((d for d in free if d.shape == shape), None)  # the largest of that shape
        if d is None:
            return 0.0
        free.remove(d)
        found.append(d)
    return float(world.relation_holds(scene.relation, found[0].centre, found[1].centre))


def score_detections(scene: world.Scene, detections: Sequence[Detection]) -> float:
    """The scene's prompt scored on what was detected (see the module docstring)."""
    if scene.category == "color":
        return _binding(scene, detections, key="shape")  # the noun finds the object, the colour is checked
    if scene.category == "shape":
        return _binding(scene, detections, key="color")
    if scene.category == "counting":
        return _counting(scene, detections)
    if scene.category == "spatial":
        return _spatial(scene, detections)
    raise ValueError(f"unknown category {scene.category!r}; use one of {world.CATEGORIES}")


def score(scene: world.Scene, image: Image) -> float:
    """The scene's prompt scored on an image, in [0, 1]."""
    return score_detections(scene, detect(image))


def score_all(scene: world.Scene, image: Image) -> dict:
    """The score with what it rests on: the category, the detections and a short text of them."""
    detections = detect(image)
    return {"category": scene.category, "score": score_detections(scene, detections),
            "detections": detections, "seen": describe(detections)}


# ---------------------------------------------------------------------------------------------------------------
# Validation on renders


REVERSED = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}


def _other(options: Sequence[str], current: str, variant: int) -> str:
    """Another option than ``current``, which one chosen by ``variant``."""
    rest = [o for o in options if o != current]
    return rest[variant % len(rest)]


def mislabel(scene: world.Scene, variant: int = 0) -> world.Scene:
    """The scene with one label made wrong for its category: a phrase's colour (color) or shape (shape)
    swapped, the count off by one, or the relation reversed. ``variant`` picks which phrase and value."""
    phrases = list(scene.phrases)
    i = variant % len(phrases)
    color, shape = phrases[i]
    if scene.category == "color":
        phrases[i] = (_other(list(world.COLORS), color, variant), shape)
        wrong = dataclasses.replace(scene, phrases=tuple(phrases))
    elif scene.category == "shape":
        phrases[i] = (color, _other(world.SHAPES, shape, variant))
        wrong = dataclasses.replace(scene, phrases=tuple(phrases))
    elif scene.category == "counting":
        up = scene.count == 1 or (scene.count < len(world.NUMBERS) and variant % 2 == 0)
        wrong = dataclasses.replace(scene, count=scene.count + (1 if up else -1))
    else:
        wrong = dataclasses.replace(scene, relation=REVERSED[scene.relation])
    return dataclasses.replace(wrong, prompt=world.prompt_for(wrong.category, wrong.phrases, wrong.count,
                                                              wrong.relation))


def blur(sigma: float) -> Transform:
    """A Gaussian blur of ``sigma`` pixels, a stand-in for a VAE round trip."""
    def apply(image: Image) -> Image:
        smooth = ndimage.gaussian_filter(np.asarray(image, dtype=np.float64), (sigma, sigma, 0))
        return np.clip(np.rint(smooth), 0, 255).astype(np.uint8)
    return apply


def validation_scenes(category: str, n: int) -> List[world.Scene]:
    """``n`` scenes of a category, alternately held-out and train."""
    return [world.make_scene(category, i // 2, ("heldout", "train")[i % 2]) for i in range(n)]


def validate(n_per_category: int = 50, size: int = 128, transform: Optional[Transform] = None) -> dict:
    """Per category: the fraction of renders whose own prompt scores 1 (``correct``), the fraction whose
    mislabelled prompt scores 0 (``rejected``), and the prompts that failed either."""
    results = {}
    for category in world.CATEGORIES:
        correct = rejected = 0
        failures = []
        for i, scene in enumerate(validation_scenes(category, n_per_category)):
            image = world.render(scene, size)
            detections = detect(transform(image) if transform else image)
            wrong = mislabel(scene, i)
            own_ok = score_detections(scene, detections) == 1.0
            wrong_ok = score_detections(wrong, detections) == 0.0
            correct += own_ok
            rejected += wrong_ok
            if not (own_ok and wrong_ok):
                failures.append(f"{scene.prompt!r} (wrong: {wrong.prompt!r}) saw: {describe(detections)}")
        results[category] = {"correct": correct / n_per_category, "rejected": rejected / n_per_category,
                             "failures": failures}
    return results


def _table(results: dict) -> str:
    lines = [f"{'category':<10} {'own prompt = 1':>15} {'wrong prompt = 0':>17}"]
    for category, r in results.items():
        lines.append(f"{category:<10} {r['correct']:>15.3f} {r['rejected']:>17.3f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="How well the checker reads renders of the world.")
    parser.add_argument("--n", type=int, default=50, help="scenes per category (half held-out, half train)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--blur", type=float, default=0.0, help="Gaussian blur sigma in pixels")
    args = parser.parse_args(argv)
    results = validate(args.n, args.size, blur(args.blur) if args.blur > 0 else None)
    print(f"size {args.size} px, blur {args.blur:g} px, {args.n} scenes per category")
    print(_table(results))
    for category, r in results.items():
        for failure in r["failures"]:
            print(f"  {category}: {failure}")


if __name__ == "__main__":
    main()
