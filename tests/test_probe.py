"""The image-to-text share probe against a float64 brute force of eq. 10 (no ComfyUI involved).

The probe computes its logits in the inputs' matmul precision (float32 for float32 and bfloat16 inputs) and
only the last steps in float64, so against the float64 full softmax of the same inputs it is within float32
rounding, not equal.
"""

import math

import pytest
import torch

from taca import probe
from taca.attention import JointLayout

GAMMAS = (1.0, 1.25, 2.0, 3.5)
TOL = 1e-6  # shares against the float64 full softmax


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small gain nothing from intra-op threads; on a busy CPU their hand-offs dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["one_chunk", "row_by_row"])
def chunks(request, monkeypatch):
    """The logits in one chunk, and one row at a time (and every gamma's pass a row of heads at a time)."""
    if request.param == "row_by_row":
        monkeypatch.setattr(probe, "CHUNK_ELEMENTS", 16)
    return request.param


# ---------------------------------------------------------------- float64 references

def brute_force_shares(q, k, span, gammas, mask=None, scale=None, queries=None):
    """(G, B, H, N) float64: sum of the text columns of the full softmax, NaN on fully masked rows
    (``queries``: only those query rows, by sequence position).

    Explicit N x N logits, eq. 10's gamma on the visual-query x text-key block, the mask added after
    the scaling (boolean: True keeps); mask shapes as ComfyUI's attention reads them.
    """
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # query head h reads key head h // (H / H_kv)
    n = q.shape[2]
    queries = torch.arange(n) if queries is None else queries
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.einsum("bhid,bhjd->bhij", q[:, :, queries], k) * scale
    text = torch.zeros(n, dtype=torch.bool)
    text[span.start:span.stop] = True
    block = ((~text)[queries][:, None] & text[None, :]).double()
    if mask is not None:
        mask = mask[None, None] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask
        mask = mask[..., queries, :] if mask.shape[-2] == n else mask
    gammas = torch.tensor(gammas, dtype=torch.float64)
    out = []
    for some in gammas.split(128):  # 128 gammas at a time keeps the (G, B, H, N, N) logits small
        scaled = logits[None] * (1.0 + (some[:, None, None] - 1.0) * block)[:, None, None]
        if mask is not None and mask.dtype == torch.bool:
            scaled = scaled.masked_fill(~mask, -math.inf)
        elif mask is not None:
            scaled = scaled + mask.double()
        out.append(torch.softmax(scaled, dim=-1)[..., text].sum(dim=-1))
    return torch.cat(out)


def visual_rows(span):
    rows = torch.ones(span.length, dtype=torch.bool)
    rows[span.start:span.stop] = False
    return rows


def brute_force_mean(q, k, span, gammas, mask=None, scale=None, rows=None):
    """(G, B): mean over heads and image rows (``rows``: indices into them), leaving out fully masked rows
    (0 if none is left)."""
    queries = torch.nonzero(visual_rows(span)).flatten()
    shares = brute_force_shares(q, k, span, gammas, mask, scale, queries if rows is None else queries[rows])
    live = ~shares.isnan()
    return shares.nan_to_num(0.0).sum(dim=(2, 3)) / live.sum(dim=(2, 3)).clamp_min(1)


def brute_force_map(q, k, span, gammas, mask=None, scale=None):
    """(G, B, visual rows): per image row, the mean over heads with a softmax (0 if none)."""
    shares = brute_force_shares(q, k, span, gammas, mask, scale)[..., visual_rows(span)]
    live = ~shares.isnan()
    return shares.nan_to_num(0.0).sum(dim=2) / live.sum(dim=2).clamp_min(1)


