"""The TACA Attention Probe and the TACA Probe Report on real tiny models, sampled with ComfyUI's own sampler.

The probe's numbers are checked against a float64 brute force written here: an attention spy (an APPLY_MODEL
wrapper inside every other, wrapping whatever override the call carries) keeps each joint call's q, k, mask and
scale as the model passes them; the test computes the full softmax of every image query over all keys, with
gamma on the text keys as eq. 10 has it, and sums what falls on the text.  Where the text sits is observed on the
running ComfyUI (``test_families.joint_layout``), not taken from taca/families.py.
"""

import json
import math
from typing import Dict, List, Tuple

import pytest
import torch

import comfy.patcher_extension
from devtools import tiny_models as tm
from devtools.sampling import sample_sigmas
from harness import GAMMA, taca
from taca import hooks, probe_record
from taca.joint_call import parse_joint_call
from taca.attention import JointLayout
from test_families import AVAILABLE, CASES, joint_layout, setup, step

BRUTE_FORCE_TOL = 1e-6  # probe (float32 logits, float64 sums) vs float64 full softmax, all rows measured
SUBSET_TOL = 2e-3  # 1024 of 4096 evenly spaced image rows vs all of them (measured below; see the test)
SPY_KEY = "test-attention-spy"


def probe(pack_nodes, model, record="all_steps", max_rows=1024):
    return pack_nodes["TACAAttentionProbe"].execute(model=model, record=record, max_rows=max_rows).result[0]


def report(pack_nodes, model, samples):
    return pack_nodes["TACAProbeReport"].execute(model=model, latent={"samples": samples})


class JointSpy:
    """The override a model call carries, wrapped: joint calls (keys of a known joint length) are kept."""

    def __init__(self, layouts: Dict[int, Tuple[int, int]], previous, calls: List[dict]):
        self.layouts, self.previous, self.calls = layouts, previous, calls

    def __call__(self, func, *args, **kwargs):
        q, k = args[0], args[1]
        seq_dim = 2 if kwargs.get("skip_reshape", False) else 1
        if k.shape[seq_dim] in self.layouts and q.shape[seq_dim] == k.shape[seq_dim]:
            heads = args[3] if len(args) > 3 else kwargs["heads"]
            mask = args[4] if len(args) > 4 else kwargs.get("mask")
            self.calls.append({"q": q.detach().double().clone(), "k": k.detach().double().clone(), "heads": heads,
                               "mask": None if mask is None else mask.detach().clone(), "seq_dim": seq_dim,
                               "scale": kwargs.get("scale"), "span": self.layouts[k.shape[seq_dim]]})
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)


class SpyWrapper:
    """APPLY_MODEL wrapper, added last so it runs inside the TACA and probe wrappers: one list per model call."""

    def __init__(self, layouts):
        self.layouts = layouts
        self.model_calls: List[Tuple[float, List[dict]]] = []

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        options = dict(transformer_options)
        calls: List[dict] = []
        self.model_calls.append((float(t.max()), calls))
        options[hooks.OVERRIDE_KEY] = JointSpy(self.layouts, options.get(hooks.OVERRIDE_KEY), calls)
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def with_spy(model, layouts) -> Tuple[object, SpyWrapper]:
    spied = model.clone()
    spy = SpyWrapper(layouts)
    spied.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, SPY_KEY, spy)
    return spied, spy


def brute_force(call: dict, gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per batch entry mean share, per image row share averaged over heads (B, rows)) by the full softmax."""
    q, k, heads, seq_dim = call["q"], call["k"], call["heads"], call["seq_dim"]
    if seq_dim == 1:
        d = q.shape[-1] // heads
        q, k = (t.reshape(t.shape[0], t.shape[1], -1, d).transpose(1, 2) for t in (q, k))
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    n = q.shape[2]
    start, stop = call["span"]
    scale = call["scale"] if call["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = q @ k.transpose(-1, -2) * scale
    text = torch.zeros(n, dtype=torch.bool)
    text[start:stop] = True
    logits[..., text] *= gamma
    mask = call["mask"]
    if mask is not None:
        while mask.ndim < 4:
            mask = mask.unsqueeze(0) if mask.ndim == 2 else mask.unsqueeze(1)
        additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf) \
            if mask.dtype == torch.bool else mask.double()
        logits = logits + additive
    share = torch.softmax(logits, dim=-1)[..., text].sum(-1)[:, :, ~text]  # (B, H, image rows)
    return share.mean(dim=(1, 2)), share.mean(dim=1)


def brute_force_steps(spy: SpyWrapper, gamma_of) -> List[dict]:
    """The probe's JSON steps, computed by brute force from what the spy kept (model calls of one sigma joined)."""
    steps: List[dict] = []
    for sigma, calls in spy.model_calls:
        gamma = gamma_of(sigma)
        entries = [(brute_force(c, 1.0)[0], brute_force(c, gamma)[0]) for c in calls]
        if steps and steps[-1]["sigma"] == sigma:
            for record, (plain, scaled) in zip(steps[-1]["calls"], entries):
                record["share_plain"] += plain.tolist()
                record["share_taca"] += scaled.tolist()
            continue
        steps.append({"sigma": sigma, "calls": [{"index": i, "gamma": gamma, "share_plain": p.tolist(),
                                                 "share_taca": s.tolist()} for i, (p, s) in enumerate(entries)]})
    return steps


