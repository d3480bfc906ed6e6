"""The pure-math module against the float64 reference of eq. 10 (no ComfyUI involved)."""

import pytest
import torch
import torch.nn.functional as F

from taca import attention as taca_attention
from taca.attention import JointLayout
from reference import max_row_rel_err, taca_reference

GAMMA = 1.2


def sdpa_bhnd(q, k, v, mask):
    """A plain fused backend, (B, H, N, D) in and out."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_bn_hd(heads):
    """A backend in ComfyUI's default layout: (B, N, H*D) in and out."""

    def attend(q, k, v, mask):
        b, _, hd = q.shape
        d = hd // heads
        q4, k4, v4 = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, -1, hd)

    return attend


def to_bn_hd(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d).contiguous()


def from_bn_hd(t, heads):
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2)


def make_inputs(n_text, n_visual, dtype, batch=2, heads=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_text + n_visual
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g) for _ in range(3))
    # Larger logits make the gamma block matter: text columns must move the result.
    q = q * 2.0
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_mask(kind, batch, heads, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":
        keep = torch.rand(batch, 1, n, n, generator=g) > 0.3
        keep |= torch.eye(n, dtype=torch.bool)  # no fully masked row
        return keep
    if kind == "additive":
        return torch.randn(batch, heads, n, n, generator=g)
    if kind == "additive_rows_broadcast":  # a key-padding style mask: (B, 1, 1, N)
        m = torch.zeros(batch, 1, 1, n)
        m[..., n // 2:n // 2 + 2] = float("-inf")  # two visual keys, whatever the token order
        return m
    raise AssertionError(kind)


def spans_for(n_text, n_visual, order):
    n = n_text + n_visual
    return JointLayout.text_first(n_text, n) if order == "text_first" else JointLayout.text_last(n_text, n)


def plain_error(q, k, v, mask):
    """How far the plain backend itself is from float64: the precision budget of this dtype."""
    out = sdpa_bhnd(q, k, v, None if mask is None else mask.to(q.dtype) if mask.dtype != torch.bool else mask)
    ref = taca_reference(q, k, v, 0, 0, 1.0, mask)
    return max_row_rel_err(out, ref)


def assert_close_to_reference(out, ref, q, k, v, mask, dtype):
    err = max_row_rel_err(out, ref)
    if dtype == torch.float32:
        assert err <= 1e-5, err
    else:
        # Within the dtype's precision: twice what plain attention loses, plus one rounding
        # of the gamma-scaled keys (one machine epsilon of this dtype).
        budget = 2.0 * plain_error(q, k, v, mask) + torch.finfo(dtype).eps
        assert err <= budget, (err, budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive", "additive_rows_broadcast"])
@pytest.mark.parametrize("order", ["text_first", "text_last"])
@pytest.mark.parametrize("n_text", [1, 7, 40])
def test_exact_all_rows_match_eq10(dtype, mask_kind, order, n_text):
    n_visual = 56
    q, k, v = make_inputs(n_text, n_visual, dtype)
    b, h, n, _ = q.shape
    mask = make_mask(mask_kind, b, h, n)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    span = spans_for(n_text, n_visual, order)
    out = taca_attention.exact_attention(
        taca_attention.AttentionInputs(sdpa_bhnd, q, k, v, mask, span, GAMMA, seq_dim=2), out_seq_dim=2)
    ref = taca_reference(q, k, v, span.start, span.stop, GAMMA, mask)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_to_reference(out, ref, q, k, v, mask, dtype)
    # The change is real: plain attention is far from the TACA reference.
    plain = taca_reference(q, k, v, span.start, span.stop, 1.0, mask)
    assert max_row_rel_err(plain, ref) > 1e-3


@pytest.mark.parametrize("order", ["text_first", "text_last"])
@pytest.mark.parametrize("mask_kind", [None, "additive"])
def test_exact_in_comfy_layout(order, mask_kind):
    """(B, N, H*D) in and out, as ComfyUI's SD3 blocks call attention."""
    heads = 3
    q, k, v = make_inputs(9, 30, torch.float32, heads=heads)
    b, h, n, _ = q.shape
    mask = make_mask(mask_kind, b, h, n)
    span = spans_for(9, 30, order)
    out = taca_attention.exact_attention(
        taca_attention.AttentionInputs(sdpa_bn_hd(heads), to_bn_hd(q), to_bn_hd(k), to_bn_hd(v), mask, span, GAMMA,
                                       seq_dim=1), out_seq_dim=1)
    ref = taca_reference(q, k, v, span.start, span.stop, GAMMA, mask)
    assert max_row_rel_err(from_bn_hd(out, heads), ref) <= 1e-5


def test_exact_text_in_the_middle():
    q, k, v = make_inputs(6, 30, torch.float32)
    span = JointLayout(10, 16, 36)
    mask = make_mask("additive", 2, 3, 36)
    out = taca_attention.exact_attention(taca_attention.AttentionInputs(sdpa_bhnd, q, k, v, mask, span, GAMMA, 2), 2)
    ref = taca_reference(q, k, v, 10, 16, GAMMA, mask)
    assert max_row_rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("order", ["text_first", "text_last"])
@pytest.mark.parametrize("n_text", [1, 20])
def test_selective_visual_rows_match_eq10_text_rows_match_listing2(mask_kind, order, n_text):
    q, k, v = make_inputs(n_text, 44, torch.float32)
    b, h, n, _ = q.shape
    mask = make_mask(mask_kind, b, h, n)
    span = spans_for(n_text, 44, order)
    out = taca_attention.selective_attention(
        taca_attention.AttentionInputs(sdpa_bhnd, q, k, v, mask, span, GAMMA, seq_dim=2))
    ref = taca_reference(q, k, v, span.start, span.stop, GAMMA, mask)
    vis = torch.ones(n, dtype=torch.bool)
    vis[span.start:span.stop] = False
    assert max_row_rel_err(out[:, :, vis], ref[:, :, vis]) <= 1e-5
    # Text rows: eq. 10 leaves them alone; listing 2 scales text->text too.
    listing2 = taca_reference(q, k, v, span.start, span.stop, GAMMA, mask, visual_rows_only_text_scaling=False)
    assert max_row_rel_err(out[:, :, ~vis], listing2[:, :, ~vis]) <= 1e-5
    assert max_row_rel_err(out[:, :, ~vis], ref[:, :, ~vis]) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("order", ["text_first", "text_last"])
def test_flex_all_rows_match_eq10(dtype, mask_kind, order):
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = make_inputs(5, 27, dtype, dim=16)
    b, h, n, _ = q.shape
    mask = make_mask(mask_kind, b, h, n)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    span = spans_for(5, 27, order)
    out = taca_attention.flex_taca_attention(q, k, v, mask, span, GAMMA, flex_fn=flex_attention)
    ref = taca_reference(q, k, v, span.start, span.stop, GAMMA, mask)
    assert_close_to_reference(out, ref, q, k, v, mask, dtype)


def test_exact_gamma_one_is_plain_attention_bit_for_bit():
    q, k, v = make_inputs(8, 24, torch.float32)
    span = JointLayout.text_first(8, 32)
    plain = sdpa_bhnd(q, k, v, None)
    # gamma == 1 is handled upstream by not patching at all; the selective path with gamma 1
    # is still one call on an identical copy of K.
    out = taca_attention.selective_attention(taca_attention.AttentionInputs(sdpa_bhnd, q, k, v, None, span, 1.0, 2))
    assert torch.equal(out, plain)


def test_exact_does_not_touch_inputs():
    q, k, v = make_inputs(8, 24, torch.float32)
    k_before = k.clone()
    taca_attention.exact_attention(
        taca_attention.AttentionInputs(sdpa_bhnd, q, k, v, None, JointLayout.text_first(8, 32), GAMMA, 2), 2)
    assert torch.equal(k, k_before)


@pytest.mark.parametrize("span", [JointLayout.text_first(9, 39), JointLayout.text_last(9, 39), JointLayout(12, 21, 39)])
def test_row_groups_written_straight_into_the_token_layout(span):
    """(B, H, n, D) row groups -> (B, N, H*D), the layout ComfyUI's models ask for."""
    heads = 3
    q, k, v = make_inputs(9, 30, torch.float32, heads=heads)
    parts = taca_attention.exact_attention_parts(
        taca_attention.AttentionInputs(sdpa_bhnd, q, k, v, None, span, GAMMA, seq_dim=2))
    out = taca_attention.assemble_heads_as_tokens(parts, span.length)
    assert out.shape == (2, 39, heads * 16) and out.is_contiguous()
    ref = taca_reference(q, k, v, span.start, span.stop, GAMMA)
    assert max_row_rel_err(from_bn_hd(out, heads), ref) <= 1e-5


KEY_SPANS = [JointLayout.text_first(9, 39), JointLayout.text_last(9, 39), JointLayout(12, 21, 39)]


@pytest.mark.parametrize("policy", ["owned", "borrowed"])
@pytest.mark.parametrize("span", KEY_SPANS)
@pytest.mark.parametrize("mask_kind", [None, "additive"])
def test_in_place_key_policies_equal_the_copy_bit_for_bit(policy, span, mask_kind):
    """Scaling K in place after the text rows gives the same bits as scaling a copy, and matches eq. 10."""
    q, k, v = make_inputs(9, 30, torch.float32)
    mask = make_mask(mask_kind, 2, 3, 39)
    copied = taca_attention.exact_attention(
        taca_attention.AttentionInputs(sdpa_bhnd, q, k, v, mask, span, GAMMA, 2, "copy"), 2)
    in_place = taca_attention.exact_attention(
        taca_attention.AttentionInputs(sdpa_bhnd, q, k.clone(), v, mask, span, GAMMA, 2, policy), 2)
    assert torch.equal(in_place, copied)
    ref = taca_reference(q, k, v, span.start, span.stop, GAMMA, mask)
    assert max_row_rel_err(in_place, ref) <= 1e-5
    sel_copy = taca_attention.selective_attention(
        taca_attention.AttentionInputs(sdpa_bhnd, q, k, v, mask, span, GAMMA, 2, "copy"))
    sel = taca_attention.selective_attention(
        taca_attention.AttentionInputs(sdpa_bhnd, q, k.clone(), v, mask, span, GAMMA, 2, policy))
    assert torch.equal(sel, sel_copy)


def keys_seen_by(backend):
    seen = []

    def attend(q, k, v, mask):
        seen.append(k.clone())
        return backend(q, k, v, mask)

    return attend, seen


@pytest.mark.parametrize("span", KEY_SPANS)
def test_borrowed_keys_are_scaled_only_for_the_visual_rows_and_given_back(span):
    q, k, v = make_inputs(9, 30, torch.float32)
    k_before = k.clone()
    attend, seen = keys_seen_by(sdpa_bhnd)
    taca_attention.exact_attention(taca_attention.AttentionInputs(attend, q, k, v, None, span, GAMMA, 2, "borrowed"), 2)
    assert torch.equal(k, k_before)
    assert torch.equal(seen[0], k_before)  # text rows: the original keys
    expected = k_before.clone()
    expected[:, :, span.start:span.stop] *= GAMMA
    assert torch.equal(seen[1], expected)  # visual rows: text keys times gamma
    taca_attention.selective_attention(
        taca_attention.AttentionInputs(sdpa_bhnd, q, k, v, None, span, GAMMA, 2, "borrowed"))
    assert torch.equal(k, k_before)


def test_borrowed_keys_are_given_back_when_the_backend_fails():
    q, k, v = make_inputs(9, 30, torch.float32)
    k_before = k.clone()
    calls = []

    def failing(q_, k_, v_, mask_):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("backend out of memory")
        return sdpa_bhnd(q_, k_, v_, mask_)

    with pytest.raises(RuntimeError, match="out of memory"):
        taca_attention.exact_attention(
            taca_attention.AttentionInputs(failing, q, k, v, None, JointLayout.text_first(9, 39), GAMMA, 2,
                                           "borrowed"), 2)
    assert torch.equal(k, k_before)


def test_unknown_key_policy_is_refused():
    q, k, v = make_inputs(9, 30, torch.float32)
    with pytest.raises(ValueError, match="key policy"):
        taca_attention.exact_attention(
            taca_attention.AttentionInputs(sdpa_bhnd, q, k, v, None, JointLayout.text_first(9, 39), GAMMA, 2,
                                           "steal"), 2)


def sdpa_bhnd_with(**sdpa_kwargs):
    """A fused backend that takes the call's softmax scale and grouped-query flag, as ComfyUI 0.33's do."""

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **sdpa_kwargs)

    return attend


def make_gqa_inputs(n_text, n_visual, heads, kv_heads, dtype=torch.float32, batch=2, dim=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    n = n_text + n_visual
    q = torch.randn(batch, heads, n, dim, generator=g) * 2.0
    k, v = (torch.randn(batch, kv_heads, n, dim, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


# (query heads, key/value heads, softmax scale): grouped-query attention, a scale other than 1/sqrt(D), both.
KEYWORD_CASES = [(4, 2, None), (4, 1, None), (3, 3, 0.4), (4, 2, 0.07)]


@pytest.mark.parametrize("heads,kv_heads,scale", KEYWORD_CASES)
@pytest.mark.parametrize("mode", ["exact", "selective", "flex"])
@pytest.mark.parametrize("order", ["text_first", "text_last"])
@pytest.mark.parametrize("mask_kind", [None, "additive"])
def test_grouped_query_attention_and_softmax_scale_in_every_mode(heads, kv_heads, scale, mode, order, mask_kind):
    """K/V with fewer heads than Q (enable_gqa) and a given softmax scale: gamma multiplies scale * q.k."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = make_gqa_inputs(7, 33, heads, kv_heads)
    b, h, n, _ = q.shape
    mask = make_mask(mask_kind, b, h, n)
    span = spans_for(7, 33, order)
    gqa = kv_heads != heads
    sdpa_kwargs = {"enable_gqa": True} if gqa else {}
    if scale is not None:
        sdpa_kwargs["scale"] = scale
    attend = sdpa_bhnd_with(**sdpa_kwargs)
    k_before = k.clone()
    if mode == "exact":
        out = taca_attention.exact_attention(
            taca_attention.AttentionInputs(attend, q, k, v, mask, span, GAMMA, 2, "borrowed"), 2)
    elif mode == "selective":
        out = taca_attention.selective_attention(
            taca_attention.AttentionInputs(attend, q, k, v, mask, span, GAMMA, 2, "borrowed"))
    else:
        out = taca_attention.flex_taca_attention(q, k, v, mask, span, GAMMA, flex_fn=flex_attention,
                                                 scale=scale, enable_gqa=gqa)
    assert out.shape == q.shape and torch.equal(k, k_before)
    ref = taca_reference(q, k, v, span.start, span.stop, GAMMA, mask, visual_rows_only_text_scaling=(mode != "selective"),
                         scale=scale)
    assert max_row_rel_err(out, ref) <= 1e-5
    # Both keywords matter here: ignoring the scale, or pairing the heads differently, is far from the reference.
    if scale is not None:
        assert max_row_rel_err(taca_reference(q, k, v, span.start, span.stop, GAMMA, mask,
                                              visual_rows_only_text_scaling=(mode != "selective")), ref) > 1e-2
    if gqa:
        tiled = [t.repeat(1, heads // kv_heads, 1, 1) for t in (k, v)]  # head h -> h % H_kv instead of h // group
        other = taca_reference(q, *tiled, span.start, span.stop, GAMMA, mask,
                               visual_rows_only_text_scaling=(mode != "selective"), scale=scale)
        if kv_heads > 1:
            assert max_row_rel_err(other, ref) > 1e-2


def test_reference_grouped_heads_equal_explicitly_repeated_heads():
    """The reference's GQA pairing is PyTorch's: query head h reads K/V head h // (H / H_kv)."""
    q, k, v = make_gqa_inputs(5, 20, 4, 2)
    repeated = [t.repeat_interleave(2, dim=1) for t in (k, v)]
    a = taca_reference(q, k, v, 0, 5, GAMMA, scale=0.3)
    b = taca_reference(q, *repeated, 0, 5, GAMMA, scale=0.3)
    assert torch.equal(a, b)
    plain = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True, scale=0.3)
    assert max_row_rel_err(taca_reference(q, k, v, 0, 5, 1.0, scale=0.3), plain) <= 1e-12