def grid_search(q, k, span, target, gamma_max, mask=None, scale=None, rows=None, points=3001, fine=2001):
    """Brute force: the smallest gamma whose share reaches the target on a grid of ``points`` over
    [1, gamma_max], then on a grid of ``fine`` points across the grid cell before it; else the best grid gamma.

    Returns (gamma, share, resolution): the crossing is found to ``resolution`` in gamma.
    """
    def shares(grid):
        return brute_force_mean(q, k, span, grid.tolist(), mask, scale, rows).mean(dim=1)

    grid = torch.linspace(1.0, gamma_max, points, dtype=torch.float64)
    coarse = shares(grid)
    reached = torch.nonzero(coarse >= target).flatten()
    if not reached.numel():
        i = int((coarse - target).abs().argmin())
        return float(grid[i]), float(coarse[i]), float(grid[1] - grid[0])
    i = int(reached[0])
    if i == 0:
        return 1.0, float(coarse[0]), 0.0
    grid = torch.linspace(float(grid[i - 1]), float(grid[i]), fine, dtype=torch.float64)
    near = shares(grid)
    j = int(torch.nonzero(near >= target).flatten()[0])
    return float(grid[j]), float(near[j]), float(grid[1] - grid[0])


# ---------------------------------------------------------------- what the callers ask of the probe

def text_share(q, k, span, gammas, mask=None, scale=None, max_rows=None, chunk=None):
    """(G, B) float64: the mean share per gamma, over ``max_rows`` evenly spaced image rows."""
    return probe.ShareProbe.measure(q, k, span, mask, scale, max_rows, chunk).mean_share(gammas)


def text_share_map(q, k, span, gammas, mask=None, scale=None, chunk=None):
    """(G, B, visual rows) float64: every image row's share averaged over heads, as the probe's map."""
    measured = probe.ShareProbe.measure(q, k, span, mask, scale, None, chunk)
    return torch.stack([measured.row_shares(g) for g in gammas])


def adaptive_gamma(q, k, span, target, gamma_max, mask=None, scale=None, max_rows=None, tol=1e-4):
    measured = probe.ShareProbe.measure(q, k, span, mask, scale, max_rows)
    return probe.search_gamma(measured, target, gamma_max, tol)


# ---------------------------------------------------------------- inputs

def make_qk(n, batch=2, heads=3, kv_heads=None, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=g) * 2.0  # logits large enough for gamma to matter
    k = torch.randn(batch, kv_heads or heads, n, dim, generator=g)
    q[1] *= 0.5  # the two batch entries differ in more than noise
    return q, k


N_TEXT, N_VISUAL = 7, 40
N = N_TEXT + N_VISUAL
SPANS = {
    "text_first": JointLayout.text_first(N_TEXT, N),
    "text_last": JointLayout.text_last(N_TEXT, N),
    "text_middle": JointLayout(10, 10 + N_TEXT, N),
}


