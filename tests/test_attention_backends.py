"""TACA beside attention kernels chosen elsewhere, and on a grouped-query model, through whole tiny models.

* ComfyUI 0.33's core "Model Attention Backend" node (``ModelAttentionBackend``) sets the model's attention
  override with ``ModelPatcher.set_model_optimized_attention``, replacing what was there.  TACA reads the
  override at call time and wraps it, so in either node order both act: the kernel that node picked computes
  every attention call (observed by counting PyTorch's scaled_dot_product_attention calls, which ComfyUI's
  CPU default, sub-quadratic attention, never makes) and TACA changes the joint calls.
* OmniGen2 passes ``enable_gqa=True`` (K/V with fewer heads than Q) on ComfyUI 0.33: every mode must equal
  the float64 reference there.
"""

import pytest
import torch
import torch.nn.functional as F

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy_extras.nodes_model_advanced as nodes_model_advanced
import comfyui_version

from devtools import tiny_models as tm
from devtools.comfy_runtime import version_key
from devtools.host_reads import TorchCallCounter
from devtools.sampling import one_step
from harness import GAMMA, ReferenceTacaAttention, rel_diff, run_report, taca, with_override
from layouts import observe_joint_layout

TOLERANCE = 1e-4
FLUX_JOINT_LAYERS = 4  # the tiny FLUX: 2 double + 2 single blocks


def counting_sdpa(fn, *args, **kwargs):
    with TorchCallCounter([F.scaled_dot_product_attention]) as counter:
        out = fn(*args, **kwargs)
    return out, counter.calls


def backend_node():
    node = getattr(nodes_model_advanced, "ModelAttentionBackend", None)
    if node is None:
        # The node, and the ModelPatcher method it uses, came with ComfyUI 0.33; nothing to compose with before.
        assert version_key(comfyui_version.__version__) < version_key("0.33.0"), comfyui_version.__version__
        assert not hasattr(comfy.model_patcher.ModelPatcher, "set_model_optimized_attention")
        pytest.skip(f"ComfyUI {comfyui_version.__version__} has no Model Attention Backend node")
    return node()


def test_the_cpu_default_kernel_makes_no_sdpa_call():
    """What makes the count below a witness of the backend node's choice."""
    assert comfy_attention.optimized_attention is comfy_attention.attention_sub_quad
    q = torch.randn(1, 2, 8, 4)
    _, calls = counting_sdpa(comfy_attention.optimized_attention, q, q, q, 2, skip_reshape=True)
    assert calls == 0
    _, calls = counting_sdpa(comfy_attention.attention_pytorch, q, q, q, 2, skip_reshape=True)
    assert calls == 1


@pytest.mark.parametrize("order", ["taca_then_backend", "backend_then_taca"])
def test_taca_composes_with_the_model_attention_backend_node(pack_nodes, order):
    node = backend_node()
    tiny = tm.build("flux")
    pos, neg, latent = tm.conditioning(tiny, 1), tm.conditioning(tiny, 2), tm.latent(tiny)
    (length, (start, stop)), = observe_joint_layout(tiny.patcher, pos, latent).items()
    with_backend = node.patch(tiny.patcher, "pytorch attention")[0]
    if order == "taca_then_backend":
        model = node.patch(taca(pack_nodes, tiny.patcher), "pytorch attention")[0]
    else:
        model = taca(pack_nodes, with_backend)
    report = run_report(model)

    # Below the threshold: the backend's kernel on every call, bits as without TACA.
    plain_low, plain_calls = counting_sdpa(one_step, with_backend, pos, neg, latent, 0.5, 3.0)
    low, calls = counting_sdpa(one_step, model, pos, neg, latent, 0.5, 3.0)
    assert plain_calls == FLUX_JOINT_LAYERS  # one batched model call, one kernel call per layer
    assert calls == plain_calls and torch.equal(low, plain_low)
    assert report.acted_calls == 0

    # A TACA step: the backend's kernel computes both row groups of every joint call, and TACA's result is eq. 10.
    out, calls = counting_sdpa(one_step, model, pos, neg, latent, 1.0, 3.0)
    assert report.acted_steps == [0] and report.attention_calls == FLUX_JOINT_LAYERS, report.as_message()
    assert calls == 2 * FLUX_JOINT_LAYERS
    ref = one_step(with_override(tiny.patcher, ReferenceTacaAttention({length: (start, stop)}, GAMMA)), pos, neg, latent,
                   1.0, 3.0)
    plain = one_step(with_backend, pos, neg, latent, 1.0, 3.0)
    assert rel_diff(out, ref) <= TOLERANCE, (rel_diff(out, ref), rel_diff(plain, ref))
    assert rel_diff(plain, ref) > 100 * TOLERANCE


def omnigen2_case():
    tiny = tm.build("omnigen2")
    ref_latent = [torch.randn(1, 16, 12, 8, generator=torch.Generator().manual_seed(7))]
    pos = tm.family_conditioning(tiny, 1, batch=1, reference_latents=ref_latent)
    neg = tm.family_conditioning(tiny, 2, batch=1, reference_latents=ref_latent)
    latent = tm.family_latent(tiny, batch=2)
    return tiny, pos, neg, latent


class GqaWitness:
    """Another pack's override in the plain model: records whether joint calls arrive with grouped K/V heads."""

    def __init__(self, length):
        self.length = length
        self.grouped = []

    def __call__(self, func, q, k, v, *args, **kwargs):
        if q.shape[2 if kwargs.get("skip_reshape") else 1] == self.length:
            self.grouped.append((bool(kwargs.get("enable_gqa", False)), q.shape, k.shape))
        return func(q, k, v, *args, **kwargs)


@pytest.mark.parametrize("mode", ["exact", "selective", "flex"])
def test_omnigen2_grouped_query_attention_in_every_mode(pack_nodes, mode):
    tiny, pos, neg, latent = omnigen2_case()
    (length, (start, stop)), = observe_joint_layout(tiny.patcher, pos, latent).items()
    if version_key(comfyui_version.__version__) >= version_key("0.33.0"):
        witness = GqaWitness(length)
        one_step(with_override(tiny.patcher, witness), pos, neg, latent, 1.0, 3.0)
        # On 0.33 the joint calls really are grouped-query: fewer K heads than Q heads, enable_gqa set.
        assert witness.grouped and all(gqa and k[1] < q[1] for gqa, q, k in witness.grouped), witness.grouped
    reference = ReferenceTacaAttention({length: (start, stop)}, GAMMA, listing2=(mode == "selective"))
    out = one_step(taca(pack_nodes, tiny.patcher, mode=mode), pos, neg, latent, 1.0, 3.0)
    ref = one_step(with_override(tiny.patcher, reference), pos, neg, latent, 1.0, 3.0)
    plain = one_step(tiny.patcher, pos, neg, latent, 1.0, 3.0)
    assert reference.joint_calls > 0
    assert torch.isfinite(out).all()
    assert rel_diff(out, ref) <= TOLERANCE, (rel_diff(out, ref), rel_diff(plain, ref))
    assert rel_diff(plain, ref) > 30 * TOLERANCE
