"""Means and paired differences with 95% intervals, by a bootstrap over prompts.

Samples of one prompt (several seeds) are not independent, so the bootstrap resamples prompts (clusters) and
keeps each prompt's seeds together; a difference is taken within each (prompt, seed) pair first.
"""

from __future__ import annotations

from typing import Dict, Hashable, List, NamedTuple, Sequence, Tuple

import numpy as np

REPS = 2000


class Estimate(NamedTuple):
    mean: float
    low: float
    high: float
    n: int  # samples (prompt x seed pairs)

    def text(self, digits: int = 3, signed: bool = False) -> str:
        fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
        return f"{fmt.format(self.mean)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def _clusters(values: Dict[Tuple[Hashable, Hashable], float]) -> List[np.ndarray]:
    by_prompt: Dict[Hashable, List[float]] = {}
    for (prompt, _seed), value in sorted(values.items(), key=lambda kv: str(kv[0])):
        by_prompt.setdefault(prompt, []).append(value)
    return [np.asarray(v, dtype=np.float64) for v in by_prompt.values()]


def cluster_mean(values: Dict[Tuple[Hashable, Hashable], float], reps: int = REPS, seed: int = 0) -> Estimate:
    """Mean of ``{(prompt, seed): value}`` with a 95% percentile interval from resampling prompts."""
    clusters = _clusters(values)
    if not clusters:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    sums = np.array([c.sum() for c in clusters])
    counts = np.array([len(c) for c in clusters])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(clusters), (reps, len(clusters)))
    boot = sums[picks].sum(1) / counts[picks].sum(1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Estimate(float(sums.sum() / counts.sum()), float(low), float(high), int(counts.sum()))


def paired_difference(treated: Dict[Tuple[Hashable, Hashable], float],
                      baseline: Dict[Tuple[Hashable, Hashable], float], reps: int = REPS, seed: int = 0) -> Estimate:
    """Mean of treated - baseline over the (prompt, seed) pairs both have, with its 95% interval."""
    keys = sorted(set(treated) & set(baseline), key=str)
    return cluster_mean({k: treated[k] - baseline[k] for k in keys}, reps, seed)


def summarize(rows: Sequence[dict], key: str = "score") -> Dict[Tuple[Hashable, Hashable], float]:
    """``{(prompt, seed): row[key]}`` of result rows."""
    return {(r["prompt"], r["seed"]): float(r[key]) for r in rows}
