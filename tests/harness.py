"""Test-side helpers: the TACA node applied, and attention overrides used as references or spies.

The overrides here stand in for "another pack": they are installed the way such
packs install theirs (``transformer_options["optimized_attention_override"]`` on
a clone), and ComfyUI's own ``wrap_attn`` calls them.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from comfy.patcher_extension import WrappersMP
from reference import taca_reference
from taca import hooks, report as taca_report
from taca.joint_call import layouts_by_length

OVERRIDE_KEY = "optimized_attention_override"
RUN_SPY_KEY = "test-run-spy"


GAMMA = 1.2  # the paper's default temperature
THRESHOLD = 0.97  # the paper's sigma threshold (eq. 11)


class RunSpy:
    """OUTER_SAMPLE wrapper inside the pack's run wrappers: keeps the state the last sampling run recorded."""

    def __init__(self):
        self.state = None

    def __call__(self, executor, *args, **kwargs):
        self.state = executor.class_obj.model_options.get("transformer_options", {}).get(hooks.RUN_KEY)
        return executor(*args, **kwargs)


def with_run_spy(model):
    """``model`` (a node's output, which the test owns) with a ``RunSpy``, after the wrappers already on it."""
    model.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, RUN_SPY_KEY)
    model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, RUN_SPY_KEY, RunSpy())
    return model


class LastRunReport:
    """The run report of the last sampling run of a model carrying a ``RunSpy``: the record's fields, and the
    message the TACA Patch Model node published."""

    def __init__(self, model):
        (self._spy,) = model.get_wrappers(WrappersMP.OUTER_SAMPLE, RUN_SPY_KEY)
        (self._node,) = model.get_wrappers(WrappersMP.OUTER_SAMPLE, hooks.WRAPPER_KEY)

    @property
    def record(self):
        assert self._spy.state is not None and self._spy.state.report is not None, "no sampling run recorded yet"
        return self._spy.state.report

    def __getattr__(self, name):
        return getattr(self.record, name)

    def as_message(self):
        return taca_report.as_message(self.record, self._node.settings, self._node.node_id)


def run_report(model) -> LastRunReport:
    return LastRunReport(model)


def call_context(settings, layouts, gamma: Optional[float] = None):
    """The pack's context of one model call inside TACA's window at ``gamma`` (default: the settings'), for a call
    of the joint ``layouts``, as the model call wrapper makes it."""
    return hooks.CallContext(1.0, 1.0, settings, settings.gamma if gamma is None else gamma,
                             layouts_by_length(layouts))


def taca(pack_nodes, model, gamma: float = GAMMA, threshold: float = THRESHOLD, mode: str = "exact"):
    """``model`` patched by the TACA Patch Model node, as a workflow would run it (with a ``RunSpy``)."""
    return with_run_spy(pack_nodes["TACAPatchModel"].execute(model=model, gamma=gamma, threshold_sigma=threshold,
                                                             mode=mode).result[0])


def advanced(pack_nodes, model, gamma: float = GAMMA, sigma_start: float = 1.0, sigma_end: float = THRESHOLD,
             ramp: str = "constant", blocks: str = "", target_share: float = 0.0, mode: str = "exact"):
    """``model`` patched by the TACA Patch Model (Advanced) node (defaults: the node's; with a ``RunSpy``)."""
    return with_run_spy(pack_nodes["TACAPatchModelAdvanced"].execute(
        model=model, gamma=gamma, sigma_start=sigma_start, sigma_end=sigma_end, ramp=ramp, blocks=blocks,
        target_share=target_share, mode=mode).result[0])


def with_override(patcher, override: Callable):
    """A clone of ``patcher`` with an attention override set, as a Sage/Flash patch node would.

    Later clones may deep-copy the override (ComfyUI 0.3.75 deep-copies model_options):
    read counters from ``installed_override(model)`` of the model that ran.
    """
    clone = patcher.clone()
    clone.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = override
    return clone


def installed_override(patcher):
    return patcher.model_options["transformer_options"][OVERRIDE_KEY]


def _to_bhnd(t: torch.Tensor, dim_head: int, skip_reshape: bool) -> torch.Tensor:
    if skip_reshape:
        return t
    # (B, N, H*D), or (B, N, H, D) as SD3 passes v; with enable_gqa K and V have fewer heads of the same size
    return t.reshape(t.shape[0], t.shape[1], -1, dim_head).transpose(1, 2)


def _reference_bhnd(q, k, v, heads, skip_reshape, kwargs):
    """q, k, v as (B, H, N, D) / (B, H_kv, N, D), and the softmax scale the call asked for (None: 1/sqrt(D))."""
    dim_head = q.shape[-1] if skip_reshape else q.shape[-1] // heads
    q4, k4, v4 = (_to_bhnd(t, dim_head, skip_reshape) for t in (q, k, v))
    if k4.shape[1] != q4.shape[1]:
        assert kwargs.get("enable_gqa", False), "fewer K/V heads than Q heads without enable_gqa"
    return q4, k4, v4, kwargs.get("scale")


