"""The per-run report of what TACA did (log line and websocket message), checked against independent counts."""

import logging

import pytest

from devtools import tiny_models as tm
from devtools.sampling import ksample, schedule
from harness import taca


def last_report(caplog):
    records = [r for r in caplog.records if r.name == "comfyui-taca" and ("TACA acted" in r.getMessage()
                                                                         or "never acted" in r.getMessage())]
    return records[-1].getMessage() if records else None


@pytest.mark.parametrize("kind,joint_layers", [("flux", 4), ("sd35_medium", 2)])
def test_report_names_the_taca_steps_and_counts_joint_attention_calls(pack_nodes, caplog, kind, joint_layers):
    tiny = tm.build(kind)
    model = taca(pack_nodes, tiny.patcher)
    with caplog.at_level(logging.INFO, logger="comfyui-taca"):
        ksample(model, tiny, steps=30, cfg=3.0)
    expected_steps = [i for i, s in enumerate(schedule(tiny.patcher, 30)[:-1].tolist()) if s >= 0.97]
    message = last_report(caplog)
    # cond+uncond are batched: one model call per step; every joint layer is one attention call.
    assert message.startswith(f"[node None] TACA acted on steps {', '.join(map(str, expected_steps))} of 30")
    assert f": {joint_layers * len(expected_steps)} joint attention calls in {len(expected_steps)} of 30 model calls" \
        in message


def test_report_warns_when_the_run_starts_below_the_threshold(pack_nodes, caplog):
    tiny = tm.build("flux")
    with caplog.at_level(logging.INFO, logger="comfyui-taca"):
        ksample(taca(pack_nodes, tiny.patcher), tiny, steps=30, start_step=5)
    message = last_report(caplog)
    assert "never acted" in message and "below threshold_sigma 0.97" in message
    assert "started at sigma 0.9" in message


def test_report_warns_when_gamma_is_one(pack_nodes, caplog):
    tiny = tm.build("sd3")
    with caplog.at_level(logging.INFO, logger="comfyui-taca"):
        ksample(taca(pack_nodes, tiny.patcher, gamma=1.0), tiny, steps=4)
    assert "gamma is 1.0" in last_report(caplog)


class ImportRecorder:
    """A meta-path finder that only records which top-level modules something tried to import."""

    def __init__(self):
        self.names = []

    def find_spec(self, name, path=None, target=None):
        self.names.append(name)
        return None


def test_report_without_a_server_does_not_try_to_import_one(pack_nodes, monkeypatch):
    """In a script there is no ComfyUI server: the report must not attempt `import server` per run
    (it fails part-way there and recompiled server.py on every run, 21 ms each)."""
    import sys

    tiny = tm.build("flux")
    model = taca(pack_nodes, tiny.patcher)
    monkeypatch.delitem(sys.modules, "server", raising=False)
    recorder = ImportRecorder()
    monkeypatch.setattr(sys, "meta_path", [recorder] + sys.meta_path)
    ksample(model, tiny, steps=2)
    assert "server" not in recorder.names


@pytest.mark.skipif(not tm.available("cogvideox"), reason="CogVideoX is newer than this ComfyUI")
def test_report_on_a_discrete_time_model_speaks_of_its_timesteps(pack_nodes, caplog):
    """CogVideoX: the report names the steps whose t/1000 (the model's own timestep of the sigma) is >= 0.97, on
    that scale, and a run that starts below it says where it started on both scales."""
    import comfy.samplers
    import torch
    from comfy_extras.nodes_void import VOID_DDIM

    from devtools.sampling import sample_sigmas

    tiny = tm.build("cogvideox")
    positive, negative = tm.family_conditioning(tiny, 1), tm.family_conditioning(tiny, 2)
    latent = tm.family_latent(tiny)
    model_sampling = tiny.patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "simple", 20).cpu()
    timesteps = [int(model_sampling.timestep(torch.tensor([s])).item()) for s in sigmas[:-1].tolist()]
    expected = [i for i, t in enumerate(timesteps) if t >= 970]
    model = taca(pack_nodes, tiny.patcher)
    with caplog.at_level(logging.INFO, logger="comfyui-taca"):
        sample_sigmas(model, positive, negative, latent, sigmas, cfg=3.0, sampler=VOID_DDIM())
    assert last_report(caplog).startswith(
        f"[node None] TACA acted on steps {', '.join(map(str, expected))} of 20 (t/1000 >= 0.97")
    with caplog.at_level(logging.INFO, logger="comfyui-taca"):
        sample_sigmas(model, positive, negative, latent, sigmas[1:], cfg=3.0, sampler=VOID_DDIM())
    message = last_report(caplog)
    assert "never acted" in message
    assert f"the run started at t/1000 = {timesteps[1] / 1000:.3f} (sigma {float(sigmas[1]):.3f})" in message
