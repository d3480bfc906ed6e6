"""Installs TACA on a ComfyUI ModelPatcher clone.

The clone holds the settings (in ``model_options``, see ``taca.settings``) and
two hooks, so the input model is never touched:

* an APPLY_MODEL wrapper, run once per model call: it reads the current sigma
  (the one host-device synchronisation this pack adds per call), and only when
  TACA is active it counts the call's text and visual tokens from the actual
  inputs and hands the diffusion model a copy of ``transformer_options`` whose
  ``optimized_attention_override`` is a ``TacaAttentionOverride``;
* that override, which ComfyUI's ``wrap_attn`` calls for every attention call
  that receives ``transformer_options``.  Joint text+image calls get TACA (a
  call of the whole joint sequence, or, where the layout is ``visual_queries_only``,
  one of its visual query rows against all its keys); all other calls go
  through untouched.  Whatever override was already set (a Sage/Flash patch
  from another pack, say) is wrapped, not replaced, whichever node came first,
  because it is read at call time.

When TACA is inactive (sigma below the threshold, or gamma == 1) the wrapper
passes the original arguments straight through: same kernels, same bits.  On
such calls the override key still holds something (the override that was
there, or ``passthrough_attention``), so ``transformer_options`` has the same
keys on every call of a patched model: torch.compile guards on those keys, and
a key that comes and goes breaks them.

An OUTER_SAMPLE wrapper resets and publishes the node's run report
(``taca.report``).  ``ModelPatcher.clone`` copies wrapper lists, so every clone
of a patched model runs these same objects and fills the same report.

ComfyUI is only touched through the objects it passes in; importing this
module does not import ComfyUI.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch

from . import attention as taca_attention
from . import probe as taca_probe
from . import settings as taca_settings
from .attention import JointLayout
from .families import ModelFamily
from .report import ReportSampleWrapper, RunReport
from .settings import TacaSettings

log = logging.getLogger("comfyui-taca")

WRAPPER_KEY = "comfyui-taca"
OVERRIDE_KEY = "optimized_attention_override"
# The sigma read once per model call, shared with the TACA LoRA gate so the call syncs only once.
SIGMA_CACHE_KEY = "taca_sigma"
# transformer_options[PROBE_KEY]: the TACA Attention Probe's recorder, told of every joint call TACA sees
# (``recorder.joint_call(call, gamma)``), whichever of the two nodes came first.
PROBE_KEY = "taca_probe"
# Image query rows the adaptive gamma measures per joint call (all of them up to this many): evenly spaced.
ADAPTIVE_PROBE_ROWS = 1024

# ComfyUI's attention functions: (q, k, v, heads, mask=None, attn_precision=None,
# skip_reshape=False, skip_output_reshape=False, **kwargs)
_ATTENTION_PARAMS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
# Keywords flex computes itself (the rest of the list only routes the call).  A joint call with any other
# keyword takes the exact path, which hands every keyword on to the backend.  low_precision_attention=False
# asks a quantised kernel (Sage) not to quantise; flex never does, so it holds already.
_FLEX_KEYWORDS = frozenset({"attn_precision", "skip_reshape", "skip_output_reshape", "enable_gqa", "scale",
                            "low_precision_attention", "transformer_options", "_inside_attn_wrapper"})


def passthrough_attention(func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The override of a patched model's calls where TACA does not act and no other override was set.

    It calls the kernel ComfyUI's ``wrap_attn`` selected with the very same arguments, so the result is
    bit for bit the unpatched one.  Like TacaAttentionOverride it has no ``container_function``: on
    ComfyUI 0.33 ``wrap_attn`` then takes the tensors out of AttentionTensorContainer inputs and hands
    them over, as it does for every kernel without a container function of its own.
    """
    return func(*args, **kwargs)


