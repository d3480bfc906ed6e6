"""TACA Patch Model (Advanced): the sigma window, the ramp, the blocks and the adaptive gamma, on real tiny models
through ComfyUI's samplers.

Which joint attention call got which gamma is read by an attention override placed before TACA's (``GammaSpy``):
in mode 'exact' TACA hands it every joint call it acts on as two calls, the text rows with the model's keys and
then the image rows with the text keys times gamma, so the ratio of the two calls' text keys is the gamma that
call got; a joint call TACA leaves alone reaches it whole.  The expected gammas are computed here from the
formulas (not from ``TacaSettings``), and the adaptive gamma is checked against a brute-force search over a fine
grid with the full float64 softmax (not ``taca.probe``).  Sampled outputs are compared with the same model whose
joint attention is the float64 reference with those gammas (tests/harness.py).
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch


from devtools import tiny_models as tm
from devtools.sampling import ksample, schedule
from harness import (ReferenceTacaAttention, advanced, call_context, installed_override, rel_diff, run_report, taca,
                     with_override)
from taca.joint_call import parse_joint_call
from taca.attention import JointLayout
from taca.settings import TacaSettings

TOLERANCE = 1e-4  # fp32 model vs the same model with float64 attention
GAMMA_TOL = 1e-5  # a gamma read back from fp32 keys
STEPS = 10
GRID = 4001  # brute-force gammas over [1, gamma_max]
# kind -> joint attention calls per model call of the tiny model, and the blocks the tests pick among them
JOINT_CALLS = {"flux": 4, "sd3": 2}
BLOCKS = {"flux": ("0,2-3", (0, 2, 3)), "sd3": ("1", (1,))}


def expected_gamma(sigma: float, gamma: float, start: float, end: float, ramp: str) -> float:
    """The model call's gamma at ``sigma`` from the node's documented formulas: 1 outside [end, start]; constant:
    gamma; linear / cosine: gamma at start falling to 1 at end, along a line or a half cosine."""
    if not end <= sigma <= start:
        return 1.0
    if ramp == "constant":
        return gamma
    weight = (sigma - end) / (start - end)
    if ramp == "cosine":
        weight = (1.0 - math.cos(math.pi * weight)) / 2.0
    return 1.0 + (gamma - 1.0) * weight


def joint_layout(tiny) -> Tuple[int, Tuple[int, int]]:
    """(joint length, (text start, stop)) of the tiny text-first model at a 16 x 16 latent (as test_sampling reads it)."""
    text = tiny.text_tokens + tiny.register_tokens
    return text + tm.image_tokens(tiny, 16, 16), (0, text)


def as_heads(t: torch.Tensor, heads: int, seq_dim: int) -> torch.Tensor:
    if seq_dim == 2:
        return t
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


class JointSeen:
    """One joint attention call as the spy saw it: its gamma, image-row queries and the model's keys (B, H, n, D)."""

    def __init__(self, sigma: float, gamma: float, q_visual: torch.Tensor, k: torch.Tensor, mask):
        self.sigma, self.gamma, self.q_visual, self.k, self.mask = sigma, gamma, q_visual, k, mask


class GammaSpy:
    """The attention override before TACA's; see the module docstring.  Text-first layouts only."""

    def __init__(self, length: int, text: Tuple[int, int]):
        self.length, self.text = length, text
        self.calls: List[tuple] = []

    def __call__(self, func, *args, **kwargs):
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        seq_dim = 2 if kwargs.get("skip_reshape", False) else 1
        if k.shape[seq_dim] == self.length:
            sigma = float(kwargs["transformer_options"]["sigmas"].max())
            self.calls.append((sigma, q.shape[seq_dim], as_heads(q.detach(), heads, seq_dim).double().clone(),
                               as_heads(k.detach(), heads, seq_dim).double().clone(), kwargs.get("mask")))
        return func(*args, **kwargs)

    def joint_calls(self) -> List[JointSeen]:
        start, stop = self.text
        n_text = stop - start
        seen, i = [], 0
        while i < len(self.calls):
            sigma, rows, q, k, mask = self.calls[i]
            if rows == self.length:  # left alone: one call of every row
                seen.append(JointSeen(sigma, 1.0, q[:, :, stop:], k, mask))
                i += 1
                continue
            assert rows == n_text, rows  # acted on: the text rows first, with the model's keys ...
            sigma_v, rows_v, q_v, k_v, _ = self.calls[i + 1]
            assert rows_v == self.length - n_text and sigma_v == sigma  # ... then the image rows, text keys scaled
            original, scaled = k[:, :, start:stop], k_v[:, :, start:stop]
            gamma = float((original * scaled).sum() / (original * original).sum())
            assert torch.allclose(scaled, gamma * original, rtol=1e-5, atol=1e-6)
            assert torch.equal(k_v[:, :, stop:], k[:, :, stop:])  # image keys untouched
            seen.append(JointSeen(sigma, gamma, q_v, k, mask))
            i += 2
        return seen

    def model_calls(self, per_model_call: int) -> List[Tuple[float, List[JointSeen]]]:
        calls = self.joint_calls()
        assert len(calls) % per_model_call == 0, len(calls)
        out = []
        for first in range(0, len(calls), per_model_call):
            group = calls[first:first + per_model_call]
            assert len({c.sigma for c in group}) == 1
            out.append((group[0].sigma, group))
        return out


