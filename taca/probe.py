"""How much attention image queries give the text: the share TACA turns up (arXiv 2506.07986).

For one joint attention call, image query i gives the text keys T the share

    share_i(gamma) = sum_{j in T} P_ij
                   = sigmoid( LSE_{j in T}(gamma * s_ij + m_ij) - LSE_{j in V}(s_ij + m_ij) )

of its softmax, with logits s_ij = scale * q_i.k_j, the additive mask m_ij added after eq. 10's
scaling (a boolean mask keeps where True) and V the visual keys.  The paper's diagnosis (sec. 3) is
that this share is small when image tokens outnumber text tokens; gamma > 1 raises it.

``ShareProbe.measure`` does the gamma-independent part once, a chunk of rows at a time: one matmul to
every key, the visual LSE and the rows x T text logits kept.  Every gamma after that is one rows x T
pass.  The logits are computed in the inputs' own matmul precision (float32 for float32, float16 and
bfloat16 inputs, float64 for float64 ones); only the LSEs' combination, the sigmoid and the means are
float64.  Against a float64 full softmax a share is then off by at most about a quarter of the float32
rounding of its logits: up to 2e-8 on means and 1.2e-7 per row on the tests' inputs (logits up to about
10); 1.3e-6 for one row and head with logits above 20, where float32 rounds a logit by up to 8e-6, while a
mean over rows stays near 1e-8.  Nothing in this module imports ComfyUI.
"""

from __future__ import annotations

import heapq
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .attention import JointLayout

# Logits per chunk of query rows: the rows x keys logits exist one chunk at a time, small enough to stay in a
# CPU's last-level cache (16 MiB of float32) while the passes over them run.
CHUNK_ELEMENTS = 1 << 22

# Image query rows the adaptive gamma measures per joint call (evenly spaced, see ``probe_rows``): few enough that
# measuring and searching cost about a tenth of an exact TACA call at a FLUX-like shape on a CPU (1024 rows: about
# half).  Its error against every row is a sampling error: on 10 images of 64 x 64 tokens whose text share varies
# over a blob, gamma searched in [1, 1.2] for the share halfway, the share (over every row) at the gamma found
# from 256 rows was within 0.005 of the target, the gamma within 0.045 of the one found from every row; from
# 1024 rows within 0.0026 and 0.013.
ADAPTIVE_ROWS = 256


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)
    return mask.to(dtype)