def schedule_position(model_sampling: Any, sigma: float) -> float:
    """Where ``sigma`` sits on the paper's time scale t / 1000, the scale ``threshold_sigma`` is compared on.

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


def current_sigma(t: Any, options: Dict[str, Any], model_sampling: Any = None) -> Tuple[float, float]:
    """The model call's (sigma, schedule position) as floats, cached in ``options``.

    Reading the sigma is the one host-device synchronisation per call (a second, tiny one on
    discrete-time models); ``options`` is the per-call copy of transformer_options the caller passes on,
    so the TACA wrapper and the TACA LoRA gate share it.  ``model_sampling`` None: the position is sigma.
    """
    cached = options.get(SIGMA_CACHE_KEY)
    if cached is not None and cached[0] is t:
        return cached[1], cached[2]
    sigma = float(t.max()) if torch.is_tensor(t) else float(t)
    position = sigma if model_sampling is None else schedule_position(model_sampling, sigma)
    options[SIGMA_CACHE_KEY] = (t, sigma, position)
    return sigma, position


def compile_errors() -> Tuple[type, ...]:
    """What compiling flex_attention can raise when torch.compile does not work here.

    Inductor's own failures (no C++ compiler, no Triton, a lowering error: InductorError) arrive as
    BackendCompilerFailed, of which it is a subclass.  Errors of the computation itself (out of memory,
    a mask of the wrong shape, also when dynamo meets them while tracing: TorchRuntimeError) are not
    here: they are the call's, and compiling stays on.
    """
    from torch._dynamo import exc

    return (exc.BackendCompilerFailed, exc.InternalTorchDynamoError, exc.Unsupported, exc.InvalidBackend,
            exc.FailOnRecompileLimitHit)


class _FlexKernel:
    """flex_attention, compiled on first use when torch.compile works here, else eager.

    A process-wide compilation cache (compiling is expensive); it holds no patch settings.
    """

    compiled: Optional[Callable] = None
    compile_failed = False

    @classmethod
    def run(cls, q, k, v, mask, span: JointLayout, gamma: float, scale: Optional[float] = None,
            enable_gqa: bool = False) -> torch.Tensor:
        taca_attention.require_flex()
        from torch.nn.attention.flex_attention import flex_attention

        extra = {"scale": scale, "enable_gqa": enable_gqa}
        if not cls.compile_failed:
            try:
                if cls.compiled is None:
                    cls.compiled = torch.compile(flex_attention, dynamic=False)
                return taca_attention.flex_taca_attention(q, k, v, mask, span, gamma, flex_fn=cls.compiled, **extra)
            except compile_errors() as err:  # a compiler that does not work here is not the user's problem
                cls.compile_failed = True
                log.warning("TACA flex: torch.compile of flex_attention failed (%s: %s); using eager "
                            "flex_attention, which is exact but slow.", type(err).__name__, err)
        return taca_attention.flex_taca_attention(q, k, v, mask, span, gamma, flex_fn=flex_attention, **extra)


_warned: Set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", lambda: False)())


def _may_borrow(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the caller's K may be scaled in place for the length of one backend call and then restored.

    Not under torch.compile (the copy is functional and the compiler fuses it), not when autograd could see
    the write, not for an inference tensor outside inference mode (PyTorch forbids it), not for a K that is
    not contiguous (an expanded view repeats memory), and not when K shares memory with q or v (a fused
    qkv view, or k passed as v), which the write would change too.
    """
    if _compiling() or (k.requires_grad and torch.is_grad_enabled()) or not k.is_contiguous():
        return False
    if k.is_inference() and not torch.is_inference_mode_enabled():
        return False
    try:
        storage = k.untyped_storage().data_ptr()
        return storage not in (q.untyped_storage().data_ptr(), v.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # a tensor subclass without plain storage
        return False


class JointCall(NamedTuple):
    """One joint text+image attention call, its arguments split out of ComfyUI's calling convention."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: int
    mask: Optional[torch.Tensor]
    params: Dict[str, Any]  # every other keyword, handed on to the kernel
    seq_dim: int  # of q, k and v: 1 for (B, N, H*D), 2 for (B, H, N, D)
    out_seq_dim: int  # of the output the model asked for
    span: JointLayout

    def as_heads(self) -> "JointCall":
        """The call with q, k and v as (B, H, N, D) views (exact and flex work on heads).

        SD3 passes (B, N, H*D), with v as (B, N, H, D).  With enable_gqa K and V carry fewer heads than Q,
        so the head size comes from Q.
        """
        if self.seq_dim == 2:
            return self
        dim_head = self.q.shape[-1] // self.heads
        q, k, v = (t.reshape(t.shape[0], t.shape[1], -1, dim_head).transpose(1, 2) for t in (self.q, self.k, self.v))
        return self._replace(q=q, k=k, v=v, seq_dim=2, params=dict(self.params, skip_reshape=True))

    def full_rows(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(q, mask) over every row of the joint sequence, q as (B, H, N, D), for the share probe.

        A ``visual_queries_only`` call holds only the visual query rows: they go to their sequence positions and
        the text rows, which the probe never reads, are zeros (a mask given per query row likewise).
        """
        q, mask, span = self.as_heads().q, self.mask, self.span
        if q.shape[2] == span.length:
            return q, mask
        rows = taca_probe.visual_positions(span, q.device)
        full = q.new_zeros(q.shape[:2] + (span.length, q.shape[3])).index_copy_(2, rows, q)
        if mask is not None and mask.ndim >= 2 and mask.shape[-2] == q.shape[2] != 1:
            padded = mask.new_zeros(mask.shape[:-2] + (span.length, mask.shape[-1]))
            mask = padded.index_copy_(mask.ndim - 2, rows, mask)
        return full, mask

    def share_probe(self, max_rows: Optional[int]) -> taca_probe.ShareProbe:
        """What the call's image queries give the text (``taca.probe``), over ``max_rows`` of them (None: all)."""
        q, mask = self.full_rows()
        return taca_probe.ShareProbe.measure(q, self.as_heads().k, self.span, mask, self.params.get("scale"),
                                             max_rows)


def parse_joint_call(args: Tuple, kwargs: Dict[str, Any], spans: Dict[int, JointLayout]) -> Optional[JointCall]:
    """The call's arguments when its keys are one of ``spans``' joint sequences and its queries the rows that
    layout's call holds (all of them; only the visual ones where the layout says ``visual_queries_only``), else None."""
    if len(args) > len(_ATTENTION_PARAMS):
        return None
    params = dict(zip(_ATTENTION_PARAMS, args))
    params.update(kwargs)
    q, k, v = params.pop("q"), params.pop("k"), params.pop("v")
    heads = params.pop("heads")
    mask = params.pop("mask", None)
    seq_dim = 2 if params.get("skip_reshape", False) else 1
    out_seq_dim = 2 if params.get("skip_output_reshape", False) else 1
    span = spans.get(k.shape[seq_dim]) if q.ndim == (4 if seq_dim == 2 else 3) else None
    if span is None or q.shape[seq_dim] != span.query_rows:
        return None
    return JointCall(q, k, v, heads, mask, params, seq_dim, out_seq_dim, span)


def key_policy(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, layout_copy: bool = False) -> taca_attention.KeyPolicy:
    """Who may write into ``k``, the K the kernel will read (a ``taca.attention.KeyPolicy``).

    A layout copy this call made (``layout_copy``) is ours; the caller's own K is borrowed when that is
    safe, else scaled as a copy.
    """
    if layout_copy:
        return taca_attention.KeyPolicy.OWNED
    return taca_attention.KeyPolicy.BORROWED if _may_borrow(k, q, v) else taca_attention.KeyPolicy.COPY


def flex_fallback(params: Dict[str, Any]) -> bool:
    """Whether a flex call must take the exact path: it passes keywords flex does not compute (said once)."""
    unknown = set(params) - _FLEX_KEYWORDS
    if unknown:
        _warn_once(f"TACA flex: this model passes attention keywords flex does not implement "
                   f"({', '.join(sorted(unknown))}); its joint calls use mode 'exact', "
                   "which hands them on to the attention kernel.")
    return bool(unknown)


class TacaAttentionOverride:
    """``transformer_options["optimized_attention_override"]`` for one TACA-active model call."""

    def __init__(self, settings: TacaSettings, spans: Sequence[JointLayout], previous: Optional[Callable],
                 gamma: Optional[float] = None, recorder: Optional[Any] = None):
        self.settings = settings
        # This model call's gamma (the settings' ramp at its sigma); each joint call may lower it (blocks, adaptive).
        self.gamma = settings.gamma if gamma is None else gamma
        # Joint calls are recognised by their keys' sequence length; each length has its own text span.
        self.spans = {span.length: span for span in spans if span.text_tokens > 0 and span.length > span.text_tokens}
        self.previous = previous
        self.recorder = recorder  # a TACA Attention Probe's, or None
        self.joint_calls = 0
        self.other_calls = 0
        self.gammas: List[float] = []  # per joint call, in call order: the gamma it got (1: left untouched)

    def _inner(self, func: Callable, args: Tuple, kwargs: Dict[str, Any]) -> torch.Tensor:
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _backend(self, func: Callable, heads: int, params: Dict[str, Any]) -> taca_attention.Backend:
        """The kernel (through any override that was there) for one row group, with the call's keywords."""
        def attend(q, k, v, mask):
            return self._inner(func, (q, k, v, heads), dict(params, mask=mask))
        return attend

    def __call__(self, func: Callable, *args, **kwargs) -> torch.Tensor:
        call = parse_joint_call(args, kwargs, self.spans)
        if call is None:
            self.other_calls += 1  # not a joint text+image attention of this model call
            return self._inner(func, args, kwargs)
        gamma = self.call_gamma(self.joint_calls, call)
        self.joint_calls += 1
        self.gammas.append(gamma)
        if self.recorder is not None:
            self.recorder.joint_call(call, gamma)
        if gamma == taca_settings.GAMMA_OFF:
            return self._inner(func, args, kwargs)  # a block TACA leaves alone, or an adaptive gamma of 1
        mode = self.settings.mode
        if mode == "flex" and flex_fallback(call.params):
            mode = "exact"
        if call.span.visual_queries_only and mode != "flex":
            return self._selective(func, call, gamma)  # only visual rows: listing 2 is eq. 10 exactly, in one call
        if mode == "selective":
            return self._selective(func, call, gamma)
        if mode == "flex":
            return self._flex(call.as_heads(), gamma)
        return self._exact(func, call.as_heads(), gamma)

    def call_gamma(self, index: int, call: JointCall) -> float:
        """The gamma of joint call ``index`` of this model call: the model call's, 1 outside ``blocks``, and with
        a target share the gamma in [1, that] whose image-to-text share comes closest to it (``taca.probe``)."""
        if self.gamma == taca_settings.GAMMA_OFF or not self.settings.acts_on_block(index):
            return taca_settings.GAMMA_OFF
        if not self.settings.adaptive or self.gamma < taca_settings.GAMMA_OFF:
            return self.gamma  # below 1 TACA lowers the share: there is nothing to adapt towards
        probe = call.share_probe(ADAPTIVE_PROBE_ROWS)
        return taca_probe.search_gamma(probe, self.settings.target_share, self.gamma).gamma

    def _selective(self, func: Callable, call: JointCall, gamma: float) -> torch.Tensor:
        return taca_attention.selective_attention(
            self._backend(func, call.heads, call.params), call.q, call.k, call.v, call.mask, call.span,
            gamma, call.seq_dim, key_policy(call.k, call.q, call.v))

    def _exact(self, func: Callable, call: JointCall, gamma: float) -> torch.Tensor:
        """``call`` in (B, H, N, D)."""
        # Two backend calls read the same K and V: lay them out once as contiguous (B, H, N, D) rather than
        # have the kernel re-layout strided views on every call (measured 7% of a call on the CPU).
        k, v = call.k.contiguous(), call.v.contiguous()
        policy = key_policy(k, call.q, call.v, layout_copy=k is not call.k)
        q, mask, span = call.q, call.mask, call.span
        if call.out_seq_dim == 2:
            attend = self._backend(func, call.heads, call.params)
            return taca_attention.exact_attention(attend, q, k, v, mask, span, gamma, 2, 2, policy)
        # The model wants (B, N, H*D): take (B, H, n, D) from the backend for each row group and write the
        # groups straight into that layout (one copy, as the backend's own reshape would make).
        attend = self._backend(func, call.heads, dict(call.params, skip_output_reshape=True))
        parts = taca_attention.exact_attention_parts(attend, q, k, v, mask, span, gamma, 2, policy)
        if all(part.ndim == 4 for _, part in parts):
            return taca_attention.assemble_heads_as_tokens(parts, span.length)
        return taca_attention.assemble_rows(  # a backend that ignored skip_output_reshape
            [(r, p if p.ndim == 3 else p.transpose(1, 2).flatten(2)) for r, p in parts], 1)

    def _flex(self, call: JointCall, gamma: float) -> torch.Tensor:
        """``call`` in (B, H, N, D), K and V possibly with fewer heads (enable_gqa)."""
        q, k, v, mask, params = call.q, call.k, call.v, call.mask, call.params
        dtype = q.dtype
        if params.get("attn_precision") == torch.float32 and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()  # the caller asked for fp32 attention
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        out = _FlexKernel.run(q, k, v, mask, call.span, gamma, params.get("scale"),
                              bool(params.get("enable_gqa", False))).to(dtype)
        if call.out_seq_dim == 1:
            b, h, n, d = out.shape
            out = out.transpose(1, 2).reshape(b, n, h * d)
        return out


class TacaApplyModelWrapper:
    """APPLY_MODEL wrapper: decides once per model call whether TACA acts."""

    def __init__(self, settings: TacaSettings, family: ModelFamily, report: Optional[RunReport] = None):
        self.settings = settings
        self.family = family
        self.report = report

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        options = dict(transformer_options or {})
        base_model = executor.class_obj
        sigma, position = current_sigma(t, options, base_model.model_sampling)  # t is the batch's sigma
        gamma = self.settings.gamma_at(position)
        if gamma == taca_settings.GAMMA_OFF:  # outside the window, or at a ramp's end
            if self.report is not None:
                self.report.record(sigma, acted=False)
            # The key is there on TACA calls, so it is here too (see the module docstring).
            options.setdefault(OVERRIDE_KEY, passthrough_attention)
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

        diffusion_model = base_model.diffusion_model
        spans = self.family.layouts(diffusion_model, x, c_crossattn, kwargs)
        override = TacaAttentionOverride(self.settings, spans, options.get(OVERRIDE_KEY), gamma, options.get(PROBE_KEY))
        options[OVERRIDE_KEY] = override
        out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        log.debug("TACA acted at sigma %.5f: %d joint attention calls, %d others untouched (layouts %s)",
                  sigma, override.joint_calls, override.other_calls, spans)
        if override.joint_calls == 0:
            log.debug("TACA active at sigma %.4f but no attention call had a joint layout %s (%s)",
                      sigma, spans, self.family.name)
        if self.report is not None:
            self.report.record(sigma, True, override.joint_calls, override.other_calls, override.gammas)
        return out


def install(model_patcher: Any, settings: TacaSettings, family: ModelFamily, node_id: Optional[str] = None) -> None:
    """Put TACA on ``model_patcher`` (a clone the caller owns), replacing an earlier TACA patch.

    Wrappers are held per patcher and copied into each clone as the same objects, so the node's run report
    is the one every clone's sampling run fills in and publishes.
    """
    from comfy.patcher_extension import WrappersMP

    model_patcher.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    model_patcher.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    report = RunReport(node_id, settings)
    taca_settings.store(model_patcher.model_options.setdefault("transformer_options", {}), settings)
    model_patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, ReportSampleWrapper(report, schedule_position))
    if settings.enabled:
        model_patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                           TacaApplyModelWrapper(settings, family, report))
