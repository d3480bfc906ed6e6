"""Sampler-level semantics: sigma gating, bit-identity when inactive, isolation, branches, composition, errors.

Everything runs through ComfyUI's real samplers (comfy.sample) on tiny models.
"""

import math

import pytest
import torch

from devtools import tiny_models as tm
from devtools.sampling import ksample, one_step, sample_sigmas, schedule
from harness import GAMMA, AttentionSpy, ReferenceTacaAttention, installed_override, rel_diff, taca, with_override

# ComfyUI 0.3.75's schedules at 1024x1024, 30 steps, `simple` (shared/TACA_REFERENCE.md section 7).
PUBLISHED_FIRST_SIGMAS = {
    "flux": [1.0, 0.98921, 0.97791, 0.96601, 0.95356, 0.94047],
    "sd3": [1.0, 0.98875, 0.97699, 0.96429, 0.95135, 0.93778],
}


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_taca_acts_on_exactly_the_steps_at_or_above_the_threshold(pack_nodes, kind):
    tiny = tm.build(kind)
    sigmas = schedule(tiny.patcher, 30)
    assert [round(float(s), 5) for s in sigmas[:6]] == pytest.approx(PUBLISHED_FIRST_SIGMAS[kind], abs=1e-5)
    expected_steps = [i for i, s in enumerate(sigmas[:-1].tolist()) if s >= 0.97]
    assert expected_steps == [0, 1, 2]  # the official code's `i < 3` of 30

    patched = taca(pack_nodes, with_override(tiny.patcher, AttentionSpy()))
    spy = installed_override(patched)
    ksample(patched, tiny)
    text = tiny.text_tokens + tiny.register_tokens
    joint = text + tm.image_tokens(tiny, 16, 16)
    step_of_sigma = {round(float(s), 6): i for i, s in enumerate(sigmas[:-1].tolist())}
    assert {round(c[0], 6) for c in spy.calls} == set(step_of_sigma)  # every step was sampled
    # 'exact' splits each joint call into a text-row call and a visual-row call.
    acted = {step_of_sigma[round(c[0], 6)] for c in spy.calls if c[2] == joint and c[1] != joint}
    untouched = {step_of_sigma[round(c[0], 6)] for c in spy.calls if c[1] == joint}
    assert sorted(acted) == expected_steps
    assert untouched == set(range(30)) - set(expected_steps)


def test_selective_changes_only_the_taca_steps(pack_nodes):
    """Per-step check for 'selective': replaying any single step with and without TACA."""
    tiny = tm.build("flux")
    sigmas = schedule(tiny.patcher, 30)
    patched = taca(pack_nodes, tiny.patcher, mode="selective")
    pos, neg, latent = tm.conditioning(tiny, 1), tm.conditioning(tiny, 2), tm.latent(tiny)
    for i in range(6):
        a = one_step(patched, pos, neg, latent, sigma=float(sigmas[i]), cfg=3.0)
        b = one_step(tiny.patcher, pos, neg, latent, sigma=float(sigmas[i]), cfg=3.0)
        assert torch.equal(a, b) == (i >= 3), i


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("mode", ["exact", "selective", "flex"])
def test_below_threshold_the_sampler_output_is_bit_identical(pack_nodes, kind, mode):
    tiny = tm.build(kind)
    patched = taca(pack_nodes, tiny.patcher, mode=mode)
    # Start at step 3 of 30 (sigma 0.966 < 0.97), like img2img with denoise < 1.
    a = ksample(patched, tiny, start_step=3)
    b = ksample(tiny.patcher, tiny, start_step=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["flux", "sd35_medium"])
def test_gamma_one_is_bit_identical_on_every_step(pack_nodes, kind):
    tiny = tm.build(kind)
    patched = taca(pack_nodes, tiny.patcher, gamma=1.0, threshold=0.0)
    assert torch.equal(ksample(patched, tiny, steps=6), ksample(tiny.patcher, tiny, steps=6))


def test_full_run_differs_only_through_the_taca_steps(pack_nodes):
    tiny = tm.build("flux")
    patched = taca(pack_nodes, tiny.patcher)
    out = ksample(patched, tiny)
    assert not torch.equal(out, ksample(tiny.patcher, tiny))
    assert torch.isfinite(out).all()


def test_input_model_and_other_branches_are_untouched(pack_nodes):
    tiny = tm.build("flux")
    fresh = tm.build("flux")  # an identical model that never meets TACA
    before = ksample(tiny.patcher, tiny, steps=6)
    patched = taca(pack_nodes, tiny.patcher, threshold=0.0)
    first = ksample(patched, tiny, steps=6)
    after = ksample(tiny.patcher, tiny, steps=6)
    second = ksample(patched, tiny, steps=6)
    assert torch.equal(before, after)  # bypassing / removing the node: exactly the unpatched model
    assert torch.equal(after, ksample(fresh.patcher, fresh, steps=6))
    assert torch.equal(first, second)  # a second run behaves like the first
    assert not torch.equal(first, before)
    assert "comfyui-taca" not in str(tiny.patcher.model_options)


