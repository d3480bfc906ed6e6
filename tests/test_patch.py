"""The attention override on ComfyUI's own selected attention function, with the caller's tensors.

exact and selective scale the caller's K in place when that is safe (and put it
back), so these tests check what the caller sees: its K unchanged after the
call, and eq. 10 kept in the cases where writing into K would be wrong.
"""

import pytest
import torch

import comfy.ldm.modules.attention as comfy_attention
import comfyui_version

from devtools.comfy_runtime import version_key
from harness import call_context
from reference import max_row_rel_err, taca_reference
from taca.attention import JointLayout
from taca.hooks import OVERRIDE_KEY, JointAttentionOverride, passthrough_attention
from taca.settings import TacaSettings

COMFYUI_VERSION = comfyui_version.__version__

GAMMA = 1.2
HEADS, DIM, TEXT, VISUAL = 3, 16, 7, 25
SPAN = JointLayout.text_first(TEXT, TEXT + VISUAL)


def taca_override(settings, layouts, previous=None):
    """TACA's override of one model call inside its window, on a call of ``layouts``."""
    return JointAttentionOverride(call_context(settings, layouts), previous)


def override(mode):
    return taca_override(TacaSettings(GAMMA, 0.97, mode), [SPAN])


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
def test_gradients_in_the_sd3_layout(mode):
    """Training through TACA (the paper's TACA LoRA recipe): the K an SD3-layout call lays out again is recorded
    by autograd, so it is not scaled in place, and the gradients are the float64 reference's."""
    def tokens(t):  # (B, H, N, D) -> (B, N, H*D), as SD3's attention hands q, k, v over
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], HEADS * DIM)

    q, k, v = inputs()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    weights = torch.randn(q.shape[0], TEXT + VISUAL, HEADS * DIM, generator=torch.Generator().manual_seed(9))
    with torch.enable_grad():
        out = override(mode)(comfy_attention.optimized_attention, *[tokens(t) for t in leaves], HEADS)
        (out * weights).sum().backward()
        ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
        (tokens(expected(*ref_leaves, mode)) * weights.double()).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert (got.grad.double() - want.grad).abs().max() <= 1e-4 * want.grad.abs().max()


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


# ComfyUI's own attention functions, called the way its models call them: through wrap_attn, with the override
# in transformer_options.  optimized_attention is what ComfyUI selected here (sub-quadratic on a CPU).
COMFY_FUNCTIONS = ["optimized_attention", "attention_pytorch", "attention_basic", "attention_split", "attention_sub_quad"]
GQA_HEADS, GQA_KV_HEADS = 4, 2
# enable_gqa (K/V with half the heads of Q), a softmax scale other than 1/sqrt(D), and both
KEYWORDS = {"gqa": {"enable_gqa": True}, "scale": {"scale": 0.11}, "gqa_scale": {"enable_gqa": True, "scale": 0.4}}


def keyword_inputs(kwargs, seed=5):
    heads = GQA_HEADS
    kv_heads = GQA_KV_HEADS if kwargs.get("enable_gqa") else GQA_HEADS
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, TEXT + VISUAL, DIM, generator=g) * 2.0
    k, v = (torch.randn(2, kv_heads, TEXT + VISUAL, DIM, generator=g) for _ in range(2))
    return q, k, v


