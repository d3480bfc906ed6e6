"""Whole tiny models, patched through the node, against the same model run with a float64 reference attention.

Runs through ComfyUI's real sampler (one Euler step from sigma 1 to 0, so the
output is the model's CFG-combined prediction), real ModelPatcher, real
attention dispatch (``wrap_attn``).
"""

import pytest
import torch

from devtools import tiny_models as tm
from harness import AttentionSpy, ReferenceTacaAttention, one_step, rel_diff, with_override
from layouts import observe_joint_layout

GAMMA = 1.2
TOLERANCE = 1e-4  # fp32 model vs the same model with float64 attention


def taca(pack_nodes, model, gamma=GAMMA, threshold=0.97, mode="exact"):
    out = pack_nodes["TACAPatchModel"].execute(model=model, gamma=gamma, threshold_sigma=threshold, mode=mode)
    return out.result[0]


def setup_case(kind, text_tokens=None, height=16, width=16, batch=2, **cond_extra):
    tiny = tm.build(kind)
    positive = tm.conditioning(tiny, 1, text_tokens=text_tokens, batch=batch, **cond_extra)
    negative = tm.conditioning(tiny, 2, text_tokens=text_tokens, batch=batch, **cond_extra)
    latent = tm.latent(tiny, height, width, batch=batch)
    return tiny, positive, negative, latent


def expected_text_tokens(tiny, fed):
    # What the test knows of each model: Flux.2 left-pads text to 512; SD3 prepends its registers.
    if tiny.kind == "flux2":
        return max(fed, 512)
    return fed + tiny.register_tokens


def check_against_reference(pack_nodes, tiny, positive, negative, latent, text, visual, mode="exact",
                            listing2_text_rows=False):
    joint = text + visual
    # The counts are the test's knowledge of the model it built; where the text sits is observed on this ComfyUI.
    (length, (start, stop)), = observe_joint_layout(tiny.patcher, positive, latent).items()
    assert (length, stop - start) == (joint, text), (length, start, stop)
    reference = ReferenceTacaAttention(joint, start, stop, GAMMA, listing2=listing2_text_rows)
    patched = taca(pack_nodes, tiny.patcher, mode=mode)
    out = one_step(patched, positive, negative, latent, cfg=3.0)
    ref = one_step(with_override(tiny.patcher, reference), positive, negative, latent, cfg=3.0)
    plain = one_step(tiny.patcher, positive, negative, latent, cfg=3.0)
    assert reference.joint_calls > 0
    assert rel_diff(out, ref) <= TOLERANCE, (rel_diff(out, ref), rel_diff(plain, ref))
    # The test can fail: TACA moves the output far beyond the tolerance.
    assert rel_diff(plain, ref) > 100 * TOLERANCE
    return reference


FAMILIES = ["flux", "flux_schnell", "flux2", "chroma", "sd3", "sd35_medium"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_exact_forward_matches_reference(pack_nodes, kind):
    size = 8 if kind == "flux2" else 16
    tiny, positive, negative, latent = setup_case(kind, height=size, width=size)
    text = expected_text_tokens(tiny, tiny.text_tokens)
    check_against_reference(pack_nodes, tiny, positive, negative, latent, text, tm.image_tokens(tiny, size, size))


@pytest.mark.parametrize("kind", ["flux", "sd35_medium"])
def test_selective_forward_matches_listing2(pack_nodes, kind):
    tiny, positive, negative, latent = setup_case(kind)
    text = expected_text_tokens(tiny, tiny.text_tokens)
    check_against_reference(pack_nodes, tiny, positive, negative, latent, text, tm.image_tokens(tiny, 16, 16),
                            mode="selective", listing2_text_rows=True)


@pytest.mark.parametrize("kind", ["flux", "sd35_medium"])
def test_flex_forward_matches_reference(pack_nodes, kind):
    tiny, positive, negative, latent = setup_case(kind, batch=1)
    text = expected_text_tokens(tiny, tiny.text_tokens)
    check_against_reference(pack_nodes, tiny, positive, negative, latent, text, tm.image_tokens(tiny, 16, 16),
                            mode="flex")


def test_flux_text_length_is_read_from_the_conditioning(pack_nodes):
    """Not diffusers' 512: whatever the conditioning holds (here 77 and 300 tokens)."""
    for text_tokens in (77, 300):
        tiny, positive, negative, latent = setup_case("flux", text_tokens=text_tokens)
        check_against_reference(pack_nodes, tiny, positive, negative, latent, text_tokens,
                                tm.image_tokens(tiny, 16, 16))


def test_flux_non_square_odd_latent(pack_nodes):
    """Latents that are not a multiple of the patch size are padded by the model: ceil(h/2) x ceil(w/2) tokens."""
    tiny, positive, negative, latent = setup_case("flux", height=9, width=14)
    check_against_reference(pack_nodes, tiny, positive, negative, latent, 256, 5 * 7)


def test_kontext_reference_tokens_count_as_visual(pack_nodes):
    tiny = tm.build("flux")
    reference_latent = torch.randn(1, 16, 12, 8, generator=torch.Generator().manual_seed(5))
    positive = tm.conditioning(tiny, 1, batch=1, reference_latents=[reference_latent])
    negative = tm.conditioning(tiny, 2, batch=1, reference_latents=[reference_latent])
    latent = tm.latent(tiny, 16, 16, batch=1)
    visual = tm.image_tokens(tiny, 16, 16) + tm.image_tokens(tiny, 12, 8)
    check_against_reference(pack_nodes, tiny, positive, negative, latent, 256, visual)


def test_redux_tokens_appended_to_the_conditioning_count_as_text(pack_nodes):
    # A Redux / StyleModelApply node concatenates image-derived tokens to the conditioning.
    tiny = tm.build("flux")
    positive = tm.conditioning(tiny, 1, text_tokens=256 + 81, batch=1)
    negative = tm.conditioning(tiny, 2, text_tokens=256 + 81, batch=1)
    latent = tm.latent(tiny, 16, 16, batch=1)
    check_against_reference(pack_nodes, tiny, positive, negative, latent, 256 + 81, tm.image_tokens(tiny, 16, 16))


def test_sd35_medium_image_only_attention_is_untouched(pack_nodes):
    tiny, positive, negative, latent = setup_case("sd35_medium", batch=1)
    text, visual = 154, tm.image_tokens(tiny, 16, 16)
    patched = taca(pack_nodes, with_override(tiny.patcher, AttentionSpy()))
    # clone() deep-copies model_options in ComfyUI 0.3.75: read the spy the patched model holds.
    spy = patched.model_options["transformer_options"]["optimized_attention_override"]
    one_step(patched, positive, negative, latent, cfg=3.0)
    x_only = [c for c in spy.calls if c[2] == visual]
    joint_text_rows = [c for c in spy.calls if c[1] == text and c[2] == text + visual]
    joint_visual_rows = [c for c in spy.calls if c[1] == visual and c[2] == text + visual]
    unsplit_joint = [c for c in spy.calls if c[1] == text + visual]
    # 2 blocks, both with an image-only attention; one model call (cond + uncond batched).
    assert len(x_only) == 2 and all(c[1] == visual for c in x_only)
    assert len(joint_text_rows) == 2 and len(joint_visual_rows) == 2
    assert unsplit_joint == []
    assert len(spy.calls) == 6