def largest_gap(found: List[dict], expected: List[dict]) -> float:
    assert [s["sigma"] for s in found] == pytest.approx([s["sigma"] for s in expected], abs=1e-6)
    gap = 0.0
    for a, b in zip(found, expected):
        assert len(a["calls"]) == len(b["calls"]) > 0
        for ca, cb in zip(a["calls"], b["calls"]):
            assert ca["index"] == cb["index"] and ca["gamma"] == pytest.approx(cb["gamma"])
            for key in ("share_plain", "share_taca"):
                assert len(ca[key]) == len(cb[key])
                gap = max(gap, max(abs(x - y) for x, y in zip(ca[key], cb[key])))
    return gap


# FLUX and SD3 (text first), and families with a text padding mask added to the joint logits: Lens (image first
# everywhere), HunyuanImage 2.1 (image first in ComfyUI 0.3.75, text first after), Ideogram 4.
BRUTE_FORCE_CASES = [n for n in ("flux", "sd3", "lens_masked", "hunyuan_image21_masked", "ideogram4_masked")
                     if n in AVAILABLE]
SIGMAS = [1.0, 0.98, 0.5, 0.0]  # two TACA steps and one plain one


def gamma_of(sigma: float) -> float:
    return GAMMA if sigma >= 0.97 else 1.0


def probed_run(pack_nodes, name: str, order: str):
    """Sample ``name`` with TACA and the probe in ``order`` ("taca_probe", "probe_taca", "probe": no TACA)."""
    case = CASES[name]
    tiny, positive, negative, latent = setup(case)
    model = tiny.patcher
    for node in order.split("_"):
        model = taca(pack_nodes, model) if node == "taca" else probe(pack_nodes, model)
    spied, spy = with_spy(model, joint_layout(name))
    out = sample_sigmas(spied, positive, negative, latent, torch.tensor(SIGMAS), cfg=case.cfg)
    data = json.loads(report(pack_nodes, model, out).result[1])
    return data, spy, latent


def test_the_brute_force_cases_cover_an_image_first_family_with_a_mask():
    assert {"flux", "sd3"} <= set(BRUTE_FORCE_CASES)
    assert "lens_masked" in BRUTE_FORCE_CASES or "hunyuan_image21_masked" in BRUTE_FORCE_CASES


@pytest.mark.parametrize("name", BRUTE_FORCE_CASES)
def test_probe_equals_the_float64_brute_force(pack_nodes, name):
    data, spy, latent = probed_run(pack_nodes, name, "taca_probe")
    expected = brute_force_steps(spy, gamma_of)
    gap = largest_gap(data["steps"], expected)
    assert gap <= BRUTE_FORCE_TOL, gap
    # TACA's gamma moves the share, so share_taca is not share_plain by accident.
    first = data["steps"][0]["calls"][0]
    assert max(abs(a - b) for a, b in zip(first["share_plain"], first["share_taca"])) > 100 * BRUTE_FORCE_TOL
    # The map: the first model call's share per image row at TACA's gamma, over heads, joint calls and batch.
    _, calls = spy.model_calls[0]
    rows = torch.stack([brute_force(c, GAMMA)[1].mean(dim=0) for c in calls]).mean(dim=0)
    heat = data["heatmap"]
    height, width = heat["height"], heat["width"]
    assert height * width == rows.numel() == len(heat["values"])
    if name == "flux":
        assert (height, width) == (8, 8)  # the 16 x 16 latent in 2 x 2 patches
    assert max(abs(a - b) for a, b in zip(heat["values"], rows.tolist())) <= BRUTE_FORCE_TOL


@pytest.mark.parametrize("order", ["probe_taca", "probe"])
def test_probe_equals_the_brute_force_in_either_order_and_without_taca(pack_nodes, order):
    data, spy, _ = probed_run(pack_nodes, "flux", order)
    expected = brute_force_steps(spy, gamma_of if order != "probe" else (lambda sigma: 1.0))
    assert largest_gap(data["steps"], expected) <= BRUTE_FORCE_TOL


