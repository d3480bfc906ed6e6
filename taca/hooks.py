"""The pack's hooks on a ComfyUI ModelPatcher clone: one context per model call, fresh state per sampling run.

* ``ModelCallWrapper`` (APPLY_MODEL, one per model, whichever of the pack's nodes put it there) makes one
  ``CallContext`` per model call: its sigma and position on TACA's time scale (the one host-device
  synchronisation the pack adds per call), the TACA settings on the model and this call's gamma, the joint
  layouts read from the call's inputs, and, when the TACA Attention Probe records this call, the probe's sink.
  It puts the context in the per-call copy of ``transformer_options`` and, when TACA acts or the probe
  records, a ``JointAttentionOverride`` on top of whatever override was there (another pack's Sage or Flash
  patch stays underneath and runs every kernel call).  The TACA LoRA's layers read the context of the call
  under way (``current_call``).
* That override, called by ComfyUI's ``wrap_attn`` for every attention call that receives
  ``transformer_options``, recognises the joint text+image calls (``taca.joint_call``), gives each its gamma
  (the window and ramp at the call's sigma, 1 outside the chosen blocks, adaptive towards a target share),
  tells the probe, and runs TACA's arithmetic (``taca.kernels``); every other call goes through untouched.
* OUTER_SAMPLE wrappers, one per node: the TACA Patch Model's makes the run's ``RunRecord`` and publishes the
  run report when the run ends (``taca.report``); the probe's makes the run's ``ProbeRun`` and keeps it, once
  the run is over, for the Probe Report node.  As ComfyUI's EasyCache does, they put the run's state in a copy
  of the guider's model options for the length of the run, so every model call of that run, in any thread,
  finds it in its ``transformer_options``, and nothing of it outlives the run there.

Where neither TACA acts nor the probe records, a model call gets its original arguments: same kernels, same
bits.  The override key still holds something then (the override that was there, or ``passthrough_attention``),
so ``transformer_options`` has the same keys on every call: torch.compile guards on those keys.

ComfyUI is only touched through the objects it passes in; importing this module does not import ComfyUI.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import kernels
from . import probe as taca_probe
from . import report as taca_report
from . import settings as taca_settings
from .attention import JointLayout
from .families import ModelFamily
from .joint_call import JointCall, layouts_by_length, parse_joint_call
from .probe_record import ProbeCall, ProbeRun, ProbeSettings
from .run_record import ModelCallOutcome, RunRecord
from .settings import TacaSettings

log = logging.getLogger("comfyui-taca")

WRAPPER_KEY = "comfyui-taca"  # the model call wrapper, and the TACA Patch Model's run wrapper
PROBE_WRAPPER_KEY = "comfyui-taca-probe"  # the TACA Attention Probe's run wrapper
OVERRIDE_KEY = "optimized_attention_override"
CONTEXT_KEY = "comfyui-taca.call"  # transformer_options[CONTEXT_KEY]: the model call's CallContext
RUN_KEY = "comfyui-taca.run"  # transformer_options[RUN_KEY]: the sampling run's RunState

_current_call: contextvars.ContextVar[Optional["CallContext"]] = contextvars.ContextVar("comfyui_taca_call",
                                                                                       default=None)


def current_call() -> Optional["CallContext"]:
    """The context of the model call under way in this thread, or None outside the pack's model calls."""
    return _current_call.get()


def schedule_position(model_sampling: Any, sigma: float) -> float:
    """Where ``sigma`` sits on the paper's time scale t / 1000, the scale TACA's window is given on.

    Flow models (sigma in [0, 1], t = 1000 x sigma): sigma itself.  Discrete-time models (a DDPM schedule
    of ``num_timesteps`` training steps: CogVideoX, a v-prediction DDPM whose sigmas run from about 4519
    down to 0.36): t / num_timesteps, t being the timestep ComfyUI's own ``model_sampling`` maps the sigma
    to, so 0.97 means t >= 970, the first steps only, as in the paper.
    """
    import comfy.model_sampling as sampling

    discrete = isinstance(model_sampling, sampling.ModelSamplingDiscrete) and not isinstance(
        model_sampling, sampling.ModelSamplingDiscreteEDM)  # EDM "timesteps" are log-sigmas, not steps
    if not discrete:
        return sigma
    timestep = model_sampling.timestep(torch.tensor([sigma], dtype=torch.float32))
    return float(timestep.item()) / int(model_sampling.num_timesteps)


class RunState:
    """What one sampling run records: the TACA run record and the probe's measurements, each where its node is."""

    def __init__(self) -> None:
        self.report: Optional[RunRecord] = None
        self.probe: Optional[ProbeRun] = None