# ------------------------------------------------------------------------------------------ window, ramp, blocks

@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("ramp", ["constant", "linear", "cosine"])
def test_window_ramp_and_blocks_give_each_joint_call_its_gamma(pack_nodes, kind, ramp):
    tiny = tm.build(kind)
    gamma, start, end = 1.6, 0.95, 0.4
    blocks_text, blocks = BLOCKS[kind]
    per_call = JOINT_CALLS[kind]
    length, text = joint_layout(tiny)
    sigmas = schedule(tiny.patcher, STEPS)[:-1].tolist()
    inside = [s for s in sigmas if end <= s <= start]
    assert sigmas[0] > start and 3 <= len(inside) < len(sigmas) - 1  # steps before, in and after the window

    patched = advanced(pack_nodes, with_override(tiny.patcher, GammaSpy(length, text)), gamma=gamma, sigma_start=start,
                       sigma_end=end, ramp=ramp, blocks=blocks_text)
    out = ksample(patched, tiny, steps=STEPS)
    seen = installed_override(patched).model_calls(per_call)
    assert [s for s, _ in seen] == pytest.approx(sigmas, abs=1e-6)  # cond and uncond batched: one model call a step

    def expected(sigma: float, index: int) -> float:
        return expected_gamma(sigma, gamma, start, end, ramp) if index in blocks else 1.0

    for sigma, calls in seen:
        assert [c.gamma for c in calls] == pytest.approx([expected(sigma, i) for i in range(per_call)], abs=GAMMA_TOL)
    if ramp != "constant":  # the ramp falls over the window: the gammas of the acting steps differ
        ramped = sorted({round(expected_gamma(s, gamma, start, end, ramp), 6) for s in inside})
        assert len(ramped) == len(inside) and ramped[-1] < gamma

    # the run report names what each setting did
    report = run_report(patched).as_message()
    acting = [i for i, s in enumerate(sigmas) if expected_gamma(s, gamma, start, end, ramp) != 1.0]
    assert report["acted_steps"] == acting
    assert (report["sigma_start"], report["sigma_end"], report["ramp"], report["blocks"]) == (start, end, ramp,
                                                                                              blocks_text)
    assert report["joint_calls_per_model_call"] == per_call and report["acted_blocks"] == list(blocks)
    assert report["blocks_beyond"] == [] and report["blocks_warning"] is None
    assert [e["step"] for e in report["step_gammas"]] == acting
    for entry in report["step_gammas"]:
        assert entry["gammas"] == pytest.approx([expected(entry["sigma"], i) for i in range(per_call)], abs=1e-9)

    reference = ReferenceTacaAttention({length: text}, expected, calls_per_model_call=per_call)
    ref = ksample(with_override(tiny.patcher, reference), tiny, steps=STEPS)
    plain = ksample(tiny.patcher, tiny, steps=STEPS)
    assert rel_diff(out, ref) <= TOLERANCE, (rel_diff(out, ref), rel_diff(plain, ref))
    assert rel_diff(out, plain) > 10 * TOLERANCE