def to_tokens(t):
    """(B, H, N, D) -> (B, N, H*D), ComfyUI's default layout."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d).contiguous()


def call_comfy(func, q, k, v, skip_reshape, options, kwargs):
    """q, k, v as (B, H, N, D); returns (B, H, N, D) whatever the layout the call used."""
    if skip_reshape:
        out = func(q, k, v, GQA_HEADS, skip_reshape=True, skip_output_reshape=True, transformer_options=options,
                   **kwargs)
        return out
    out = func(to_tokens(q), to_tokens(k), to_tokens(v), GQA_HEADS, transformer_options=options, **kwargs)
    return out.view(out.shape[0], -1, GQA_HEADS, DIM).transpose(1, 2)


def comfy_function_honours(func, kwargs) -> bool:
    """Whether this ComfyUI's kernel itself takes the keywords (ComfyUI 0.3.75's do not know them)."""
    q, k, v = keyword_inputs(kwargs)
    try:
        out = call_comfy(func, q, k, v, True, {}, kwargs)
    except RuntimeError:  # 0.3.75: K/V head count does not match Q's
        return False
    plain = taca_reference(q, k, v, 0, 0, 1.0, scale=kwargs.get("scale"))
    return max_row_rel_err(out, plain) <= 1e-5


@pytest.mark.parametrize("skip_reshape", [True, False], ids=["bhnd", "tokens"])
@pytest.mark.parametrize("keywords", list(KEYWORDS))
@pytest.mark.parametrize("mode", ["exact", "selective", "flex"])
@pytest.mark.parametrize("name", COMFY_FUNCTIONS)
def test_enable_gqa_and_scale_on_comfy_attention_functions(name, mode, keywords, skip_reshape):
    func = getattr(comfy_attention, name)
    kwargs = KEYWORDS[keywords]
    if not comfy_function_honours(func, kwargs):
        # Only ComfyUI versions before 0.33 have kernels without these keywords (and no model passes them there).
        assert version_key(COMFYUI_VERSION) < version_key("0.33.0"), (COMFYUI_VERSION, name, kwargs)
        pytest.skip(f"ComfyUI {COMFYUI_VERSION}'s {name} does not take {sorted(kwargs)}")
    q, k, v = keyword_inputs(kwargs)
    k_before = k.clone()
    taca = override(mode)
    out = call_comfy(func, q, k, v, skip_reshape, {OVERRIDE_KEY: taca}, kwargs)
    assert taca.context.joint_calls == 1 and taca.context.other_calls == 0  # wrap_attn handed the call to TACA
    assert torch.equal(k, k_before)
    ref = taca_reference(q, k, v, SPAN.start, SPAN.stop, GAMMA, visual_rows_only_text_scaling=(mode != "selective"),
                         scale=kwargs.get("scale"))
    check_rows(out, ref)
    # The keyword changes the result: computing without it is far from the reference.
    if "scale" in kwargs:
        unscaled = taca_reference(q, k, v, SPAN.start, SPAN.stop, GAMMA, visual_rows_only_text_scaling=(mode != "selective"))
        assert max_row_rel_err(unscaled, ref) > 1e-2


@pytest.mark.parametrize("name", COMFY_FUNCTIONS)
def test_flex_keeps_low_precision_attention_and_hands_unknown_keywords_to_the_kernel(name):
    """low_precision_attention=False is honoured by flex as it stands (it never quantises); a keyword flex does
    not implement sends the joint call through the exact path, which gives it to the kernel."""
    func = getattr(comfy_attention, name)
    q, k, v = inputs()
    ref = expected(q, k, v, "flex")
    taca = override("flex")
    out = taca(func, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True, low_precision_attention=False)
    check_rows(out, ref)
    seen = []

    def kernel(q_, k_, v_, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
               **kwargs):  # a kernel taking a keyword of its own, as another pack's might
        seen.append(kwargs["block_sparse"])
        return func(q_, k_, v_, heads, mask=mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)

    out = taca(kernel, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True, block_sparse="yes")
    assert seen == ["yes", "yes"]  # two row-group calls, each with the keyword
    check_rows(out, expected(q, k, v, "exact"))


@pytest.mark.parametrize("skip_reshape", [True, False], ids=["bhnd", "tokens"])
@pytest.mark.parametrize("mode", ["exact", "selective", "flex"])
def test_a_call_of_the_visual_rows_alone_is_eq10_in_one_kernel_call(mode, skip_reshape):
    """A visual_queries_only layout (HiDream-O1's): the model hands over only the visual query rows, against every key,
    with fewer K/V heads where this ComfyUI's kernels take enable_gqa, as HiDream-O1 passes it.  Every mode gives
    eq. 10 for those rows (exact and selective in one kernel call), the caller's K is unchanged, and a call of the
    whole sequence, text rows included, is not this layout's and is left alone."""
    func = comfy_attention.optimized_attention
    kwargs = {"enable_gqa": True} if comfy_function_honours(func, {"enable_gqa": True}) else {}
    q, k, v = keyword_inputs(kwargs)
    k_before = k.clone()
    kernel_calls = []

    def counting(kernel, *args, **kw):  # an override that was there before TACA: it sees TACA's kernel calls
        kernel_calls.append(args[0].shape)
        return kernel(*args, **kw)

    taca = taca_override(TacaSettings(GAMMA, 0.97, mode),
                         [JointLayout.text_first(TEXT, TEXT + VISUAL, visual_queries_only=True)], counting)
    out = call_comfy(func, q[:, :, TEXT:], k, v, skip_reshape, {OVERRIDE_KEY: taca}, kwargs)
    assert taca.context.joint_calls == 1 and taca.context.other_calls == 0
    assert len(kernel_calls) == (0 if mode == "flex" else 1)
    assert torch.equal(k, k_before)
    check_rows(out, taca_reference(q, k, v, 0, TEXT, GAMMA)[:, :, TEXT:])
    whole = call_comfy(func, q, k, v, skip_reshape, {OVERRIDE_KEY: taca}, kwargs)
    assert taca.context.joint_calls == 1 and taca.context.other_calls == 1
    assert torch.equal(whole, call_comfy(func, q, k, v, skip_reshape, {}, kwargs))


def test_passthrough_is_bit_identical_through_wrap_attn():
    """The override a patched model gets where TACA does not act: the same kernel, the same bits."""
    q, k, v = inputs()
    for skip in (True, False):
        args = (q, k, v) if skip else tuple(to_tokens(t) for t in (q, k, v))
        plain = comfy_attention.optimized_attention(*args, HEADS, skip_reshape=skip, transformer_options={})
        passed = comfy_attention.optimized_attention(*args, HEADS, skip_reshape=skip,
                                                     transformer_options={OVERRIDE_KEY: passthrough_attention})
        assert torch.equal(plain, passed)


def _container_class():
    container = getattr(comfy_attention, "AttentionTensorContainer", None)
    if container is None:
        assert version_key(COMFYUI_VERSION) < version_key("0.33.0"), COMFYUI_VERSION
        pytest.skip(f"ComfyUI {COMFYUI_VERSION} has no AttentionTensorContainer (MiniMaxH3's q/k/v, from 0.33)")
    return container


@pytest.mark.parametrize("mode", ["exact", "selective", "flex"])
def test_tensor_containers_reach_the_override_as_tensors(mode):
    """q/k/v in AttentionTensorContainers: TACA has no container_function, so wrap_attn takes the tensors out
    and hands them to the override, which acts on them (it is not bypassed)."""
    container = _container_class()
    q, k, v = inputs()
    boxes = [container(t) for t in (q, k, v)]
    taca = override(mode)
    out = comfy_attention.optimized_attention(*boxes, HEADS, skip_reshape=True, skip_output_reshape=True,
                                              transformer_options={OVERRIDE_KEY: taca})
    assert taca.context.joint_calls == 1
    assert all(box.tensor is None for box in boxes)  # consumed, as a container kernel would
    check_rows(out, expected(q, k, v, mode))
    boxes = [container(t) for t in (q, k, v)]
    passed = comfy_attention.optimized_attention(*boxes, HEADS, skip_reshape=True, skip_output_reshape=True,
                                                 transformer_options={OVERRIDE_KEY: passthrough_attention})
    plain = comfy_attention.optimized_attention(*[container(t) for t in (q, k, v)], HEADS, skip_reshape=True,
                                                skip_output_reshape=True)
    assert torch.equal(passed, plain)


def test_flex_honours_attn_precision_float32():
    """attn_precision=float32 on bf16 inputs: flex computes in fp32, so its only error is the final bf16 rounding
    (plain bf16 flex loses visibly more on these logits)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, 96, 64, generator=g).bfloat16() for _ in range(3))
    q = q * 2
    span = JointLayout.text_first(16, 96)
    ref = taca_reference(q, k, v, 0, 16, GAMMA)
    rounding = max_row_rel_err(ref.bfloat16(), ref)
    taca = taca_override(TacaSettings(GAMMA, 0.97, "flex"), [span])
    errors = {}
    for precision in (None, torch.float32):
        out = taca(comfy_attention.optimized_attention, q, k, v, HEADS, attn_precision=precision, skip_reshape=True,
                   skip_output_reshape=True)
        assert out.dtype == torch.bfloat16
        errors[precision] = max_row_rel_err(out, ref)
    assert errors[torch.float32] <= 1.01 * rounding, (errors, rounding)
    assert errors[None] > 1.1 * rounding, (errors, rounding)  # what makes the first assertion mean something
