"""The patched model under ComfyUI's core TorchCompileModel node (inductor on the CPU)."""

import pytest
import torch

from comfy_extras.nodes_torch_compile import TorchCompileModel

from devtools import tiny_models as tm
from devtools.sampling import one_step, sample_sigmas
from harness import rel_diff, run_report, with_run_spy

FLUX_JOINT_LAYERS = 4  # the tiny FLUX: 2 double + 2 single blocks, each one joint attention call


@pytest.fixture(scope="module")
def compiled_case(pack_nodes):
    """One tiny FLUX, patched and compiled once for the module (compiling costs minutes on a CPU)."""
    tiny = tm.build("flux")
    pos, neg, latent = tm.conditioning(tiny, 1), tm.conditioning(tiny, 2), tm.latent(tiny)
    taca = with_run_spy(pack_nodes["TACAPatchModel"].execute(model=tiny.patcher, gamma=1.2, threshold_sigma=0.97,
                                                             mode="exact").result[0])
    compiled = TorchCompileModel.execute(model=taca, backend="inductor").result[0]
    return tiny, pos, neg, latent, taca, compiled


def test_taca_under_torch_compile_matches_eager_in_taca_and_plain_steps(compiled_case):
    tiny, pos, neg, latent, taca, compiled = compiled_case
    for sigma in (1.0, 0.5):
        eager = one_step(taca, pos, neg, latent, sigma, 3.0)
        out = one_step(compiled, pos, neg, latent, sigma, 3.0)
        assert torch.isfinite(out).all()
        assert rel_diff(out, eager) <= 1e-4, (sigma, rel_diff(out, eager))
    # TACA really acted inside the compiled graph: the TACA step differs from the plain model's.
    plain = one_step(tiny.patcher, pos, neg, latent, 1.0, 3.0)
    assert rel_diff(one_step(compiled, pos, neg, latent, 1.0, 3.0), plain) > 1e-2


def test_compiled_run_switches_taca_off_after_the_first_steps(compiled_case):
    """One sampling run through the compiled model: TACA on the two steps at sigma >= 0.97, then off, then on and
    off again in a second run (the options handed to the model keep the same keys throughout, which Dynamo's
    guards need); the whole run equals the eager patched model's."""
    tiny, pos, neg, latent, taca, compiled = compiled_case
    sigmas = torch.tensor([1.0, 0.98, 0.5, 0.3, 0.0])
    report = run_report(compiled)
    for _ in range(2):
        out = sample_sigmas(compiled, pos, neg, latent, sigmas, cfg=3.0)
        assert torch.isfinite(out).all()
        assert report.acted_steps == [0, 1], report.as_message()
        assert report.model_calls == 4 and report.acted_calls == 2  # cond and uncond batched: one call per step
        assert report.attention_calls == 2 * FLUX_JOINT_LAYERS, report.as_message()
    eager = sample_sigmas(taca, pos, neg, latent, sigmas, cfg=3.0)
    assert rel_diff(out, eager) <= 1e-4, rel_diff(out, eager)
    plain = sample_sigmas(tiny.patcher, pos, neg, latent, sigmas, cfg=3.0)
    assert rel_diff(out, plain) > 1e-2
