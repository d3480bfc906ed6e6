"""The TACA Attention Probe on a ComfyUI ModelPatcher clone: what each joint attention call gives the text.

For each model call it records, per joint text+image attention call in call order, the image-to-text share
(``taca.probe``) at gamma 1 and at the gamma TACA uses on that call, per batch entry; for the first recorded
model call also the share of every image token, averaged over heads, joint calls and batch entries, as a map.
It never changes a tensor the model computes with, so the sampled output is bit for bit what it is without it.

Hooks, all holding the node's one ``ProbeRecorder`` (``ModelPatcher.clone`` copies wrapper lists as the same
objects, while ComfyUI 0.3.75 deep-copies ``model_options``, so the recorder lives in the wrappers):

* an OUTER_SAMPLE wrapper that starts a new run (the recorder keeps the last run);
* an APPLY_MODEL wrapper that decides per model call whether to record and hands the recorder on:
  - a TACA Patch Model on the same model acting on this call, its wrapper outside this one: the
    ``TacaAttentionOverride`` is already in ``transformer_options``; it is given the recorder;
  - TACA acting, its wrapper inside this one: the recorder goes in ``transformer_options[PROBE_KEY]``, where
    TACA's wrapper reads it;
  - TACA not acting (or absent): a ``ProbeAttentionOverride`` wraps whatever override was there and measures
    the joint calls with gamma 1, handing every call on with the very same arguments.
  TACA's override tells the recorder of each joint call with its gamma (``taca.patch``).

Importing this module does not import ComfyUI.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import patch as taca_patch
from . import settings as taca_settings
from .attention import JointLayout
from .families import ModelFamily
from .probe import probe_rows
from .settings import TacaSettings

WRAPPER_KEY = "comfyui-taca-probe"
RECORD = ("taca_steps", "all_steps")
DEFAULT_MAX_ROWS = 1024
MAX_ROWS_LIMIT = 1 << 20
# Patch sizes a latent's token grid is tried with, smallest first (HiDream-O1 cuts pixels in 32 x 32 patches).
GRID_PATCHES = (1, 2, 4, 8, 16, 32)


class CallRecord(NamedTuple):
    """One joint attention call: its index in the model call, its gamma and (2, B) shares [plain, TACA]."""

    index: int
    gamma: float
    shares: torch.Tensor  # float64, on the model's device until the report reads it


class StepRecord(NamedTuple):
    sigma: float
    calls: List[List[CallRecord]]  # per joint call index, one record per model call at this sigma


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


class ProbeRecorder:
    """What one TACA Attention Probe node measured in the last sampling run."""

    def __init__(self, record: str = "taca_steps", max_rows: int = DEFAULT_MAX_ROWS, node_id: Optional[str] = None):
        if record not in RECORD:
            raise ValueError(f"TACA Attention Probe: unknown record {record!r}; choose one of {', '.join(RECORD)}.")
        if not 1 <= int(max_rows) <= MAX_ROWS_LIMIT:
            raise ValueError(f"TACA Attention Probe: max_rows={max_rows!r} is out of range; use 1 to {MAX_ROWS_LIMIT} "
                             f"image query rows per attention call (default {DEFAULT_MAX_ROWS}).")
        self.record = record
        self.max_rows = int(max_rows)
        self.node_id = node_id
        self.runs = 0
        self.reset()

    def reset(self) -> None:
        """A new sampling run: the measurements of the last one are dropped."""
        self.steps: List[StepRecord] = []
        self.model_calls = 0
        self._calls: Optional[List[CallRecord]] = None  # the model call being recorded
        self._sigma = 0.0
        self._latent_shape: Tuple[int, ...] = ()
        self._map: Optional[List[torch.Tensor]] = None  # per joint call of the first model call: (2, visual rows)
        self.heatmap: Optional[Dict[str, Any]] = None  # of the first recorded model call, once it is over

    # ---------------------------------------------------------------- one model call
    def begin(self, sigma: float, latent_shape: Sequence[int]) -> None:
        self._calls = []
        self._sigma = sigma
        self._latent_shape = tuple(int(s) for s in latent_shape)
        self._map = [] if self.heatmap is None else None

    def joint_call(self, call: Any, gamma: float) -> None:
        """One joint attention call (a ``taca.patch.JointCall``) of the model call being recorded, TACA's gamma on it."""
        if self._calls is None:
            return  # a call outside a recorded model call (the override outlived it)
        gammas = [taca_settings.GAMMA_OFF, float(gamma)]
        if self._map is None:
            probe = call.share_probe(self.max_rows)
        else:
            # The first model call measures every row once, for the map; the means read the same subset of it
            # as every other call's.
            probe = call.share_probe(None)
            self._map.append(torch.stack([probe.row_shares(g).mean(dim=0) for g in gammas]))
            probe = probe.subset(probe_rows(probe.rows.numel(), self.max_rows).to(probe.rows.device))
        self._calls.append(CallRecord(len(self._calls), float(gamma), probe.mean_share(gammas).detach()))

    def end(self, completed: bool) -> None:
        """The model call is over; ``completed`` False (it raised): what it recorded is dropped."""
        calls, self._calls = self._calls, None
        if not completed or calls is None:
            self._map = None
            return
        self.model_calls += 1
        if self.steps and self.steps[-1].sigma == self._sigma:
            step = self.steps[-1]  # cond and uncond in separate model calls: one step, their batch entries together
        else:
            step = StepRecord(self._sigma, [])
            self.steps.append(step)
        for record in calls:
            if record.index == len(step.calls):
                step.calls.append([])
            if record.index < len(step.calls):
                step.calls[record.index].append(record)
        if self._map:
            self._finish_map(self._map)
        self._map = None

    def _finish_map(self, per_call: List[torch.Tensor]) -> None:
        n_visual = per_call[0].shape[-1]
        same = [m for m in per_call if m.shape[-1] == n_visual]  # joint calls of another layout are left out
        mean = torch.stack(same).mean(dim=0).cpu()  # (2, visual rows): plain, TACA
        height, width, tokens = token_grid(self._latent_shape, n_visual)
        grids = mean[:, :tokens].reshape(2, -1, height, width).mean(dim=1)
        self.heatmap = {"height": height, "width": width, "sigma": self._sigma,
                        "values": grids[1].flatten().tolist(), "values_plain": grids[0].flatten().tolist(),
                        "visual_tokens": n_visual, "joint_calls": len(same)}

    # ---------------------------------------------------------------- what the report reads
    def as_json(self) -> Dict[str, Any]:
        """The measurements: ``{"version": 1, "steps": [...], "heatmap": {...}}`` (see the report node)."""
        steps = []
        for step in self.steps:
            calls = []
            for records in step.calls:
                shares = torch.cat([r.shares for r in records], dim=1).cpu()
                calls.append({"index": records[0].index, "gamma": records[0].gamma,
                              "share_plain": shares[0].tolist(), "share_taca": shares[1].tolist()})
            steps.append({"sigma": step.sigma, "calls": calls})
        heatmap = self.heatmap or {"height": 0, "width": 0, "values": []}
        return {"version": 1, "record": self.record, "max_rows": self.max_rows, "model_calls": self.model_calls,
                "steps": steps, "heatmap": heatmap}


