"""TACA attention arithmetic (arXiv 2506.07986, eq. 10), independent of ComfyUI.

Every function here takes the attention backend as a callable, so the fused
kernel ComfyUI (or another pack) selected keeps doing the softmax; we only
change what goes into it.  The eq. 10 functions take one attention call's
backend and inputs together, as ``AttentionInputs``.  Nothing in this module
imports ComfyUI.

Notation: the joint sequence holds N tokens, the text tokens occupy the
contiguous span ``[text.start, text.stop)`` and every other token is visual.
TACA multiplies the logits q_i.k_j/sqrt(d) of visual queries i and text keys j
by gamma; additive masks are added after that scaling and boolean masks keep
their meaning.  An attention call usually holds every query row of the joint
sequence; where the layout says ``visual_queries_only`` it holds only the visual ones.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

FLEX_MIN_TORCH = "2.5.0"

# attend(q, k, v, mask) -> output; the layout of every tensor is the caller's.
Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class JointLayout(NamedTuple):
    """Where the text tokens sit in a joint text+visual sequence of ``length`` tokens, and which query rows its
    attention call holds.

    ``visual_queries_only`` False: the call holds every row of the sequence.  True: only the visual query rows, in
    sequence order, against every key; the model computes the text rows elsewhere (HiDream-O1 runs them as a causal
    text pass of their own).  As every query row of such a call is visual, eq. 10 is the call itself with the text
    keys multiplied by gamma.
    """

    start: int
    stop: int
    length: int
    visual_queries_only: bool = False

    @classmethod
    def text_first(cls, text_tokens: int, length: int, visual_queries_only: bool = False) -> "JointLayout":
        return cls(0, text_tokens, length, visual_queries_only)

    @classmethod
    def text_last(cls, text_tokens: int, length: int, visual_queries_only: bool = False) -> "JointLayout":
        return cls(length - text_tokens, length, length, visual_queries_only)

    @property
    def text_tokens(self) -> int:
        return self.stop - self.start

    def visual_pieces(self) -> List[Tuple[int, int]]:
        """The visual token ranges, in sequence order (one, or two if text sits in the middle)."""
        pieces = [(0, self.start), (self.stop, self.length)]
        return [(a, b) for a, b in pieces if b > a]

    @property
    def query_rows(self) -> int:
        """How many query rows the layout's attention call holds."""
        return self.length - self.text_tokens if self.visual_queries_only else self.length


class KeyPolicy(str, enum.Enum):
    """Who may write into K, the caller's choice (see ``scaled_text_keys``)."""

    COPY = "copy"  # K is the caller's and must not change: scale a copy (one extra K-sized buffer)
    OWNED = "owned"  # K belongs to this attention call (a layout copy we made): scale its text part in place
    # K is the caller's but may change while we hold it: scale the text part in place and put the saved original
    # back before returning (a text-sized buffer instead of a K-sized one)
    BORROWED = "borrowed"


def scale_text_keys(k: torch.Tensor, span: JointLayout, gamma: float, seq_dim: int) -> torch.Tensor:
    """A copy of ``k`` whose text tokens are multiplied by gamma (the one extra K-sized buffer)."""
    scaled = k.clone()
    scaled.narrow(seq_dim, span.start, span.text_tokens).mul_(gamma)
    return scaled


@contextlib.contextmanager
def scaled_text_keys(k: torch.Tensor, span: JointLayout, gamma: float, seq_dim: int,
                     policy: KeyPolicy = KeyPolicy.COPY) -> Iterator[torch.Tensor]:
    """K with its text tokens multiplied by gamma, for the ``with`` block, under a ``KeyPolicy``.

    A borrowed K gets its original text part back when the block ends, also on an error.  Copying all
    of K costs more than the text part alone, and a fresh K-sized allocation per call is not free on
    a CPU either.
    """
    if policy not in set(KeyPolicy):
        raise ValueError(f"unknown key policy {policy!r}; one of {', '.join(p.value for p in KeyPolicy)}")
    policy = KeyPolicy(policy)
    if policy is KeyPolicy.COPY:
        yield scale_text_keys(k, span, gamma, seq_dim)
        return
    text = k.narrow(seq_dim, span.start, span.text_tokens)
    saved = text.clone() if policy is KeyPolicy.BORROWED else None
    text.mul_(gamma)
    try:
        yield k
    finally:
        if saved is not None:
            text.copy_(saved)


