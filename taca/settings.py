"""The TACA Patch Model's settings: the one type, its defaults and ranges, and where a model keeps it.

The node's inputs, the APPLY_MODEL wrapper, the TACA LoRA gate and the run report all use
``TacaSettings``; the node's schema takes its defaults and ranges from here (and the frontend reads
them from the node definition).  Importing this module does not import ComfyUI.
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

MODES: Tuple[str, ...] = ("exact", "selective", "flex")
DEFAULT_MODE = "exact"
DEFAULT_GAMMA = 1.2  # the paper's gamma_0
GAMMA_MIN = 0.1
GAMMA_MAX = 3.0
GAMMA_OFF = 1.0  # every logit unchanged: TACA does nothing
DEFAULT_THRESHOLD_SIGMA = 0.97  # the paper's t_thresh = 970
THRESHOLD_SIGMA_MIN = 0.0
THRESHOLD_SIGMA_MAX = 1.0

# transformer_options[OPTIONS_KEY] holds the TacaSettings of the TACA Patch Model on a model, for nodes
# that follow TACA (the LoRA gate), whichever node came first.
OPTIONS_KEY = "taca"


def _in_range(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high


def validate_settings(gamma: float, threshold_sigma: float, mode: str) -> None:
    """Raise ValueError naming the bad value and the accepted range."""
    if not _in_range(gamma, GAMMA_MIN, GAMMA_MAX):
        raise ValueError(
            f"TACA: gamma={gamma!r} is out of range; use a value in [{GAMMA_MIN}, {GAMMA_MAX}] "
            f"(the paper uses 1.15-1.25, default {DEFAULT_GAMMA}; {GAMMA_OFF} disables TACA)."
        )
    if not _in_range(threshold_sigma, THRESHOLD_SIGMA_MIN, THRESHOLD_SIGMA_MAX):
        raise ValueError(
            f"TACA: threshold_sigma={threshold_sigma!r} is out of range; use a sigma in "
            f"[{THRESHOLD_SIGMA_MIN:g}, {THRESHOLD_SIGMA_MAX:g}] "
            f"(default {DEFAULT_THRESHOLD_SIGMA}, i.e. t_thresh = {DEFAULT_THRESHOLD_SIGMA * 1000:g} in the paper)."
        )
    if mode not in MODES:
        raise ValueError(f"TACA: unknown mode {mode!r}; choose one of {', '.join(MODES)}.")


class TacaSettings(NamedTuple):
    gamma: float = DEFAULT_GAMMA
    threshold_sigma: float = DEFAULT_THRESHOLD_SIGMA
    mode: str = DEFAULT_MODE

    @classmethod
    def from_inputs(cls, gamma: float, threshold_sigma: float, mode: str) -> "TacaSettings":
        """The settings of the node's inputs, validated (ValueError naming the bad one)."""
        validate_settings(gamma, threshold_sigma, mode)
        return cls(float(gamma), float(threshold_sigma), mode)

    @property
    def enabled(self) -> bool:
        return self.gamma != GAMMA_OFF

    def active_at(self, position: float) -> bool:
        """Paper eq. 11: gamma_0 while t >= t_thresh, else 1.

        ``position`` is t / 1000: the sigma on flow models, the model's timestep over its training steps on
        discrete-time ones (``taca.patch.schedule_position``); the threshold is on the same scale.
        """
        return self.enabled and position >= self.threshold_sigma


def store(transformer_options: Dict[str, Any], settings: TacaSettings) -> None:
    """Leave ``settings`` on a model's transformer_options (replacing an earlier TACA patch's)."""
    transformer_options[OPTIONS_KEY] = settings


def stored(transformer_options: Dict[str, Any]) -> Optional[TacaSettings]:
    """The settings a TACA Patch Model left on this model, or None."""
    settings = transformer_options.get(OPTIONS_KEY)
    return settings if isinstance(settings, TacaSettings) else None