def test_the_subset_estimate_on_a_large_random_case():
    """4096 image tokens (a 64 x 64 grid) and 64 text tokens: 1024 evenly spaced rows estimate the mean share.

    On these random inputs the subset is at most 3.1e-4 off (measured; shares about 0.016 and 0.027); SUBSET_TOL
    allows about six times that.
    The map measures every row, so it equals the brute force to float64 precision.
    """
    g = torch.Generator().manual_seed(3)
    batch, heads, dim, text, visual = 2, 4, 32, 64, 4096
    q = torch.randn(batch, heads, text + visual, dim, generator=g) * 1.5
    k = torch.randn(batch, heads, text + visual, dim, generator=g)
    # A smooth bias over the image, so rows differ systematically and the subset has something to miss.
    ramp = torch.linspace(-1, 1, visual)
    q[:, :, text:, 0] += 2.0 * ramp
    k[:, :, :text, 0] += 1.0
    span = JointLayout.text_first(text, text + visual)
    call = parse_joint_call((q, k, k, heads), {"skip_reshape": True, "skip_output_reshape": True},
                            {span.length: span})
    run = probe_record.ProbeRun(probe_record.ProbeSettings("all_steps", 1024))
    sink = run.begin(1.0, (0, 1), (batch, 16, 128, 128))
    sink.joint_call(call, GAMMA)
    run.end(sink, True)
    data = run.as_json()
    shares = {"share_plain": [], "share_taca": []}
    rows = []
    for first in range(0, visual, 512):  # the full softmax, 512 image rows at a time
        part = q[:, :, text + first:text + first + 512].double()
        logits = part @ k.double().transpose(-1, -2) / math.sqrt(dim)
        for key, gamma in (("share_plain", 1.0), ("share_taca", GAMMA)):
            scaled = torch.cat([logits[..., :text] * gamma, logits[..., text:]], dim=-1)
            share = torch.softmax(scaled, dim=-1)[..., :text].sum(-1)
            shares[key].append(share)
            if gamma == GAMMA:
                rows.append(share.mean(dim=(0, 1)))
    call_data = data["steps"][0]["calls"][0]
    for key, parts in shares.items():
        full = torch.cat(parts, dim=2).mean(dim=(1, 2))
        error = max(abs(a - b) for a, b in zip(call_data[key], full.tolist()))
        assert error <= SUBSET_TOL, (key, error)
    heat = data["heatmap"]
    assert (heat["height"], heat["width"]) == (64, 64)
    assert max(abs(a - b) for a, b in zip(heat["values"], torch.cat(rows).tolist())) <= BRUTE_FORCE_TOL


# One case per family kind this ComfyUI has: the probe changes no output bit, with or without TACA, in either order.
FAMILY_CASES = list({CASES[n].kind: n for n in reversed(AVAILABLE)}.values())[::-1]


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_outputs_are_bit_identical_with_the_probe_on_every_family(pack_nodes, name):
    case = CASES[name]
    tiny, positive, negative, latent = setup(case)
    at = step(case, tiny)
    model_sampling = tiny.patcher.get_model_object("model_sampling")
    sigmas = torch.tensor([float(at["sigma"]), float(model_sampling.percent_to_sigma(0.5)), 0.0])

    def run(model):
        return sample_sigmas(model, positive, negative, latent, sigmas, cfg=at["cfg"], sampler=at["sampler"])

    plain, patched = run(tiny.patcher), run(taca(pack_nodes, tiny.patcher))
    probed = probe(pack_nodes, tiny.patcher)
    assert torch.equal(run(probed), plain)
    conds = 1 if case.cfg == 1.0 else 2
    data = json.loads(report(pack_nodes, probed, plain).result[1])
    assert len(data["steps"]) == 2
    for recorded in data["steps"]:
        assert len(recorded["calls"]) == case.joint_calls
        for call in recorded["calls"]:
            assert call["share_plain"] == call["share_taca"] and call["gamma"] == 1.0
            assert all(0.0 <= s <= 1.0 for s in call["share_plain"])
    assert not torch.equal(plain, patched)
    for model in (probe(pack_nodes, taca(pack_nodes, tiny.patcher)), taca(pack_nodes, probe(pack_nodes, tiny.patcher))):
        assert torch.equal(run(model), patched)
        data = json.loads(report(pack_nodes, model, patched).result[1])
        taca_step, plain_step = data["steps"]
        assert [c["gamma"] for c in taca_step["calls"]] == [GAMMA] * case.joint_calls
        assert [c["gamma"] for c in plain_step["calls"]] == [1.0] * case.joint_calls
        assert len(taca_step["calls"][0]["share_plain"]) >= conds
        assert taca_step["calls"][0]["share_plain"] != taca_step["calls"][0]["share_taca"]