def mask_rows(mask: Optional[torch.Tensor], start: int, stop: int, n_query: int) -> Optional[torch.Tensor]:
    """The query rows [start, stop) of a mask whose second-to-last dim is queries (or broadcast 1)."""
    if mask is None or mask.ndim < 2 or mask.shape[-2] != n_query:
        return mask
    return mask.narrow(mask.ndim - 2, start, stop - start)


def _gather(t: torch.Tensor, pieces: Sequence[Tuple[int, int]], dim: int) -> torch.Tensor:
    if len(pieces) == 1:
        a, b = pieces[0]
        return t.narrow(dim, a, b - a)
    return torch.cat([t.narrow(dim, a, b - a) for a, b in pieces], dim=dim)


# Row groups of one attention call: (the sequence ranges the rows cover, in order; the backend's output for them).
RowParts = List[Tuple[List[Tuple[int, int]], torch.Tensor]]


class AttentionInputs(NamedTuple):
    """One attention call as the eq. 10 functions take it: the backend, its inputs, the text span and gamma.

    ``seq_dim`` is the sequence dim of q, k and v; a mask's query rows are its second-to-last dim.
    ``key_policy`` says who may write into K (see ``scaled_text_keys``).
    """

    attend: Backend
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    span: JointLayout
    gamma: float
    seq_dim: int
    key_policy: KeyPolicy = KeyPolicy.COPY


def exact_attention_parts(inputs: AttentionInputs) -> RowParts:
    """Eq. 10 exactly, in two backend calls, returned as row groups (see ``assemble_rows``).

    Text-query rows see the original keys; visual-query rows see keys whose
    text part is multiplied by gamma, which multiplies exactly the logits
    q_vis . k_txt / sqrt(d) by gamma before the backend adds the mask.  The
    text rows go first, so with ``key_policy`` "owned" or "borrowed" the same
    K can be scaled in place for the visual rows afterwards.
    """
    attend, q, k, v, mask, span, gamma, seq_dim, key_policy = inputs
    n_query = q.shape[seq_dim]
    if span.text_tokens == 0 or span.text_tokens == n_query:
        return [([(0, n_query)], attend(q, k, v, mask))]
    vis = span.visual_pieces()
    out_text = attend(q.narrow(seq_dim, span.start, span.text_tokens), k, v,
                      mask_rows(mask, span.start, span.stop, n_query))
    if len(vis) == 1:
        a, b = vis[0]
        q_vis, vis_mask = q.narrow(seq_dim, a, b - a), mask_rows(mask, a, b, n_query)
    else:
        q_vis, vis_mask = _gather(q, vis, seq_dim), mask
        if mask is not None and mask.ndim >= 2 and mask.shape[-2] == n_query:
            vis_mask = _gather(mask, vis, mask.ndim - 2)
    with scaled_text_keys(k, span, gamma, seq_dim, key_policy) as k_scaled:
        out_vis = attend(q_vis, k_scaled, v, vis_mask)
    return [([(span.start, span.stop)], out_text), (vis, out_vis)]


def _pieces(parts: RowParts, dim: int):
    """(start, stop, rows of that range) for every range, in sequence order."""
    out = []
    for ranges, tensor in parts:
        offset = 0
        for a, b in ranges:
            out.append((a, b, tensor.narrow(dim, offset, b - a)))
            offset += b - a
    return sorted(out, key=lambda piece: piece[0])


def assemble_rows(parts: RowParts, out_seq_dim: int) -> torch.Tensor:
    """Concatenate the row groups back into sequence order along ``out_seq_dim``."""
    if len(parts) == 1 and len(parts[0][0]) == 1:
        return parts[0][1]
    return torch.cat([rows for _, _, rows in _pieces(parts, out_seq_dim)], dim=out_seq_dim)