def test_two_branches_with_different_settings_each_get_their_own(pack_nodes):
    tiny = tm.build("flux")
    pos, neg, latent = tm.conditioning(tiny, 1), tm.conditioning(tiny, 2), tm.latent(tiny)
    branch_a = taca(pack_nodes, tiny.patcher, gamma=1.2)
    branch_b = taca(pack_nodes, tiny.patcher, gamma=1.3)
    a1 = one_step(branch_a, pos, neg, latent, cfg=3.0)
    b1 = one_step(branch_b, pos, neg, latent, cfg=3.0)
    a2 = one_step(branch_a, pos, neg, latent, cfg=3.0)
    assert torch.equal(a1, a2)
    joint = 256 + tm.image_tokens(tiny, 16, 16)
    for out, gamma in ((a1, 1.2), (b1, 1.3)):
        ref = one_step(with_override(tiny.patcher, ReferenceTacaAttention({joint: (0, 256)}, gamma)), pos, neg, latent,
                       cfg=3.0)
        assert rel_diff(out, ref) <= 1e-4
    assert rel_diff(a1, b1) > 1e-3


def test_a_second_taca_node_replaces_the_first(pack_nodes):
    tiny = tm.build("flux")
    pos, neg, latent = tm.conditioning(tiny, 1), tm.conditioning(tiny, 2), tm.latent(tiny)
    chained = taca(pack_nodes, taca(pack_nodes, tiny.patcher, gamma=1.3, mode="selective"), gamma=1.2)
    single = taca(pack_nodes, tiny.patcher, gamma=1.2)
    assert torch.equal(one_step(chained, pos, neg, latent), one_step(single, pos, neg, latent))


def halve(out):
    return out * 0.5


@pytest.mark.parametrize("order", ["theirs_then_taca", "taca_then_theirs"])
def test_composes_with_another_attention_override_in_either_order(pack_nodes, order):
    tiny = tm.build("flux")
    pos, neg, latent = tm.conditioning(tiny, 1), tm.conditioning(tiny, 2), tm.latent(tiny)
    if order == "theirs_then_taca":
        model = taca(pack_nodes, with_override(tiny.patcher, AttentionSpy(post=halve)))
    else:
        model = with_override(taca(pack_nodes, tiny.patcher), AttentionSpy(post=halve))
    theirs = installed_override(model)
    out = one_step(model, pos, neg, latent, cfg=3.0)
    joint = 256 + tm.image_tokens(tiny, 16, 16)
    expected = one_step(with_override(tiny.patcher, ReferenceTacaAttention({joint: (0, 256)}, GAMMA, post=halve)),
                        pos, neg, latent, cfg=3.0)
    taca_only = one_step(taca(pack_nodes, tiny.patcher), pos, neg, latent, cfg=3.0)
    theirs_only = one_step(with_override(tiny.patcher, AttentionSpy(post=halve)), pos, neg, latent, cfg=3.0)
    assert rel_diff(out, expected) <= 1e-4
    assert rel_diff(out, taca_only) > 1e-2 and rel_diff(out, theirs_only) > 1e-3
    assert len(theirs.calls) == 2 * 4  # 4 joint calls (2 double + 2 single blocks), each split in two
    # Below the threshold their override still runs, on the untouched calls.
    theirs.calls.clear()
    below = one_step(model, pos, neg, latent, sigma=0.5, cfg=3.0)
    assert len(theirs.calls) == 4 and all(c[1] == joint for c in theirs.calls)
    assert torch.equal(below, one_step(with_override(tiny.patcher, AttentionSpy(post=halve)), pos, neg, latent,
                                       sigma=0.5, cfg=3.0))


@pytest.mark.parametrize("kind,words", [
    ("sd15", ["BaseModel", "cross-attention", "FLUX.1", "SD3"]),
    ("hunyuan3d", ["Hunyuan3Dv2", "not support", "FLUX.1", "SD3"]),
])
def test_unsupported_models_get_a_clear_error(pack_nodes, kind, words):
    patcher = tm.build_unsupported(kind)
    options_before = repr(patcher.model_options)
    with pytest.raises(ValueError) as err:
        taca(pack_nodes, patcher)
    for word in words:
        assert word in str(err.value)
    assert repr(patcher.model_options) == options_before


@pytest.mark.parametrize("gamma,threshold,mode,word", [
    (0.0, 0.97, "exact", "gamma"), (-1.2, 0.97, "exact", "gamma"), (math.nan, 0.97, "exact", "gamma"),
    (12.0, 0.97, "exact", "gamma"), (1.2, -0.5, "exact", "threshold_sigma"), (1.2, 1.01, "exact", "threshold_sigma"),
    (1.2, 0.97, "fastest", "mode"),
])
def test_bad_values_are_refused(pack_nodes, gamma, threshold, mode, word):
    tiny = tm.build("flux")
    with pytest.raises(ValueError) as err:
        taca(pack_nodes, tiny.patcher, gamma=gamma, threshold=threshold, mode=mode)
    assert word in str(err.value)
