"""The image-to-text share probe against a float64 brute force of eq. 10 (no ComfyUI involved)."""

import math

import pytest
import torch

from taca import probe
from taca.attention import JointLayout

GAMMAS = (1.0, 1.25, 2.0, 3.5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small gain nothing from intra-op threads; on a busy CPU their hand-offs dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def brute_force_shares(q, k, span, gammas, mask=None, scale=None):
    """(G, B, H, N) float64: sum of the text columns of the full softmax, NaN on fully masked rows.

    Explicit N x N logits, eq. 10's gamma on the visual-query x text-key block, the mask added after
    the scaling (boolean: True keeps); mask shapes as ComfyUI's attention reads them.
    """
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # query head h reads key head h // (H / H_kv)
    n = q.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    text = torch.zeros(n, dtype=torch.bool)
    text[span.start:span.stop] = True
    block = ((~text)[:, None] & text[None, :]).double()
    if mask is not None:
        mask = mask[None, None] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask
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


def brute_force_mean(q, k, span, gammas, mask=None, scale=None):
    """(G, B): mean over heads and image rows, leaving out fully masked rows (0 if none is left)."""
    shares = brute_force_shares(q, k, span, gammas, mask, scale)[..., visual_rows(span)]
    live = ~shares.isnan()
    return shares.nan_to_num(0.0).sum(dim=(2, 3)) / live.sum(dim=(2, 3)).clamp_min(1)


def brute_force_map(q, k, span, gammas, mask=None, scale=None):
    """(G, B, visual rows): per image row, the mean over heads with a softmax (0 if none)."""
    shares = brute_force_shares(q, k, span, gammas, mask, scale)[..., visual_rows(span)]
    live = ~shares.isnan()
    return shares.nan_to_num(0.0).sum(dim=2) / live.sum(dim=2).clamp_min(1)


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
    elif case == "custom_scale":
        scale = 0.3
    q, k = make_qk(n, heads=heads, kv_heads=kv_heads)
    return q, k, mask, scale


CASES = ["plain", "additive_with_inf", "bool", "key_padding", "shared_2d", "gqa_bool_3d", "custom_scale"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("order", list(SPANS))
def test_text_share_matches_brute_force(order, case):
    span = SPANS[order]
    q, k, mask, scale = case_inputs(case)
    ref = brute_force_mean(q, k, span, GAMMAS, mask, scale)
    for chunk in (None, 5):  # one chunk, and chunks that do not divide the rows
        out = probe.text_share(q, k, span, GAMMAS, mask=mask, scale=scale, chunk=chunk)
        assert out.shape == (len(GAMMAS), 2) and out.dtype == torch.float64
        # Measured: at most 3e-16 over these cases, both sides are float64.
        assert (out - ref).abs().max() <= 1e-6
    # The inputs are not degenerate: the entries differ and gamma moves the share.
    assert (ref[:, 0] - ref[:, 1]).abs().max() > 1e-2
    assert (ref[-1] - ref[0]).abs().min() > 1e-3
    heatmap = probe.text_share_map(q, k, span, (1.0, 2.0), mask=mask, scale=scale, chunk=6)
    assert heatmap.shape == (2, 2, N_VISUAL)
    assert (heatmap - brute_force_map(q, k, span, (1.0, 2.0), mask, scale)).abs().max() <= 1e-6


def test_fully_masked_text_visual_keys_and_rows():
    span = SPANS["text_first"]
    q, k = make_qk(N)
    mask = torch.ones(2, 3, N, N, dtype=torch.bool)
    text, vis = slice(span.start, span.stop), torch.nonzero(visual_rows(span)).flatten()
    mask[:, :, vis[0], text] = False  # no text key: share 0
    mask[:, :, vis[1], N_TEXT:] = False  # no visual key: share 1
    mask[:, :, vis[2]] = False  # no key at all, in every head: left out, its map entry 0
    mask[0, 1, vis[3]] = False  # no key in one head: the others make up the row
    out = probe.text_share(q, k, span, GAMMAS, mask=mask)
    assert torch.isfinite(out).all()
    assert (out - brute_force_mean(q, k, span, GAMMAS, mask)).abs().max() <= 1e-6
    heatmap = probe.text_share_map(q, k, span, GAMMAS, mask=mask)
    assert torch.isfinite(heatmap).all()
    assert (heatmap - brute_force_map(q, k, span, GAMMAS, mask)).abs().max() <= 1e-6
    assert (heatmap[:, :, 0] == 0).all() and (heatmap[:, :, 1] == 1).all() and (heatmap[:, :, 2] == 0).all()


def test_every_row_masked_is_share_zero():
    span = SPANS["text_last"]
    q, k = make_qk(N)
    mask = torch.zeros(2, 1, N, N)
    mask[0, :, visual_rows(span)] = -math.inf
    out = probe.text_share(q, k, span, GAMMAS, mask=mask)
    assert (out[:, 0] == 0).all() and (out[:, 1] > 0).all()


def test_no_text_tokens_share_zero_and_no_image_refused():
    q, k = make_qk(N)
    assert (probe.text_share(q, k, JointLayout.text_first(0, N), GAMMAS) == 0).all()
    with pytest.raises(ValueError, match="no image tokens"):
        probe.text_share(q, k, JointLayout.text_first(N, N), GAMMAS)


def test_probe_rows_evenly_spaced_with_both_ends():
    assert torch.equal(probe.probe_rows(40, None), torch.arange(40))
    assert torch.equal(probe.probe_rows(40, 40), torch.arange(40))
    rows = probe.probe_rows(4096, 256)
    assert rows.numel() == 256 and rows[0] == 0 and rows[-1] == 4095
    assert (rows.diff() >= 16).all() and (rows.diff() <= 17).all()
    assert torch.equal(probe.probe_rows(4096, 256), rows)  # deterministic
    assert torch.equal(probe.probe_rows(1000, 999).unique(), probe.probe_rows(1000, 999))


def test_subset_rows_are_the_full_measure_on_those_rows():
    span = SPANS["text_middle"]
    q, k, mask, _ = case_inputs("additive_with_inf")
    rows = probe.probe_rows(N_VISUAL, 9)
    full = brute_force_shares(q, k, span, GAMMAS, mask)[..., visual_rows(span)][..., rows]
    ref = full.nan_to_num(0.0).sum(dim=(2, 3)) / (~full.isnan()).sum(dim=(2, 3))
    assert (probe.text_share(q, k, span, GAMMAS, mask=mask, max_rows=9) - ref).abs().max() <= 1e-6


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
    estimate = probe.text_share(q, k, span, gammas, max_rows=256)[:, 0]
    standard_error = per_row.std(dim=-1) / math.sqrt(256)  # of a random 256-row sample
    # Measured: off by 0.16 and 0.54 standard errors here (0.0007 and 0.011, relative 1.2 % and 4.6 % of
    # shares 0.060 and 0.23); over 12 such fields, evenly spaced rows stayed within 0.8 standard errors.
    assert ((estimate - full).abs() <= 3.0 * standard_error).all(), (estimate, full, standard_error)
    assert (standard_error < 0.1 * full).all()  # the bound says something: a few percent of the share


def grid_search(q, k, span, target, gamma_max, mask=None, scale=None, points=2001):
    """Brute force: share on a fine gamma grid; the smallest grid gamma reaching the target, else the best one."""
    grid = torch.linspace(1.0, gamma_max, points, dtype=torch.float64)
    shares = brute_force_mean(q, k, span, grid.tolist(), mask, scale).mean(dim=1)
    reached = torch.nonzero(shares >= target).flatten()
    i = int(reached[0]) if reached.numel() else int((shares - target).abs().argmin())
    return float(grid[i]), float(shares[i]), (gamma_max - 1.0) / (points - 1)


@pytest.mark.parametrize("case", ["plain", "additive_with_inf", "gqa_bool_3d"])
@pytest.mark.parametrize("reach", ["reachable", "out_of_reach"])
def test_adaptive_gamma_equals_a_fine_grid_search(case, reach):
    span = JointLayout.text_last(4, 16)  # small: the brute force takes the full softmax at 2001 gammas
    q, k, mask, scale = case_inputs(case, n=16)
    gamma_max = 4.0
    at_one, at_max = brute_force_mean(q, k, span, [1.0, gamma_max], mask, scale).mean(dim=1).tolist()
    assert at_max > at_one + 0.05
    target = 0.5 * (at_one + at_max) if reach == "reachable" else at_max + 0.05
    found = probe.adaptive_gamma(q, k, span, target, gamma_max, mask=mask, scale=scale)
    best_gamma, best_share, spacing = grid_search(q, k, span, target, gamma_max, mask, scale)
    assert abs(found.gamma - best_gamma) <= spacing + 1e-4
    assert abs(found.share - target) <= abs(best_share - target) + 1e-6
    # The share reported is the share at the gamma returned.
    assert abs(found.share - float(brute_force_mean(q, k, span, [found.gamma], mask, scale).mean())) <= 1e-9


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


def test_adaptive_gamma_on_a_non_monotonic_share():
    q, k, span = rising_then_falling()
    gamma_max, target = 8.0, 0.56
    shares = probe.text_share(q, k, span, [1.0, 3.0, 4.5, gamma_max], scale=1.0)[:, 0].tolist()
    assert [round(s, 9) for s in shares] == [round(closed_form(g), 9) for g in (1.0, 3.0, 4.5, gamma_max)]
    # Neither end reaches the target, and the middle of the interval does not either: a bisection that
    # took the share to grow with gamma would walk right, to gamma_max, with a share of 0.50.
    assert shares[0] < target and shares[3] < target and shares[2] < target and shares[1] > target
    found = probe.adaptive_gamma(q, k, span, target, gamma_max, scale=1.0)
    best_gamma, best_share, spacing = grid_search(q, k, span, target, gamma_max, scale=1.0)
    assert abs(found.gamma - best_gamma) <= spacing + 1e-4 and found.gamma < 3.0
    assert abs(found.share - target) <= 1e-4
    # A target above the peak: the peak, not an end of the interval.
    found = probe.adaptive_gamma(q, k, span, 0.7, gamma_max, scale=1.0)
    best_gamma, best_share, spacing = grid_search(q, k, span, 0.7, gamma_max, scale=1.0)
    assert abs(found.gamma - best_gamma) <= spacing + 1e-3
    assert found.share >= best_share - 1e-9 and 2.5 < found.gamma < 3.5


def test_adaptive_gamma_is_one_when_the_share_already_reaches_the_target():
    q, k, mask, _ = case_inputs("bool")
    span = SPANS["text_first"]
    at_one = float(probe.text_share(q, k, span, [1.0], mask=mask).mean())
    assert probe.adaptive_gamma(q, k, span, 0.9 * at_one, 5.0, mask=mask) == (1.0, pytest.approx(at_one, abs=1e-12))
    assert probe.adaptive_gamma(q, k, span, at_one, 5.0, mask=mask).gamma == 1.0


def test_one_probe_serves_every_gamma():
    span = SPANS["text_middle"]
    q, k, mask, _ = case_inputs("key_padding")
    measured = probe.ShareProbe.measure(q, k, span, mask, max_rows=16)
    assert torch.equal(measured.mean_share(GAMMAS), probe.text_share(q, k, span, GAMMAS, mask=mask, max_rows=16))
    assert probe.search_gamma(measured, 0.3, 4.0) == probe.adaptive_gamma(q, k, span, 0.3, 4.0, mask=mask,
                                                                          max_rows=16)
