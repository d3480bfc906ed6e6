"""What TACA did in one sampling run, model call by model call (``taca.report`` says it in words).

The TACA Patch Model's OUTER_SAMPLE wrapper makes one ``RunRecord`` per sampling run; each model call adds its
outcome when it is over, under a lock, so model calls running at the same time (ComfyUI 0.33's MultiGPU CFG Split
runs cond and uncond in two threads) each add their own.  Everything read from the record is ordered by step, then
by the model call's cond/uncond entries, never by which thread finished first.  Importing this module does not
import ComfyUI.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from .settings import GAMMA_OFF


class StepCounter:
    """Numbers the steps of a run as its model calls arrive: a call at another sigma than the last one starts the
    next step, so the model calls of one step (cond and uncond, maybe in two threads at once) share a number."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: Optional[float] = None
        self._count = -1

    def step(self, sigma: float) -> int:
        with self._lock:
            if sigma != self._last:
                self._last = sigma
                self._count += 1
            return self._count


class ModelCallOutcome(NamedTuple):
    sigma: float
    batch: Tuple[int, ...]  # the call's cond_or_uncond entries (0 cond, 1 uncond), its place within the step
    acted: bool  # TACA's window held for this call
    joint_calls: int = 0
    other_calls: int = 0
    gammas: Tuple[float, ...] = ()  # of its joint calls, in call order (1: a call left alone)


class RunRecord:
    def __init__(self, sample_sigmas: Any = (), position_of: Optional[Callable[[float], float]] = None):
        """A run over ``sample_sigmas``; ``position_of`` maps a sigma to the threshold's scale (t / 1000)."""
        # Kept as given (a tensor, maybe on the GPU) and read only when the run is over: no sync while sampling.
        self._schedule = sample_sigmas
        self._position_of = position_of
        self._lock = threading.Lock()
        self._outcomes: List[Tuple[int, int, ModelCallOutcome]] = []  # (step, arrival, outcome)
        self._steps = StepCounter()

    def add(self, outcome: ModelCallOutcome) -> None:
        """One model call is over (the calls of a step end before the next step's begin)."""
        step = self._steps.step(outcome.sigma)
        with self._lock:
            self._outcomes.append((step, len(self._outcomes), outcome))

    @property
    def outcomes(self) -> List[ModelCallOutcome]:
        """Every model call, by step, then by its cond/uncond entries, then in arrival order."""
        with self._lock:
            ordered = sorted(self._outcomes, key=lambda entry: (entry[0], entry[2].batch, entry[1]))
        return [outcome for _, _, outcome in ordered]

    # ---------------------------------------------------------------- the schedule
    @functools.cached_property
    def sample_sigmas(self) -> List[float]:
        schedule = self._schedule
        return [float(s) for s in (schedule.tolist() if hasattr(schedule, "tolist") else schedule)]

    @functools.cached_property
    def sample_positions(self) -> List[float]:
        """The run's sigmas on the threshold's scale: equal to them on flow models, t / 1000 on discrete-time ones."""
        position_of = self._position_of or (lambda sigma: sigma)
        return [position_of(s) for s in self.sample_sigmas]

    @property
    def discrete_time(self) -> bool:
        return self.sample_positions != self.sample_sigmas

    def step_of(self, sigma: float) -> Optional[int]:
        for i, s in enumerate(self.sample_sigmas[:-1]):
            if abs(s - sigma) <= 1e-6 * max(1.0, abs(s)):
                return i
        return None

    # ---------------------------------------------------------------- what TACA did
    @property
    def model_calls(self) -> int:
        return len(self._outcomes)

    @property
    def acted(self) -> List[ModelCallOutcome]:
        return [o for o in self.outcomes if o.acted]

    @property
    def acted_calls(self) -> int:
        return len(self.acted)

    @property
    def attention_calls(self) -> int:
        return sum(o.joint_calls for o in self.acted)

    @property
    def untouched_attention_calls(self) -> int:
        return sum(o.other_calls for o in self.acted)

    @property
    def acted_sigmas(self) -> List[float]:
        sigmas: List[float] = []
        for o in self.acted:
            if o.joint_calls > 0 and o.sigma not in sigmas:
                sigmas.append(o.sigma)
        return sigmas

    @property
    def acted_steps(self) -> List[int]:
        steps = {self.step_of(sigma) for sigma in self.acted_sigmas}
        return sorted(s for s in steps if s is not None)

    @property
    def joint_calls_per_model_call(self) -> Optional[int]:
        """The most joint attention calls one acting model call made (None: TACA acted in none)."""
        counts = [len(o.gammas) for o in self.acted if o.gammas]
        return max(counts) if counts else None

    @property
    def acted_blocks(self) -> List[int]:
        """The joint call indices (call order, from 0) that got a gamma other than 1 in some model call."""
        return sorted({i for o in self.acted for i, g in enumerate(o.gammas) if g != GAMMA_OFF})

    def blocks_beyond(self, blocks: Sequence[int]) -> List[int]:
        """Those of ``blocks`` this model's model calls did not reach."""
        made = self.joint_calls_per_model_call
        return [] if made is None else [b for b in blocks if b >= made]

    def step_gammas(self) -> List[Dict[str, Any]]:
        """Per acting model call: its step, sigma, every joint call's gamma, and min/mean/max over those TACA
        acted on (all None when it acted on none: blocks beyond the model, an adaptive gamma of 1 everywhere)."""
        out = []
        for o in self.acted:
            gammas = list(o.gammas)
            acted = [g for g in gammas if g != GAMMA_OFF]
            out.append({"step": self.step_of(o.sigma), "sigma": o.sigma, "gammas": gammas,
                        "min": min(acted) if acted else None, "max": max(acted) if acted else None,
                        "mean": sum(acted) / len(acted) if acted else None})
        return out