@pytest.mark.parametrize("mode", ["selective", "flex"])
def test_the_other_modes_follow_the_same_schedule(pack_nodes, mode):
    """'selective' (listing 2) and 'flex' with a cosine ramp over blocks, against the reference."""
    tiny = tm.build("flux")
    gamma, start, end = 1.6, 0.95, 0.4
    blocks_text, blocks = BLOCKS["flux"]
    length, text = joint_layout(tiny)

    def expected(sigma: float, index: int) -> float:
        return expected_gamma(sigma, gamma, start, end, "cosine") if index in blocks else 1.0

    out = ksample(advanced(pack_nodes, tiny.patcher, gamma=gamma, sigma_start=start, sigma_end=end, ramp="cosine",
                           blocks=blocks_text, mode=mode), tiny, steps=STEPS)
    reference = ReferenceTacaAttention({length: text}, expected, calls_per_model_call=JOINT_CALLS["flux"],
                                       listing2=(mode == "selective"))
    ref = ksample(with_override(tiny.patcher, reference), tiny, steps=STEPS)
    assert rel_diff(out, ref) <= TOLERANCE


def test_blocks_beyond_the_model_are_named_in_the_report(pack_nodes, caplog):
    tiny = tm.build("flux")  # 4 joint attention calls per model call
    model = advanced(pack_nodes, tiny.patcher, blocks="1,3-9")
    with caplog.at_level(logging.INFO, logger="comfyui-taca"):
        ksample(model, tiny, steps=STEPS)
    report = run_report(model).as_message()
    assert report["acted_blocks"] == [1, 3] and report["blocks_beyond"] == [4, 5, 6, 7, 8, 9]
    warning = "blocks 4-9 name joint attention calls this model does not make: it makes 4 per model call"
    assert report["blocks_warning"].startswith(warning) and report["warning"] is None
    logged = [r for r in caplog.records if r.name == "comfyui-taca" and "TACA acted" in r.getMessage()][-1]
    assert logged.levelno == logging.WARNING and "Blocks 1,3-9: acted on 1,3 of 4" in logged.getMessage()
    assert "Blocks 4-9 name joint attention calls" in logged.getMessage()

    none = advanced(pack_nodes, tiny.patcher, blocks="60-70")
    ksample(none, tiny, steps=STEPS)
    report = run_report(none).as_message()
    assert report["acted_blocks"] == []
    assert report["warning"].startswith("TACA never acted: blocks 60-70 name joint attention calls this model does "
                                        "not make: it makes 4 per model call")


# ------------------------------------------------------------------------------------------ adaptive gamma