def _mask_4d(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask


class ReferenceTacaAttention:
    """Computes joint calls with the float64 eq.-10 reference; other calls go to ComfyUI's kernel.

    ``layouts`` maps a joint sequence length to its text span (start, stop): the test's own reading of the model
    it built (observed with ``layouts.observe_joint_layout``, or known from the inputs it fed); self-attention
    calls of any other length go to ComfyUI's kernel; a call whose keys have a joint length and whose queries are
    as many as that layout's visual tokens holds those visual rows, in sequence order (HiDream-O1's).  With
    ``threshold`` set, the reference acts only while the call's sigma >= threshold (eq. 11), so whole sampler runs
    can be compared; a callable ``threshold`` is asked instead, with the call's sigma (a test's own reading of
    eq. 11 on a discrete-time model).  ``post`` is applied to the output
    of every call (to model a composed override).  ``listing2=True`` scales the text keys for every query (the
    paper's listing 2, 'selective').  Counters: ``joint_calls`` per length, ``other_calls`` as (q length, k length).

    ``gamma`` may be a callable ``gamma(sigma, index)``: each joint call's own gamma, ``index`` being the call's place
    among the joint calls of its model call (counted per sigma, modulo ``calls_per_model_call`` when given, for model
    calls that share a sigma); a gamma of 1 leaves the call to ComfyUI's kernel.  ``gammas`` records
    (sigma, index, gamma) of every joint call.
    """

    def __init__(self, layouts: Dict[int, Tuple[int, int]], gamma: Union[float, Callable[[float, int], float]],
                 threshold: Union[float, Callable[[float], bool], None] = None,
                 post: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, listing2: bool = False,
                 calls_per_model_call: Optional[int] = None):
        self.layouts = {int(n): (int(a), int(b)) for n, (a, b) in layouts.items()}
        self.gamma = gamma
        self.calls_per_model_call = calls_per_model_call
        self._seen_at_sigma: Dict[float, int] = {}
        self.gammas: List[Tuple[float, int, float]] = []
        self.threshold = threshold
        self.post = post or (lambda out: out)
        self.listing2 = listing2
        self.joint_calls_by_length = {n: 0 for n in self.layouts}
        self.other_calls: List[tuple] = []

    @property
    def joint_calls(self) -> int:
        return sum(self.joint_calls_by_length.values())

    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        seq_dim = 2 if skip_reshape else 1
        n, n_key = q.shape[seq_dim], k.shape[seq_dim]
        active = True
        if self.threshold is not None:
            sigma = float(kwargs["transformer_options"].get("sigmas").max())
            active = self.threshold(sigma) if callable(self.threshold) else sigma >= self.threshold
        start, stop = self.layouts.get(n_key, (0, 0))
        if n_key not in self.layouts or n not in (n_key, n_key - (stop - start)) or not active:
            self.other_calls.append((n, n_key))
            return self.post(func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                                  skip_output_reshape=skip_output_reshape, **kwargs))
        gamma = self.gamma
        if callable(gamma):
            sigma = float(kwargs["transformer_options"].get("sigmas").max())
            index = self._seen_at_sigma.get(sigma, 0)
            self._seen_at_sigma[sigma] = index + 1
            if self.calls_per_model_call:
                index %= self.calls_per_model_call
            gamma = float(gamma(sigma, index))
            self.gammas.append((sigma, index, gamma))
            if gamma == 1.0:
                self.other_calls.append((n, n_key))
                return self.post(func(q, k, v, heads, mask=mask, attn_precision=attn_precision,
                                      skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape, **kwargs))
        self.joint_calls_by_length[n_key] += 1
        q4, k4, v4, scale = _reference_bhnd(q, k, v, heads, skip_reshape, kwargs)
        rows = [i for i in range(n_key) if n == n_key or not start <= i < stop]  # the sequence rows of the queries
        if n != n_key:  # the visual rows alone: put them in their places in the sequence (text queries left 0)
            assert mask is None, "a mask over the visual rows alone is not modelled here"
            q4 = q4.new_zeros(q4.shape[:2] + (n_key, q4.shape[3])).index_copy_(2, torch.tensor(rows), q4)
        out = taca_reference(q4, k4, v4, start, stop, gamma, _mask_4d(mask),
                             visual_rows_only_text_scaling=not self.listing2, scale=scale)[:, :, rows].to(q.dtype)
        if not skip_output_reshape:
            b, h, n_, d = out.shape
            out = out.transpose(1, 2).reshape(b, n_, h * d)
        return self.post(out)


class AttentionSpy:
    """Records every attention call (sigma, q length, k length) and optionally transforms the output."""

    def __init__(self, post: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.calls: List[tuple] = []
        self.post = post or (lambda out: out)

    def __call__(self, func, *args, **kwargs):
        q, k = args[0], args[1]
        skip_reshape = kwargs.get("skip_reshape", False)
        seq_dim = 2 if skip_reshape else 1
        sigmas = kwargs["transformer_options"].get("sigmas")
        sigma = float(sigmas.max()) if sigmas is not None else None
        self.calls.append((sigma, q.shape[seq_dim], k.shape[seq_dim]))
        return self.post(func(*args, **kwargs))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())