class ProbeAttentionOverride:
    """``optimized_attention_override`` of a recorded model call where TACA does not act: measures, changes nothing.

    Like ``taca.patch.passthrough_attention`` it has no ``container_function``, so ComfyUI 0.33's ``wrap_attn``
    hands it plain tensors; each call goes on to the override that was there (or the kernel) with the very same
    arguments.
    """

    def __init__(self, spans: Sequence[JointLayout], previous: Optional[Callable], recorder: ProbeRecorder):
        self.spans = {span.length: span for span in spans if span.text_tokens > 0 and span.length > span.text_tokens}
        self.previous = previous
        self.recorder = recorder

    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        call = taca_patch.parse_joint_call(args, kwargs, self.spans)
        if call is not None:
            self.recorder.joint_call(call, taca_settings.GAMMA_OFF)
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)


def recording_window(transformer_options: Dict[str, Any]) -> Tuple[Optional[TacaSettings], TacaSettings]:
    """(the TACA settings on this model or None, the window ``taca_steps`` records: theirs, else the default)."""
    settings = taca_settings.stored(transformer_options)
    window = settings if settings is not None and settings.enabled else taca_settings.DEFAULT_SCHEDULE
    return settings, window


class ProbeApplyModelWrapper:
    """APPLY_MODEL wrapper: per model call, whether to record, and how the recorder reaches the joint calls."""

    def __init__(self, recorder: ProbeRecorder, family: ModelFamily):
        self.recorder = recorder
        self.family = family

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        options = dict(transformer_options or {})
        base_model = executor.class_obj
        sigma, position = taca_patch.current_sigma(t, options, base_model.model_sampling)
        settings, window = recording_window(options)
        taca_gamma = settings.gamma_at(position) if settings is not None else taca_settings.GAMMA_OFF
        record = self.recorder.record == "all_steps" or window.gamma_at(position) != taca_settings.GAMMA_OFF
        if not record:
            # The keys of a recorded call are here too, so torch.compile's guards hold (see taca.patch).
            options[taca_patch.PROBE_KEY] = None
            options.setdefault(taca_patch.OVERRIDE_KEY, taca_patch.passthrough_attention)
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

        options[taca_patch.PROBE_KEY] = self.recorder
        current = options.get(taca_patch.OVERRIDE_KEY)
        if isinstance(current, taca_patch.TacaAttentionOverride):
            current.recorder = self.recorder  # TACA's wrapper ran first; its override reports each joint call
        elif taca_gamma == taca_settings.GAMMA_OFF:
            spans = self.family.layouts(base_model.diffusion_model, x, c_crossattn, kwargs)
            options[taca_patch.OVERRIDE_KEY] = ProbeAttentionOverride(spans, current, self.recorder)
        # else TACA's wrapper runs inside this one, acts, and reads the recorder from PROBE_KEY.
        self.recorder.begin(sigma, _shape(x))
        completed = False
        try:
            out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
            completed = True
        finally:
            self.recorder.end(completed)
        return out


