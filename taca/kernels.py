"""TACA's arithmetic on one joint attention call, through the kernel ComfyUI (or another pack) selected.

``attend_joint_call`` runs eq. 10 in the chosen mode (``taca.attention`` holds the arithmetic): ``exact`` and
``selective`` through the backend, ``flex`` through flex_attention, compiled once per process when
torch.compile works here.  Also here: when the caller's K may be scaled in place (``key_policy``), and the
warnings said once per process.  Importing this module does not import ComfyUI.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch

from . import attention as taca_attention
from .attention import JointLayout, KeyPolicy
from .joint_call import JointCall

log = logging.getLogger("comfyui-taca")

# Keywords flex computes itself (the rest of the list only routes the call).  A joint call with any other
# keyword takes the exact path, which hands every keyword on to the backend.  low_precision_attention=False
# asks a quantised kernel (Sage) not to quantise; flex never does, so it holds already.
_FLEX_KEYWORDS = frozenset({"attn_precision", "skip_reshape", "skip_output_reshape", "enable_gqa", "scale",
                            "low_precision_attention", "transformer_options", "_inside_attn_wrapper"})

# inner(args, kwargs): the attention call handed on, to the override that was there before TACA or the kernel.
Inner = Callable[[Tuple, Dict[str, Any]], torch.Tensor]

_warned: Set[str] = set()


def warn_once(message: str) -> None:
    """Log ``message`` the first time this process meets it."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


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


class FlexKernel:
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
    if _compiling() or _autograd_records(k) or not k.is_contiguous():
        return False
    if k.is_inference() and not torch.is_inference_mode_enabled():
        return False
    try:
        storage = k.untyped_storage().data_ptr()
        return storage not in (q.untyped_storage().data_ptr(), v.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # a tensor subclass without plain storage
        return False


def _autograd_records(k: torch.Tensor) -> bool:
    """Whether autograd records operations on ``k`` (training through TACA): it may have saved k for backward."""
    return k.requires_grad and torch.is_grad_enabled()


def key_policy(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, layout_copy: bool = False) -> KeyPolicy:
    """Who may write into ``k``, the K the kernel will read.

    A layout copy this call made (``layout_copy``) is ours unless autograd records it; the caller's own K is
    borrowed when that is safe, else scaled as a copy.
    """
    if layout_copy and not _autograd_records(k):
        return KeyPolicy.OWNED
    return KeyPolicy.BORROWED if _may_borrow(k, q, v) else KeyPolicy.COPY


def flex_fallback(params: Dict[str, Any]) -> bool:
    """Whether a flex call must take the exact path: it passes keywords flex does not compute (said once)."""
    unknown = set(params) - _FLEX_KEYWORDS
    if unknown:
        warn_once(f"TACA flex: this model passes attention keywords flex does not implement "
                  f"({', '.join(sorted(unknown))}); its joint calls use mode 'exact', "
                  "which hands them on to the attention kernel.")
    return bool(unknown)


def _backend(inner: Inner, heads: int, params: Dict[str, Any]) -> taca_attention.Backend:
    """The kernel (through any override that was there) for one row group, with the call's keywords."""
    def attend(q, k, v, mask):
        return inner((q, k, v, heads), dict(params, mask=mask))
    return attend


def attend_joint_call(inner: Inner, call: JointCall, gamma: float, mode: str) -> torch.Tensor:
    """Eq. 10 on ``call`` at ``gamma`` in ``mode`` (exact / selective / flex), output in the layout asked for."""
    if mode == "flex" and flex_fallback(call.params):
        mode = "exact"
    if mode == "selective" or (call.span.visual_queries_only and mode != "flex"):
        # Only visual query rows: listing 2 is eq. 10 exactly, in one call.
        return taca_attention.selective_attention(taca_attention.AttentionInputs(
            _backend(inner, call.heads, call.params), call.q, call.k, call.v, call.mask, call.span, gamma,
            call.seq_dim, key_policy(call.k, call.q, call.v)))
    if mode == "flex":
        return _flex(call.as_heads(), gamma)
    return _exact(inner, call.as_heads(), gamma)


def _exact(inner: Inner, call: JointCall, gamma: float) -> torch.Tensor:
    """``call`` in (B, H, N, D)."""
    # Two backend calls read the same K and V: lay them out once as contiguous (B, H, N, D) rather than
    # have the kernel re-layout strided views on every call (measured 7% of a call on the CPU).
    k, v = call.k.contiguous(), call.v.contiguous()
    policy = key_policy(k, call.q, call.v, layout_copy=k is not call.k)
    q, mask, span = call.q, call.mask, call.span
    if call.out_seq_dim == 2:
        attend = _backend(inner, call.heads, call.params)
        return taca_attention.exact_attention(
            taca_attention.AttentionInputs(attend, q, k, v, mask, span, gamma, 2, policy), 2)
    # The model wants (B, N, H*D): take (B, H, n, D) from the backend for each row group and write the
    # groups straight into that layout (one copy, as the backend's own reshape would make).
    attend = _backend(inner, call.heads, dict(call.params, skip_output_reshape=True))
    parts = taca_attention.exact_attention_parts(
        taca_attention.AttentionInputs(attend, q, k, v, mask, span, gamma, 2, policy))
    if all(part.ndim == 4 for _, part in parts):
        return taca_attention.assemble_heads_as_tokens(parts, span.length)
    return taca_attention.assemble_rows(  # a backend that ignored skip_output_reshape
        [(r, p if p.ndim == 3 else p.transpose(1, 2).flatten(2)) for r, p in parts], 1)


def _flex(call: JointCall, gamma: float) -> torch.Tensor:
    """``call`` in (B, H, N, D), K and V possibly with fewer heads (enable_gqa)."""
    q, k, v, mask, params = call.q, call.k, call.v, call.mask, call.params
    dtype = q.dtype
    if params.get("attn_precision") == torch.float32 and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()  # the caller asked for fp32 attention
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = FlexKernel.run(q, k, v, mask, call.span, gamma, params.get("scale"),
                         bool(params.get("enable_gqa", False))).to(dtype)
    if call.out_seq_dim == 1:
        b, h, n, d = out.shape
        out = out.transpose(1, 2).reshape(b, n, h * d)
    return out
