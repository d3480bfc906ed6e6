"""The TACA Patch Model's settings: the one type, its defaults and ranges, and where a model keeps it.

The node's inputs, the APPLY_MODEL wrapper, the TACA LoRA gate and the run report all use
``TacaSettings``; the node's schema takes its defaults and ranges from here (and the frontend reads
them from the node definition).  Importing this module does not import ComfyUI.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Iterable, NamedTuple, Optional, Tuple

MODES: Tuple[str, ...] = ("exact", "selective", "flex")
DEFAULT_MODE = "exact"
DEFAULT_GAMMA = 1.2  # the paper's gamma_0
GAMMA_MIN = 0.1
GAMMA_MAX = 3.0
GAMMA_OFF = 1.0  # every logit unchanged: TACA does nothing
DEFAULT_THRESHOLD_SIGMA = 0.97  # the paper's t_thresh = 970
THRESHOLD_SIGMA_MIN = 0.0
THRESHOLD_SIGMA_MAX = 1.0

# The TACA Patch Model (Advanced)'s schedule: a window [sigma_end, sigma_start] (sigma_end is threshold_sigma),
# a ramp of gamma over it, the joint attention calls it acts on, and an adaptive target share.
RAMPS: Tuple[str, ...] = ("constant", "linear", "cosine")
DEFAULT_RAMP = "constant"
DEFAULT_SIGMA_START = 1.0
TARGET_SHARE_OFF = 0.0
TARGET_SHARE_MAX = 0.99
BLOCK_INDEX_MAX = 1023  # far above any model's joint attention calls per model call (FLUX.1: 57)
_BLOCK_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")

# transformer_options[OPTIONS_KEY] holds the TacaSettings of the TACA Patch Model on a model, for nodes
# that follow TACA (the LoRA gate), whichever node came first.
OPTIONS_KEY = "taca"


def _in_range(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high


def _check_range(name: str, value: Any, low: float, high: float, what: str, hint: str, spec: str = "g") -> None:
    """Raise ValueError unless ``low <= value <= high`` (a finite number), naming the input, its value, the
    range (bounds formatted with ``spec``) and a hint: ``TACA: name=value is out of range; use <what> in
    [low, high] (hint).``"""
    if not _in_range(value, low, high):
        raise ValueError(f"TACA: {name}={value!r} is out of range; use {what} in "
                         f"[{low:{spec}}, {high:{spec}}] ({hint}).")


def validate_settings(gamma: float, threshold_sigma: float, mode: str, threshold_name: str = "threshold_sigma") -> None:
    """Raise ValueError naming the bad value and the accepted range (the threshold by the node's name for it)."""
    _check_range("gamma", gamma, GAMMA_MIN, GAMMA_MAX, "a value",
                 f"the paper uses 1.15-1.25, default {DEFAULT_GAMMA}; {GAMMA_OFF} disables TACA", spec="")
    _check_range(threshold_name, threshold_sigma, THRESHOLD_SIGMA_MIN, THRESHOLD_SIGMA_MAX, "a sigma",
                 f"default {DEFAULT_THRESHOLD_SIGMA}, i.e. t_thresh = {DEFAULT_THRESHOLD_SIGMA * 1000:g} in the paper")
    if mode not in MODES:
        raise ValueError(f"TACA: unknown mode {mode!r}; choose one of {', '.join(MODES)}.")


def validate_schedule(sigma_start: Optional[float], sigma_end: float, ramp: str, target_share: float) -> None:
    """Raise ValueError naming the bad schedule value of the Advanced node and the accepted range.

    sigma_end's own range is checked by ``validate_settings``, as the threshold it is.
    """
    if sigma_start is not None:
        _check_range("sigma_start", sigma_start, THRESHOLD_SIGMA_MIN, THRESHOLD_SIGMA_MAX, "a sigma",
                     f"default {DEFAULT_SIGMA_START:g}: from the first step")
        if sigma_end > sigma_start:
            raise ValueError(f"TACA: sigma_end={sigma_end:g} is above sigma_start={sigma_start:g}, so the window "
                             "is empty; TACA acts while sigma_end <= sigma <= sigma_start. Swap them or widen it.")
    if ramp not in RAMPS:
        raise ValueError(f"TACA: unknown ramp {ramp!r}; choose one of {', '.join(RAMPS)}.")
    _check_range("target_share", target_share, TARGET_SHARE_OFF, TARGET_SHARE_MAX, "a share of attention",
                 f"{TARGET_SHARE_OFF:g} turns adaptive gamma off")


def parse_blocks(text: str) -> Tuple[int, ...]:
    """``"0-9,15"`` -> (0, 1, ..., 9, 15): joint attention call indices, sorted; ``""`` -> () (every call)."""
    blocks = set()
    for item in (text or "").split(","):
        if not item.strip():
            continue
        match = _BLOCK_ITEM.match(item)
        if match is None:
            raise ValueError(f"TACA: blocks={text!r}: {item.strip()!r} is not a block index or range; write indices "
                             "of joint attention calls in call order, counted from 0, like \"0-9,15\" (empty: all).")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"TACA: blocks={text!r}: the range {item.strip()!r} runs backwards; write it low-high.")
        if last > BLOCK_INDEX_MAX:
            raise ValueError(f"TACA: blocks={text!r}: {last} is above {BLOCK_INDEX_MAX}; no model makes that many "
                             "joint attention calls (the help page lists each model's count).")
        blocks.update(range(first, last + 1))
    return tuple(sorted(blocks))


