"""How much attention image queries give the text: the share TACA turns up (arXiv 2506.07986).

For one joint attention call, image query i gives the text keys T the share

    share_i(gamma) = sum_{j in T} P_ij
                   = sigmoid( LSE_{j in T}(gamma * s_ij + m_ij) - LSE_{j in V}(s_ij + m_ij) )

of its softmax, with logits s_ij = scale * q_i.k_j, the additive mask m_ij added after eq. 10's
scaling (a boolean mask keeps where True) and V the visual keys.  The paper's diagnosis (sec. 3) is
that this share is small when image tokens outnumber text tokens; gamma > 1 raises it.

The visual LSE does not depend on gamma, so it is computed once, over chunks of query rows that
never hold the full N x N logits, and every gamma after that costs only a rows x T pass.  Nothing
in this module imports ComfyUI.
"""

from __future__ import annotations

import math
from typing import Iterator, List, NamedTuple, Optional, Sequence

import torch

from .attention import JointLayout

# Logit elements per chunk of query rows (float64: 128 MiB), unless the caller names a chunk size.
CHUNK_ELEMENTS = 1 << 24


def visual_positions(span: JointLayout, device: Optional[torch.device] = None) -> torch.Tensor:
    """The sequence positions of the visual tokens, in sequence order."""
    pieces = [torch.arange(a, b, device=device) for a, b in span.visual_pieces()]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)


def probe_rows(n_visual: int, max_rows: Optional[int] = None) -> torch.Tensor:
    """Indices into the visual rows to measure: all of them, or ``max_rows`` evenly spaced ones.

    Evenly spaced over the raster (the first and the last visual row included), so the subset is
    the same on every call and covers the whole image rather than one corner of it.
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if max_rows is None or n_visual <= max_rows:
        return torch.arange(n_visual)
    # Spacing (n - 1) / (max_rows - 1) >= 1, so rounding keeps the indices distinct.
    return torch.linspace(0, n_visual - 1, max_rows, dtype=torch.float64).round().long()


def _as_4d(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # ComfyUI's conventions, as its attention functions read them: (Nq, Nk), (B, Nq, Nk) or
    # (B, H, Nq, Nk), any dim possibly 1.
    if mask is None:
        return None
    if mask.ndim == 2:
        return mask[None, None]
    if mask.ndim == 3:
        return mask[:, None]
    return mask


def _additive(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float64, device=mask.device).masked_fill_(~mask, -math.inf)
    return mask.double()


def _mask_part(mask: Optional[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """Mask rows x cols as float64 additive; a broadcast (size 1) dim stays size 1."""
    if mask is None:
        return None
    if mask.shape[-2] == n:
        mask = mask.index_select(-2, rows)
    if mask.shape[-1] == n:
        mask = mask.index_select(-1, cols)
    return _additive(mask)


def _logits(q_rows: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, r, D) x (B, H_kv, n, D) -> (B, H, r, n) float64, query head h reading key head h // (H / H_kv).

    The query heads of one key head are folded into the rows, so K is never repeated per head.
    """
    b, h, r, d = q_rows.shape
    h_kv = keys.shape[1]
    if h % h_kv:
        raise ValueError(f"{h} query heads cannot share {h_kv} key heads")
    folded = q_rows.double().reshape(b, h_kv, (h // h_kv) * r, d)
    return (torch.matmul(folded, keys.transpose(-1, -2)) * scale).view(b, h, r, keys.shape[2])


class _Chunk(NamedTuple):
    text_logits: torch.Tensor  # (B, H, r, T), before gamma
    text_mask: Optional[torch.Tensor]  # broadcastable to text_logits
    visual_lse: torch.Tensor  # (B, H, r)


def _chunks(q: torch.Tensor, k: torch.Tensor, span: JointLayout, mask: Optional[torch.Tensor],
            scale: Optional[float], rows: torch.Tensor, chunk: Optional[int]) -> Iterator[_Chunk]:
    """The text logits and the visual LSE of the query rows ``rows`` (sequence positions), chunk by chunk."""
    b, h, n, d = q.shape
    if k.shape[2] != n:
        raise ValueError(f"queries and keys must share one joint sequence, got {n} and {k.shape[2]} tokens")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    mask = None if mask is None else _as_4d(mask).to(q.device)
    text_cols = torch.arange(span.start, span.stop, device=q.device)
    visual_cols = visual_positions(span, q.device)
    text_keys = k.narrow(2, span.start, span.text_tokens).double()
    visual_keys = k.index_select(2, visual_cols).double()
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * max(visual_cols.numel(), span.text_tokens)))
    rows = rows.to(q.device)
    for first in range(0, rows.numel(), chunk):
        these = rows[first:first + chunk]
        q_rows = q.index_select(2, these)
        visual = _logits(q_rows, visual_keys, scale)
        visual_mask = _mask_part(mask, these, visual_cols, n)
        if visual_mask is not None:
            visual.add_(visual_mask)
        yield _Chunk(_logits(q_rows, text_keys, scale), _mask_part(mask, these, text_cols, n),
                     torch.logsumexp(visual, dim=-1))