def case_inputs(case, n=N):
    """q, k, mask, scale of one input case on a joint sequence of n tokens."""
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, mask, scale = 3, None, None, None
    if case == "additive_with_inf":  # (B, H, N, N), some keys cut but every row keeps its own token
        mask = torch.randn(2, 3, n, n, generator=g)
        mask[torch.rand(2, 3, n, n, generator=g) < 0.3] = -math.inf
        mask.diagonal(dim1=-2, dim2=-1).zero_()
    elif case == "bool":  # (B, 1, N, N)
        mask = torch.rand(2, 1, n, n, generator=g) > 0.3
        mask |= torch.eye(n, dtype=torch.bool)
    elif case == "key_padding":  # (B, 1, 1, N): three keys of entry 1 cut, text and visual ones
        mask = torch.zeros(2, 1, 1, n)
        mask[1, ..., [2, n // 2, n - 7]] = -math.inf
    elif case == "shared_2d":  # (N, N) additive, the same for every entry and head
        mask = torch.randn(n, n, generator=g)
    elif case == "gqa_bool_3d":  # 4 query heads on 2 key heads, a (B, N, N) boolean mask
        heads, kv_heads = 4, 2
        mask = (torch.rand(2, n, n, generator=g) > 0.2) | torch.eye(n, dtype=torch.bool)
    elif case == "gqa_additive_per_head":  # 6 query heads on 2 key heads, a (B, H, N, N) additive mask
        heads, kv_heads = 6, 2
        mask = torch.randn(2, 6, n, n, generator=g)
        mask[torch.rand(2, 6, n, n, generator=g) < 0.2] = -math.inf
        mask.diagonal(dim1=-2, dim2=-1).zero_()
    elif case == "custom_scale":
        scale = 0.3
    q, k = make_qk(n, heads=heads, kv_heads=kv_heads)
    if case == "token_major":  # SD3's layout: (B, N, H*D) memory seen as (B, H, N, D), no head stride to fold
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    return q, k, mask, scale


CASES = ["plain", "additive_with_inf", "bool", "key_padding", "shared_2d", "gqa_bool_3d", "gqa_additive_per_head",
         "custom_scale", "token_major"]


# ---------------------------------------------------------------- shares

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("order", list(SPANS))
def test_text_share_matches_brute_force(order, case, chunks):
    span = SPANS[order]
    q, k, mask, scale = case_inputs(case)
    ref = brute_force_mean(q, k, span, GAMMAS, mask, scale)
    for chunk in (None, 5):  # one chunk, and chunks that do not divide the rows
        out = text_share(q, k, span, GAMMAS, mask=mask, scale=scale, chunk=chunk)
        assert out.shape == (len(GAMMAS), 2) and out.dtype == torch.float64
        # Measured: at most 1.6e-8 over these cases (float32 logits against float64 ones); the map 1.2e-7.
        assert (out - ref).abs().max() <= TOL
    # The inputs are not degenerate: the entries differ and gamma moves the share.
    assert (ref[:, 0] - ref[:, 1]).abs().max() > 1e-2
    assert (ref[-1] - ref[0]).abs().min() > 1e-3
    heatmap = text_share_map(q, k, span, (1.0, 2.0), mask=mask, scale=scale, chunk=6)
    assert heatmap.shape == (2, 2, N_VISUAL)
    assert (heatmap - brute_force_map(q, k, span, (1.0, 2.0), mask, scale)).abs().max() <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", ["plain", "bool", "additive_with_inf", "gqa_bool_3d"])
def test_text_share_in_each_input_dtype(case, dtype, chunks):
    """bf16 and fp16 inputs: float32 logits of the very values given; float64 inputs: float64 throughout."""
    span = SPANS["text_middle"]
    q, k, mask, scale = case_inputs(case)
    q, k = q.to(dtype), k.to(dtype)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    ref = brute_force_mean(q, k, span, GAMMAS, mask, scale)
    measured = probe.ShareProbe.measure(q, k, span, mask, scale)
    assert measured.text_logits.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Measured: float64 inputs 2.2e-16, bf16 ones 8e-8, fp16 ones 1.0e-7.
    assert (measured.mean_share(GAMMAS) - ref).abs().max() <= (1e-12 if dtype == torch.float64 else TOL)
    row_ref = brute_force_map(q, k, span, GAMMAS[1:2], mask, scale)[0]
    assert (measured.row_shares(GAMMAS[1]) - row_ref).abs().max() <= (1e-12 if dtype == torch.float64 else TOL)


@pytest.mark.parametrize("order", ["text_first", "text_middle"])
def test_large_logits_on_many_keys(order, chunks):
    """Hundreds of keys and logits above 20, where float32 rounds a logit by up to 8e-6: a share moves by up to
    about a quarter of that, so here one head's share, and the mean of two, can be off by more than 1e-6; a
    mean over many rows stays far below."""
    n_text, n_visual, heads, dim = 77, 700, 2, 64
    n = n_text + n_visual
    span = JointLayout.text_first(n_text, n) if order == "text_first" else JointLayout(300, 300 + n_text, n)
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, heads, n, dim, generator=g) * 4.0, torch.randn(1, heads, n, dim, generator=g)
    k[:, :, span.start:span.stop] += 0.3 * q[:, :, span.stop:span.stop + n_text].mean(dim=2, keepdim=True)
    rows = probe.probe_rows(n_visual, 96)
    gammas = (1.0, 1.2, 1.5)
    shares = brute_force_shares(q, k, span, gammas)[..., visual_rows(span)][..., rows]
    measured = probe.ShareProbe.measure(q, k, span, max_rows=96)
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) / math.sqrt(dim)
    assert logits.abs().max() > 20.0
    for i, gamma in enumerate(gammas):
        # Measured: per row and head up to 1.3e-6, per row (the map's mean of the 2 heads) 9.7e-7.
        assert (measured.shares(gamma) - shares[i]).abs().max() <= 2 * TOL
        assert (measured.row_shares(gamma) - shares[i].mean(dim=1)).abs().max() <= 2 * TOL
    # Measured: 1.3e-8.
    assert (measured.mean_share(gammas) - shares.mean(dim=(2, 3))).abs().max() <= 1e-7