class CallContext:
    """One model call, as the pack's hooks see it; its counters are this call's own."""

    def __init__(self, sigma: float, position: float, settings: Optional[TacaSettings], gamma: float,
                 layouts: Dict[int, JointLayout], probe: Optional[ProbeCall] = None):
        self.sigma = sigma
        self.position = position  # on TACA's time scale (``schedule_position``)
        self.settings = settings  # of the TACA Patch Model on the model, or None
        self.gamma = gamma  # this call's: the window and ramp at its position (1: TACA does not act)
        self.layouts = layouts  # the joint layouts by key length (``taca.joint_call.layouts_by_length``)
        self.probe = probe
        self.joint_calls = 0
        self.other_calls = 0
        self.gammas: List[float] = []  # per joint call, in call order: the gamma it got (1: left untouched)

    @property
    def taca_window(self) -> bool:
        """Whether TACA's window holds (the default window on a model without TACA): when the TACA LoRA acts."""
        settings = self.settings if self.settings is not None else taca_settings.DEFAULT_SCHEDULE
        return settings.active_at(self.position)

    def joint_gamma(self, index: int, call: JointCall) -> float:
        """The gamma of joint call ``index`` of this model call: the model call's, 1 outside ``blocks``, and with
        a target share the gamma in [1, that] whose image-to-text share comes closest to it (``taca.probe``)."""
        settings = self.settings
        if self.gamma == taca_settings.GAMMA_OFF or settings is None or not settings.acts_on_block(index):
            return taca_settings.GAMMA_OFF
        if not settings.adaptive or self.gamma < taca_settings.GAMMA_OFF:
            return self.gamma  # below 1 TACA lowers the share: there is nothing to adapt towards
        probe = call.share_probe(taca_probe.ADAPTIVE_ROWS)
        return taca_probe.search_gamma(probe, settings.target_share, self.gamma).gamma

    def outcome(self, batch: Tuple[int, ...]) -> ModelCallOutcome:
        return ModelCallOutcome(self.sigma, batch, self.gamma != taca_settings.GAMMA_OFF, self.joint_calls,
                                self.other_calls, tuple(self.gammas))