def test_report_json_schema_and_plot_after_a_full_run(pack_nodes):
    """A 30-step KSampler-like run, probe on TACA's steps: the JSON holds those steps, the plot is an IMAGE."""
    tiny = tm.build("flux")
    positive, negative = tm.conditioning(tiny, 1), tm.conditioning(tiny, 2)
    latent = tm.latent(tiny, 16, 16)
    from devtools.sampling import schedule

    sigmas = schedule(tiny.patcher, 30)
    model = probe(pack_nodes, taca(pack_nodes, tiny.patcher), record="taca_steps")
    out = sample_sigmas(model, positive, negative, latent, sigmas, cfg=3.0)
    result = report(pack_nodes, model, out)
    image, text = result.result
    data = json.loads(text)
    assert data["version"] == 1 and set(data) >= {"version", "steps", "heatmap"}
    acting = [float(s) for s in sigmas[:-1] if s >= 0.97]
    assert len(acting) >= 2
    assert [s["sigma"] for s in data["steps"]] == pytest.approx(acting)
    for recorded in data["steps"]:
        assert isinstance(recorded["sigma"], float) and len(recorded["calls"]) == 4
        for i, call in enumerate(recorded["calls"]):
            assert set(call) >= {"index", "gamma", "share_plain", "share_taca"} and call["index"] == i
            assert call["gamma"] == GAMMA and len(call["share_plain"]) == len(call["share_taca"]) == 2  # cond, uncond
    heat = data["heatmap"]
    assert (heat["height"], heat["width"]) == (8, 8) and len(heat["values"]) == 64
    assert all(0.0 < v < 1.0 for v in heat["values"])
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.05
    shown = result.ui if isinstance(result.ui, dict) else result.ui.as_dict()
    assert shown["images"] and shown["images"][0]["type"] == "temp" and "taca_probe" not in shown
    # Without a TACA Patch Model, taca_steps means the default window: the same steps, gamma 1.
    alone = probe(pack_nodes, tiny.patcher, record="taca_steps")
    sample_sigmas(alone, positive, negative, latent, sigmas, cfg=3.0)
    data = json.loads(report(pack_nodes, alone, out).result[1])
    assert [s["sigma"] for s in data["steps"]] == pytest.approx(acting)
    assert all(c["gamma"] == 1.0 for s in data["steps"] for c in s["calls"])


def test_a_new_run_replaces_the_last_one(pack_nodes):
    tiny = tm.build("flux")
    positive, negative, latent = tm.conditioning(tiny, 1), tm.conditioning(tiny, 2), tm.latent(tiny, 16, 16)
    model = probe(pack_nodes, tiny.patcher)
    sample_sigmas(model, positive, negative, latent, torch.tensor(SIGMAS), cfg=3.0)
    out = sample_sigmas(model, positive, negative, latent, torch.tensor([0.5, 0.0]), cfg=3.0)
    data = json.loads(report(pack_nodes, model, out).result[1])
    assert [s["sigma"] for s in data["steps"]] == [0.5]


def test_report_without_a_probe_names_the_fix(pack_nodes):
    tiny = tm.build("flux")
    with pytest.raises(ValueError) as err:
        report(pack_nodes, taca(pack_nodes, tiny.patcher), tm.latent(tiny))
    assert "TACA Attention Probe" in str(err.value) and "MODEL output" in str(err.value)


def test_bad_inputs_are_refused(pack_nodes):
    tiny = tm.build("flux")
    with pytest.raises(ValueError, match="max_rows"):
        probe(pack_nodes, tiny.patcher, max_rows=0)
    with pytest.raises(ValueError, match="record"):
        probe(pack_nodes, tiny.patcher, record="sometimes")
    with pytest.raises(ValueError):
        probe(pack_nodes, tm.build_cross_attention("sdxl"))


def test_token_grid():
    assert probe_record.token_grid((1, 16, 16, 16), 64) == (8, 8, 64)
    assert probe_record.token_grid((1, 16, 3, 8, 8), 48) == (4, 4, 48)  # 3 frames, averaged
    assert probe_record.token_grid((1, 16, 16, 16), 88) == (8, 8, 64)  # a reference after the image
    assert probe_record.token_grid((1, 3, 128, 96), 13) == (4, 3, 12)  # pixels in 32 x 32 patches
    assert probe_record.token_grid((), 10) == (1, 10, 10)  # no single latent shape: the tokens in a row