def format_blocks(blocks: Iterable[int]) -> str:
    """(0, 1, 2, 5) -> ``"0-2,5"``, the inverse of ``parse_blocks``."""
    runs = []
    for index in sorted(set(blocks)):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


class TacaSettings(NamedTuple):
    """What TACA does.  The last four fields are the Advanced node's; their defaults are the simple node."""

    gamma: float = DEFAULT_GAMMA
    sigma_end: float = DEFAULT_THRESHOLD_SIGMA  # the window's lower end: the simple node's threshold_sigma
    mode: str = DEFAULT_MODE
    sigma_start: Optional[float] = None  # the window's upper end; None: no upper end
    ramp: str = DEFAULT_RAMP
    blocks: Tuple[int, ...] = ()  # joint attention calls of a model call TACA acts on, in call order; (): all
    target_share: float = TARGET_SHARE_OFF  # > 0: adaptive gamma in [1, gamma] per joint call

    @classmethod
    def from_inputs(cls, gamma: float, threshold_sigma: float, mode: str) -> "TacaSettings":
        """The settings of the node's inputs, validated (ValueError naming the bad one)."""
        validate_settings(gamma, threshold_sigma, mode)
        return cls(float(gamma), float(threshold_sigma), mode)

    @classmethod
    def from_advanced_inputs(cls, gamma: float, sigma_start: float, sigma_end: float, ramp: str, blocks: str,
                             target_share: float, mode: str) -> "TacaSettings":
        """The Advanced node's settings, validated (ValueError naming the bad input)."""
        validate_settings(gamma, sigma_end, mode, threshold_name="sigma_end")  # its range before the window's order
        validate_schedule(sigma_start, sigma_end, ramp, target_share)
        return cls(float(gamma), float(sigma_end), mode, float(sigma_start), ramp, parse_blocks(blocks),
                   float(target_share))

    @property
    def adaptive(self) -> bool:
        return self.target_share > TARGET_SHARE_OFF

    @property
    def enabled(self) -> bool:
        return self.gamma != GAMMA_OFF

    def active_at(self, position: float) -> bool:
        """Paper eq. 11: gamma_0 while t >= t_thresh, else 1.

        ``position`` is t / 1000: the sigma on flow models, the model's timestep over its training steps on
        discrete-time ones (``taca.hooks.schedule_position``); the threshold is on the same scale.
        """
        return (self.enabled and position >= self.sigma_end
                and (self.sigma_start is None or position <= self.sigma_start))

    def gamma_at(self, position: float) -> float:
        """The gamma of a model call at ``position`` (scale as in ``active_at``): 1 outside the window.

        ``constant``: gamma over the whole window.  ``linear`` and ``cosine``: gamma at sigma_start falling to
        1 at sigma_end, along a straight line or a half cosine (flat at both ends) in the position.
        """
        if not self.active_at(position):
            return GAMMA_OFF
        if self.ramp == "constant" or self.sigma_start is None or self.sigma_start <= self.sigma_end:
            return self.gamma
        weight = (position - self.sigma_end) / (self.sigma_start - self.sigma_end)
        if self.ramp == "cosine":
            weight = 0.5 - 0.5 * math.cos(math.pi * weight)
        return GAMMA_OFF + (self.gamma - GAMMA_OFF) * weight

    def acts_on_block(self, index: int) -> bool:
        """Whether TACA acts on the joint attention call ``index`` (from 0, in call order) of a model call."""
        return not self.blocks or index in self.blocks


def store(transformer_options: Dict[str, Any], settings: TacaSettings) -> None:
    """Leave ``settings`` on a model's transformer_options (replacing an earlier TACA patch's)."""
    transformer_options[OPTIONS_KEY] = settings


def stored(transformer_options: Dict[str, Any]) -> Optional[TacaSettings]:
    """The settings a TACA Patch Model left on this model, or None."""
    settings = transformer_options.get(OPTIONS_KEY)
    return settings if isinstance(settings, TacaSettings) else None


# TACA's default schedule: the window the LoRA gate and the probe's taca_steps use on a model without TACA.
DEFAULT_SCHEDULE = TacaSettings()