def test_fully_masked_text_visual_keys_and_rows(chunks):
    span = SPANS["text_first"]
    q, k = make_qk(N)
    mask = torch.ones(2, 3, N, N, dtype=torch.bool)
    text, vis = slice(span.start, span.stop), torch.nonzero(visual_rows(span)).flatten()
    mask[:, :, vis[0], text] = False  # no text key: share 0
    mask[:, :, vis[1], N_TEXT:] = False  # no visual key: share 1
    mask[:, :, vis[2]] = False  # no key at all, in every head: left out, its map entry 0
    mask[0, 1, vis[3]] = False  # no key in one head: the others make up the row
    out = text_share(q, k, span, GAMMAS, mask=mask)
    assert torch.isfinite(out).all()
    assert (out - brute_force_mean(q, k, span, GAMMAS, mask)).abs().max() <= TOL
    heatmap = text_share_map(q, k, span, GAMMAS, mask=mask)
    assert torch.isfinite(heatmap).all()
    assert (heatmap - brute_force_map(q, k, span, GAMMAS, mask)).abs().max() <= TOL
    assert (heatmap[:, :, 0] == 0).all() and (heatmap[:, :, 1] == 1).all() and (heatmap[:, :, 2] == 0).all()
    # The same cuts as an additive mask of -inf.
    additive = torch.zeros(mask.shape).masked_fill_(~mask, -math.inf)
    assert (text_share(q, k, span, GAMMAS, mask=additive) - out).abs().max() <= 1e-12


def test_every_row_masked_is_share_zero(chunks):
    span = SPANS["text_last"]
    q, k = make_qk(N)
    mask = torch.zeros(2, 1, N, N)
    mask[0, :, visual_rows(span)] = -math.inf
    out = text_share(q, k, span, GAMMAS, mask=mask)
    assert (out[:, 0] == 0).all() and (out[:, 1] > 0).all()


def test_no_text_tokens_share_zero_and_no_image_refused(chunks):
    q, k = make_qk(N)
    assert (text_share(q, k, JointLayout.text_first(0, N), GAMMAS) == 0).all()
    with pytest.raises(ValueError, match="no image tokens"):
        text_share(q, k, JointLayout.text_first(N, N), GAMMAS)
    with pytest.raises(ValueError, match="one joint sequence"):
        probe.ShareProbe.measure(q, k[:, :, 1:], JointLayout.text_first(N_TEXT, N))


def test_probe_rows_evenly_spaced_with_both_ends():
    assert torch.equal(probe.probe_rows(40, None), torch.arange(40))
    assert torch.equal(probe.probe_rows(40, 40), torch.arange(40))
    rows = probe.probe_rows(4096, 256)
    assert rows.numel() == 256 and rows[0] == 0 and rows[-1] == 4095
    assert (rows.diff() >= 16).all() and (rows.diff() <= 17).all()
    assert torch.equal(probe.probe_rows(4096, 256), rows)  # deterministic
    assert torch.equal(probe.probe_rows(1000, 999).unique(), probe.probe_rows(1000, 999))