def passthrough_attention(func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The override of a patched model's calls where the pack does nothing and no other override was set.

    It calls the kernel ComfyUI's ``wrap_attn`` selected with the very same arguments, so the result is
    bit for bit the unpatched one.  Like JointAttentionOverride it has no ``container_function``: on
    ComfyUI 0.33 ``wrap_attn`` then takes the tensors out of AttentionTensorContainer inputs and hands
    them over, as it does for every kernel without a container function of its own.
    """
    return func(*args, **kwargs)


class JointAttentionOverride:
    """``optimized_attention_override`` of one model call where TACA acts or the probe records."""

    def __init__(self, context: CallContext, previous: Optional[Callable]):
        self.context = context
        self.previous = previous  # the override that was there (another pack's), run for every kernel call

    def _inner(self, args: Tuple, kwargs: Dict[str, Any], func: Callable) -> torch.Tensor:
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        context = self.context
        call = parse_joint_call(args, kwargs, context.layouts)
        if call is None:
            context.other_calls += 1  # not a joint text+image attention of this model call
            return self._inner(args, kwargs, func)
        gamma = context.joint_gamma(context.joint_calls, call)
        context.joint_calls += 1
        context.gammas.append(gamma)
        if context.probe is not None:
            context.probe.joint_call(call, gamma)
        if gamma == taca_settings.GAMMA_OFF:
            return self._inner(args, kwargs, func)  # a block TACA leaves alone, an adaptive gamma of 1, the probe alone
        return kernels.attend_joint_call(lambda a, kw: self._inner(a, kw, func), call, gamma, context.settings.mode)


def _latent_shape(x: Any) -> Tuple[int, ...]:
    try:
        return tuple(int(s) for s in x.shape)
    except (AttributeError, TypeError, RuntimeError):  # a nested latent (video + audio) has no single shape
        return ()


class ModelCallWrapper:
    """APPLY_MODEL wrapper: one ``CallContext`` per model call (see the module docstring)."""

    def __init__(self, family: Optional[ModelFamily]):
        self.family = family  # None until a TACA or probe node puts the wrapper on (the LoRA gate needs none)

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        options = dict(transformer_options or {})
        base_model = executor.class_obj
        sigma = float(t.max()) if torch.is_tensor(t) else float(t)  # t is the batch's sigma
        position = schedule_position(base_model.model_sampling, sigma)
        settings = taca_settings.stored(options)
        gamma = settings.gamma_at(position) if settings is not None else taca_settings.GAMMA_OFF
        run: Optional[RunState] = options.get(RUN_KEY)
        batch = tuple(int(b) for b in options.get("cond_or_uncond", ()))
        probe = None
        if run is not None and run.probe is not None and run.probe.settings.records(settings, position):
            probe = run.probe.begin(sigma, batch, _latent_shape(x))
        layouts: Dict[int, JointLayout] = {}
        if (gamma != taca_settings.GAMMA_OFF or probe is not None) and self.family is not None:
            layouts = layouts_by_length(self.family.layouts(base_model.diffusion_model, x, c_crossattn, kwargs))
        context = CallContext(sigma, position, settings, gamma, layouts, probe)
        options[CONTEXT_KEY] = context
        if gamma == taca_settings.GAMMA_OFF and probe is None:
            options.setdefault(OVERRIDE_KEY, passthrough_attention)  # the keys of an acting call (see above)
        else:
            options[OVERRIDE_KEY] = JointAttentionOverride(context, options.get(OVERRIDE_KEY))
        token = _current_call.set(context)
        completed = False
        try:
            out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
            completed = True
        finally:
            _current_call.reset(token)
            if probe is not None:
                run.probe.end(probe, completed)
        if gamma != taca_settings.GAMMA_OFF and context.joint_calls == 0:
            log.debug("TACA active at sigma %.4f but no attention call had a joint layout %s (%s)",
                      sigma, list(layouts.values()), self.family.name if self.family else "?")
        if run is not None and run.report is not None:
            run.report.add(context.outcome(batch))
        return out


@contextlib.contextmanager
def run_state(guider: Any) -> Iterator[RunState]:
    """The sampling run's state in the guider's model options, for the length of the run.

    The outermost of the pack's run wrappers makes it in a copy of the options and puts the originals back
    when the run ends; the others find it there.
    """
    options = guider.model_options
    state = options.get("transformer_options", {}).get(RUN_KEY)
    if state is not None:
        yield state
        return
    import comfy.model_patcher

    guider.model_options = comfy.model_patcher.create_model_options_clone(options)
    state = RunState()
    guider.model_options.setdefault("transformer_options", {})[RUN_KEY] = state
    try:
        yield state
    finally:
        guider.model_options = options


class TacaRunWrapper:
    """OUTER_SAMPLE wrapper of a TACA Patch Model node: the run's record, and its report when it ends."""

    def __init__(self, settings: TacaSettings, node_id: Optional[str]):
        self.settings = settings
        self.node_id = node_id

    def __call__(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        position_of = None
        model_patcher = getattr(guider, "model_patcher", None)
        if model_patcher is not None:
            model_sampling = model_patcher.get_model_object("model_sampling")
            position_of = lambda sigma: schedule_position(model_sampling, sigma)  # noqa: E731
        record = RunRecord(sigmas, position_of)
        with run_state(guider) as state:
            state.report = record
            out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        taca_report.publish(taca_report.as_message(record, self.settings, self.node_id))
        return out


class ProbeRunWrapper:
    """OUTER_SAMPLE wrapper of a TACA Attention Probe node: the run's measurements, kept once the run is over."""

    def __init__(self, settings: ProbeSettings):
        self.settings = settings
        self.last_run = ProbeRun(settings)  # of the last finished run (empty before the first)

    def __call__(self, executor, *args, **kwargs):
        run = ProbeRun(self.settings)
        with run_state(executor.class_obj) as state:
            state.probe = run
            out = executor(*args, **kwargs)
        self.last_run = run
        return out


def ensure_call_wrapper(model_patcher: Any, family: Optional[ModelFamily]) -> None:
    """Put the model call wrapper on ``model_patcher`` unless one is there (one knowing the family, when given)."""
    from comfy.patcher_extension import WrappersMP

    present = model_patcher.get_wrappers(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    if present and (family is None or getattr(present[0], "family", None) is not None):
        return
    model_patcher.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    model_patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, ModelCallWrapper(family))


def install_taca(model_patcher: Any, settings: TacaSettings, family: ModelFamily, node_id: Optional[str] = None) -> None:
    """Put TACA on ``model_patcher`` (a clone the caller owns), replacing an earlier TACA patch.

    Wrappers are held per patcher and copied into each clone as the same objects; they hold settings only,
    each sampling run's state is its own.  With gamma 1 no model call wrapper is added for TACA.
    """
    from comfy.patcher_extension import WrappersMP

    model_patcher.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    taca_settings.store(model_patcher.model_options.setdefault("transformer_options", {}), settings)
    model_patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, TacaRunWrapper(settings, node_id))
    if settings.enabled:
        ensure_call_wrapper(model_patcher, family)


def install_probe(model_patcher: Any, settings: ProbeSettings, family: ModelFamily) -> None:
    """Put the probe on ``model_patcher`` (a clone the caller owns), replacing an earlier probe."""
    from comfy.patcher_extension import WrappersMP

    model_patcher.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, PROBE_WRAPPER_KEY)
    model_patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, PROBE_WRAPPER_KEY, ProbeRunWrapper(settings))
    ensure_call_wrapper(model_patcher, family)


def last_probe_run(model_patcher: Any) -> Optional[ProbeRun]:
    """What the probe on ``model_patcher`` (or a clone of it) measured in its last finished run; None: no probe."""
    from comfy.patcher_extension import WrappersMP

    for wrapper in model_patcher.get_wrappers(WrappersMP.OUTER_SAMPLE, PROBE_WRAPPER_KEY):
        return wrapper.last_run
    return None
