"""The attention override on ComfyUI's own selected attention function, with the caller's tensors.

exact and selective scale the caller's K in place when that is safe (and put it
back), so these tests check what the caller sees: its K unchanged after the
call, and eq. 10 kept in the cases where writing into K would be wrong.
"""

import pytest
import torch

import comfy.ldm.modules.attention as comfy_attention

from reference import max_row_rel_err, taca_reference
from taca.attention import TextSpan
from taca.patch import TacaAttentionOverride, TacaSettings

GAMMA = 1.2
HEADS, DIM, TEXT, VISUAL = 3, 16, 7, 25
SPAN = TextSpan.text_first(TEXT, TEXT + VISUAL)


def override(mode):
    return TacaAttentionOverride(TacaSettings(GAMMA, 0.97, mode), [SPAN], None)


def inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, HEADS, TEXT + VISUAL, DIM, generator=g) for _ in range(3))
    return q * 2.0, k, v


def expected(q, k, v, mode):
    # selective differs from eq. 10 on the text rows by design: its reference is listing 2 on all rows.
    return taca_reference(q, k, v, SPAN.start, SPAN.stop, GAMMA, visual_rows_only_text_scaling=(mode != "selective"))


def check_rows(out, ref):
    assert max_row_rel_err(out, ref) <= 1e-5


def call_bhnd(mode, q, k, v):
    return override(mode)(comfy_attention.optimized_attention, q, k, v, HEADS, skip_reshape=True,
                          skip_output_reshape=True)


@pytest.mark.parametrize("mode", ["exact", "selective"])
def test_the_callers_keys_are_unchanged_after_the_call(mode):
    q, k, v = inputs()
    k_before = k.clone()
    out = call_bhnd(mode, q, k, v)
    assert torch.equal(k, k_before)
    check_rows(out, expected(q, k_before, v, mode))


@pytest.mark.parametrize("mode", ["exact", "selective"])
def test_sd3_layout_keys_are_unchanged(mode):
    q, k, v = inputs()
    flat = [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], HEADS * DIM).contiguous() for t in (q, k, v)]
    k_before = flat[1].clone()
    out = override(mode)(comfy_attention.optimized_attention, *flat, HEADS)
    assert torch.equal(flat[1], k_before)
    out = out.view(out.shape[0], -1, HEADS, DIM).transpose(1, 2)
    check_rows(out, expected(q, k, v, mode))


@pytest.mark.parametrize("mode", ["exact", "selective"])
def test_keys_passed_as_values_are_not_scaled_in_place(mode):
    """k is v: scaling K in place would scale V too; the result must still be eq. 10 with v = k."""
    q, k, _ = inputs()
    out = call_bhnd(mode, q, k, k)
    check_rows(out, expected(q, k, k, mode))


@pytest.mark.parametrize("mode", ["exact", "selective"])
def test_keys_and_values_in_one_fused_buffer(mode):
    """k and v as views of one buffer: the result is eq. 10 and the buffer is as it was."""
    q, k, v = inputs()
    fused = torch.stack([k, v])
    out = call_bhnd(mode, q, fused[0], fused[1])
    check_rows(out, expected(q, k, v, mode))
    assert torch.equal(fused[0], k) and torch.equal(fused[1], v)


@pytest.mark.parametrize("mode", ["exact", "selective"])
def test_autograd_still_works(mode):
    """With gradients on, K is never written in place (autograd would refuse the backward)."""
    q, k, v = (t.clone().requires_grad_(True) for t in inputs())
    with torch.enable_grad():
        out = call_bhnd(mode, q, k, v)
        out.sum().backward()
    assert k.grad is not None and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("mode", ["exact", "selective"])
def test_inference_tensors_outside_inference_mode(mode):
    with torch.inference_mode():
        q, k, v = inputs()
    out = call_bhnd(mode, q, k, v)  # PyTorch forbids in-place updates of these here
    check_rows(out, expected(q, k, v, mode))
    with torch.inference_mode():
        k_before = k.clone()
        out = call_bhnd(mode, q, k, v)
    assert torch.equal(k, k_before)
    check_rows(out, expected(q, k, v, mode))
