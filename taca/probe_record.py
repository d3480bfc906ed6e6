"""What the TACA Attention Probe measures in one sampling run: each joint attention call's image-to-text share.

For each recorded model call, per joint text+image attention call in call order, the share (``taca.probe``) at
gamma 1 and at the gamma TACA uses on that call, per batch entry; for the model calls of the first recorded step
also the share of every image token, averaged over heads, joint calls and batch entries, as a map.

The probe node's OUTER_SAMPLE wrapper (``taca.hooks``) makes one ``ProbeRun`` per sampling run.  Each recorded
model call measures into its own ``ProbeCall`` and hands it to the run when it is over, under a lock, so model
calls running at the same time (cond and uncond in two threads) never write the same fields; the run orders
them by step, then by their cond/uncond entries.  Importing this module does not import ComfyUI.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import settings as taca_settings
from .probe import probe_rows
from .run_record import StepCounter
from .settings import TacaSettings

RECORD = ("taca_steps", "all_steps")
DEFAULT_MAX_ROWS = 1024
MAX_ROWS_LIMIT = 1 << 20
# Patch sizes a latent's token grid is tried with, smallest first (HiDream-O1 cuts pixels in 32 x 32 patches).
GRID_PATCHES = (1, 2, 4, 8, 16, 32)


def token_grid(latent_shape: Sequence[int], n_visual: int) -> Tuple[int, int, int]:
    """(height, width, tokens) of the image token grid inside ``n_visual`` visual tokens of a latent.

    The smallest patch p of ``GRID_PATCHES`` whose grid ceil(H/p) x ceil(W/p) fits in ``n_visual``: when it
    divides it, every visual token (several grids: frames, or references of the image's size, averaged); else
    the first that many visual tokens (references and padding follow the image in the supported families'
    joint sequences).  For a latent that is not (B, C, [T,] H, W), one row of all the visual tokens in order.
    """
    if len(latent_shape) >= 4 and n_visual > 0:
        h, w = int(latent_shape[-2]), int(latent_shape[-1])
        for p in GRID_PATCHES:
            gh, gw = math.ceil(h / p), math.ceil(w / p)
            if gh * gw <= n_visual:
                return gh, gw, n_visual if n_visual % (gh * gw) == 0 else gh * gw
    return 1, max(n_visual, 1), n_visual


class ProbeSettings(NamedTuple):
    """The TACA Attention Probe node's inputs."""

    record: str = "taca_steps"
    max_rows: int = DEFAULT_MAX_ROWS

    @classmethod
    def from_inputs(cls, record: str, max_rows: int) -> "ProbeSettings":
        """Validated (ValueError naming the bad input and the fix)."""
        if record not in RECORD:
            raise ValueError(f"TACA Attention Probe: unknown record {record!r}; choose one of {', '.join(RECORD)}.")
        if not 1 <= int(max_rows) <= MAX_ROWS_LIMIT:
            raise ValueError(f"TACA Attention Probe: max_rows={max_rows!r} is out of range; use 1 to {MAX_ROWS_LIMIT} "
                             f"image query rows per attention call (default {DEFAULT_MAX_ROWS}).")
        return cls(record, int(max_rows))

    def records(self, taca: Optional[TacaSettings], position: float) -> bool:
        """Whether the model call at ``position`` is recorded: every one, or those in the window of the TACA on the
        model (without one, or with gamma 1, TACA's default window)."""
        if self.record == "all_steps":
            return True
        window = taca if taca is not None and taca.enabled else taca_settings.DEFAULT_SCHEDULE
        return window.gamma_at(position) != taca_settings.GAMMA_OFF


class CallRecord(NamedTuple):
    """One joint attention call: its index in the model call, its gamma and (2, B) shares [plain, TACA]."""

    index: int
    gamma: float
    shares: torch.Tensor  # float64, on the model's device until the report reads it


class ProbeCall:
    """What one recorded model call measures: its own until the run takes it."""

    def __init__(self, step: int, sigma: float, batch: Tuple[int, ...], latent_shape: Tuple[int, ...],
                 max_rows: int, with_map: bool):
        self.step = step
        self.sigma = sigma
        self.batch = batch  # cond_or_uncond of its batch entries: its place among the step's model calls
        self.latent_shape = latent_shape
        self.max_rows = max_rows
        self.records: List[CallRecord] = []
        self.maps: Optional[List[torch.Tensor]] = [] if with_map else None  # per joint call: (2, visual rows)

    def joint_call(self, call: Any, gamma: float) -> None:
        """One joint attention call (a ``taca.joint_call.JointCall``) of this model call, TACA's gamma on it."""
        gammas = [taca_settings.GAMMA_OFF, float(gamma)]
        if self.maps is None:
            probe = call.share_probe(self.max_rows)
        else:
            # The map measures every row once; the means read the same subset of it as every other call's.
            probe = call.share_probe(None)
            self.maps.append(torch.stack([probe.row_shares(g).mean(dim=0) for g in gammas]))
            probe = probe.subset(probe_rows(probe.rows.numel(), self.max_rows).to(probe.rows.device))
        self.records.append(CallRecord(len(self.records), float(gamma), probe.mean_share(gammas).detach()))


class ProbeRun:
    """What the probe measured in one sampling run."""

    def __init__(self, settings: ProbeSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self._steps = StepCounter()
        self._calls: List[Tuple[int, ProbeCall]] = []  # (arrival, call), completed model calls
        self._map_step: Optional[int] = None  # the first recorded step: its model calls measure the map

    def begin(self, sigma: float, batch: Sequence[int], latent_shape: Sequence[int]) -> ProbeCall:
        """A recorded model call starts."""
        step = self._steps.step(sigma)
        with self._lock:
            if self._map_step is None:
                self._map_step = step
            with_map = step == self._map_step
        return ProbeCall(step, sigma, tuple(int(b) for b in batch), tuple(int(s) for s in latent_shape),
                         self.settings.max_rows, with_map)

    def end(self, call: ProbeCall, completed: bool) -> None:
        """The model call is over; ``completed`` False (it raised): what it measured is dropped."""
        if completed:
            with self._lock:
                self._calls.append((len(self._calls), call))

    @property
    def model_calls(self) -> int:
        return len(self._calls)

    def _ordered(self) -> List[ProbeCall]:
        with self._lock:
            calls = sorted(self._calls, key=lambda entry: (entry[1].step, entry[1].batch, entry[0]))
        return [call for _, call in calls]

    def as_json(self) -> Dict[str, Any]:
        """The measurements: ``{"version": 1, "steps": [...], "heatmap": {...}}`` (see the report node)."""
        ordered = self._ordered()
        steps: List[Dict[str, Any]] = []
        per_index: List[List[CallRecord]] = []
        for position, call in enumerate(ordered):
            if position == 0 or call.step != ordered[position - 1].step:
                per_index = []  # cond and uncond in separate model calls: one step, their batch entries together
                steps.append({"sigma": call.sigma, "calls": per_index})
            for record in call.records:
                if record.index == len(per_index):
                    per_index.append([])
                if record.index < len(per_index):
                    per_index[record.index].append(record)
        for step in steps:
            step["calls"] = [self._call_json(records) for records in step["calls"]]
        maps = [call for call in ordered if call.maps]
        heatmap = self._heatmap(maps) if maps else {"height": 0, "width": 0, "values": []}
        return {"version": 1, "record": self.settings.record, "max_rows": self.settings.max_rows,
                "model_calls": self.model_calls, "steps": steps, "heatmap": heatmap}

    @staticmethod
    def _call_json(records: List[CallRecord]) -> Dict[str, Any]:
        shares = torch.cat([r.shares for r in records], dim=1).cpu()
        return {"index": records[0].index, "gamma": records[0].gamma,
                "share_plain": shares[0].tolist(), "share_taca": shares[1].tolist()}

    @staticmethod
    def _heatmap(calls: List[ProbeCall]) -> Dict[str, Any]:
        """The map of the first recorded step: every joint call of its model calls with the first call's layout."""
        n_visual = calls[0].maps[0].shape[-1]
        same = [m for call in calls for m in call.maps if m.shape[-1] == n_visual]
        mean = torch.stack(same).mean(dim=0).cpu()  # (2, visual rows): plain, TACA
        height, width, tokens = token_grid(calls[0].latent_shape, n_visual)
        grids = mean[:, :tokens].reshape(2, -1, height, width).mean(dim=1)
        return {"height": height, "width": width, "sigma": calls[0].sigma,
                "values": grids[1].flatten().tolist(), "values_plain": grids[0].flatten().tolist(),
                "visual_tokens": n_visual, "joint_calls": len(same)}