@pytest.mark.parametrize("order", ["text_first", "text_middle"])
def test_subset_rows_are_the_full_measure_on_those_rows(order, chunks):
    span = SPANS[order]
    q, k, mask, _ = case_inputs("additive_with_inf")
    rows = probe.probe_rows(N_VISUAL, 9)
    ref = brute_force_mean(q, k, span, GAMMAS, mask, rows=rows)
    measured = probe.ShareProbe.measure(q, k, span, mask, max_rows=9)
    assert torch.equal(measured.rows, rows)
    assert (measured.mean_share(GAMMAS) - ref).abs().max() <= TOL
    # A subset of a full measure is the measure of those rows.
    every_row = probe.ShareProbe.measure(q, k, span, mask)
    assert (every_row.subset(rows).mean_share(GAMMAS) - ref).abs().max() <= TOL


def test_subset_estimate_on_a_large_image():
    """64 x 64 image tokens, 256 of them measured: the estimate is within three standard errors."""
    side, n_text, dim = 64, 77, 8
    n = n_text + side * side
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, n, dim, generator=g) * 0.5, torch.randn(1, 1, n, dim, generator=g)
    # A share that varies over the image, as a prompt's subject would: image queries in a blob lean
    # towards the text keys' common direction.
    towards_text = torch.randn(dim, generator=g)
    k[:, :, -n_text:] += towards_text
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                          indexing="ij")
    blob = 1.5 * torch.exp(-((x - 40.0) ** 2 + (y - 25.0) ** 2) / (2 * 12.0 ** 2)).flatten()
    q[:, :, :-n_text] += blob[:, None] * towards_text
    span = JointLayout.text_last(n_text, n)
    gammas = (1.0, 2.0)
    every_row = probe.ShareProbe.measure(q, k, span)
    full = every_row.mean_share(gammas)[:, 0]
    per_row = torch.stack([every_row.shares(gamma)[0, 0] for gamma in gammas])
    estimate = text_share(q, k, span, gammas, max_rows=probe.ADAPTIVE_ROWS)[:, 0]
    standard_error = per_row.std(dim=-1) / math.sqrt(probe.ADAPTIVE_ROWS)  # of a random sample that size
    # Measured: off by 0.16 and 0.54 standard errors here (0.0007 and 0.011, relative 1.2 % and 4.6 % of
    # shares 0.060 and 0.23); over 12 such fields, evenly spaced rows stayed within 0.8 standard errors.
    assert ((estimate - full).abs() <= 3.0 * standard_error).all(), (estimate, full, standard_error)
    assert (standard_error < 0.1 * full).all()  # the bound says something: a few percent of the share


# ---------------------------------------------------------------- adaptive gamma

@pytest.mark.parametrize("case", ["plain", "additive_with_inf", "gqa_bool_3d", "key_padding"])
@pytest.mark.parametrize("reach", ["reachable", "out_of_reach"])
def test_adaptive_gamma_equals_a_fine_grid_search(case, reach, chunks):
    span = JointLayout.text_last(4, 16)  # small: the brute force takes the full softmax at thousands of gammas
    q, k, mask, scale = case_inputs(case, n=16)
    gamma_max = 4.0
    at_one, at_max = brute_force_mean(q, k, span, [1.0, gamma_max], mask, scale).mean(dim=1).tolist()
    assert at_max > at_one + 0.05
    target = 0.5 * (at_one + at_max) if reach == "reachable" else at_max + 0.05
    found = adaptive_gamma(q, k, span, target, gamma_max, mask=mask, scale=scale)
    best_gamma, best_share, resolution = grid_search(q, k, span, target, gamma_max, mask, scale)
    if reach == "reachable":
        assert resolution < 1e-5
        # Measured: 3.3e-5 at most.
        assert abs(found.gamma - best_gamma) <= 1e-4 + resolution
    else:
        assert found.gamma == best_gamma == gamma_max  # the share rises to the end here
        assert abs(found.share - best_share) <= TOL
    # The share reported is the share at the gamma returned.
    assert abs(found.share - float(brute_force_mean(q, k, span, [found.gamma], mask, scale).mean())) <= TOL


