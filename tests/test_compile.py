"""The patched model under ComfyUI's core TorchCompileModel node (inductor on the CPU)."""

import torch

from comfy_extras.nodes_torch_compile import TorchCompileModel

from devtools import tiny_models as tm
from devtools.sampling import one_step
from harness import rel_diff


def test_taca_under_torch_compile_matches_eager_in_taca_and_plain_steps(pack_nodes):
    tiny = tm.build("flux")
    pos, neg, latent = tm.conditioning(tiny, 1), tm.conditioning(tiny, 2), tm.latent(tiny)
    taca = pack_nodes["TACAPatchModel"].execute(model=tiny.patcher, gamma=1.2, threshold_sigma=0.97,
                                                mode="exact").result[0]
    compiled = TorchCompileModel.execute(model=taca, backend="inductor").result[0]
    for sigma in (1.0, 0.5):
        eager = one_step(taca, pos, neg, latent, sigma, 3.0)
        out = one_step(compiled, pos, neg, latent, sigma, 3.0)
        assert torch.isfinite(out).all()
        assert rel_diff(out, eager) <= 1e-4, (sigma, rel_diff(out, eager))
    # TACA really acted inside the compiled graph: the TACA step differs from the plain model's.
    plain = one_step(tiny.patcher, pos, neg, latent, 1.0, 3.0)
    assert rel_diff(one_step(compiled, pos, neg, latent, 1.0, 3.0), plain) > 1e-2