def _shape(x: Any) -> Tuple[int, ...]:
    try:
        return tuple(int(s) for s in x.shape)
    except (AttributeError, TypeError, RuntimeError):  # a nested latent (video + audio) has no single shape
        return ()


class ProbeSampleWrapper:
    """OUTER_SAMPLE wrapper: each sampling run starts the recorder afresh."""

    def __init__(self, recorder: ProbeRecorder):
        self.recorder = recorder

    def __call__(self, executor, *args, **kwargs):
        self.recorder.reset()
        self.recorder.runs += 1
        return executor(*args, **kwargs)


def install(model_patcher: Any, recorder: ProbeRecorder, family: ModelFamily) -> None:
    """Put the probe on ``model_patcher`` (a clone the caller owns), replacing an earlier probe."""
    from comfy.patcher_extension import WrappersMP

    model_patcher.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    model_patcher.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    model_patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, ProbeSampleWrapper(recorder))
    model_patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, ProbeApplyModelWrapper(recorder, family))


def recorder_of(model_patcher: Any) -> Optional[ProbeRecorder]:
    """The recorder of the probe on ``model_patcher`` (or a clone of it), or None."""
    from comfy.patcher_extension import WrappersMP

    for wrapper in model_patcher.get_wrappers(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY):
        if isinstance(wrapper, ProbeSampleWrapper):
            return wrapper.recorder
    return None