def brute_shares(q_visual: torch.Tensor, k: torch.Tensor, text: Tuple[int, int], gammas: Sequence[float],
                 mask: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Mean image-to-text share (over heads, image rows, then batch entries) per gamma: the full float64 softmax
    of the image rows over every key, eq. 10's gamma on the text logits, the additive mask after it."""
    start, stop = text
    q_visual, k = q_visual.double(), k.double()
    logits = torch.matmul(q_visual, k.transpose(-1, -2)) * (scale or 1.0 / math.sqrt(q_visual.shape[-1]))
    out = []
    for g in gammas:
        scaled = logits.clone()
        scaled[..., start:stop] *= g
        if mask is not None:
            scaled = scaled + mask
        probs = torch.softmax(scaled, dim=-1)
        out.append(probs[..., start:stop].sum(-1).mean(dim=(1, 2)).mean())
    return torch.stack(out)


def brute_gamma(q_visual, k, text, target: float, gamma_max: float, mask=None) -> Tuple[float, float, List[float]]:
    """(gamma, share, shares on the grid): the grid gamma in [1, gamma_max] whose share is closest to ``target``;
    1 when the share at 1 already reaches it."""
    grid = torch.linspace(1.0, gamma_max, GRID, dtype=torch.float64).tolist()
    shares = brute_shares(q_visual, k, text, grid, mask).tolist()
    if shares[0] >= target:
        return 1.0, shares[0], shares
    best = min(range(GRID), key=lambda i: abs(shares[i] - target))
    return grid[best], shares[best], shares


def check_chosen(chosen: float, q_visual, k, text, target: float, gamma_max: float, mask=None) -> str:
    """The chosen gamma against the brute force; returns which case it was ('one', 'reached', 'out of reach')."""
    spacing = (gamma_max - 1.0) / (GRID - 1)
    best, best_share, shares = brute_gamma(q_visual, k, text, target, gamma_max, mask)
    if shares[0] >= target:
        assert chosen == 1.0
        return "one"
    (achieved,) = brute_shares(q_visual, k, text, [chosen], mask).tolist()
    # as close to the target as the best grid gamma (the search stops within 1e-4 of the gamma)
    assert abs(achieved - target) <= abs(best_share - target) + 1e-4
    crossings = sum(1 for a, b in zip(shares, shares[1:]) if (a - target) * (b - target) <= 0)
    if abs(best_share - target) <= 1e-3 and crossings == 1:
        assert abs(chosen - best) <= spacing + 1e-4, (chosen, best)
        return "reached"
    if abs(best_share - target) > 1e-3:  # out of reach: the peak of the share
        assert abs(chosen - best) <= spacing + 2e-3, (chosen, best)
        assert achieved >= max(shares) - 1e-6
        return "out of reach"
    return "reached"


@pytest.mark.parametrize("seed", range(6))
def test_adaptive_gamma_equals_a_brute_force_search_on_random_calls(seed):
    """The joint call's gamma (``CallContext.joint_gamma``) on random q, k, text span and mask."""
    g = torch.Generator().manual_seed(seed)
    b, h, n, d, n_text = 2, 2, 48, 8, 10
    q = torch.randn(b, h, n, d, generator=g) * (1.0 + seed * 0.4)
    k = torch.randn(b, h, n, d, generator=g)
    v = torch.randn(b, h, n, d, generator=g)
    start = 0 if seed % 2 == 0 else 17
    span = JointLayout(start, start + n_text, n)
    mask = None
    if seed >= 3:  # key padding: each batch entry masks some text keys and some image keys
        mask = torch.zeros(b, 1, 1, n)
        mask[0, ..., start + 7:start + n_text] = -math.inf
        mask[1, ..., n - 5:] = -math.inf
    gamma_max = 3.0
    at_one = float(brute_shares(q[:, :, [i for i in range(n) if not start <= i < start + n_text]], k,
                                (start, start + n_text), [1.0], mask)[0])
    cases = set()
    for target in (at_one * 0.8, at_one + 0.05, at_one + 0.2, 0.97):
        settings = TacaSettings(gamma_max, 0.0, "exact", 1.0, "constant", (), min(target, 0.99))
        context = call_context(settings, [span], gamma_max)
        call = parse_joint_call((q, k, v, h), {"mask": mask, "skip_reshape": True}, context.layouts)
        chosen = context.joint_gamma(0, call)
        visual = [i for i in range(n) if not start <= i < start + n_text]
        cases.add(check_chosen(chosen, q[:, :, visual], k, (start, start + n_text), min(target, 0.99), gamma_max,
                               mask))
    assert "one" in cases and len(cases) >= 2, cases


def test_adaptive_gamma_in_a_sampling_run(pack_nodes):
    """Each joint call's gamma equals the brute-force search on the queries and keys the call really had, and the
    sampled output equals the float64 reference with those gammas."""
    tiny = tm.build("flux")
    per_call = JOINT_CALLS["flux"]
    length, text = joint_layout(tiny)
    gamma_max, start, end = 3.0, 1.0, 0.5
    sigmas = schedule(tiny.patcher, STEPS)[:-1].tolist()
    # a target between the calls' shares at gamma 1, so some calls keep 1 and the others adapt
    plain_spy = with_override(tiny.patcher, GammaSpy(length, text))
    ksample(plain_spy, tiny, steps=STEPS)
    shares = sorted(float(brute_shares(c.q_visual, c.k, text, [1.0])[0]) for c in installed_override(plain_spy).joint_calls()
                    if c.sigma >= end)
    target = round(shares[len(shares) // 2], 4)

    patched = advanced(pack_nodes, with_override(tiny.patcher, GammaSpy(length, text)), gamma=gamma_max,
                       sigma_start=start, sigma_end=end, target_share=target)
    out = ksample(patched, tiny, steps=STEPS)
    seen = installed_override(patched).model_calls(per_call)
    report = run_report(patched).as_message()
    chosen = {(round(e["sigma"], 6), i): g for e in report["step_gammas"] for i, g in enumerate(e["gammas"])}
    cases = []
    for sigma, calls in seen:
        for i, call in enumerate(calls):
            if not end <= sigma <= start:
                assert call.gamma == 1.0
                continue
            assert call.mask is None
            assert call.gamma == pytest.approx(chosen[(round(sigma, 6), i)], abs=GAMMA_TOL)
            cases.append(check_chosen(chosen[(round(sigma, 6), i)], call.q_visual, call.k, text, target, gamma_max))
    assert "one" in cases and ("reached" in cases or "out of reach" in cases), cases
    assert report["target_share"] == target

    def table(sigma: float, index: int) -> float:
        return chosen.get((round(sigma, 6), index), 1.0)

    reference = ReferenceTacaAttention({length: text}, table, calls_per_model_call=per_call)
    ref = ksample(with_override(tiny.patcher, reference), tiny, steps=STEPS)
    assert rel_diff(out, ref) <= TOLERANCE
    assert len([s for s in sigmas if end <= s <= start]) == len(report["step_gammas"])


# ------------------------------------------------------------------------------------------ defaults, bad inputs

@pytest.mark.parametrize("mode", ["exact", "selective", "flex"])
def test_default_inputs_are_the_simple_node_bit_for_bit(pack_nodes, mode):
    tiny = tm.build("flux")
    simple = ksample(taca(pack_nodes, tiny.patcher, mode=mode), tiny, steps=STEPS)
    adv = ksample(advanced(pack_nodes, tiny.patcher, mode=mode), tiny, steps=STEPS)
    assert torch.equal(simple, adv)
    assert not torch.equal(simple, ksample(tiny.patcher, tiny, steps=STEPS))


def test_default_inputs_give_the_simple_nodes_settings_and_schema(pack_nodes):
    simple = pack_nodes["TACAPatchModel"].INPUT_TYPES()["required"]
    adv = pack_nodes["TACAPatchModelAdvanced"].INPUT_TYPES()["required"]
    assert list(adv) == ["model", "gamma", "sigma_start", "sigma_end", "ramp", "blocks", "target_share", "mode"]
    assert adv["mode"] == simple["mode"]
    for key in ("default", "min", "max", "step"):
        assert adv["gamma"][1][key] == simple["gamma"][1][key]
        assert adv["sigma_end"][1][key] == simple["threshold_sigma"][1][key]
    assert (adv["sigma_start"][1]["default"], adv["ramp"][1]["default"], adv["blocks"][1]["default"],
            adv["target_share"][1]["default"]) == (1.0, "constant", "", 0.0)
    assert "57" in adv["blocks"][1]["tooltip"] and "help page" in adv["blocks"][1]["tooltip"]
    defaults = TacaSettings.from_advanced_inputs(1.2, 1.0, 0.97, "constant", "", 0.0, "exact")
    assert defaults.gamma_at(1.0) == defaults.gamma_at(0.97) == 1.2 and defaults.gamma_at(0.969) == 1.0
    assert not defaults.adaptive and defaults.acts_on_block(56)


@pytest.mark.parametrize("inputs,words", [
    ({"sigma_start": 0.5, "sigma_end": 0.8}, ["sigma_end=0.8", "above sigma_start=0.5", "Swap"]),
    ({"sigma_start": 1.5}, ["sigma_start=1.5", "out of range"]),
    ({"sigma_end": -0.1}, ["sigma_end=-0.1", "out of range"]),
    ({"blocks": "0-9,x"}, ["'x' is not a block index", "0-9,15"]),
    ({"blocks": "9-2"}, ["runs backwards"]),
    ({"blocks": "0-5000"}, ["5000 is above 1023"]),
    ({"target_share": -0.1}, ["target_share=-0.1", "out of range"]),
    ({"target_share": 1.0}, ["target_share=1.0", "0.99"]),
    ({"target_share": float("nan")}, ["target_share=nan"]),
    ({"ramp": "square"}, ["unknown ramp 'square'", "constant, linear, cosine"]),
    ({"mode": "fast"}, ["unknown mode 'fast'"]),
    ({"gamma": 0.0}, ["gamma=0.0"]),
])
def test_bad_inputs_are_refused_with_a_clear_error(pack_nodes, inputs, words):
    tiny = tm.build("flux")
    options_before = repr(tiny.patcher.model_options)
    with pytest.raises(ValueError) as err:
        advanced(pack_nodes, tiny.patcher, **inputs)
    for word in words:
        assert word in str(err.value)
    assert repr(tiny.patcher.model_options) == options_before
