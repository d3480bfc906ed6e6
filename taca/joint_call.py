"""One joint text+image attention call, recognised among the attention calls of a model call.

ComfyUI's attention functions take ``(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
skip_output_reshape=False, **kwargs)``.  A call is a joint call of this model call when its keys have the length
of one of the model call's joint layouts (``taca.families``) and its queries are the rows that layout's call holds.
Importing this module does not import ComfyUI.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, NamedTuple, Optional, Tuple

import torch

from . import probe as taca_probe
from .attention import JointLayout

ATTENTION_PARAMS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def layouts_by_length(layouts: Iterable[JointLayout]) -> Dict[int, JointLayout]:
    """The layouts with both text and visual tokens, by their keys' sequence length (one layout per length)."""
    return {layout.length: layout for layout in layouts
            if layout.text_tokens > 0 and layout.length > layout.text_tokens}


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


def parse_joint_call(args: Tuple, kwargs: Dict[str, Any], layouts: Dict[int, JointLayout]) -> Optional[JointCall]:
    """The call's arguments when its keys are one of ``layouts``' joint sequences (``layouts_by_length``) and its
    queries the rows that layout's call holds (all of them, or only the visual ones), else None."""
    if len(args) > len(ATTENTION_PARAMS):
        return None
    params = dict(zip(ATTENTION_PARAMS, args))
    params.update(kwargs)
    q, k, v = params.pop("q"), params.pop("k"), params.pop("v")
    heads = params.pop("heads")
    mask = params.pop("mask", None)
    seq_dim = 2 if params.get("skip_reshape", False) else 1
    out_seq_dim = 2 if params.get("skip_output_reshape", False) else 1
    span = layouts.get(k.shape[seq_dim]) if q.ndim == (4 if seq_dim == 2 else 3) else None
    if span is None or q.shape[seq_dim] != span.query_rows:
        return None
    return JointCall(q, k, v, heads, mask, params, seq_dim, out_seq_dim, span)