def _shares(text_logits: torch.Tensor, text_mask: Optional[torch.Tensor], visual_lse: torch.Tensor,
            live: torch.Tensor, gamma: float) -> torch.Tensor:
    """share_i(gamma) per (B, H, row); 0 on rows that attend to nothing (``live`` False)."""
    scaled = text_logits * gamma
    if text_mask is not None:
        scaled = scaled + text_mask
    # Fully masked text: LSE -inf, share 0.  Fully masked visual keys: LSE -inf, share 1.
    share = torch.sigmoid(torch.logsumexp(scaled, dim=-1) - visual_lse)
    return torch.where(live, share, torch.zeros_like(share))


def _head_mean(shares: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """(B, H, R) shares -> (B, R): each row's mean over the heads where it attends to some key (0 where none)."""
    return shares.sum(dim=1) / live.sum(dim=1).clamp_min(1)


def _live(text_mask: Optional[torch.Tensor], visual_lse: torch.Tensor, n_text: int) -> torch.Tensor:
    """(B, H, row) rows that keep at least one key; a row with every key masked has no softmax to share."""
    if text_mask is None:
        text_kept = torch.tensor(n_text > 0, device=visual_lse.device)
    else:
        text_kept = (text_mask > -math.inf).any(dim=-1)
    return (text_kept | torch.isfinite(visual_lse)).expand(visual_lse.shape)


def _check(q: torch.Tensor, span: JointLayout) -> None:
    if q.ndim != 4 or q.shape[2] != span.length:
        raise ValueError(f"q must be (B, H, N, D) with N = {span.length}, got {tuple(q.shape)}")
    if span.text_tokens == span.length:
        raise ValueError("the joint sequence holds no image tokens, so there is no image-to-text share")


class ShareProbe(NamedTuple):
    """What one attention call says about its image rows, once; any number of gammas read it.

    text_logits: (B, H, R, T) scaled logits to the text keys, before gamma; text_mask: the mask on
    them, broadcastable (None: no mask); visual_lse: (B, H, R) the visual LSE with its mask; live:
    (B, H, R) rows with at least one unmasked key.  R: the measured image rows, ``rows`` (indices
    into the visual rows, see ``probe_rows``).
    """

    text_logits: torch.Tensor
    text_mask: Optional[torch.Tensor]
    visual_lse: torch.Tensor
    live: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def measure(cls, q: torch.Tensor, k: torch.Tensor, span: JointLayout, mask: Optional[torch.Tensor] = None,
                scale: Optional[float] = None, max_rows: Optional[int] = None,
                chunk: Optional[int] = None) -> "ShareProbe":
        """Run the gamma-independent part over the image rows ``probe_rows`` picks.

        Memory: B x H x R x T float64 for the text logits kept; the visual logits only ever exist
        one chunk of ``chunk`` rows at a time (None: about ``CHUNK_ELEMENTS`` logits a chunk).
        """
        _check(q, span)
        positions = visual_positions(span, q.device)
        rows = probe_rows(positions.numel(), max_rows).to(q.device)
        parts = list(_chunks(q, k, span, mask, scale, positions[rows], chunk))
        text_logits = torch.cat([p.text_logits for p in parts], dim=2)
        visual_lse = torch.cat([p.visual_lse for p in parts], dim=2)
        text_mask = parts[0].text_mask
        if text_mask is not None and len(parts) > 1 and text_mask.shape[2] != 1:
            text_mask = torch.cat([p.text_mask for p in parts], dim=2)
        return cls(text_logits, text_mask, visual_lse, _live(text_mask, visual_lse, span.text_tokens), rows)

    def shares(self, gamma: float) -> torch.Tensor:
        """share_i(gamma) for every measured row, (B, H, R); 0 on rows with every key masked."""
        return _shares(self.text_logits, self.text_mask, self.visual_lse, self.live, gamma)

    def row_shares(self, gamma: float) -> torch.Tensor:
        """(B, R): each measured row's share averaged over the heads that attend (as ``text_share_map``)."""
        return _head_mean(self.shares(gamma), self.live)

    def subset(self, keep: torch.Tensor) -> "ShareProbe":
        """The probe over some of its measured rows (``keep``: indices into them)."""
        mask = self.text_mask
        if mask is not None and mask.shape[2] != 1:
            mask = mask.index_select(2, keep)
        return ShareProbe(self.text_logits.index_select(2, keep), mask, self.visual_lse.index_select(2, keep),
                          self.live.index_select(2, keep), self.rows.index_select(0, keep))

    def mean_share(self, gammas: Sequence[float]) -> torch.Tensor:
        """(len(gammas), B) float64: the mean over live image rows and heads, per batch entry.

        A batch entry with every row masked has share 0.
        """
        count = self.live.sum(dim=(1, 2)).clamp_min(1)
        return torch.stack([self.shares(g).sum(dim=(1, 2)) / count for g in gammas])


def text_share(q: torch.Tensor, k: torch.Tensor, span: JointLayout, gammas: Sequence[float],
               mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
               max_rows: Optional[int] = None, chunk: Optional[int] = None) -> torch.Tensor:
    """The attention image queries give the text under eq. 10's gamma, (len(gammas), B) float64.

    q: (B, H, N, D); k: (B, H_kv, N, D), H_kv dividing H (query head h reads key head h // (H / H_kv));
    ``mask``: additive or boolean (True keeps), in ComfyUI's shapes, added to the logits after gamma;
    ``scale``: the softmax scale (None: 1/sqrt(D)).  Each entry is the mean of share_i(gamma) over
    heads and image queries, over ``max_rows`` evenly spaced image queries when the image has more
    (see ``probe_rows``).  The visual LSE is computed once for all gammas.
    """
    return ShareProbe.measure(q, k, span, mask, scale, max_rows, chunk).mean_share(gammas)


def text_share_map(q: torch.Tensor, k: torch.Tensor, span: JointLayout, gammas: Sequence[float] = (1.0,),
                   mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   chunk: Optional[int] = None) -> torch.Tensor:
    """Per image query, the share averaged over heads: (len(gammas), B, visual rows) float64.

    Every image row, in sequence order, so the last dim reshapes to the latent grid; computed chunk
    by chunk, nothing larger than one chunk's logits is kept.  Heads with every key masked are left
    out of a row's mean; a row with none left is 0.  Arguments as in ``text_share``.
    """
    _check(q, span)
    out: List[torch.Tensor] = []
    for part in _chunks(q, k, span, mask, scale, visual_positions(span, q.device), chunk):
        live = _live(part.text_mask, part.visual_lse, span.text_tokens)
        out.append(torch.stack([_head_mean(_shares(part.text_logits, part.text_mask, part.visual_lse, live, g), live)
                                for g in gammas]))
    return torch.cat(out, dim=-1)


class AdaptiveGamma(NamedTuple):
    gamma: float
    share: float  # the mean image-to-text share at that gamma (mean over batch entries)


# Grid points over [1, gamma_max] before the refinement: fine enough that share(gamma) crosses the
# target at most once, or has at most one peak, between neighbours on any real attention call.
GRID_POINTS = 65
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def search_gamma(probe: ShareProbe, target: float, gamma_max: float, tol: float = 1e-4,
                 grid_points: int = GRID_POINTS) -> AdaptiveGamma:
    """``adaptive_gamma`` on an already measured probe; see there."""
    if gamma_max < 1.0:
        raise ValueError(f"gamma_max must be at least 1, got {gamma_max}")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")

    def share(gamma: float) -> float:
        return float(probe.mean_share([gamma]).mean())

    at_one = share(1.0)
    if at_one >= target or gamma_max == 1.0:
        return AdaptiveGamma(1.0, at_one)
    grid = torch.linspace(1.0, gamma_max, max(2, grid_points), dtype=torch.float64).tolist()
    shares = probe.mean_share(grid).mean(dim=1).tolist()
    shares[0] = at_one
    # share(gamma) need not be monotonic (negative text logits fall further when scaled), so no
    # bisection over the whole interval: the first grid cell where the share reaches the target,
    # bisected inside; else the best grid point, refined by golden section around it.
    for i in range(1, len(grid)):
        if shares[i] >= target:
            lo, hi, at_lo, at_hi = grid[i - 1], grid[i], shares[i - 1], shares[i]
            while hi - lo > tol:
                mid = 0.5 * (lo + hi)
                at_mid = share(mid)
                if at_mid >= target:
                    hi, at_hi = mid, at_mid
                else:
                    lo, at_lo = mid, at_mid
            return AdaptiveGamma(lo, at_lo) if target - at_lo < at_hi - target else AdaptiveGamma(hi, at_hi)
    # The target is out of reach: the share closest to it is the largest one.
    best = max(range(len(grid)), key=lambda i: shares[i])
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    at_c, at_d = share(c), share(d)
    while b - a > tol:
        if at_c >= at_d:
            b, d, at_d = d, c, at_c
            c = b - _GOLDEN * (b - a)
            at_c = share(c)
        else:
            a, c, at_c = c, d, at_d
            d = a + _GOLDEN * (b - a)
            at_d = share(d)
    found = [(grid[best], shares[best]), (c, at_c), (d, at_d)]
    gamma, achieved = min(found, key=lambda pair: abs(pair[1] - target))
    return AdaptiveGamma(gamma, achieved)


def adaptive_gamma(q: torch.Tensor, k: torch.Tensor, span: JointLayout, target: float, gamma_max: float,
                   mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   max_rows: Optional[int] = None, tol: float = 1e-4,
                   chunk: Optional[int] = None) -> AdaptiveGamma:
    """The gamma in [1, gamma_max] whose image-to-text share comes closest to ``target``.

    The share is ``text_share`` averaged over batch entries.  If it already reaches the target at
    gamma 1, gamma is 1.  share(gamma) is not monotonic in general (image queries whose text logits
    are negative give the text less as gamma grows), so the search does not bisect the interval:
    a grid of ``GRID_POINTS`` gammas over [1, gamma_max], then

    * if the share reaches the target somewhere on the grid: bisection inside the first grid cell
      where it does, so the result is the smallest gamma reaching the target, within ``tol`` of it
      (a gamma within ``tol`` of a crossing of the target: |share - target| <= tol * |d share / d gamma|);
    * else (the target is out of reach): golden-section search for the largest share in the two grid
      cells around the best grid point, gamma within ``tol`` of that peak.

    A crossing or a peak narrower than one grid cell, (gamma_max - 1) / (GRID_POINTS - 1), can be
    missed.  The
    visual LSE is computed once; each gamma tried costs one B x H x rows x T pass.  Arguments as in
    ``text_share``.
    """
    probe = ShareProbe.measure(q, k, span, mask, scale, max_rows, chunk)
    return search_gamma(probe, target, gamma_max, tol)