@pytest.mark.parametrize("seed", range(4))
def test_adaptive_gamma_on_a_flux_like_call_in_few_passes(seed, chunks, monkeypatch):
    """A call with FLUX's proportions, scaled down (1:2 text to image tokens, 8 heads of 32), TACA's gammas:
    the gamma of a float64 brute force on the same rows, in a handful of rows x text passes."""
    n_text, n_visual, heads, dim = 64, 128, 8, 32
    n = n_text + n_visual
    span = JointLayout.text_first(n_text, n)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, heads, n, dim, generator=g) * 1.5, torch.randn(1, heads, n, dim, generator=g)
    k[:, :, :n_text] += 0.4 * q[:, :, n_text:].mean(dim=2, keepdim=True)  # text keys the image leans to
    gamma_max, rows = 1.5, probe.probe_rows(n_visual, 64)
    at_one, at_max = brute_force_mean(q, k, span, [1.0, gamma_max], rows=rows)[:, 0].tolist()
    target = at_one + (0.2 + 0.2 * seed) * (at_max - at_one)
    measured = probe.ShareProbe.measure(q, k, span, max_rows=64)
    passes = []
    text_lse = probe.ShareProbe.text_lse
    monkeypatch.setattr(probe.ShareProbe, "text_lse", lambda self, gamma: passes.append(gamma) or text_lse(self, gamma))
    found = probe.search_gamma(measured, target, gamma_max)
    best_gamma, _, resolution = grid_search(q, k, span, target, gamma_max, rows=rows, points=201, fine=501)
    assert abs(found.gamma - best_gamma) <= 1e-4 + resolution
    # Measured: 6 (1, gamma_max, then interpolation); the 65-gamma grid and bisection before took about 73.
    assert len(passes) <= 8, passes


def rising_then_falling():
    """Closed-form share 1/2 [sigmoid(2 g - 4) + sigmoid(2 - g)]: up from 0.42 to 0.58 near g = 3, then down.

    Half the image rows have positive text logits (their share rises with gamma), half negative
    ones, so their share falls: text keys along e0, visual keys along e1, as many of each, scale 1.
    """
    n_text = n_visual = 8
    n = n_text + n_visual
    q, k = torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2)
    k[0, 0, :n_text, 0] = 1.0
    k[0, 0, n_text:, 1] = 1.0
    q[0, 0, n_text:n_text + 4] = torch.tensor([2.0, 4.0])
    q[0, 0, n_text + 4:] = torch.tensor([-1.0, -2.0])
    q[0, 0, :n_text] = torch.tensor([0.5, 0.5])
    return q, k, JointLayout.text_first(n_text, n)


def closed_form(gamma):
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    return 0.5 * (sigmoid(2.0 * gamma - 4.0) + sigmoid(2.0 - gamma))


def test_adaptive_gamma_on_a_non_monotonic_share(chunks):
    q, k, span = rising_then_falling()
    gamma_max, target = 8.0, 0.56
    shares = text_share(q, k, span, [1.0, 3.0, 4.5, gamma_max], scale=1.0)[:, 0].tolist()
    assert max(abs(s - closed_form(g)) for s, g in zip(shares, (1.0, 3.0, 4.5, gamma_max))) <= TOL
    # Neither end reaches the target, and the middle of the interval does not either: a bisection that
    # took the share to grow with gamma would walk right, to gamma_max, with a share of 0.50.
    assert shares[0] < target and shares[3] < target and shares[2] < target and shares[1] > target
    found = adaptive_gamma(q, k, span, target, gamma_max, scale=1.0)
    best_gamma, best_share, resolution = grid_search(q, k, span, target, gamma_max, scale=1.0)
    assert abs(found.gamma - best_gamma) <= 1e-4 + resolution and found.gamma < 3.0
    assert abs(found.share - target) <= 1e-4
    # A target above the peak: the peak, not an end of the interval.
    found = adaptive_gamma(q, k, span, 0.7, gamma_max, scale=1.0)
    peak = max((closed_form(1.0 + i * 1e-4), 1.0 + i * 1e-4) for i in range(70001))
    assert found.share >= peak[0] - 1e-9 and abs(found.gamma - peak[1]) <= 1e-2  # a flat peak: share decides