def assemble_heads_as_tokens(parts: RowParts, length: int) -> torch.Tensor:
    """Row groups given as (B, H, n, D) written straight into one (B, N, H*D) tensor.

    This is the layout ComfyUI's models ask attention for; writing each group
    into its slice costs the same single copy the backend's own reshape would,
    instead of a reshape per group plus a concatenation.
    """
    first = parts[0][1]
    b, h, _, d = first.shape
    out = torch.empty(b, length, h * d, dtype=first.dtype, device=first.device)
    tokens = out.view(b, length, h, d)
    for start, stop, rows in _pieces(parts, 2):
        tokens.narrow(1, start, stop - start).copy_(rows.transpose(1, 2))
    return out


def exact_attention(inputs: AttentionInputs, out_seq_dim: int) -> torch.Tensor:
    """Eq. 10 exactly: ``exact_attention_parts`` put back in sequence order along ``out_seq_dim``."""
    return assemble_rows(exact_attention_parts(inputs), out_seq_dim)


def selective_attention(inputs: AttentionInputs) -> torch.Tensor:
    """The paper's listing 2: text keys scaled for every query, one backend call.

    Exact for visual-query rows; text-query rows also get their text->text
    logits scaled by gamma, which eq. 10 does not do.
    """
    attend, q, k, v, mask, span, gamma, seq_dim, key_policy = inputs
    if span.text_tokens == 0:
        return attend(q, k, v, mask)
    with scaled_text_keys(k, span, gamma, seq_dim, key_policy) as k_scaled:
        return attend(q, k_scaled, v, mask)


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def require_flex() -> None:
    if not flex_available():
        raise RuntimeError(
            f"TACA mode 'flex' needs torch.nn.attention.flex_attention (PyTorch >= {FLEX_MIN_TORCH}); "
            f"this PyTorch is {torch.__version__}. Upgrade PyTorch or use mode 'exact'."
        )


def _broadcast_mask(mask: torch.Tensor, b: int, h: int, nq: int, nk: int) -> torch.Tensor:
    # ComfyUI's conventions: (Nq, Nk), (B, Nq, Nk) or (B, H, Nq, Nk), any dim possibly 1.
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask.expand(b, h, nq, nk)


def flex_taca_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    span: JointLayout,
    gamma: float,
    flex_fn: Optional[Callable] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """The paper's listing 1 through flex_attention; q is (B, H, N, D), k and v (B, H_kv, N, D).

    Where ``span.visual_queries_only`` q holds only the visual rows (B, H, N - text, D): every query is visual.

    ``flex_fn`` is flex_attention itself or a compiled version of it.  ``scale`` is the softmax scale
    (None: 1/sqrt(D)); gamma multiplies the scaled logit.  ``enable_gqa``: K and V have fewer heads than
    Q, query head h reading K/V head h // (H / H_kv), as in scaled_dot_product_attention.
    """
    if flex_fn is None:
        require_flex()
        from torch.nn.attention.flex_attention import flex_attention as flex_fn
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    t0, t1 = span.start, span.stop
    gamma_t = torch.tensor(gamma, dtype=torch.float32, device=q.device)
    full_mask = None if mask is None else _broadcast_mask(mask, b, h, nq, nk)

    visual_rows_only = span.visual_queries_only

    def score_mod(score, bi, hi, qi, ki):
        scaled = (ki >= t0) & (ki < t1)  # text keys
        if not visual_rows_only:
            scaled = scaled & ((qi < t0) | (qi >= t1))  # of visual queries
        score = torch.where(scaled, score * gamma_t, score)
        if full_mask is None:
            return score
        m = full_mask[bi, hi, qi, ki]
        if m.dtype == torch.bool:
            return torch.where(m, score, -float("inf"))
        return score + m.to(score.dtype)

    extra = {}
    if scale is not None:
        extra["scale"] = scale
    if enable_gqa:
        extra["enable_gqa"] = True
    return flex_fn(q, k, v, score_mod=score_mod, **extra)