def _rows(t: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``t``'s entries at ``positions`` (a host tensor, increasing) along ``dim``: a view where they are consecutive."""
    count = positions.numel()
    if count and int(positions[-1]) - int(positions[0]) + 1 == count:
        return t.narrow(dim, int(positions[0]), count)
    return t.index_select(dim, positions.to(t.device))


def _mask_rows(mask: Optional[torch.Tensor], positions: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """The mask's query rows at sequence ``positions`` (a broadcast row dim stays size 1)."""
    if mask is None or mask.shape[-2] != n:
        return mask
    return _rows(mask, positions, mask.ndim - 2)


def _key_cols(mask: Optional[torch.Tensor], a: int, b: int, n: int) -> Optional[torch.Tensor]:
    if mask is None or mask.shape[-1] != n:
        return mask
    return mask.narrow(-1, a, b - a)


def _fold(q_rows: torch.Tensor, h_kv: int) -> torch.Tensor:
    """(B, H, r, D) -> (B, H_kv, (H / H_kv) r, D): the query heads of one key head as rows, so K is never repeated."""
    b, h, r, d = q_rows.shape
    if h % h_kv:
        raise ValueError(f"{h} query heads cannot share {h_kv} key heads")
    return q_rows if h == h_kv else q_rows.reshape(b, h_kv, (h // h_kv) * r, d)


def _logits(q_rows: torch.Tensor, keys_t: torch.Tensor, scale: float,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """scale * q_rows . keys^T: (B, H, r, D) x keys_t (B H_kv, D, n) -> (B, H, r, n), in one batched matmul.

    ``out``: a (B H_kv, (H / H_kv) r, n) buffer to write into (None: a new one).
    """
    b, h, r, d = q_rows.shape
    h_kv, n = keys_t.shape[0] // b, keys_t.shape[2]
    folded = _fold(q_rows, h_kv).reshape(b * h_kv, -1, d)
    ignored = folded.new_zeros(()).expand(b * h_kv, folded.shape[1], n)  # beta 0: only its shape counts
    if out is None:
        out = torch.baddbmm(ignored, folded, keys_t, beta=0.0, alpha=scale)
    else:
        torch.baddbmm(ignored, folded, keys_t, beta=0.0, alpha=scale, out=out)
    return out.view(b, h, r, n)


def _apply_mask(logits: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """Add an additive mask, or cut where a boolean one is False, in place."""
    if mask is None:
        return
    if mask.dtype == torch.bool:
        logits.masked_fill_(~mask, -math.inf)
    else:
        logits.add_(mask)


def _lse(*pieces: torch.Tensor) -> torch.Tensor:
    """float64 LSE over the last dim of ``pieces`` together (each overwritten); -inf where every entry is -inf.

    The largest entry is taken out first, so each term is at most 1 and the sum at least 1 where any entry is
    finite; the log and the largest entry added back are float64 (added in float32 they would round the LSE
    by up to half a unit in its last place, 1e-6 for an LSE of 20).
    """
    top = pieces[0].amax(dim=-1, keepdim=True)
    for piece in pieces[1:]:
        top = torch.maximum(top, piece.amax(dim=-1, keepdim=True))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = sum(piece.sub_(top).exp_().sum(dim=-1).double() for piece in pieces)
    return top.squeeze(-1).double() + total.log_()


class ShareProbe(NamedTuple):
    """What one attention call says about its image rows, once; any number of gammas read it.

    text_logits: (B, H, R, T) the scaled logits to the text keys minus ``text_max`` (float32, or float64 for
    float64 inputs), before gamma.  text_max: (B, H, R) float64, each row's largest masked text
    logit at gamma 1 (0 where every text key is masked); text_mask: the additive mask on the text keys,
    broadcastable to (B, H, R, T) (None: no mask); visual_lse: (B, H, R) float64 the visual LSE with its
    mask; live: (B, H, R) rows with at least one unmasked key.  R: the measured image rows, ``rows`` (indices
    into the visual rows, see ``probe_rows``).  With no mask every text logit minus its row's largest is at
    most 0, so a gamma >= 0 needs no further shift: the largest term of the text sum is 1.
    """

    text_logits: torch.Tensor
    text_max: torch.Tensor
    text_mask: Optional[torch.Tensor]
    visual_lse: torch.Tensor
    live: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def measure(cls, q: torch.Tensor, k: torch.Tensor, span: JointLayout, mask: Optional[torch.Tensor] = None,
                scale: Optional[float] = None, max_rows: Optional[int] = None,
                chunk: Optional[int] = None) -> "ShareProbe":
        """Run the gamma-independent part over the image rows ``probe_rows`` picks.

        q: (B, H, N, D); k: (B, H_kv, N, D), H_kv dividing H (query head h reads key head h // (H / H_kv));
        ``mask``: additive or boolean (True keeps), in ComfyUI's shapes (any dim possibly 1), added to the
        logits after gamma; ``scale``: the softmax scale (None: 1/sqrt(D)).

        Memory: the B x H x R x T text logits kept, and the logits of ``chunk`` rows (to every key) at a time
        (None: about ``CHUNK_ELEMENTS`` logits a chunk).
        """
        _check(q, k, span)
        b, h, n, d = q.shape
        dtype, device = _compute_dtype(q.dtype), q.device
        if scale is None:
            scale = 1.0 / math.sqrt(d)
        positions = visual_positions(span)  # on the host, so picking rows never waits for the device
        rows = probe_rows(positions.numel(), max_rows)
        positions = positions[rows]
        r, t, h_kv = rows.numel(), span.text_tokens, k.shape[1]
        # (B H_kv, D, N): a view of K in its usual layouts; a (B, N, H*D) one, as SD3's, is copied here once.
        keys_t = k.to(dtype).reshape(b * h_kv, n, d).transpose(1, 2)
        mask = None if mask is None else _as_4d(mask).to(device)
        text_mask = _key_cols(_mask_rows(mask, positions, n), span.start, span.stop, n)
        if text_mask is not None:
            text_mask = _additive(text_mask, dtype)
        text_logits = torch.empty((b, h, r, t), dtype=dtype, device=device)
        text_max = torch.full((b, h, r, 1), -math.inf, dtype=dtype, device=device)
        visual_lse = torch.empty((b, h, r), dtype=torch.float64, device=device)
        if chunk is None:
            chunk = max(1, CHUNK_ELEMENTS // (b * h * n))
        buffer = None  # one chunk's logits, reused
        for first in range(0, r, chunk):
            these = min(chunk, r - first)
            at = positions.narrow(0, first, these)
            if these == chunk and buffer is None:
                buffer = torch.empty((b * h_kv, (h // h_kv) * chunk, n), dtype=dtype, device=device)
            logits = _logits(_rows(q, at, 2).to(dtype), keys_t, scale, buffer if these == chunk else None)
            if t:
                text = logits.narrow(-1, span.start, t)
                text_part_mask = text_mask
                if text_mask is not None and text_mask.shape[2] != 1:
                    text_part_mask = text_mask.narrow(2, first, these)
                top = (text if text_part_mask is None else text + text_part_mask).amax(dim=-1, keepdim=True)
                text_max.narrow(2, first, these).copy_(top)
                top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
                torch.sub(text, top, out=text_logits.narrow(2, first, these))
            part_mask = None if mask is None else _mask_rows(mask, at, n)
            pieces = []
            for a, stop in span.visual_pieces():
                piece = logits.narrow(-1, a, stop - a)
                _apply_mask(piece, _key_cols(part_mask, a, stop, n))
                pieces.append(piece)
            visual_lse.narrow(2, first, these).copy_(_lse(*pieces))
        text_kept = torch.isfinite(text_max).squeeze(-1)
        text_max = torch.where(text_kept, text_max.squeeze(-1), torch.zeros_like(visual_lse, dtype=dtype))
        live = text_kept | torch.isfinite(visual_lse)
        return cls(text_logits, text_max.double(), text_mask, visual_lse, live, rows.to(device))

    def text_lse(self, gamma: float) -> torch.Tensor:
        """(B, H, R) float64: LSE_{j in T}(gamma * s_ij + m_ij); -inf where every text key is masked."""
        logits, mask = self.text_logits, self.text_mask
        if logits.shape[-1] == 0:
            return torch.full(self.visual_lse.shape, -math.inf, dtype=torch.float64, device=logits.device)
        if mask is not None or gamma < 0:
            x = logits * gamma
            _apply_mask(x, mask)
            return self.text_max * gamma + _lse(x)
        # Every term at most 1, the largest exactly 1: no shift needed.  In chunks of rows that stay in cache.
        t = logits.shape[-1]
        flat = logits.view(-1, t)
        step = max(1, CHUNK_ELEMENTS // t)
        scratch = torch.empty((min(step, flat.shape[0]), t), dtype=logits.dtype, device=logits.device)
        sums = torch.empty(flat.shape[0], dtype=logits.dtype, device=logits.device)
        for first in range(0, flat.shape[0], step):
            these = min(step, flat.shape[0] - first)
            x = torch.mul(flat.narrow(0, first, these), gamma, out=scratch.narrow(0, 0, these)).exp_()
            torch.sum(x, dim=-1, out=sums.narrow(0, first, these))
        return self.text_max * gamma + sums.view(self.visual_lse.shape).double().log_()

    def shares(self, gamma: float) -> torch.Tensor:
        """share_i(gamma) for every measured row, (B, H, R) float64; 0 on rows with every key masked.

        Fully masked text: share 0; fully masked visual keys: share 1.
        """
        share = torch.sigmoid(self.text_lse(gamma) - self.visual_lse)
        return torch.where(self.live, share, torch.zeros_like(share))

    def row_shares(self, gamma: float) -> torch.Tensor:
        """(B, R): each measured row's share averaged over the heads that attend (0 where none does)."""
        return self.shares(gamma).sum(dim=1) / self.live.sum(dim=1).clamp_min(1)

    def subset(self, keep: torch.Tensor) -> "ShareProbe":
        """The probe over some of its measured rows (``keep``: indices into them)."""
        mask = self.text_mask
        if mask is not None and mask.shape[2] != 1:
            mask = mask.index_select(2, keep)
        return ShareProbe(self.text_logits.index_select(2, keep), self.text_max.index_select(2, keep), mask,
                          self.visual_lse.index_select(2, keep), self.live.index_select(2, keep),
                          self.rows.index_select(0, keep))

    def mean_share(self, gammas: Sequence[float]) -> torch.Tensor:
        """(len(gammas), B) float64: the mean over live image rows and heads, per batch entry.

        A batch entry with every row masked has share 0.
        """
        count = self.live.sum(dim=(1, 2)).clamp_min(1)
        return torch.stack([self.shares(g).sum(dim=(1, 2)) / count for g in gammas])


def _check(q: torch.Tensor, k: torch.Tensor, span: JointLayout) -> None:
    if q.ndim != 4 or q.shape[2] != span.length:
        raise ValueError(f"q must be (B, H, N, D) with N = {span.length}, got {tuple(q.shape)}")
    if k.ndim != 4 or k.shape[2] != q.shape[2]:
        raise ValueError(f"queries and keys must share one joint sequence, got {q.shape[2]} and "
                         f"{k.shape[2] if k.ndim == 4 else tuple(k.shape)} tokens")
    if span.text_tokens == span.length:
        raise ValueError("the joint sequence holds no image tokens, so there is no image-to-text share")


class AdaptiveGamma(NamedTuple):
    gamma: float
    share: float  # the mean image-to-text share at that gamma (mean over batch entries)


# max |sigma''| = max |s (1 - s)(1 - 2 s)|, at s = 1/2 -+ 1/(2 sqrt 3).
_SIGMOID_CURVATURE = 1.0 / (6.0 * math.sqrt(3.0))


class _Point(NamedTuple):
    gamma: float
    share: float
    row_f: torch.Tensor  # per row f_i = LSE_T(gamma) - LSE_V, 0 where the row does not count


class _Search:
    """share(gamma) = sum_i w_i sigmoid(f_i(gamma)), each f_i convex in gamma, with bounds over an interval.

    f_i(gamma) = LSE_{j in T}(gamma s_ij + m_ij) - LSE_V is a log-sum-exp of functions linear in gamma, so on
    [a, b] it lies below its chord l_i, and as sigmoid rises, share <= g = sum_i w_i sigmoid(l_i) there, with
    g(a) = share(a), g(b) = share(b) and |g''| <= K = max|sigma''| sum_i w_i slope_i^2.  Upper bounds of share on
    [a, b] from that: each row at the larger end; g's linear interpolation plus K (gamma - a)(b - gamma) / 2; a
    second-order Taylor bound from either end.  Weights w_i: 1 / (B x live rows of the entry) on live rows.
    """

    def __init__(self, probe: ShareProbe):
        self.probe = probe
        count = probe.live.sum(dim=(1, 2), keepdim=True).clamp_min(1).double()
        self.weight = probe.live.double() / (count * probe.live.shape[0])
        self.evaluations = 0

    def point(self, gamma: float) -> _Point:
        self.evaluations += 1
        f = self.probe.text_lse(gamma) - self.probe.visual_lse
        f = torch.where(self.probe.live, f, torch.zeros_like(f))  # off rows: NaN (every key masked) made 0
        return _Point(gamma, float((self.weight * torch.sigmoid(f)).sum()), f)

    def upper_bound(self, a: _Point, b: _Point) -> float:
        """An upper bound of share on [a, b]."""
        width = b.gamma - a.gamma
        slope = (b.row_f - a.row_f) / width
        slope = torch.where(torch.isfinite(slope), slope, torch.zeros_like(slope))  # +-inf rows are constant
        at_a, at_b = torch.sigmoid(a.row_f), torch.sigmoid(b.row_f)
        w = self.weight
        stats = torch.stack([(w * torch.maximum(at_a, at_b)).sum(), (w * slope * slope).sum(),
                             (w * at_a * (1 - at_a) * slope).sum(), (w * at_b * (1 - at_b) * slope).sum()])
        each_row_at_best, mean_square_slope, g_a, g_b = stats.tolist()
        curvature = _SIGMOID_CURVATURE * mean_square_slope
        bend = 0.5 * curvature * width * width
        rise = b.share - a.share
        # s_a + rise t + bend t (1 - t) over t in [0, 1]
        t = min(1.0, max(0.0, 0.5 * (1.0 + rise / bend))) if bend > 0 else (1.0 if rise > 0 else 0.0)
        interpolated = a.share + rise * t + bend * t * (1.0 - t)
        from_b = b.share + max(0.0, -g_b * width + bend)
        from_a = a.share + max(0.0, g_a * width + bend)
        return min(each_row_at_best, interpolated, from_a, from_b)


def _crossing_estimate(a: _Point, b: _Point, older: Optional[_Point], target: float) -> float:
    """Where share crosses the target between a and b: inverse quadratic interpolation through a, b and the
    point a bracket end replaced last, where it lands inside; else the secant through a and b."""
    if older is not None:
        (ga, sa), (gb, sb), (gc, sc) = (a.gamma, a.share), (b.gamma, b.share), (older.gamma, older.share)
        if sa != sc and sb != sc:
            guess = (ga * (target - sb) * (target - sc) / ((sa - sb) * (sa - sc))
                     + gb * (target - sa) * (target - sc) / ((sb - sa) * (sb - sc))
                     + gc * (target - sa) * (target - sb) / ((sc - sa) * (sc - sb)))
            if ga < guess < gb:
                return guess
    return a.gamma + (b.gamma - a.gamma) * (target - a.share) / (b.share - a.share)


def search_gamma(probe: ShareProbe, target: float, gamma_max: float, tol: float = 1e-4) -> AdaptiveGamma:
    """The gamma in [1, gamma_max] whose mean image-to-text share on ``probe`` comes closest to ``target``.

    The share is ``probe.mean_share`` averaged over batch entries.  If it reaches the target at gamma 1, gamma
    is 1.  Else the smallest gamma where it reaches the target, within ``tol`` of it (the closer of the two
    ends of the last bracket, by share); if it never does, the gamma of the largest share, within ``tol``.

    share(gamma) need not be monotonic (image queries whose text logits are negative give the text less as
    gamma grows), so the search does not trust a bisection of the whole interval; nor does it sample a grid
    and hope nothing happens between its points.  Each row's log-odds f_i(gamma) is convex in gamma, which
    bounds the share between two measured gammas from above (``_Search``): an interval whose bound stays
    below the target cannot hold a crossing and is dropped, any other is split, left to right, so the first
    crossing is never missed, however narrow.  Inside the first interval that ends at or above the target,
    inverse quadratic interpolation (bisection where it is slow) narrows the crossing to ``tol``, each point
    below the target checked by the bound for an earlier crossing.  With no crossing, intervals whose bound
    is below the best share found are dropped and the rest split until ``tol`` wide.  Each gamma tried costs
    one B x H x rows x T pass; a smooth share takes about 6 (1, gamma_max, then the interpolation).
    """
    if gamma_max < 1.0:
        raise ValueError(f"gamma_max must be at least 1, got {gamma_max}")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    search = _Search(probe)
    one = search.point(1.0)
    if one.share >= target or gamma_max == 1.0:
        return AdaptiveGamma(1.0, one.share)
    cleared: List[Tuple[_Point, _Point]] = []  # intervals without a crossing, for the largest share

    def closer(a: _Point, b: _Point) -> AdaptiveGamma:
        best = a if target - a.share < b.share - target else b
        return AdaptiveGamma(best.gamma, best.share)

    def first_crossing(a: _Point, b: _Point) -> Optional[AdaptiveGamma]:
        """The first crossing in (a, b] (share(a) below the target), or None if there is none."""
        pending = [(a, b)]  # the leftmost last
        while pending:
            a, b = pending.pop()
            if b.share >= target:
                return bracketed(a, b)
            if b.gamma - a.gamma <= tol or search.upper_bound(a, b) < target:
                cleared.append((a, b))
                continue
            m = search.point(0.5 * (a.gamma + b.gamma))
            pending += [(m, b), (a, m)]
        return None

    def bracketed(a: _Point, b: _Point) -> AdaptiveGamma:
        """share(a) < target <= share(b), no crossing at or before a: the crossing in (a, b], to ``tol``."""
        last, older, widths = 0, None, [b.gamma - a.gamma]  # which end moved last (-1 a, +1 b); the end it replaced
        while b.gamma - a.gamma > tol:
            width = b.gamma - a.gamma
            guess = _crossing_estimate(a, b, older, target)
            if len(widths) >= 3 and width > 0.5 * widths[-3]:
                guess = a.gamma + 0.5 * width  # slow: bisect
            # Aimed a third of the tolerance past the estimate, away from the end that moved last: once the
            # estimate is that close, the point lands on the other side and the bracket closes.
            m = search.point(min(b.gamma - 0.25 * tol, max(a.gamma + 0.25 * tol, guess - tol * last / 3.0)))
            if m.share >= target:
                older, b, last = b, m, 1
            else:
                earlier = first_crossing(a, m)  # a crossing between a and m that the estimate jumped over?
                if earlier is not None:
                    return earlier
                older, a, last = a, m, -1
            widths.append(b.gamma - a.gamma)
        return closer(a, b)

    found = first_crossing(one, search.point(gamma_max))
    if found is not None:
        return found
    # The target is out of reach: the share closest to it is the largest one.
    best = max((p for cell in cleared for p in cell), key=lambda p: p.share)
    queue = [(-search.upper_bound(a, b), i, a, b) for i, (a, b) in enumerate(cleared)]
    heapq.heapify(queue)
    order = len(queue)
    while queue:
        bound, _, a, b = heapq.heappop(queue)
        if -bound <= best.share or b.gamma - a.gamma <= tol:
            continue
        m = search.point(0.5 * (a.gamma + b.gamma))
        best = max(best, m, key=lambda p: p.share)
        for cell in ((a, m), (m, b)):
            heapq.heappush(queue, (-search.upper_bound(*cell), order, *cell))
            order += 1
    return AdaptiveGamma(best.gamma, best.share)