def test_adaptive_gamma_finds_a_crossing_narrower_than_any_grid_cell():
    """One text key; half the image rows' share jumps up at gamma 3, the other half's drops at 3.01: the
    share is 1/2 outside [3, 3.01] and about 1 inside.  A grid of 65 gammas over [1, 8] never lands in it;
    the bound between measured gammas does not let it go."""
    steep, start, width = 2000.0, 3.0, 0.01
    n_visual = 2
    n = 1 + n_visual
    q, k = torch.zeros(1, 1, n, 2, dtype=torch.float64), torch.zeros(1, 1, n, 2, dtype=torch.float64)
    k[0, 0, 0, 0] = 1.0  # the text key along e0, the visual keys along e1
    k[0, 0, 1:, 1] = 1.0
    # Row 1: f = steep (g - start); row 2: f = -steep (g - start - width); f = g q0 - log(2) - q1.
    q[0, 0, 1] = torch.tensor([steep, steep * start - math.log(2.0)], dtype=torch.float64)
    q[0, 0, 2] = torch.tensor([-steep, -steep * (start + width) - math.log(2.0)], dtype=torch.float64)
    span = JointLayout.text_first(1, n)

    def share(gamma):
        sigmoid = lambda x: 0.5 * (1.0 + math.tanh(0.5 * x))  # noqa: E731
        return 0.5 * (sigmoid(steep * (gamma - start)) + sigmoid(-steep * (gamma - start - width)))

    assert max(share(g) for g in torch.linspace(1.0, 8.0, 65).tolist()) < 0.51
    measured = probe.ShareProbe.measure(q, k, span, scale=1.0)
    assert abs(float(measured.mean_share([3.005])) - share(3.005)) <= 1e-12
    found = probe.search_gamma(measured, 0.75, 8.0)
    lo, hi = 1.0, start + 0.5 * width  # share rises through 0.75 once on this side of the plateau's middle
    for _ in range(60):
        lo, hi = (lo, 0.5 * (lo + hi)) if share(0.5 * (lo + hi)) >= 0.75 else (0.5 * (lo + hi), hi)
    assert abs(found.gamma - hi) <= 1e-4 and abs(found.share - 0.75) <= 0.1
    # Out of reach: the plateau's top, not 1/2 somewhere else.
    found = probe.search_gamma(measured, 1.5, 8.0)
    assert found.share > 0.99 and start < found.gamma < start + width


def test_adaptive_gamma_is_one_when_the_share_already_reaches_the_target(chunks):
    q, k, mask, _ = case_inputs("bool")
    span = SPANS["text_first"]
    at_one = float(text_share(q, k, span, [1.0], mask=mask).mean())
    assert adaptive_gamma(q, k, span, 0.9 * at_one, 5.0, mask=mask) == (1.0, pytest.approx(at_one, abs=1e-12))
    assert adaptive_gamma(q, k, span, at_one, 5.0, mask=mask).gamma == 1.0
    assert adaptive_gamma(q, k, span, 2.0, 1.0, mask=mask).gamma == 1.0  # nothing to search
    with pytest.raises(ValueError, match="gamma_max"):
        adaptive_gamma(q, k, span, 0.5, 0.9)


def test_one_probe_serves_every_gamma():
    span = SPANS["text_middle"]
    q, k, mask, _ = case_inputs("key_padding")
    measured = probe.ShareProbe.measure(q, k, span, mask, max_rows=16)
    assert torch.equal(measured.mean_share(GAMMAS), text_share(q, k, span, GAMMAS, mask=mask, max_rows=16))
    assert torch.equal(torch.stack([measured.mean_share([g])[0] for g in GAMMAS]), measured.mean_share(GAMMAS))
    assert probe.search_gamma(measured, 0.3, 4.0) == adaptive_gamma(q, k, span, 0.3, 4.0, mask=mask, max_rows=16)

